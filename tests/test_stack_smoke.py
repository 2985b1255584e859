"""Smoke tests proving each part of the local stack is the real thing: the
apiserver validates, stores and authorizes; Prometheus scrapes and answers
PromQL; kubectl and helm talk to the apiserver."""

from __future__ import annotations

import copy
import json
import random
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import stack
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_api_client import PrometheusConnect
from prometheus_client import CollectorRegistry, Gauge, start_http_server

import batchpilot.sim.sandbox.process as sandbox_process
import batchpilot.sim.sandbox.prometheus as sandbox_prometheus

REPO = Path(__file__).resolve().parent.parent
# RBAC decisions and new scrapes show up within about a second; waits give up after this.
EVENTUALLY_TIMEOUT_S = 15.0


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + EVENTUALLY_TIMEOUT_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {EVENTUALLY_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def widget_crd(group: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["replicas"],
                                    "properties": {"replicas": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture
def crd_group() -> str:
    # CRDs are cluster-wide and the apiserver lives for the whole session.
    return f"{stack.unique_name('smoke')}.batchpilot.dev"


# -- tools and guards (no servers) -------------------------------------------


@pytest.mark.parametrize(
    ("find", "missing"),
    [
        (stack.kube_apiserver_path, "bin/kube-apiserver-etcd"),
        (stack.kubectl_path, "tools/bin/kubectl"),
        (stack.helm_path, "tools/bin/helm"),
        (lambda: stack.start_kube_apiserver(), "bin/kube-apiserver-etcd"),
    ],
    ids=["kube-apiserver", "kubectl", "helm", "start_kube_apiserver"],
)
def test_missing_binary_error_names_path_and_fix(
    find: Callable[[], object], missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHPILOT_CACHE_DIR", str(tmp_path))
    with pytest.raises(stack.StackError) as raised:
        find()
    assert str(tmp_path / missing) in str(raised.value)
    assert "run scripts/dev-setup" in str(raised.value)


def test_missing_prometheus_error_names_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(
        stack.StackError, match="prometheus not found on PATH: run scripts/dev-setup"
    ):
        stack.prometheus_path()


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: stack.ScrapeTarget("10.0.0.5:9090"), "ScrapeTarget.address"),
        (lambda: stack.ScrapeTarget("example.org:80"), "ScrapeTarget.address"),
        (lambda: stack.ScrapeTarget("127.0.0.1"), "ScrapeTarget.address"),
        (lambda: stack.start_prometheus(["127.0.0.1:9100", "127.0.0.1:9100"]), "targets"),
        (
            lambda: stack.create_serving_pod(None, "ns", "p", pod_ip="192.168.1.2", ports={}),
            "pod_ip",
        ),
    ],
    ids=["private-ip", "public-name", "no-port", "duplicate", "pod-ip"],
)
def test_bad_addresses_are_refused_naming_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        make()


# -- kube-apiserver ------------------------------------------------------------


def test_custom_resource_round_trips_and_its_schema_is_enforced(
    k8s_client: client.ApiClient, namespace: str, crd_group: str
) -> None:
    stack.create_crd(k8s_client, widget_crd(crd_group))
    objects = client.CustomObjectsApi(k8s_client)

    def widget(name: str, replicas: int) -> dict[str, Any]:
        return {
            "apiVersion": f"{crd_group}/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"replicas": replicas},
        }

    objects.create_namespaced_custom_object(crd_group, "v1", namespace, "widgets", widget("w1", 3))
    stored = objects.get_namespaced_custom_object(crd_group, "v1", namespace, "widgets", "w1")
    assert stored["spec"] == {"replicas": 3}
    assert stored["metadata"]["uid"]

    with pytest.raises(ApiException) as rejected:
        objects.create_namespaced_custom_object(
            crd_group, "v1", namespace, "widgets", widget("w0", 0)
        )
    assert rejected.value.status == 422
    assert (
        "spec.replicas: Invalid value: 0: spec.replicas in body should be greater than or "
        "equal to 1"
    ) in json.loads(rejected.value.body)["message"]


def _without_schema(crd: dict[str, Any]) -> None:
    del crd["spec"]["versions"][0]["schema"]


def _two_storage_versions(crd: dict[str, Any]) -> None:
    crd["spec"]["versions"].append({**copy.deepcopy(crd["spec"]["versions"][0]), "name": "v2"})


def _untyped_property(crd: dict[str, Any]) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"]["properties"]["extra"] = {}


@pytest.mark.parametrize(
    ("break_crd", "server_says"),
    [
        (
            lambda crd: crd["metadata"].update(name="gadgets.example.invalid"),
            'metadata.name: Invalid value: "gadgets.example.invalid": must be '
            'spec.names.plural+"."+spec.group',
        ),
        (
            _without_schema,
            "spec.versions[0].schema.openAPIV3Schema: Required value: schemas are required",
        ),
        (_two_storage_versions, "must have exactly one version marked as storage version"),
        (
            _untyped_property,
            "properties[extra].type: Required value: must not be empty for specified object fields",
        ),
        (
            lambda crd: crd["spec"].update(scope="Everywhere"),
            'spec.scope: Unsupported value: "Everywhere": supported values: "Cluster", "Namespaced"',
        ),
    ],
    ids=[
        "name-not-plural.group",
        "no-schema",
        "two-storage-versions",
        "untyped-property",
        "bad-scope",
    ],
)
def test_malformed_crd_is_rejected_with_the_servers_error(
    k8s_client: client.ApiClient,
    crd_group: str,
    break_crd: Callable[[dict[str, Any]], None],
    server_says: str,
) -> None:
    crd = widget_crd(crd_group)
    break_crd(crd)
    with pytest.raises(ApiException) as rejected:
        client.ApiextensionsV1Api(k8s_client).create_custom_resource_definition(crd)
    assert rejected.value.status == 422
    assert server_says in json.loads(rejected.value.body)["message"]


SERVING_PODS = {
    # name: (pod IP, labels)
    "llm-a": ("127.0.0.2", {"app": "llm", "pool": "a"}),
    "llm-b": ("127.0.0.3", {"app": "llm", "pool": "b"}),
    "other": ("127.0.0.4", {"app": "other"}),
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=llm", {"llm-a", "llm-b"}),
        ("pool=b", {"llm-b"}),
        ("app!=llm", {"other"}),
        ("app in (llm,other),pool notin (a)", {"llm-b", "other"}),
    ],
)
def test_label_selector_lists_serving_pods_ready_with_their_ip(
    k8s_client: client.ApiClient,
    namespace: str,
    make_serving_pod: Callable[..., stack.ServingPod],
    selector: str,
    expected: set[str],
) -> None:
    for name, (pod_ip, labels) in SERVING_PODS.items():
        make_serving_pod(namespace, name, pod_ip=pod_ip, ports={"http": 8000}, labels=labels)

    listed = client.CoreV1Api(k8s_client).list_namespaced_pod(namespace, label_selector=selector)

    assert {pod.metadata.name for pod in listed.items} == expected
    for pod in listed.items:
        conditions = {c.type: c.status for c in pod.status.conditions}
        assert pod.status.phase == "Running"
        assert conditions["Ready"] == "True"
        assert pod.status.pod_ip == SERVING_PODS[pod.metadata.name][0]
        assert [ip.ip for ip in pod.status.pod_ips] == [pod.status.pod_ip]
        assert pod.spec.containers[0].ports[0].container_port == 8000
        # ServiceAccount admission ran: the namespace's default SA was assigned.
        assert pod.spec.service_account_name == "default"


