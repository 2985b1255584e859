"""`batchpilot operator` as a process against the real API server and Prometheus:
errors mapped to conditions and Events, no status writes when nothing changed,
the liveness endpoint and /metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from batchpilot.operator.kube import GROUP, PLURAL, VERSION
from batchpilot.sim.sandbox.operator_process import OperatorProcess
from batchpilot.sim.sandbox.process import http_get

# Policies step every 2 s here, the operator ticks every 0.5 s.
INTERVAL_S = 2


@pytest.fixture
def operator(kube_api: Any, inferencepolicy_crd: None, namespace: str, prometheus: Callable[..., Any],
             tmp_path: Path) -> Iterator[OperatorProcess]:
    with OperatorProcess(workdir=tmp_path, kubeconfig=kube_api.kubeconfig, namespaces=[namespace],
                         prometheus_url=prometheus([]).url).start() as running:
        yield running


def create_policy(api: client.ApiClient, namespace: str, name: str, **spec: Any) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferencePolicy", "metadata": {"name": name},
            "spec": {"slo": {"ttftMs": 2000, "tpotMs": 50}, "behavior": {"intervalSeconds": INTERVAL_S}, **spec}}
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def read_policy(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def ready_condition(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    conditions = (read_policy(api, namespace, name).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), None)


def eventually(check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout_s:.0f} s")
        time.sleep(0.25)
    return value


def metric(url: str, name: str) -> float:
    reply = http_get(url)
    assert reply is not None and reply[0] == 200
    return sum(float(line.rpartition(" ")[2]) for line in reply[1].decode().splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_errors_become_conditions_and_one_event(operator: OperatorProcess, k8s_client: client.ApiClient,
                                                namespace: str) -> None:
    create_policy(k8s_client, namespace, "bad-endpoint", selector={"matchLabels": {"app": "x"}},
                  metrics={"endpoint": "nowhere"})
    create_policy(k8s_client, namespace, "no-pods", selector={"matchLabels": {"app": "none"}})
    bad = eventually(lambda: ready_condition(k8s_client, namespace, "bad-endpoint"), "bad-endpoint has Ready")
    assert (bad["status"], bad["reason"]) == ("False", "InvalidSpec")
    assert bad["message"].startswith("spec.metrics.endpoint: 'nowhere' is not a Prometheus endpoint")
    empty = eventually(lambda: ready_condition(k8s_client, namespace, "no-pods"), "no-pods has Ready")
    assert (empty["status"], empty["reason"]) == ("False", "NoPodsSelected")
    time.sleep(3 * INTERVAL_S)  # several ticks with the same problem
    events = client.CoreV1Api(k8s_client).list_namespaced_event(namespace).items
    invalid = [e for e in events if e.reason == "InvalidSpec" and e.involved_object.name == "bad-endpoint"]
    assert len(invalid) == 1 and invalid[0].type == "Warning"
    # The operator is still alive, and its probe (which kopf caches for 10 s) counts both policies.
    assert operator.running()
    eventually(lambda: json.loads(http_get(operator.health_url)[1])["timers"]["policies"] == 2,
               "the liveness probe counting both policies", timeout_s=20)


def test_no_status_write_while_nothing_changes(operator: OperatorProcess, k8s_client: client.ApiClient,
                                               namespace: str, make_serving_pod: Callable[..., Any]) -> None:
    for index, ip in enumerate(("127.0.0.2", "127.0.0.3")):
        make_serving_pod(namespace, f"quiet-{index}", pod_ip=ip, ports={"admin": 9090}, labels={"app": "quiet"})
    create_policy(k8s_client, namespace, "quiet", selector={"matchLabels": {"app": "quiet"}})
    eventually(lambda: (read_policy(k8s_client, namespace, "quiet").get("status") or {}).get("recommendation"),
               "a recommendation published")
    eventually(lambda: metric(operator.metrics_url, "batchpilot_operator_decisions_total") >= 2, "two steps")
    settled = read_policy(k8s_client, namespace, "quiet")
    decisions_before = metric(operator.metrics_url, "batchpilot_operator_decisions_total")
    time.sleep(4 * INTERVAL_S)
    later = read_policy(k8s_client, namespace, "quiet")
    assert metric(operator.metrics_url, "batchpilot_operator_decisions_total") >= decisions_before + 2
    # Steps ran, nothing they found changed: not one write to the policy.
    assert later["metadata"]["resourceVersion"] == settled["metadata"]["resourceVersion"]
    status = later["status"]
    assert status["pods"] == {"selected": 2, "ready": 2, "reporting": 0, "summary": "2/2"}
    assert status["applied"] == {"summary": "not applied (mode Recommend)"}
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == "True" and conditions["MetricsAvailable"] == "False"


def log_lines(operator: OperatorProcess, needle: str) -> list[str]:
    """The operator's log lines (kopf's format: `[time] logger [LEVEL] message`) that contain `needle`."""
    assert operator.process is not None
    return [line for line in (operator.workdir / "operator.log").read_text().splitlines() if needle in line]


def test_one_info_line_per_step(operator: OperatorProcess, k8s_client: client.ApiClient, namespace: str,
                                make_serving_pod: Callable[..., Any]) -> None:
    make_serving_pod(namespace, "told-0", pod_ip="127.0.0.2", ports={"admin": 9090}, labels={"app": "told"})
    create_policy(k8s_client, namespace, "told", selector={"matchLabels": {"app": "told"}})
    eventually(lambda: metric(operator.metrics_url, "batchpilot_operator_decisions_total") >= 3, "three steps")
    time.sleep(INTERVAL_S / 2)  # the third step's line is written after the metric moves
    decisions = metric(operator.metrics_url, "batchpilot_operator_decisions_total")
    lines = log_lines(operator, f"policy {namespace}/told: ")
    # One per step (a fourth may have run between the two reads), each at INFO with the decision.
    assert decisions <= len(lines) <= decisions + 1, lines
    assert all("[INFO" in line and "mode Recommend; pods 1/1 ready" in line and "recommends cap=" in line
               for line in lines), lines


def test_prometheus_down_is_named_by_every_condition_and_logged_once(
    kube_api: Any, inferencepolicy_crd: None, namespace: str, k8s_client: client.ApiClient,
    make_serving_pod: Callable[..., Any], tmp_path: Path,
) -> None:
    """B2 and the log: every step fails the same way; the conditions say so, the log says it once a minute."""
    make_serving_pod(namespace, "dark-0", pod_ip="127.0.0.2", ports={"admin": 9090}, labels={"app": "dark"})
    # Port 9 (discard) on loopback: nothing listens, every query is refused.
    with OperatorProcess(workdir=tmp_path, kubeconfig=kube_api.kubeconfig, namespaces=[namespace],
                         prometheus_url="http://127.0.0.1:9").start() as operator:
        create_policy(k8s_client, namespace, "dark", selector={"matchLabels": {"app": "dark"}})
        eventually(lambda: metric(operator.metrics_url, 'batchpilot_operator_errors_total{reason="MetricsUnavailable"}')
                   >= 4, "four failed steps")
        status = read_policy(k8s_client, namespace, "dark")["status"]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "MetricsUnavailable")
        assert (conditions["SLOMet"]["status"], conditions["SLOMet"]["reason"]) == ("Unknown", "QueryFailed")
        assert (conditions["Degraded"]["status"], conditions["Degraded"]["reason"]) == ("True", "MetricsUnavailable")
        refused = conditions["Ready"]["message"]
        assert refused in conditions["SLOMet"]["message"] and refused in conditions["Degraded"]["message"]
        lines = log_lines(operator, f"policy {namespace}/dark: ")
        assert len(lines) == 1 and "[WARNING" in lines[0] and "no step (MetricsUnavailable" in lines[0], lines
