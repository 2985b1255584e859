"""The serving examples run on a real node: applied as a user would apply
them, every pod becomes Ready, serves a streamed completion through its
Service, answers the probes and the scrape, and takes its knobs from the
Downward API file when the pod's annotation changes.

Each example gets a namespace of its own with the simulator's calibration
ConfigMap; the CRD comes from `kubectl apply -f crds/`, the paired policy
file (with its Secret) from `kubectl apply -f examples/policy-*.yaml`, the
bare Pod's token Secret from the `kubectl create secret ...` command its
header documents, run as written. The workload is the example made runnable
here (stack.workloads.simulated): its engine is the simulator, listening
where the example's engine listens, with the ceilings the paired policy
declares in spec.engine.

One deviation from the shipped files: each Deployment runs 1 replica, not 2.
The gates request 250m CPU each and the bare Pod's 500m; all examples at
their shipped sizes (plus the regression pod) would ask more than the test
node's 2 cores and stay Pending.

All examples start together, so their waits overlap: the module's wall time
is that of the slowest pod, not of the sum. The namespaces go at the end of
the module, and the test waits until they are gone.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from stack.node import Cluster
from stack.workloads import (
    CALIBRATION,
    GATE_CONTAINER,
    Images,
    SimEngine,
    calibration_configmap,
    engine_listen,
    pod_spec,
    simulated,
)

from batchpilot.contract.gate_api import KNOBS_ANNOTATION
from batchpilot.contract.knobs import Knobs
from batchpilot.sim.sandbox.kube import unique_name, wait_until_established
from batchpilot.sim.sandbox.tools import kubectl_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
# The documented scrape job (also what docs/install.md's PodMonitor names):
# it keeps the container ports whose names match its first relabelling.
SCRAPE_CONFIG = EXAMPLES / "prometheus" / "scrape-config.yaml"
ADMIN_PORT = 9090
GATE_PORT = 8080
# Measured here: pods Ready 7-22 s after the apply with all examples starting
# at once (two Python processes each on 2 shared cores, the engine's startup
# probe every 10 s). Several times that for a machine loaded by other builds.
READY_TIMEOUT_S = 120.0
# kube-proxy writes a new Service's rules within a sync or two.
SERVICE_TIMEOUT_S = 30.0
# The kubelet rewrites a Downward API volume when it syncs the pod: at once
# for an update it is told of, at the latest after its 1 min sync period
# (plus its configmap/secret cache TTL).
DOWNWARD_TIMEOUT_S = 120.0
# The regression pod's engine readiness probe runs every 5 s: after this long
# with the engine running it has failed at least 3 times.
BROKEN_OBSERVE_S = 16.0
NAMESPACE_DELETE_TIMEOUT_S = 120.0
POLL_S = 0.5
KUBECTL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Example:
    """One workload example and what it is paired with."""

    key: str
    workload: str
    policy: str | None = None
    # The header's `kubectl create secret` command runs as documented.
    secret_command: bool = False
    # Where the engine listens instead of the shipped --host (the regression case).
    engine_host: str | None = None


EXAMPLE_LIST = [
    Example("vllm", "vllm-deployment.yaml", policy="policy-auto.yaml"),
    Example("sglang", "sglang-deployment.yaml", policy="policy-sglang-native.yaml"),
    Example("llamacpp", "llamacpp-deployment.yaml", policy="policy-llamacpp.yaml"),
    Example("gate-sidecar-pod", "gate-sidecar-pod.yaml", secret_command=True),
]
# The gate-sidecar-pod example as it was before its fix: the engine bound to
# its loopback, behind a readiness probe on the pod IP.
BROKEN = Example(
    "loopback-engine", "gate-sidecar-pod.yaml", secret_command=True, engine_host="127.0.0.1"
)
SHIPPED = [example.key for example in EXAMPLE_LIST]


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def workload_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (workload,) = [doc for doc in docs if doc["kind"] in ("Deployment", "Pod")]
    return workload


def engine_container(workload: dict[str, Any]) -> dict[str, Any]:
    (engine,) = [c for c in pod_spec(workload)["containers"] if c["name"] != GATE_CONTAINER]
    return engine


def engine_flag(args: list[str], name: str) -> str:
    """The value of `--name=V` or `--name V` in an engine's arguments."""
    for index, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1].split()[0]
        if arg == f"--{name}":
            return args[index + 1]
    raise KeyError(name)


