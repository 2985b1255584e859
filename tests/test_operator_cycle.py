"""operator/cycle.py's step scheduling, and the liveness the policy timers feed (runtime.py)."""

from __future__ import annotations

import asyncio
import zlib

import pytest

from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.cycle import next_due
from batchpilot.operator.runtime import Operator, TimersStalled, open_operator


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
def test_next_due_lands_on_the_policys_phase(
    now: float, interval: float, phase: float, due: float
) -> None:
    assert next_due(now, interval, phase) == pytest.approx(due)


def test_phases_spread_many_policies_over_the_interval() -> None:
    """100 policies stepping together once are spread over the interval from their second step on."""
    interval = 30.0
    phases = [zlib.crc32(f"uid-{i}".encode()) / 2**32 for i in range(100)]
    second_steps = sorted(next_due(5.0, interval, phase) for phase in phases)
    assert all(5.0 < due <= 35.0 for due in second_steps)
    # No 3-second slice of the interval holds more than a quarter of them.
    busiest = max(
        sum(1 for due in second_steps if start <= due < start + 3.0) for start in range(5, 35)
    )
    assert busiest <= 25


def make_operator(stall_s: float) -> Operator:
    """An Operator as startup builds it, already closed: liveness reads only its own state."""

    async def opened_and_closed() -> Operator:
        op = await open_operator(OperatorConfig(liveness_stall_seconds=stall_s), kube=None)  # type: ignore[arg-type]
        await op.close()
        return op

    return asyncio.run(opened_and_closed())


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
def test_liveness_fails_only_when_timers_stall(
    policies: int, last_tick: float | None, now: float, alive: bool
) -> None:
    op = make_operator(stall_s=200.0)
    for index in range(policies):
        op.runtime(f"uid-{index}", f"p{index}", "ns")
    op.last_tick_s = last_tick
    if alive:
        assert op.liveness(now)["policies"] == policies
    else:
        with pytest.raises(TimersStalled, match="no policy timer fired for 201 s"):
            op.liveness(now)