def test_readiness_flips_like_a_kubelet_reports_it(
    namespace: str, make_serving_pod: Callable[..., stack.ServingPod]
) -> None:
    pod = make_serving_pod(namespace, "llm-0", pod_ip="127.0.0.2", ports={"http": 8000})

    def readiness(observed: client.V1Pod) -> tuple[str, str, bool]:
        conditions = {c.type: c.status for c in observed.status.conditions}
        return (
            conditions["Ready"],
            conditions["ContainersReady"],
            observed.status.container_statuses[0].ready,
        )

    assert readiness(pod.read()) == ("True", "True", True)
    became_ready_at = next(c for c in pod.read().status.conditions if c.type == "Ready")
    assert readiness(pod.set_ready(False)) == ("False", "False", False)
    assert readiness(pod.read()) == ("False", "False", False)
    back = pod.set_ready(True)
    assert readiness(back) == ("True", "True", True)
    assert back.status.pod_ip == "127.0.0.2"
    ready_again_at = next(c for c in back.status.conditions if c.type == "Ready")
    assert ready_again_at.last_transition_time >= became_ready_at.last_transition_time


@pytest.mark.parametrize(
    ("granted", "expected_status"), [(False, 403), (True, 200)], ids=["no-binding", "role-binding"]
)
def test_rbac_decides_what_a_service_account_token_may_list(
    kube_api: stack.KubeAPIServer,
    k8s_client: client.ApiClient,
    namespace: str,
    granted: bool,
    expected_status: int,
) -> None:
    stack.create_service_account(k8s_client, namespace, "reader")
    if granted:
        rbac = client.RbacAuthorizationV1Api(k8s_client)
        rbac.create_namespaced_role(
            namespace,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="pod-reader"),
                rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list"])],
            ),
        )
        rbac.create_namespaced_role_binding(
            namespace,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="reader-reads-pods"),
                role_ref=client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"
                ),
                subjects=[
                    client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)
                ],
            ),
        )
    token = stack.service_account_token(k8s_client, namespace, "reader")

    with kube_api.api_client(token) as as_reader:
        # Authentication works either way: the apiserver knows who this is.
        review = client.AuthenticationV1Api(as_reader).create_self_subject_review(
            client.V1SelfSubjectReview()
        )
        username = f"system:serviceaccount:{namespace}:reader"
        assert review.status.user_info.username == username

        last_denial = ""

        def list_status_is_expected() -> bool:
            nonlocal last_denial
            try:
                client.CoreV1Api(as_reader).list_namespaced_pod(namespace)
            except ApiException as error:
                last_denial = json.loads(error.body)["message"]
                return error.status == expected_status
            return expected_status == 200

        # A new RoleBinding reaches the authorizer's cache within milliseconds.
        eventually(list_status_is_expected, f"HTTP {expected_status} listing pods")
    if not granted:
        assert f'User "{username}" cannot list resource "pods"' in last_denial


