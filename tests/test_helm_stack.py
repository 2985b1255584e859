"""The chart against the real API server (tests/stack): every rendered object is
accepted by a server-side dry-run, the RBAC, applied for real, lets the
operator's ServiceAccount do exactly its job, and `helm install` works the ways
docs/install.md says (CRDs applied with kubectl first; several releases on
disjoint namespaces), running the doc's commands as written, and refuses
conflicting releases with the value to change.

ServiceMonitor and PrometheusRule are left out of the dry-run: the test API
server has no Prometheus Operator CRDs (promtool checks the rules instead,
tests/test_alerts_rules.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from stack import (
    KubeAPIServer,
    StackError,
    create_namespace,
    service_account_token,
    start_kube_apiserver,
    unique_name,
    wait_until_established,
)

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "batchpilot"
ALL_ON_VALUES = CHART / "ci" / "all-on-values.yaml"
CRD_NAME = "inferencepolicies.batchpilot.dev"
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
GATE_TOKEN_SECRET = "gate-token"
# RBAC changes reach the authorizer's cache within about a second.
RBAC_PROPAGATION_TIMEOUT_S = 15.0


def helm_template(helm: Path, release: str, namespace: str, *args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(helm), "template", release, str(CHART), "--namespace", namespace, *args],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kubectl_apply(kubectl: Path, kube_api: KubeAPIServer, docs: list[dict[str, Any]],
                  *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(kubectl), "--kubeconfig", str(kube_api.kubeconfig), "apply", "--server-side",
         "--force-conflicts", "--field-manager=batchpilot-chart-test", *extra, "-f", "-"],
        input=yaml.safe_dump_all(docs), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "value_args",
    [[], ["-f", str(ALL_ON_VALUES)]],
    ids=["default", "all-on"],
)
def test_rendered_chart_passes_server_side_dry_run(
    helm: Path, kubectl: Path, kube_api: KubeAPIServer, namespace: str, value_args: list[str]
) -> None:
    if value_args:
        # all-on watches two namespaces that do not exist here: watch this one.
        value_args = [*value_args, "--set", f"watchNamespaces={{{namespace}}}"]
    docs = helm_template(helm, "batchpilot", namespace, *value_args)
    applied = [doc for doc in docs if doc["kind"] not in PROMETHEUS_OPERATOR_KINDS]
    assert len(applied) >= 7

    result = kubectl_apply(kubectl, kube_api, applied, "--dry-run=server")

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("serverside-applied (server dry run)") == len(applied), result.stdout


# --- RBAC, applied for real ------------------------------------------------------------


@dataclass
class Installed:
    """The chart's RBAC and CRD applied for real, and the operator's identity."""

    watched: str  # the namespace the operator runs in and works in
    other: str  # a namespace it must not touch when watchNamespaces is set
    cluster_wide: bool
    operator: client.ApiClient  # authenticated as the chart's ServiceAccount


@pytest.fixture(scope="module", params=["cluster-wide", "namespaced"])
def installed(
    request: pytest.FixtureRequest, helm: Path, kubectl: Path, kube_api: KubeAPIServer,
    k8s_client: client.ApiClient,
) -> Iterator[Installed]:
    cluster_wide = request.param == "cluster-wide"
    watched, other = unique_name("rbac-watched"), unique_name("rbac-other")
    for name in (watched, other):
        create_namespace(k8s_client, name)
    release = unique_name("rbac")[:20]
    args = ["--set", f"rbac.gateTokenSecretNames={{{GATE_TOKEN_SECRET}}}"]
    if not cluster_wide:
        args += ["--set", f"watchNamespaces={{{watched}}}"]
    docs = helm_template(helm, release, watched, *args)
    rbac_and_crd = [doc for doc in docs if doc["kind"] in RBAC_KINDS | {"CustomResourceDefinition"}]
    result = kubectl_apply(kubectl, kube_api, rbac_and_crd)
    assert result.returncode == 0, result.stderr
    wait_until_established(k8s_client, CRD_NAME)
    _seed_objects(k8s_client, watched, other)

    (account,) = [doc["metadata"]["name"] for doc in docs if doc["kind"] == "ServiceAccount"]
    token = service_account_token(k8s_client, watched, account)
    with kube_api.api_client(token) as operator:
        yield Installed(watched=watched, other=other, cluster_wide=cluster_wide, operator=operator)

    core, rbac = client.CoreV1Api(k8s_client), client.RbacAuthorizationV1Api(k8s_client)
    selector = f"app.kubernetes.io/instance={release}"
    for role in rbac.list_cluster_role_binding(label_selector=selector).items:
        rbac.delete_cluster_role_binding(role.metadata.name)
    for role in rbac.list_cluster_role(label_selector=selector).items:
        rbac.delete_cluster_role(role.metadata.name)
    for name in (watched, other):
        core.delete_namespace(name)


def _seed_objects(admin: client.ApiClient, watched: str, other: str) -> None:
    """What a cluster holds when the operator starts: serving pods, policies, Secrets."""
    core = client.CoreV1Api(admin)
    for namespace in (watched, other):
        core.create_namespaced_pod(namespace, client.V1Pod(
            metadata=client.V1ObjectMeta(name="llm-0", labels={"app": "llm"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="engine", image="engine:test")])))
        for secret in (GATE_TOKEN_SECRET, "database-password"):
            core.create_namespaced_secret(namespace, client.V1Secret(
                metadata=client.V1ObjectMeta(name=secret), string_data={"token": "t"}))
        client.CustomObjectsApi(admin).create_namespaced_custom_object(
            "batchpilot.dev", "v1alpha1", namespace, "inferencepolicies",
            {"apiVersion": "batchpilot.dev/v1alpha1", "kind": "InferencePolicy",
             "metadata": {"name": "chat"},
             "spec": {"selector": {"matchLabels": {"app": "llm"}}, "slo": {"ttftMs": 2000, "tpotMs": 50}}})


def _allowed(operator: client.ApiClient, verb: str, resource: str, namespace: str | None,
             group: str = "", subresource: str = "", name: str = "") -> bool:
    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
        resource_attributes=client.V1ResourceAttributes(
            verb=verb, group=group, resource=resource, subresource=subresource or None,
            name=name or None, namespace=namespace)))
    answer = client.AuthorizationV1Api(operator).create_self_subject_access_review(review)
    return bool(answer.status.allowed)


def _eventually_allowed(operator: client.ApiClient, namespace: str) -> None:
    deadline = time.monotonic() + RBAC_PROPAGATION_TIMEOUT_S
    while not _allowed(operator, "list", "pods", namespace):
        if time.monotonic() > deadline:
            pytest.fail(f"the operator's RBAC did not take effect within {RBAC_PROPAGATION_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


# (verb, group, resource, subresource, name, where, allowed in cluster-wide mode, allowed namespaced)
# where: "watched", "other", or "cluster" (cluster-scoped).
ACCESS_TABLE = [
    ("list", "", "pods", "", "", "watched", True, True),
    ("watch", "", "pods", "", "", "watched", True, True),
    ("patch", "", "pods", "", "llm-0", "watched", True, True),
    ("delete", "", "pods", "", "llm-0", "watched", False, False),
    ("create", "", "pods", "", "", "watched", False, False),
    ("update", "", "pods", "", "llm-0", "watched", False, False),
    ("list", "", "pods", "", "", "other", True, False),
    ("patch", "batchpilot.dev", "inferencepolicies", "status", "chat", "watched", True, True),
    ("patch", "batchpilot.dev", "inferencepolicies", "", "chat", "watched", True, True),
    ("watch", "batchpilot.dev", "inferencepolicies", "", "", "watched", True, True),
    ("delete", "batchpilot.dev", "inferencepolicies", "", "chat", "watched", False, False),
    ("update", "batchpilot.dev", "inferencepolicies", "", "chat", "watched", False, False),
    ("patch", "batchpilot.dev", "inferencepolicies", "status", "chat", "other", True, False),
    ("get", "", "secrets", "", GATE_TOKEN_SECRET, "watched", True, True),
    ("get", "", "secrets", "", "database-password", "watched", False, False),
    ("list", "", "secrets", "", "", "watched", False, False),
    ("get", "", "secrets", "", GATE_TOKEN_SECRET, "other", True, False),
    ("create", "", "events", "", "", "watched", True, True),
    ("create", "events.k8s.io", "events", "", "", "watched", True, True),
    ("get", "apps", "deployments", "", "llm", "watched", True, True),
    ("patch", "apps", "deployments", "", "llm", "watched", False, False),
    ("list", "apiextensions.k8s.io", "customresourcedefinitions", "", "", "cluster", True, True),
    ("watch", "apiextensions.k8s.io", "customresourcedefinitions", "", "", "cluster", True, True),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions", "", "", "cluster", False, False),
    ("list", "", "namespaces", "", "", "cluster", False, True),
    # Leader election's Leases: in the release's namespace only (here the
    # watched one), never deleted.
    ("create", "coordination.k8s.io", "leases", "", "", "watched", True, True),
    ("update", "coordination.k8s.io", "leases", "", "batchpilot", "watched", True, True),
    ("delete", "coordination.k8s.io", "leases", "", "batchpilot", "watched", False, False),
    ("create", "coordination.k8s.io", "leases", "", "", "other", False, False),
    ("update", "coordination.k8s.io", "leases", "", "batchpilot", "other", False, False),
]


@pytest.mark.parametrize(
    ("verb", "group", "resource", "subresource", "name", "where", "cluster_wide_ok", "namespaced_ok"),
    ACCESS_TABLE,
    ids=[f"{row[0]}-{row[2]}{'-' + row[3] if row[3] else ''}-{row[4] or 'any'}-{row[5]}"
         for row in ACCESS_TABLE],
)
def test_operator_identity_can_do_its_job_and_no_more(
    installed: Installed, verb: str, group: str, resource: str, subresource: str, name: str,
    where: str, cluster_wide_ok: bool, namespaced_ok: bool,
) -> None:
    _eventually_allowed(installed.operator, installed.watched)
    namespace = {"watched": installed.watched, "other": installed.other, "cluster": None}[where]
    expected = cluster_wide_ok if installed.cluster_wide else namespaced_ok
    assert _allowed(installed.operator, verb, resource, namespace, group, subresource, name) is expected


def _status_of(call: Callable[[], object]) -> int:
    try:
        call()
    except ApiException as error:
        return int(error.status)
    return 200


def test_real_calls_succeed_or_get_403(installed: Installed) -> None:
    _eventually_allowed(installed.operator, installed.watched)
    core = client.CoreV1Api(installed.operator)
    policies = client.CustomObjectsApi(installed.operator)
    ns = installed.watched

    pods = core.list_namespaced_pod(ns)
    assert [pod.metadata.name for pod in pods.items] == ["llm-0"]
    patched = policies.patch_namespaced_custom_object_status(
        "batchpilot.dev", "v1alpha1", ns, "inferencepolicies", "chat",
        {"status": {"observedGeneration": 1, "mode": "Recommend"}})
    assert patched["status"]["mode"] == "Recommend"
    assert core.read_namespaced_secret(GATE_TOKEN_SECRET, ns).data["token"]

    assert _status_of(lambda: core.delete_namespaced_pod("llm-0", ns)) == 403
    assert _status_of(lambda: core.read_namespaced_secret("database-password", ns)) == 403
    assert _status_of(lambda: core.list_namespaced_secret(ns)) == 403
    other_pods = _status_of(lambda: core.list_namespaced_pod(installed.other))
    assert other_pods == (200 if installed.cluster_wide else 403)


# --- helm install: who owns the CRD, several releases ----------------------------------
# Each test gets an API server of its own: a CRD is cluster-wide, and the
# session's kube_api holds the CRD that other tests applied without Helm.

INSTALL_DOC = REPO / "docs" / "install.md"
OWNERSHIP_SECTION = "### CRDs installed with kubectl, and several releases"
# The docs' placeholders, and what the tests type instead (an image reference
# is never pulled: the test API server runs no pods).
PLACEHOLDERS = {"<your-registry>": "registry.example"}


def doc_block(section: str, first_command: str) -> str:
    """The ```bash block of docs/install.md's `section` that starts with
    `first_command`, placeholders filled in: what a user would paste."""
    blocks: list[str] = []
    in_section = False
    fence: tuple[str, list[str]] | None = None  # the open code block's language and lines
    for line in INSTALL_DOC.read_text().splitlines(keepends=True):
        if fence is not None:
            if not line.startswith("```"):
                fence[1].append(line)
                continue
            if fence[0] == "bash" and in_section:
                blocks.append("".join(fence[1]))
            fence = None
        elif line.startswith("```"):
            fence = (line[3:].strip(), [])
        elif line.startswith("#"):  # a heading: a `# comment` inside a block never gets here
            in_section = line.strip() == section
    matching = [block for block in blocks if block.startswith(first_command)]
    assert len(matching) == 1, f"expected one bash block starting {first_command!r} in {section!r}"
    (block,) = matching
    for placeholder, value in PLACEHOLDERS.items():
        block = block.replace(placeholder, value)
    return block


