"""pytest fixtures for the local stack; tests/conftest.py registers this module.

Session scope for the servers (the apiserver is ready in about 5 s;
Prometheus in 0.1 s, with its first scrape about 6 s after start; the
single-node cluster in about 9 s), function scope for what a test creates in
them. A test that uses any of these fixtures is marked `stack`, or `cluster`
for the real node (root only), so `-m "not stack and not cluster"` leaves them
out. A missing binary fails the test with the fix; it never skips it, because
CI must run these tests.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client

from batchpilot.sim.llamacpp import DEFAULT_SERVER_OPTIONS, ServerOptions
from batchpilot.sim.sandbox.apiserver import KubeAPIServer, start_kube_apiserver
from batchpilot.sim.sandbox.kube import (
    ServingPod,
    create_namespace,
    create_serving_pod,
    unique_name,
    wait_until_established,
)
from batchpilot.sim.sandbox.llama_server import LlamaServer, start_llama_server
from batchpilot.sim.sandbox.prometheus import PrometheusServer, ScrapeTarget, start_prometheus
from batchpilot.sim.sandbox.tools import StackError, helm_path, kubectl_path

from .images import image_ref, oci_archive
from .node import Cluster, start_cluster
from .workloads import Images

STACK_FIXTURES = frozenset(
    {
        "kube_api",
        "k8s_client",
        "namespace",
        "make_serving_pod",
        "prometheus",
        "kubectl",
        "helm",
        "inferencepolicy_crd",
    }
)
# Fixtures that run the real CPU engine: their tests are marked `engine`.
ENGINE_FIXTURES = frozenset({"llama_server"})
# Fixtures that run real pods on a single-node cluster: marked `cluster`.
CLUSTER_FIXTURES = frozenset({"cluster", "cluster_images"})
REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if STACK_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.stack)
        if ENGINE_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.engine)
        if CLUSTER_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.cluster)


_Result = TypeVar("_Result")


def _or_fail(call: Callable[[], _Result]) -> _Result:
    # StackError's message already says what to do; its traceback says nothing more.
    try:
        return call()
    except StackError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPIServer]:
    """The session's apiserver: .server, .token (admin), .ca_file, .kubeconfig,
    .kubeconfig_for(token, user), .api_client(token=None). Its log is
    kube-apiserver.log in the session's pytest temp dir."""
    server = _or_fail(lambda: start_kube_apiserver(tmp_path_factory.mktemp("kube-apiserver")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The session's single-node cluster (stack.node): .apiserver, .kubeconfig,
    .api_client(), .import_image(archive), .exec_in_node(argv), .node_name,
    .node_ip. Its logs are in the session's pytest temp dir (cluster0/)."""
    started = _or_fail(lambda: start_cluster(tmp_path_factory.mktemp("cluster")))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def cluster_images(cluster: Cluster) -> Images:
    """The operator and gate images (scripts/build-images), imported into the
    session cluster's containerd once; pods run them with imagePullPolicy Never."""

    def load(name: str) -> str:
        imported = cluster.import_image(oci_archive(name))
        expected = image_ref(name)
        if imported != expected:
            raise StackError(
                f"the {name} archive holds {imported}, but this tree builds {expected}: "
                "run scripts/build-images"
            )
        return imported

    return _or_fail(lambda: Images(operator=load("operator"), gate=load("gate")))


@pytest.fixture(scope="session")
def k8s_client(kube_api: KubeAPIServer) -> Iterator[client.ApiClient]:
    """The admin's ApiClient, loaded from kube_api.kubeconfig."""
    with kube_api.api_client() as api:
        yield api


@pytest.fixture
def namespace(k8s_client: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, with its `default` ServiceAccount.

    Deleted afterwards; without a namespace controller it then stays Terminating,
    which is why every test gets a unique name.
    """
    name = unique_name(request.node.name)
    create_namespace(k8s_client, name)
    yield name
    client.CoreV1Api(k8s_client).delete_namespace(name)


@pytest.fixture
def make_serving_pod(k8s_client: client.ApiClient) -> Callable[..., ServingPod]:
    """make_serving_pod(namespace, name, *, pod_ip, ports, labels=None,
    annotations=None, ready=True) -> ServingPod (.read(), .set_ready(bool)).

    The pod is Running on pod_ip (127.0.0.x) with Ready as asked; it goes with
    the test's namespace."""

    def make(namespace: str, name: str, **kwargs: Any) -> ServingPod:
        return create_serving_pod(k8s_client, namespace, name, **kwargs)

    return make


@pytest.fixture(scope="session")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., PrometheusServer]]:
    """prometheus(targets, *, scrape_interval_s=1.0, metrics_path="/metrics")
    -> PrometheusServer (.url, .stop()), returned once every target is up.

    Each call starts its own Prometheus; all still running stop at session end,
    so stop one early when a test is done with it."""
    started: list[PrometheusServer] = []

    def start(targets: Sequence[str | ScrapeTarget], **kwargs: Any) -> PrometheusServer:
        server = _or_fail(
            lambda: start_prometheus(
                targets, workdir=tmp_path_factory.mktemp("prometheus"), **kwargs
            )
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def llama_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., LlamaServer]]:
    """llama_server(options=ServerOptions()) -> LlamaServer (.url, .stop()), the
    real llama.cpp engine serving the generated model, returned once healthy.

    Each call starts its own server; all still running stop at session end."""
    started: list[LlamaServer] = []

    def start(options: ServerOptions = DEFAULT_SERVER_OPTIONS) -> LlamaServer:
        server = _or_fail(
            lambda: start_llama_server(options, workdir=tmp_path_factory.mktemp("llama"))
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def kubectl() -> Path:
    """Path of the kubectl that scripts/dev-setup installed (v1.33)."""
    return _or_fail(kubectl_path)


@pytest.fixture(scope="session")
def helm() -> Path:
    """Path of the helm that scripts/dev-setup installed (v4)."""
    return _or_fail(helm_path)


@pytest.fixture(scope="session")
def inferencepolicy_crd(
    kube_api: KubeAPIServer, k8s_client: client.ApiClient, kubectl: Path
) -> None:
    """The project's CRDs applied with `kubectl apply -f crds/`, established."""
    done = subprocess.run(
        [str(kubectl), f"--kubeconfig={kube_api.kubeconfig}", "apply", "-f", str(REPO / "crds")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "inferencepolicies.batchpilot.dev" in done.stdout, done.stdout
    wait_until_established(k8s_client, "inferencepolicies.batchpilot.dev")
