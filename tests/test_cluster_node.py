"""The real single-node cluster (stack.node): pods that run, and a teardown
that leaves nothing on the host.

The teardown tests come first: they start clusters of their own, and run
before the session's `cluster` starts, so that the kubelet's sysctls they
compare are still the host's own (with another cluster up they would already
hold the kubelet's values, and their restore would prove less).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from stack.node import (
    KUBERNETES_SERVICE_IP,
    POD_CIDR,
    Cluster,
    clear_leftovers,
    read_sysctls,
    start_cluster,
)

from batchpilot.sim.sandbox.kube import unique_name
from batchpilot.sim.sandbox.tools import StackError, node_image_archive_path

K8S_VERSION = "v1.33.13"
# Pods start in 1-3 s on an idle machine; the 2 cores are shared with builds.
POD_TIMEOUT_S = 90.0
TESTS_DIR = Path(__file__).resolve().parent
# Where a kubelet, containerd, CNI or `ip netns` would write on the host with
# their defaults; the node points each at its workdir or cleans it up.
HOST_DEFAULT_PATHS = (
    "/run/netns",
    "/run/containerd",
    "/var/lib/cni",
    "/var/lib/containerd",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/etc/cni",
    "/etc/kubernetes",
    "/opt/cni",
    "/opt/containerd",
    "/usr/libexec/kubernetes",
)


def _host_paths() -> dict[str, bool]:
    return {path: os.path.lexists(path) for path in HOST_DEFAULT_PATHS}


def _wait_for(check: Callable[[], Any], what: str, timeout_s: float = POD_TIMEOUT_S) -> Any:
    """Poll `check` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"not {what} after {timeout_s:.0f} s"
        time.sleep(0.2)
    return result


def _host_traces(name: str, workdir: Path, host_veth: str, host_ip: str) -> list[str]:
    """Whatever of cluster `name` the host still shows, found without stack.node's
    own bookkeeping: processes, mounts, cgroups, namespace, link, route, rules."""
    traces = []
    for entry in Path("/proc").iterdir():
        # A zombie has exited: only its parent (init, for orphans) has yet to reap it.
        if not entry.name.isdigit() or _state(int(entry.name)) in (None, "Z"):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cgroups = (entry / "cgroup").read_text()
        except OSError:
            continue
        # Components and shims name the workdir; pod processes sit in its cgroups.
        if str(workdir) in cmdline or f"/{name}/" in cgroups:
            traces.append(f"process {entry.name}: {cmdline[:120]}")
    mountinfo = Path("/proc/self/mountinfo").read_text()
    traces += [f"mount: {line}" for line in mountinfo.splitlines() if str(workdir) in line]
    traces += [f"mount: {line}" for line in mountinfo.splitlines() if name in line]
    traces += [f"cgroup {path}" for path in Path("/sys/fs/cgroup").glob(f"*/{name}")]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    traces += [f"netns {line}" for line in netns.stdout.splitlines() if name in line]
    if Path("/sys/class/net", host_veth).exists():
        traces.append(f"link {host_veth}")
    link_net = ipaddress.ip_network(f"{host_ip}/30", strict=False)
    routes = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    for route in json.loads(routes.stdout):
        destination = route.get("dst", "default")
        if destination != "default" and ipaddress.ip_network(destination).overlaps(link_net):
            traces.append(f"route {route}")
    for table in ("filter", "nat", "mangle", "raw"):
        rules = subprocess.run(
            ["iptables", "-w", "5", "-t", table, "-S"], capture_output=True, text=True, check=True
        )
        for rule in rules.stdout.splitlines():
            # KUBE- chains on the host would mean kube-proxy or the kubelet
            # wrote outside the node's namespace.
            if name in rule or host_veth in rule or "KUBE-" in rule:
                traces.append(f"iptables -t {table}: {rule}")
    links = Path("/var/log/containers")
    if links.is_dir():
        traces += [
            f"log link {link}" for link in links.iterdir() if str(workdir) in os.readlink(link)
        ]
    return traces