@dataclass
class Cluster:
    """An API server with no CRD, and a shell whose helm and kubectl talk to it."""

    api: KubeAPIServer
    tools: Path  # the directory holding dev-setup's helm and kubectl

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.api.kubeconfig),
            "PATH": f"{self.tools}{os.pathsep}{os.environ['PATH']}",
        }
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def ok(self, script: str) -> str:
        result = self.sh(script)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def releases(self) -> dict[str, str]:
        """{name: status} of every release in the cluster."""
        return {
            release["name"]: release["status"]
            for release in json.loads(self.ok("helm list --all-namespaces -o json"))
        }

    def crd_owner(self) -> str | None:
        with self.api.api_client() as admin:
            crd = client.ApiextensionsV1Api(admin).read_custom_resource_definition(CRD_NAME)
        return (crd.metadata.annotations or {}).get("meta.helm.sh/release-name")


def _start_cluster(workdir: Path, helm: Path, kubectl: Path) -> Cluster:
    assert helm.parent == kubectl.parent  # one directory on PATH serves both
    try:
        return Cluster(api=start_kube_apiserver(workdir), tools=helm.parent)
    except StackError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def empty_cluster(tmp_path: Path, helm: Path, kubectl: Path) -> Iterator[Cluster]:
    cluster = _start_cluster(tmp_path, helm, kubectl)
    yield cluster
    cluster.api.stop()


