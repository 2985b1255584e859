"""PromQL injection end to end: hostile pod names and namespaces against a REAL Prometheus.

tests/test_controller_promql.py proves at the string level that a hostile
name stays inside its literal. Here the controller's own `PrometheusSource`
runs its queries against a real Prometheus that holds a victim tenant's
series next to the policy's own; a hostile name must select nothing that is
not literally its own, and above all never the victim's series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from policyspec import controller_spec
from prometheus_api_client import PrometheusConnect
from stack import PrometheusServer, ScrapeTarget

from batchpilot.controller.policy import Policy, PolicyError
from batchpilot.controller.signals import Signal
from batchpilot.controller.sources import PrometheusSource
from batchpilot.sim.sandbox.process import serve_in_thread

VICTIM_NAMESPACE = "victim"
VICTIM_POD = "secret-pod"
OWN_NAMESPACE = "tenant-a"
OWN_POD = "llm-0"

# The gate's series, with distinct values per tenant so a leak is visible.
EXPOSITION = b"""\
# TYPE batchpilot_gate_inflight_requests gauge
batchpilot_gate_inflight_requests 3
# TYPE batchpilot_gate_queue_length gauge
batchpilot_gate_queue_length 5
# TYPE batchpilot_gate_admitted_total counter
batchpilot_gate_admitted_total 100
"""

HOSTILE_PODS = [
    ".*",
    ".+",
    f"{OWN_POD}|{VICTIM_POD}",
    f'{OWN_POD}"}} or batchpilot_gate_inflight_requests{{pod="{VICTIM_POD}',
    f'x", namespace="{VICTIM_NAMESPACE}',
    f'{VICTIM_POD}"}} or vector(1) #',
    "secret-.*",
    "(secret)-pod",
    "\\",
    "new\nline",
]
HOSTILE_NAMESPACES = [
    ".*",
    f'{OWN_NAMESPACE}", namespace=~".*',
    f'{OWN_NAMESPACE}"}} or {{namespace="{VICTIM_NAMESPACE}',
    f"{OWN_NAMESPACE}|{VICTIM_NAMESPACE}",
    "",
]


class _Exporter(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(EXPOSITION)))
        self.end_headers()
        self.wfile.write(EXPOSITION)

    def log_message(self, format: str, *args: object) -> None:
        return  # scrapes every second would flood the test output


@pytest.fixture(scope="module")
def tenant_prometheus(
    prometheus: Callable[..., PrometheusServer],
) -> Iterator[PrometheusConnect]:
    with serve_in_thread(_Exporter) as port:
        address = f"127.0.0.1:{port}"
        server = prometheus(
            [
                ScrapeTarget(address, {"namespace": OWN_NAMESPACE, "pod": OWN_POD}),
                ScrapeTarget(address, {"namespace": VICTIM_NAMESPACE, "pod": VICTIM_POD}),
            ]
        )
        try:
            yield PrometheusConnect(url=server.url, disable_ssl=True)
        finally:
            server.stop()


def _read(
    client: PrometheusConnect, namespace: str, pods: list[str]
) -> dict[Signal, dict[str, object]]:
    policy = Policy.from_spec(controller_spec(), name="p", namespace=namespace)
    window = PrometheusSource(client, policy).read(time.time(), pods)
    return {signal: dict(by_pod) for signal, by_pod in window.readings.items()}


def _wait_for_own_series(client: PrometheusConnect) -> dict[Signal, dict[str, object]]:
    # rate() needs two scrapes (1 s apart) inside the window.
    deadline = time.monotonic() + 30
    while True:
        readings = _read(client, OWN_NAMESPACE, [OWN_POD])
        if readings[Signal.ADMITTED] or time.monotonic() > deadline:
            return readings
        time.sleep(0.5)


def test_controls_own_and_victim_series_are_there(tenant_prometheus: PrometheusConnect) -> None:
    """Without this the checks below would pass on an empty Prometheus."""
    own = _wait_for_own_series(tenant_prometheus)
    assert own[Signal.GATE_INFLIGHT] == {OWN_POD: 3.0}
    assert own[Signal.GATE_QUEUE] == {OWN_POD: 5.0}
    assert OWN_POD in own[Signal.ADMITTED]
    victim = _read(tenant_prometheus, VICTIM_NAMESPACE, [VICTIM_POD])
    assert victim[Signal.GATE_INFLIGHT] == {VICTIM_POD: 3.0}


@pytest.mark.parametrize("hostile_pod", HOSTILE_PODS)
def test_hostile_pod_name_selects_no_foreign_series(
    tenant_prometheus: PrometheusConnect, hostile_pod: str
) -> None:
    _wait_for_own_series(tenant_prometheus)
    readings = _read(tenant_prometheus, OWN_NAMESPACE, [hostile_pod, "llm-9"])
    # Neither pod exists: every signal comes back empty, not the own pod's
    # series and not the victim's.
    assert {signal: by_pod for signal, by_pod in readings.items() if by_pod} == {}


@pytest.mark.parametrize("hostile_namespace", HOSTILE_NAMESPACES)
@pytest.mark.parametrize("pods", [[OWN_POD], [VICTIM_POD], [OWN_POD, VICTIM_POD]])
def test_hostile_namespace_selects_no_foreign_series(
    tenant_prometheus: PrometheusConnect, hostile_namespace: str, pods: list[str]
) -> None:
    _wait_for_own_series(tenant_prometheus)
    readings = _read(tenant_prometheus, hostile_namespace, pods)
    assert {signal: by_pod for signal, by_pod in readings.items() if by_pod} == {}


@pytest.mark.parametrize(
    ("metrics", "field"),
    [
        ({"podLabel": 'pod="x"} or vector(1) #'}, "spec.metrics.podLabel"),
        ({"namespaceLabel": "namespace,pod"}, "spec.metrics.namespaceLabel"),
        (
            {"overrides": {"running": {"metric": "up) or (vector(1)"}}},
            "spec.metrics.overrides.running.metric",
        ),
        (
            {"overrides": {"running": {"metric": "m", "labels": {'a="b",pod': "x"}}}},
            "spec.metrics.overrides.running.labels",
        ),
    ],
)
def test_hostile_label_and_metric_names_are_refused_before_any_query(
    metrics: dict[str, object], field: str
) -> None:
    with pytest.raises(PolicyError) as refused:
        Policy.from_spec(controller_spec(metrics=metrics))
    assert refused.value.field.startswith(field), refused.value.field