# -- Prometheus ----------------------------------------------------------------


@pytest.fixture
def exporters() -> Iterator[Callable[[], tuple[Gauge, str]]]:
    """Start prometheus_client exporters on 127.0.0.1; each returns (gauge, host:port)."""
    servers = []

    def start() -> tuple[Gauge, str]:
        registry = CollectorRegistry()
        gauge = Gauge("batchpilot_smoke_value", "A value the test sets.", registry=registry)
        server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append(server)
        return gauge, f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_prometheus_scrapes_exporters_and_promql_returns_their_values(
    prometheus: Callable[..., stack.PrometheusServer],
    exporters: Callable[[], tuple[Gauge, str]],
) -> None:
    values = random.Random(20251122)
    plain_gauge, plain_address = exporters()
    labelled_gauge, labelled_address = exporters()
    plain_value, labelled_value = values.uniform(1, 1000), values.uniform(1, 1000)
    plain_gauge.set(plain_value)
    labelled_gauge.set(labelled_value)

    server = prometheus(
        [
            plain_address,
            stack.ScrapeTarget(labelled_address, labels={"pod": "llm-0", "namespace": "team-a"}),
        ]
    )
    promql = PrometheusConnect(url=server.url, disable_ssl=True)

    def scraped(query: str) -> tuple[dict[str, str], float]:
        (sample,) = promql.custom_query(query)
        return sample["metric"], float(sample["value"][1])

    metric, value = scraped(f'batchpilot_smoke_value{{instance="{plain_address}"}}')
    assert value == plain_value
    assert metric["job"] == "batchpilot"
    metric, value = scraped('batchpilot_smoke_value{pod="llm-0"}')
    assert value == labelled_value
    assert (metric["instance"], metric["namespace"]) == (labelled_address, "team-a")

    # Scraping goes on: a new value shows up within a few 1 s scrapes.
    new_value = values.uniform(1000, 2000)
    plain_gauge.set(new_value)
    eventually(
        lambda: scraped(f'batchpilot_smoke_value{{instance="{plain_address}"}}')[1] == new_value,
        "the new value scraped",
    )
    server.stop()