@pytest.fixture(scope="module")
def two_teams(
    tmp_path_factory: pytest.TempPathFactory, helm: Path, kubectl: Path
) -> Iterator[Cluster]:
    """The docs' two releases, each watching its team's namespace; and team-c,
    an empty namespace for the mistakes below."""
    cluster = _start_cluster(tmp_path_factory.mktemp("two-teams"), helm, kubectl)
    cluster.ok(doc_block(OWNERSHIP_SECTION, "kubectl create namespace team-a"))
    cluster.ok("kubectl create namespace team-c")
    yield cluster
    cluster.api.stop()


def test_crds_applied_with_kubectl_then_the_chart_as_documented(empty_cluster: Cluster) -> None:
    documented = doc_block(OWNERSHIP_SECTION, "kubectl apply -f crds/")
    assert "--set crds.enabled=false" in documented
    empty_cluster.ok("kubectl apply -f crds/")

    # What the user typed: the chart's defaults. Refused before Helm
    # writes anything, with the value to set instead of "invalid ownership metadata".
    without_the_value = documented.replace("kubectl apply -f crds/\n", "").replace(
        "--set crds.enabled=false", ""
    )
    refused = empty_cluster.sh(without_the_value)
    assert refused.returncode != 0
    assert (
        f"CustomResourceDefinition {CRD_NAME} already exists and belongs to no Helm release"
        in refused.stderr
    )
    assert "install this release with --set crds.enabled=false" in refused.stderr
    assert f'docs/install.md, "{OWNERSHIP_SECTION.lstrip("# ")}"' in refused.stderr
    assert empty_cluster.releases() == {}

    empty_cluster.ok(documented)

    assert empty_cluster.releases() == {"batchpilot": "deployed"}
    assert empty_cluster.crd_owner() is None  # still kubectl's: the chart left it alone
    manifest = empty_cluster.ok("helm get manifest batchpilot -n batchpilot-system")
    assert "kind: CustomResourceDefinition" not in manifest
    # The documented upgrade path: the CRD again with kubectl, then the chart.
    empty_cluster.ok(
        "kubectl apply -f crds/\n"
        "helm upgrade batchpilot ./helm/batchpilot -n batchpilot-system --reuse-values"
    )
    # This release watches every namespace, so a namespaced one would overlap it.
    empty_cluster.ok("kubectl create namespace team-a")
    overlapping = empty_cluster.sh(
        "helm install team-a ./helm/batchpilot -n team-a "
        "--set crds.enabled=false --set 'watchNamespaces={team-a}'"
    )
    assert overlapping.returncode != 0
    assert (
        "Helm release batchpilot in namespace batchpilot-system already watches every namespace"
        in overlapping.stderr
    )
    assert empty_cluster.releases() == {"batchpilot": "deployed"}