def _state(pid: int) -> str | None:
    """A process's state letter (Z: exited, its parent not told yet); None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _pause_pod(name: str, image: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "containers": [{"name": "pause", "image": image}],
            # Deleting a pause pod need not wait the default 30 s.
            "terminationGracePeriodSeconds": 0,
        },
    }


def _running_pod(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod:
    def running() -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase == "Running" and pod.status.pod_ip else None

    return _wait_for(running, f"pod {namespace}/{name} Running with an IP")


def _start_pod(cluster: Cluster, namespace: str) -> None:
    """A running pause pod: it brings the mounts, cgroups and pod namespace a
    teardown must remove."""
    image = cluster.import_image(node_image_archive_path("pause"))
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(namespace, _pause_pod("teardown", image))
        _running_pod(core, namespace, "teardown")


@pytest.mark.cluster
def test_stop_leaves_nothing_on_the_host(tmp_path: Path) -> None:
    sysctls_before = read_sysctls()
    paths_before = _host_paths()
    started = start_cluster(tmp_path / "node")
    try:
        _start_pod(started, "default")
        pids = started.pids()
        running = _host_traces(started.name, started.workdir, started.host_veth, started.host_ip)
        # The check sees each kind of trace while the cluster runs, so that
        # finding none after stop() means they were removed.
        for kind in ("process", "mount", "cgroup", "netns", "link", "route", "iptables"):
            assert any(trace.startswith(kind) for trace in running), (kind, running)
        assert read_sysctls()["vm.overcommit_memory"] == "1"  # the kubelet's value
    finally:
        began = time.monotonic()
        started.stop()
        stop_s = time.monotonic() - began
    assert _host_traces(started.name, started.workdir, started.host_veth, started.host_ip) == []
    survivors = {pid: _state(pid) for pid in pids if _state(pid) not in (None, "Z")}
    assert survivors == {}
    assert read_sysctls() == sysctls_before
    assert _host_paths() == paths_before
    # Containerd's state and the kubelet's went with it; the logs stay.
    assert not (started.workdir / "containerd").exists()
    assert (started.workdir / "kubelet.log").stat().st_size > 0
    assert stop_s < 30, stop_s


_CRASHING_RUN = """
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from kubernetes import client
from stack.node import start_cluster
from batchpilot.sim.sandbox.tools import StackError, node_image_archive_path
started = start_cluster(Path(sys.argv[2]))
image = started.import_image(node_image_archive_path("pause"))
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orphan"},
       "spec": {"containers": [{"name": "pause", "image": image}]}}
with started.api_client() as api:
    core = client.CoreV1Api(api)
    core.create_namespaced_pod("default", pod)
    while core.read_namespaced_pod("orphan", "default").status.phase != "Running":
        time.sleep(0.2)
print(started.name, started.host_veth, started.host_ip, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.cluster
def test_leftovers_of_a_killed_run_are_cleared(tmp_path: Path) -> None:
    """pytest SIGKILLed mid-session: its pod and shim outlive it (the
    components die with it), and the next start's clear_leftovers removes
    them and everything else."""
    sysctls_before = read_sysctls()
    paths_before = _host_paths()
    workdir = (tmp_path / "node").resolve()
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_RUN, str(TESTS_DIR), str(workdir)],
        capture_output=True, text=True, timeout=POD_TIMEOUT_S + 120, check=False,
    )  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    name, host_veth, host_ip = crashed.stdout.split()
    left = _host_traces(name, workdir, host_veth, host_ip)
    for kind in ("process", "mount", "cgroup", "netns", "link", "iptables"):
        assert any(trace.startswith(kind) for trace in left), (kind, left)
    assert read_sysctls()["vm.overcommit_memory"] == "1"  # the kubelet's value

    clear_leftovers()

    assert _host_traces(name, workdir, host_veth, host_ip) == []
    assert read_sysctls() == sysctls_before
    assert _host_paths() == paths_before


@pytest.mark.cluster
def test_a_missing_build_fails_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHPILOT_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(StackError, match=r"kubelet not found at .*: run scripts/dev-setup"):
        start_cluster(tmp_path / "node")
    assert not (tmp_path / "node").exists()


@pytest.mark.cluster
def test_an_unrecorded_namespace_with_the_prefix_is_reported(tmp_path: Path) -> None:
    """Not made by this code (no ledger entry): the start names it and the
    commands that remove it, and touches nothing."""
    name = "bp-node-0-1"  # no process has pid 0
    netns_dir_existed = os.path.lexists("/run/netns")
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        with pytest.raises(StackError, match=f"ip netns delete {name}"):
            start_cluster(tmp_path / "node")
        assert Path("/run/netns", name).exists()
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=30)
        if not netns_dir_existed:
            # `ip netns add` made /run/netns a mount of its own.
            subprocess.run(["umount", "/run/netns"], check=True, timeout=30)
            Path("/run/netns").rmdir()


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[client.ApiClient]:
    with cluster.api_client() as api_client:
        yield api_client


@pytest.fixture(scope="module")
def images(cluster: Cluster) -> dict[str, str]:
    """Image names of the pause and agnhost archives, imported into the node."""
    return {
        name: cluster.import_image(node_image_archive_path(name)) for name in ("pause", "agnhost")
    }