def sim_engine(example: Example, workload: dict[str, Any]) -> SimEngine:
    """The simulator's ceilings: the paired policy's spec.engine, or for the
    bare Pod (no policy) the engine's own startup flags."""
    if example.policy is not None:
        spec = next(d for d in load(EXAMPLES / example.policy) if d["kind"] == "InferencePolicy")
        engine = spec["spec"]["engine"]
        kwargs: dict[str, Any] = {
            "max_num_seqs": engine["maxNumSeqs"],
            "max_num_batched_tokens": engine["maxNumBatchedTokens"],
            "runtime_tunable": bool(engine.get("runtimeTunable", False)),
        }
        if "kvCacheTokens" in engine:
            kwargs["kv_cache_tokens"] = engine["kvCacheTokens"]
        return SimEngine(**kwargs)
    args = engine_container(workload)["args"]
    return SimEngine(
        max_num_seqs=int(engine_flag(args, "max-num-seqs")),
        max_num_batched_tokens=int(engine_flag(args, "max-num-batched-tokens")),
    )


def documented_secret_command(path: Path) -> str:
    """The `kubectl create secret ...` command in a manifest's header comment,
    its continuation lines joined, exactly as a user would paste it."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    header = "\n".join(lines)
    match = re.search(r"^(kubectl create secret (?:[^\n]*\\\n)*[^\n]*)$", header, re.MULTILINE)
    assert match, f"{path.name}: no `kubectl create secret` command in its header"
    return match.group(1)


# --- running things ----------------------------------------------------------------------


def kubectl(cluster: Cluster, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [str(kubectl_path()), f"--kubeconfig={cluster.kubeconfig}", *args],
        input=stdin, capture_output=True, text=True, timeout=KUBECTL_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def run_documented(cluster: Cluster, command: str, namespace: str) -> None:
    """Run a documented shell command with `kubectl` meaning the pinned kubectl
    on the test cluster, in `namespace`."""
    prelude = 'kubectl() { "$BP_KUBECTL" --kubeconfig="$BP_KUBECONFIG" --namespace="$BP_NS" "$@"; }'
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f"{prelude}\n{command}"],
        env={
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "BP_KUBECTL": str(kubectl_path()),
            "BP_KUBECONFIG": str(cluster.kubeconfig),
            "BP_NS": namespace,
        },
        capture_output=True, text=True, timeout=KUBECTL_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{command}: {done.stderr}"


# Run inside the node's network namespace, the only place where pod IPs and
# ClusterIPs are routed. No proxy: nothing may leave the machine.
_REQUESTS = r"""
import json, sys, time, urllib.error, urllib.request
requests = json.loads(sys.argv[1])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
results = {}
for spec in requests:
    body = spec.get("body")
    if spec.get("body_from"):  # the knobs an earlier GET /config returned
        body = json.loads(results[spec["body_from"]]["body"])["knobs"]
    deadline = time.monotonic() + spec.get("retry_s", 0)
    while True:
        request = urllib.request.Request(
            spec["url"], method=spec.get("method", "GET"),
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **spec.get("headers", {})})
        try:
            with opener.open(request, timeout=10) as response:
                result = {"status": response.status, "body": response.read().decode(),
                          "type": response.headers.get("Content-Type", "")}
        except urllib.error.HTTPError as error:
            result = {"status": error.code, "body": error.read().decode(), "type": ""}
        except OSError as error:
            result = {"status": None, "body": repr(error), "type": ""}
        if result["status"] == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    results[spec["name"]] = result
print(json.dumps(results))
"""

_WATCH_CONFIG = r"""
import json, sys, time, urllib.request
spec = json.loads(sys.argv[1])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
pending, seen, last = dict(spec["expect"]), {}, {}
deadline = time.monotonic() + spec["deadline_s"]
while pending and time.monotonic() < deadline:
    for name, expect in list(pending.items()):
        request = urllib.request.Request(spec["urls"][name], headers=spec["headers"][name])
        try:
            with opener.open(request, timeout=5) as response:
                config = json.loads(response.read())
        except (OSError, ValueError) as error:
            last[name] = repr(error)
            continue
        last[name] = config
        knobs = config["knobs"]
        if config["source"] == "file" and all(knobs.get(k) == v for k, v in expect.items()):
            seen[name] = time.time()
            del pending[name]
    time.sleep(0.1)
