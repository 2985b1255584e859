"""The chart against the real API server (tests/stack): every rendered object is
accepted by a server-side dry-run, and the RBAC, applied for real, lets the
operator's ServiceAccount do exactly its job.

ServiceMonitor and PrometheusRule are left out of the dry-run: the test API
server has no Prometheus Operator CRDs (promtool checks the rules instead,
tests/test_alerts_rules.py).
"""

from __future__ import annotations

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
from stack import KubeAPIServer, create_namespace, service_account_token, unique_name

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "batchpilot"
ALL_ON_VALUES = CHART / "ci" / "all-on-values.yaml"
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
    subprocess.run([str(kubectl), "--kubeconfig", str(kube_api.kubeconfig), "wait",
                    "--for=condition=Established", "crd/inferencepolicies.batchpilot.dev",
                    "--timeout=30s"], check=True, capture_output=True, timeout=60)
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
    ("create", "coordination.k8s.io", "leases", "", "", "watched", False, False),
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