@pytest.fixture
def ns(api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace, once the controller manager gave it its default
    ServiceAccount (pods are refused before)."""
    core = client.CoreV1Api(api)
    name = unique_name(request.node.name)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def has_service_account() -> bool:
        accounts = core.list_namespaced_service_account(name).items
        return any(account.metadata.name == "default" for account in accounts)

    _wait_for(has_service_account, f"the default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name)


def test_node_is_ready_with_containerd_and_the_built_versions(
    cluster: Cluster, api: client.ApiClient
) -> None:
    node = client.CoreV1Api(api).read_node(cluster.node_name)
    ready = [c for c in node.status.conditions if c.type == "Ready"]
    assert [c.status for c in ready] == ["True"]
    info = node.status.node_info
    assert info.container_runtime_version.startswith("containerd://1.6."), info
    assert info.kubelet_version == K8S_VERSION
    assert client.VersionApi(api).get_code().git_version == K8S_VERSION
    addresses = {(a.type, a.address) for a in node.status.addresses}
    assert ("InternalIP", cluster.node_ip) in addresses
    # The test process reaches the apiserver on the node's address, off loopback.
    assert cluster.server.startswith(f"https://{cluster.node_ip}:")


def test_pause_pod_runs_with_a_pod_ip(
    cluster: Cluster, api: client.ApiClient, images: dict[str, str], ns: str
) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(ns, _pause_pod("pause", images["pause"]))
    pod = _running_pod(core, ns, "pause")
    assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(POD_CIDR)
    assert pod.spec.node_name == cluster.node_name
    # The kubelet mounted the ServiceAccount token the admission plugin added.
    assert any(volume.projected for volume in pod.spec.volumes)
    sandboxes = cluster.crictl(
        "pods", "--name", "pause", "--namespace", ns, "--state", "ready", "-q"
    )
    assert len(sandboxes.split()) == 1


def test_deployment_of_two_replicas_becomes_available(
    api: client.ApiClient, images: dict[str, str], ns: str
) -> None:
    labels = {"app": "pause"}
    template = _pause_pod("unused", images["pause"], labels)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "pause"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": template["spec"]},
        },
    }
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(ns, deployment)

    def available() -> bool:
        status = apps.read_namespaced_deployment_status("pause", ns).status
        return status.available_replicas == 2

    _wait_for(available, "2 replicas available")
    pods = client.CoreV1Api(api).list_namespaced_pod(ns, label_selector="app=pause").items
    assert len({pod.status.pod_ip for pod in pods}) == 2


def _serve(core: client.CoreV1Api, ns: str, name: str, image: str) -> client.V1Pod:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "containers": [
                {"name": "netexec", "image": image, "args": ["netexec", "--http-port=8080"]}
            ],
            "terminationGracePeriodSeconds": 0,
        },
    }
    core.create_namespaced_pod(ns, pod)
    return _running_pod(core, ns, name)


# A GET from inside the node's namespace, the only place where pod IPs and
# ClusterIPs are routed. No proxy: nothing may leave the machine.
_FETCH = """
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2]) if len(sys.argv) > 2 else None
opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
)
print(opener.open(sys.argv[1], timeout=5).read().decode(), end="")
"""


def _fetch(cluster: Cluster, url: str, *cafile: Path) -> str | None:
    """The body of a GET of `url` from inside the node; None when it failed."""
    done = cluster.exec_in_node([sys.executable, "-c", _FETCH, url, *map(str, cafile)])
    return done.stdout if done.returncode == 0 else None


def test_service_cluster_ip_routes_to_the_pod(
    cluster: Cluster, api: client.ApiClient, images: dict[str, str], ns: str
) -> None:
    core = client.CoreV1Api(api)
    _serve(core, ns, "web", images["agnhost"])
    client_pod = _serve(core, ns, "client", images["agnhost"])
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    cluster_ip = core.create_namespaced_service(ns, service).spec.cluster_ip

    # From the node: kube-proxy's rules pick it up within a sync or two.
    def served_by_web() -> bool:
        return _fetch(cluster, f"http://{cluster_ip}/hostname") == "web"

    _wait_for(served_by_web, f"Service {cluster_ip} answering from pod web", 30)
    # From another pod, across the node's bridge: agnhost dials the Service itself.
    dial = (
        f"http://{client_pod.status.pod_ip}:8080/dial"
        f"?request=hostname&protocol=http&host={cluster_ip}&port=80&tries=1"
    )
    assert json.loads(_fetch(cluster, dial) or "null") == {"responses": ["web"]}


def test_kubernetes_service_reaches_the_apiserver(cluster: Cluster) -> None:
    healthz = f"https://{KUBERNETES_SERVICE_IP}:443/healthz"
    assert _fetch(cluster, healthz, cluster.apiserver.ca_file) == "ok"


def test_logs_come_from_the_kubelet(api: client.ApiClient, images: dict[str, str], ns: str) -> None:
    """The apiserver fetches logs from the kubelet with its client certificate;
    the kubelet checks it against the CA and asks the apiserver whether it may."""
    core = client.CoreV1Api(api)
    _serve(core, ns, "talker", images["agnhost"])
    logs = _wait_for(
        lambda: core.read_namespaced_pod_log("talker", ns), "logs from the kubelet", 30
    )
    assert "Started HTTP server on port 8080" in logs