print(json.dumps({"seen": seen, "last": last}))
"""


def in_node(cluster: Cluster, script: str, spec: dict[str, Any], timeout_s: float) -> Any:
    done = cluster.exec_in_node(
        [sys.executable, "-c", script, json.dumps(spec)], timeout_s=timeout_s
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- deploying ---------------------------------------------------------------------------


@dataclass
class Deployed:
    """One example as applied: its namespace, what it runs, how long it took."""

    example: Example
    namespace: str
    workload: dict[str, Any]
    engine_port: int
    token_secret: str
    service: str | None
    applied_at: float = 0.0
    # Pod name -> seconds from the workload's apply to Ready.
    ready_s: dict[str, float] = field(default_factory=dict)
    failure: str | None = None

    @property
    def selector(self) -> str:
        template = (
            self.workload if self.workload["kind"] == "Pod" else self.workload["spec"]["template"]
        )
        return ",".join(f"{k}={v}" for k, v in template["metadata"]["labels"].items())


def _wait_for_default_service_account(core: client.CoreV1Api, namespace: str) -> None:
    # The controller manager makes it; pods are refused before.
    deadline = time.monotonic() + 60
    while not any(
        account.metadata.name == "default"
        for account in core.list_namespaced_service_account(namespace).items
    ):
        assert time.monotonic() < deadline, f"no default ServiceAccount in {namespace}"
        time.sleep(0.2)


def apply_example(
    cluster: Cluster, core: client.CoreV1Api, images: Images, example: Example, namespace: str
) -> Deployed:
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    docs = load(EXAMPLES / example.workload)
    shipped = workload_of(docs)
    if example.engine_host is not None:
        args = engine_container(shipped)["args"]
        args[:] = [
            f"--host={example.engine_host}" if arg.startswith("--host=") else arg for arg in args
        ]
    engine = sim_engine(example, shipped)
    runnable = simulated(shipped, images=images, engine=engine)
    if runnable["kind"] == "Deployment":
        runnable["spec"]["replicas"] = 1  # see the module's docstring
    port = engine_listen(engine_container(shipped)["args"])[1]
    token_volume = next(v for v in pod_spec(shipped)["volumes"] if v["name"] == "gate-token")
    services = [doc["metadata"]["name"] for doc in docs if doc["kind"] == "Service"]
    deployed = Deployed(
        example=example,
        namespace=namespace,
        workload=runnable,
        engine_port=port,
        token_secret=token_volume["secret"]["secretName"],
        service=services[0] if services else None,
    )
    _wait_for_default_service_account(core, namespace)
    core.create_namespaced_config_map(namespace, calibration_configmap(CALIBRATION, namespace))
    if example.policy is not None:
        kubectl(cluster, "apply", "-n", namespace, "-f", str(EXAMPLES / example.policy))
    if example.secret_command:
        run_documented(cluster, documented_secret_command(EXAMPLES / example.workload), namespace)
    others = [doc for doc in docs if doc is not shipped]
    deployed.applied_at = time.monotonic()
    kubectl(
        cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all([*others, runnable])
    )
    return deployed


def _pod_ready(pod: client.V1Pod) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def describe_pods(core: client.CoreV1Api, namespace: str) -> str:
    """Conditions, container statuses and events of every pod in `namespace`."""
    lines = []
    for pod in core.list_namespaced_pod(namespace).items:
        lines.append(f"pod {namespace}/{pod.metadata.name}: phase {pod.status.phase}")
        for condition in pod.status.conditions or []:
            lines.append(
                f"  condition {condition.type}={condition.status} {condition.reason or ''} "
                f"{condition.message or ''}"
            )
        for status in pod.status.container_statuses or []:
            state = status.state.to_dict() if status.state else {}
            lines.append(
                f"  container {status.name}: ready={status.ready} started={status.started} "
                f"restarts={status.restart_count} state={json.dumps(state, default=str)}"
            )
        events = core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={pod.metadata.name}"
        ).items
        for event in sorted(events, key=lambda e: str(e.last_timestamp or e.event_time)):
            lines.append(
                f"  event {event.type} {event.reason} x{event.count or 1} "
                f"({event.source.component if event.source else ''}): {event.message}"
            )
    return "\n".join(lines) or f"no pods in {namespace}"


def wait_until_ready(core: client.CoreV1Api, examples: list[Deployed]) -> None:
    """Poll until each example's pods are all Ready, recording when each got
    there; one that is not by READY_TIMEOUT_S records why."""
    waiting = list(examples)
    while waiting:
        for deployed in list(waiting):
            pods = core.list_namespaced_pod(deployed.namespace).items
            now = time.monotonic()
            for pod in pods:
                if _pod_ready(pod) and pod.metadata.name not in deployed.ready_s:
                    deployed.ready_s[pod.metadata.name] = now - deployed.applied_at
            if pods and all(_pod_ready(pod) for pod in pods):
                waiting.remove(deployed)
            elif now - deployed.applied_at > READY_TIMEOUT_S:
                deployed.failure = (
                    f"{deployed.example.workload} not Ready {READY_TIMEOUT_S:.0f} s after "
                    f"its apply:\n{describe_pods(core, deployed.namespace)}"
                )
                waiting.remove(deployed)
        time.sleep(POLL_S)


def delete_namespaces(api: client.ApiClient, namespaces: list[str]) -> None:
    """Delete the namespaces and wait until they are gone.

    The examples' engines sleep 25 s in preStop under a 45 s grace period, and
    the namespace controller, finding pods with that much grace left, looks
    again only after half of it. So the pods go first, with a 1 s grace, once
    their Deployments and ReplicaSets are gone (orphaning them) and nothing
    recreates them; then the namespace.
    """
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    for namespace in namespaces:
        try:
            apps.delete_collection_namespaced_deployment(namespace, propagation_policy="Orphan")
            apps.delete_collection_namespaced_replica_set(namespace, propagation_policy="Orphan")
            core.delete_collection_namespaced_pod(namespace, grace_period_seconds=1)
            core.delete_namespace(namespace)
        except ApiException as error:
            if error.status != 404:
                raise
    deadline = time.monotonic() + NAMESPACE_DELETE_TIMEOUT_S
    remaining = list(namespaces)
    while remaining:
        for namespace in list(remaining):
            try:
                core.read_namespace(namespace)
            except ApiException as error:
                if error.status != 404:
                    raise
                remaining.remove(namespace)
        if remaining and time.monotonic() > deadline:
            pytest.fail(
                f"namespaces {remaining} still there after {NAMESPACE_DELETE_TIMEOUT_S:.0f} s"
            )
        time.sleep(POLL_S)


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[client.ApiClient]:
    with cluster.api_client() as api_client:
        yield api_client


@pytest.fixture(scope="module")
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def deployed(
    cluster: Cluster, cluster_images: Images, api: client.ApiClient, core: client.CoreV1Api
) -> Iterator[dict[str, Deployed]]:
    """Every example (and the regression pod) applied at once in namespaces of
    their own; returned once the shipped examples are Ready or timed out."""
    kubectl(cluster, "apply", "-f", str(REPO / "crds"))
    wait_until_established(api, "inferencepolicies.batchpilot.dev")
    examples = [*EXAMPLE_LIST, BROKEN]
    namespaces = [unique_name(f"examples-{example.key}") for example in examples]
    applied: dict[str, Deployed] = {}
    try:
        # Side by side: each waits on its namespace's ServiceAccount and on kubectl.
        with concurrent.futures.ThreadPoolExecutor(len(examples)) as pool:
            futures = [
                pool.submit(apply_example, cluster, core, cluster_images, example, namespace)
                for example, namespace in zip(examples, namespaces, strict=True)
            ]
            for example, future in zip(examples, futures, strict=True):
                applied[example.key] = future.result()
        wait_until_ready(core, [applied[key] for key in SHIPPED])
        for key in SHIPPED:
            print(f"\n{key}: Ready after {applied[key].ready_s}", end="")
        yield applied
    finally:
        delete_namespaces(api, namespaces)


def ready(deployed: dict[str, Deployed], key: str) -> Deployed:
    example = deployed[key]
    if example.failure is not None:
        pytest.fail(example.failure, pytrace=False)
    return example


def gate_token(core: client.CoreV1Api, example: Deployed) -> str:
    secret = core.read_namespaced_secret(example.token_secret, example.namespace)
    return base64.b64decode(secret.data["token"]).decode()


def pod_ips(core: client.CoreV1Api, example: Deployed) -> dict[str, str]:
    pods = core.list_namespaced_pod(example.namespace, label_selector=example.selector).items
    return {pod.metadata.name: pod.status.pod_ip for pod in pods}


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", SHIPPED)
def test_example_pods_become_ready(deployed: dict[str, Deployed], key: str) -> None:
    example = ready(deployed, key)
    expected = 1  # replicas, see the module's docstring
    assert len(example.ready_s) == expected, example.ready_s
    assert max(example.ready_s.values()) < READY_TIMEOUT_S


@pytest.mark.parametrize("key", SHIPPED)
def test_example_serves_a_stream_and_answers_probes_and_scrapes(
    cluster: Cluster, core: client.CoreV1Api, deployed: dict[str, Deployed], key: str
) -> None:
    example = ready(deployed, key)
    auth = {"Authorization": f"Bearer {gate_token(core, example)}"}
    # Clients reach the gates through the Service; the bare Pod has none.
    entry = None
    if example.service is not None:
        service = core.read_namespaced_service(example.service, example.namespace)
        entry = f"http://{service.spec.cluster_ip}:{service.spec.ports[0].port}"
    max_tokens = 6
    for name, ip in pod_ips(core, example).items():
        admin = f"http://{ip}:{ADMIN_PORT}"
        gate = entry or f"http://{ip}:{GATE_PORT}"
        completion = {"model": "m", "prompt": "hello", "max_tokens": max_tokens, "stream": True}
        results = in_node(
            cluster,
            _REQUESTS,
            [
                {"name": "completion", "method": "POST", "url": f"{gate}/v1/completions",
                 "body": completion, "retry_s": SERVICE_TIMEOUT_S},
                {"name": "readyz", "url": f"{admin}/readyz"},
                # What Prometheus scrapes on the pod IP: the engine and the gate.
                {"name": "engine_metrics", "url": f"http://{ip}:{example.engine_port}/metrics"},
                {"name": "gate_metrics", "url": f"{admin}/metrics"},
                {"name": "config", "url": f"{admin}/config", "headers": auth},
                # The Secret's token is the one the gate reads: writing the
                # applied knobs back authenticates and changes nothing.
                {"name": "put_config", "method": "PUT", "url": f"{admin}/config",
                 "body_from": "config", "headers": auth},
            ],
            SERVICE_TIMEOUT_S + 30,
        )  # fmt: skip
        stream = results["completion"]
        assert stream["status"] == 200, (name, stream)
        assert stream["type"].startswith("text/event-stream"), stream
        events = [block.removeprefix("data: ") for block in stream["body"].split("\n\n") if block]
        assert events[-1] == "[DONE]", stream["body"][-200:]
        texts = [json.loads(event)["choices"][0]["text"] for event in events[:-1]]
        assert len([text for text in texts if text]) == max_tokens, texts
        assert (results["readyz"]["status"], results["readyz"]["body"]) == (200, "ready\n")
        assert results["engine_metrics"]["status"] == 200, results["engine_metrics"]
        assert "# TYPE" in results["engine_metrics"]["body"]
        assert results["gate_metrics"]["status"] == 200, results["gate_metrics"]
        config = json.loads(results["config"]["body"])
        if key == "gate-sidecar-pod":
            # The shipped annotation, read from the Downward API file at start.
            assert config["source"] == "file", config
            assert config["knobs"]["max_concurrency"] == 128, config
        assert results["put_config"]["status"] == 200, results["put_config"]
        assert json.loads(results["put_config"]["body"])["changed"] is False


@pytest.mark.parametrize("key", SHIPPED)
def test_example_declares_the_ports_the_scrape_job_keeps(
    core: client.CoreV1Api, deployed: dict[str, Deployed], key: str
) -> None:
    """Prometheus finds the engine's and the gate's /metrics by port name: the
    job keeps exactly one port of each container, the one they serve on."""
    example = ready(deployed, key)
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())
    keep = next(
        rule
        for rule in job["relabel_configs"]
        if rule["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
    )
    assert keep["action"] == "keep"
    for pod in core.list_namespaced_pod(example.namespace).items:
        kept = {
            container.name: [
                port.container_port
                for port in container.ports or []
                if port.name and re.fullmatch(keep["regex"], port.name)
            ]
            for container in pod.spec.containers
        }
        engine = engine_container(example.workload)["name"]
        assert kept == {engine: [example.engine_port], GATE_CONTAINER: [ADMIN_PORT]}, kept


def test_knobs_annotation_reaches_the_gates_through_the_downward_api(
    cluster: Cluster, core: client.CoreV1Api, deployed: dict[str, Deployed]
) -> None:
    """The operator's fallback path: the pod annotation, as the kubelet writes
    it into the Downward API volume, becomes the gate's configuration."""
    examples = [ready(deployed, key) for key in SHIPPED]
    knobs = Knobs(max_concurrency=6, discipline="shortest-prompt-first", queue_deadline_ms=4321)
    # As the operator writes it (operator/gates.py).
    value = json.dumps(knobs.to_mapping(), sort_keys=True, separators=(",", ":"))
    urls, headers, patched_at = {}, {}, {}
    for example in examples:
        token = gate_token(core, example)
        for name, ip in pod_ips(core, example).items():
            target = f"{example.example.key}/{name}"
            urls[target] = f"http://{ip}:{ADMIN_PORT}/config"
            headers[target] = {"Authorization": f"Bearer {token}"}
            core.patch_namespaced_pod(
                name, example.namespace, {"metadata": {"annotations": {KNOBS_ANNOTATION: value}}}
            )
            patched_at[target] = time.time()
    expect = {
        "max_concurrency": 6,
        "discipline": "shortest-prompt-first",
        "queue_deadline_ms": 4321,
    }
    result = in_node(
        cluster,
        _WATCH_CONFIG,
        {
            "urls": urls,
            "headers": headers,
            "expect": dict.fromkeys(urls, expect),
            "deadline_s": DOWNWARD_TIMEOUT_S,
        },
        DOWNWARD_TIMEOUT_S + 30,
    )
    missing = {
        target: result["last"].get(target) for target in urls if target not in result["seen"]
    }
    assert not missing, f"no knobs from the annotation after {DOWNWARD_TIMEOUT_S:.0f} s: {missing}"
    delays = {target: round(result["seen"][target] - patched_at[target], 2) for target in urls}
    print(f"\nDownward API delay (patch to GET /config), s: {delays}", end="")