def test_several_releases_with_disjoint_namespaces_as_documented(two_teams: Cluster) -> None:
    assert two_teams.releases() == {
        "batchpilot-team-a": "deployed",
        "batchpilot-team-b": "deployed",
    }
    assert two_teams.crd_owner() == "batchpilot-team-a"
    assert "kind: CustomResourceDefinition" not in two_teams.ok(
        "helm get manifest batchpilot-team-b -n team-b"
    )
    with two_teams.api.api_client() as admin:
        rbac = client.RbacAuthorizationV1Api(admin)
        selector = "app.kubernetes.io/part-of=batchpilot"
        roles = {
            (role.metadata.namespace, role.metadata.name)
            for role in rbac.list_role_for_all_namespaces(label_selector=selector).items
        }
        cluster_roles = {
            role.metadata.name for role in rbac.list_cluster_role(label_selector=selector).items
        }
    # Each release's work Role in its team's namespace, and its leader
    # election's Role in its own namespace (here the same one).
    assert roles == {
        ("team-a", "batchpilot-team-a"),
        ("team-b", "batchpilot-team-b"),
        ("team-a", "batchpilot-team-a-leader-election"),
        ("team-b", "batchpilot-team-b-leader-election"),
    }
    # Cluster-wide, only what kopf's discovery needs; no cluster-wide work rules.
    assert cluster_roles == {"batchpilot-team-a-discovery", "batchpilot-team-b-discovery"}
    # A release's own CRD, ClusterRole and Roles never count as someone else's.
    for team in ("team-a", "team-b"):
        two_teams.ok(f"helm upgrade batchpilot-{team} ./helm/batchpilot -n {team} --reuse-values")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            "helm install batchpilot-team-c ./helm/batchpilot -n team-c --set 'watchNamespaces={team-c}'",
            f"crds.enabled=true, but CustomResourceDefinition {CRD_NAME} already exists and belongs "
            "to Helm release batchpilot-team-a in namespace team-a. One installation owns the CRD and "
            "every other release uses it: install this release with --set crds.enabled=false",
        ),
        (
            "helm install batchpilot-team-a ./helm/batchpilot -n team-c --set crds.enabled=false "
            "--set 'watchNamespaces={team-c}'",
            "ClusterRole batchpilot-team-a-discovery already exists and belongs to Helm release "
            "batchpilot-team-a in namespace team-a: cluster-scoped objects are named after the "
            "release, so give this release another name",
        ),
        (
            "helm install batchpilot-team-c ./helm/batchpilot -n team-c --set crds.enabled=false "
            "--set 'watchNamespaces={team-c,team-b}'",
            "watchNamespaces: namespace team-b is already watched by another batchpilot installation "
            "(its Role batchpilot-team-b belongs to Helm release batchpilot-team-b in namespace team-b)",
        ),
        (
            "helm install batchpilot-all ./helm/batchpilot -n team-c --set crds.enabled=false",
            "watchNamespaces is empty, so this release would watch every namespace, but namespace "
            "team-a is already watched by another batchpilot installation",
        ),
    ],
    ids=[
        "crd-owned-by-another-release",
        "release-name-taken",
        "namespace-overlap",
        "cluster-wide-beside-namespaced",
    ],
)
def test_a_conflicting_release_is_refused_with_the_value_to_change(
    two_teams: Cluster, command: str, message: str
) -> None:
    before = two_teams.releases()
    result = two_teams.sh(command)
    assert result.returncode != 0
    assert message in result.stderr
    assert "invalid ownership metadata" not in result.stderr
    assert two_teams.releases() == before  # refused while rendering: nothing was written


def test_uninstalling_the_crd_owner_leaves_the_crd_to_the_others(empty_cluster: Cluster) -> None:
    empty_cluster.ok(doc_block(OWNERSHIP_SECTION, "kubectl create namespace team-a"))
    empty_cluster.ok("helm uninstall batchpilot-team-a -n team-a")
    assert empty_cluster.crd_owner() == "batchpilot-team-a"  # kept (crds.keep), as it was
    empty_cluster.ok("helm upgrade batchpilot-team-b ./helm/batchpilot -n team-b --reuse-values")
    assert empty_cluster.releases() == {"batchpilot-team-b": "deployed"}
