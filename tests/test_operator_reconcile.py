"""Pure parts of operator/reconcile.py: step scheduling and reading pods."""

from __future__ import annotations

import asyncio
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from batchpilot.controller.knobs import Knobs
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.gates import APPLIED_ANNOTATION, AppliedRecord
from batchpilot.operator.metrics import OperatorMetrics
from batchpilot.operator.reconcile import Operator, TimersStalled, fleet_setting, next_due, pod_info


@pytest.mark.parametrize(
    ("now", "interval", "phase", "due"),
    [
        (0.0, 30.0, 0.0, 30.0),
        (29.9, 30.0, 0.0, 30.0),
        (30.0, 30.0, 0.0, 60.0),  # strictly after now
        (0.0, 30.0, 0.5, 15.0),
        (15.0, 30.0, 0.5, 45.0),
        (100.0, 10.0, 0.25, 102.5),
        (1_000_000.3, 30.0, 0.9, 1_000_017.0),
    ],
)
def test_next_due_lands_on_the_policys_phase(now: float, interval: float, phase: float, due: float) -> None:
    assert next_due(now, interval, phase) == pytest.approx(due)


def test_phases_spread_many_policies_over_the_interval() -> None:
    """100 policies stepping together once are spread over the interval from their second step on."""
    interval = 30.0
    phases = [zlib.crc32(f"uid-{i}".encode()) / 2**32 for i in range(100)]
    second_steps = sorted(next_due(5.0, interval, phase) for phase in phases)
    assert all(5.0 < due <= 35.0 for due in second_steps)
    # No 3-second slice of the interval holds more than a quarter of them.
    busiest = max(sum(1 for due in second_steps if start <= due < start + 3.0) for start in range(5, 35))
    assert busiest <= 25


def status(ready: str, ip: str | None = "127.0.0.2") -> dict[str, Any]:
    return {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}


@pytest.mark.parametrize(
    ("pod_status", "deleting", "ready"),
    [
        (status("True"), False, True),
        (status("False"), False, False),
        (status("True"), True, False),  # terminating pods take no new settings
        ({"podIP": "127.0.0.2"}, False, False),
        ({}, False, False),
    ],
)
def test_pod_readiness(pod_status: dict[str, Any], deleting: bool, ready: bool) -> None:
    assert pod_info("p", "uid-p", {}, {}, pod_status, deleting).ready is ready


def test_pod_info_keeps_what_selection_and_actuation_need() -> None:
    info = pod_info("chat-0", "uid-chat-0", {"b": "2", "a": "1"}, {APPLIED_ANNOTATION: "{}", "other": "x"}, status("True"), False)
    assert info.label_map == {"a": "1", "b": "2"}
    assert info.ip == "127.0.0.2"
    assert info.applied == "{}"
    assert info.record is None  # unreadable record reads as absent
    assert hash(info) == hash(pod_info("chat-0", "uid-chat-0", {"a": "1", "b": "2"}, {APPLIED_ANNOTATION: "{}"}, status("True"), False))


def make_operator(stall_s: float) -> Operator:
    # No gates or API server: liveness reads only the operator's own state.
    return Operator(config=OperatorConfig(liveness_stall_seconds=stall_s), gates=None, kube=None,  # type: ignore[arg-type]
                    metrics=OperatorMetrics(), step_slots=asyncio.Semaphore(1),
                    step_threads=ThreadPoolExecutor(1))


@pytest.mark.parametrize(
    ("policies", "last_tick", "now", "alive"),
    [
        (0, None, 1000.0, True),  # nothing to run yet
        (0, 0.0, 1000.0, True),  # policies all gone: no timers expected
        (2, 990.0, 1000.0, True),
        (2, 800.0, 1000.0, True),  # exactly at the limit
        (2, 799.0, 1000.0, False),
    ],
)
def test_liveness_fails_only_when_timers_stall(policies: int, last_tick: float | None, now: float,
                                               alive: bool) -> None:
    op = make_operator(stall_s=200.0)
    for index in range(policies):
        op.runtime(f"uid-{index}", f"p{index}", "ns")
    op.last_tick_s = last_tick
    if alive:
        assert op.liveness(now)["policies"] == policies
    else:
        with pytest.raises(TimersStalled, match="no policy timer fired for 201 s"):
            op.liveness(now)


FLEET, CANARY = Knobs(max_concurrency=32), Knobs(max_concurrency=48)


def recorded(name: str, knobs: Knobs, at: str, policy: str = "chat", canary: bool = False) -> Any:
    record = AppliedRecord(policy, knobs, 2, at, startup=FLEET, canary=canary)
    return pod_info(name, f"uid-{name}", {}, {APPLIED_ANNOTATION: record.to_json()}, status("True"), False)


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        # Two pods, one mid-canary: the older setting is the fleet's, whichever pod comes first.
        ([recorded("a", CANARY, "2026-11-23T01:10:00Z"), recorded("b", FLEET, "2026-11-23T01:00:00Z")], FLEET),
        ([recorded("a", FLEET, "2026-11-23T01:00:00Z"), recorded("b", CANARY, "2026-11-23T01:10:00Z")], FLEET),
        # Written in the same second: the canary's record says which is which.
        ([recorded("a", CANARY, "2026-11-23T01:00:00Z", canary=True), recorded("b", FLEET, "2026-11-23T01:00:00Z")],
         FLEET),
        # Only the canary has a record: the other pod still runs the startup settings it keeps.
        ([recorded("a", CANARY, "2026-11-23T01:00:00Z", canary=True),
          pod_info("b", "uid-b", {}, {}, status("True"), False)], FLEET),
        # A majority is the fleet's setting, however recent.
        ([recorded("a", CANARY, "2026-11-23T01:10:00Z"), recorded("b", CANARY, "2026-11-23T01:10:00Z"),
          recorded("c", FLEET, "2026-11-23T01:00:00Z")], CANARY),
        # Another policy's records and pods without one say nothing.
        ([recorded("a", CANARY, "2026-11-23T01:10:00Z", policy="other"),
          pod_info("b", "uid-b", {}, {}, status("True"), False)], None),
    ],
)
def test_the_setting_a_policy_left_its_pods_on(pods: list[Any], expected: Knobs | None) -> None:
    assert fleet_setting(pods, "chat") == expected