# Starts Debian's prometheus directly, without the fixture that would mark it.
@pytest.mark.stack
@pytest.mark.parametrize(
    ("taken_picks", "starts"),
    [(1, True), (sandbox_process.PORT_ATTEMPTS, False)],
    ids=["one-lost-race", "every-pick-lost"],
)
def test_port_lost_to_another_process_is_retried_with_a_fresh_one(
    taken_picks: int, starts: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken_port = squatter.getsockname()[1]
        picks: list[int] = []

        def pick_port() -> int:
            picks.append(
                taken_port if len(picks) < taken_picks else sandbox_process.free_loopback_port()
            )
            return picks[-1]

        monkeypatch.setattr(sandbox_prometheus, "free_loopback_port", pick_port)
        if starts:
            with stack.start_prometheus([], workdir=tmp_path) as server:
                assert server.url != f"http://127.0.0.1:{taken_port}"
            assert picks[0] == taken_port
            assert len(picks) == 2
        else:
            with pytest.raises(stack.StackError, match="address already in use"):
                stack.start_prometheus([], workdir=tmp_path)
            assert picks == [taken_port] * taken_picks


# -- kubectl and helm ----------------------------------------------------------


def run_tool(*argv: str | Path) -> str:
    completed = subprocess.run(
        [str(arg) for arg in argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, f"{argv} failed: {completed.stderr}"
    return completed.stdout


def test_kubectl_matches_the_apiserver_and_lists_namespaces(
    kubectl: Path, kube_api: stack.KubeAPIServer, namespace: str
) -> None:
    versions = json.loads(
        run_tool(kubectl, "version", "-o", "json", "--kubeconfig", kube_api.kubeconfig)
    )
    client_version, server_version = versions["clientVersion"], versions["serverVersion"]
    # The build stamps the pinned release: without its ldflags this reads v0.0.0-master.
    go_mod = (REPO / "hack" / "kube-apiserver" / "go.mod").read_text()
    pinned = re.search(r"^\s*k8s\.io/kubernetes (v\S+)$", go_mod, re.MULTILINE)
    assert pinned is not None
    assert server_version["gitVersion"] == pinned.group(1)
    # kubectl supports one minor version of skew either way.
    assert client_version["major"] == server_version["major"]
    assert abs(int(client_version["minor"]) - int(server_version["minor"])) <= 1

    names = run_tool(
        kubectl, "get", "namespaces", "-o", "name", "--kubeconfig", kube_api.kubeconfig
    )
    assert {f"namespace/{namespace}", "namespace/default"} <= set(names.split())


def test_helm_runs_and_talks_to_the_apiserver(helm: Path, kube_api: stack.KubeAPIServer) -> None:
    assert re.fullmatch(r"v\d+\.\d+\.\d+\S*\n", run_tool(helm, "version", "--short"))
    releases = run_tool(
        helm, "list", "--all-namespaces", "--output", "json", "--kubeconfig", kube_api.kubeconfig
    )
    assert json.loads(releases) == []