def test_engine_bound_to_loopback_never_becomes_ready(
    core: client.CoreV1Api, deployed: dict[str, Deployed]
) -> None:
    """The gate-sidecar-pod example as it shipped before its fix (engine on
    127.0.0.1, readiness probe on the pod IP) stays unready, while the
    shipped one is Ready: the suite sees that kind of wiring mistake."""
    ready(deployed, "gate-sidecar-pod")
    broken = deployed[BROKEN.key]
    name = broken.workload["metadata"]["name"]
    engine_name = engine_container(broken.workload)["name"]
    deadline = broken.applied_at + READY_TIMEOUT_S
    while True:
        pod = core.read_namespaced_pod(name, broken.namespace)
        assert not _pod_ready(pod), describe_pods(core, broken.namespace)
        statuses = {s.name: s for s in pod.status.container_statuses or []}
        engine = statuses.get(engine_name)
        if engine is not None and engine.state and engine.state.running:
            assert not engine.ready
            running_s = time.time() - engine.state.running.started_at.timestamp()
            if running_s >= BROKEN_OBSERVE_S:
                break
        assert time.monotonic() < deadline, describe_pods(core, broken.namespace)
        time.sleep(POLL_S)
    # The gate reaches the engine on the loopback and is ready; only the
    # kubelet's probe of the engine, on the pod IP, fails.
    assert statuses[GATE_CONTAINER].ready, describe_pods(core, broken.namespace)
    events = core.list_namespaced_event(
        broken.namespace, field_selector=f"involvedObject.name={name},reason=Unhealthy"
    ).items
    failures = [
        e.message
        for e in events
        if e.message.startswith("Readiness probe failed")
        and e.involved_object.field_path == f"spec.containers{{{engine_name}}}"
    ]
    assert failures, describe_pods(core, broken.namespace)
    assert "connection refused" in failures[0], failures
