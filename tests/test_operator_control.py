"""operator/control.py: telling "Prometheus did not answer" from "metrics missing"."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from batchpilot.controller.observe import MetricsUnavailable, RawWindow
from batchpilot.controller.policy import EngineSpec, Policy, Slo
from batchpilot.operator.control import ControllerStepper, OutageWatch, stable_message


class FlakyPrometheus:
    """custom_query that fails while `down`, else answers an empty vector (no series)."""

    def __init__(self) -> None:
        self.down = False
        self.queries = 0

    def custom_query(self, query: str, params: dict[str, object] | None = None, timeout: int | None = None) -> list[object]:
        self.queries += 1
        if self.down:
            # requests' connection errors are OSErrors; the source maps them.
            raise ConnectionError(
                f"HTTPConnectionPool(host='p', port=9090): Max retries exceeded with url: "
                f"/api/v1/query?query=up&time={params['time'] if params else 0} "
                f"(Caused by NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f{self.queries:04x}>'))"
            )
        return []


@pytest.fixture
def stepper_and_prometheus() -> tuple[ControllerStepper, FlakyPrometheus]:
    prometheus = FlakyPrometheus()
    policy = Policy.default_for(Slo(2000, 50), EngineSpec())
    return ControllerStepper(policy, prometheus), prometheus


def test_outage_is_reported_and_clears(stepper_and_prometheus: tuple[ControllerStepper, FlakyPrometheus]) -> None:
    stepper, prometheus = stepper_and_prometheus
    first = stepper.run_once(1000.0, ["a", "b"])
    assert stepper.outage is None
    assert first.conditions.metrics_available is False  # answered, but no series: missing, not an outage
    prometheus.down = True
    held = stepper.run_once(1030.0, ["a", "b"])
    assert stepper.outage is not None and "Max retries exceeded" in stepper.outage
    assert held.target == first.target  # the controller holds; the operator skips actuation
    prometheus.down = False
    stepper.run_once(1060.0, ["a", "b"])
    assert stepper.outage is None


def test_the_same_outage_reads_the_same_on_every_attempt(stepper_and_prometheus: tuple[ControllerStepper, FlakyPrometheus]) -> None:
    stepper, prometheus = stepper_and_prometheus
    prometheus.down = True
    messages = set()
    for now in (1000.0, 1030.0, 1060.0):
        stepper.run_once(now, ["a"])
        messages.add(stepper.outage)
    assert len(messages) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("failed: url: /api/v1/query?query=x&time=17.5 (Caused by X)", "failed: url: /api/v1/query (Caused by X)"),
        ("object at 0x7f3a2c (refused)", "object (refused)"),
        ("plain message", "plain message"),
    ],
)
def test_stable_message(text: str, expected: str) -> None:
    assert stable_message(text) == expected


def test_outage_watch_passes_windows_through() -> None:
    class Source:
        def read(self, now_s: float, pods: Sequence[str]) -> RawWindow:
            if now_s < 0:
                raise MetricsUnavailable("down")
            return RawWindow(now_s, {})

    watch = OutageWatch(Source())
    assert watch.read(5.0, ["a"]).time_s == 5.0 and watch.failure is None
    with pytest.raises(MetricsUnavailable):
        watch.read(-1.0, ["a"])
    assert watch.failure == "down"
