"""operator/logs.py: one line per control step, one line per cause of trouble per interval."""

from __future__ import annotations

import logging

import pytest

from batchpilot.contract.knobs import Knobs
from batchpilot.contract.reasons import ConditionReason
from batchpilot.controller.explain import Conditions, Decision, ModelQuality
from batchpilot.controller.policy import Mode
from batchpilot.operator.logs import RepeatLimiter, step_line
from batchpilot.operator.status import ActuationReport, CycleReport, HeldReport, PodCounts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(
    message: str, *args: object, level: int = logging.ERROR, name: str = "kopf._cogs.clients.api"
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_repeats_of_one_cause_are_one_line_per_interval_with_their_count() -> None:
    clock = Clock()
    limiter = RepeatLimiter(interval_s=60.0, clock=clock)
    passed = []
    # An API outage: kopf's retries of one watch, two a second for 59 s, each
    # with its own attempt number and resource version.
    for attempt in range(118):
        line = record(
            "Request attempt %d failed; will retry: GET /api/v1/pods?resourceVersion=%d",
            attempt,
            4711 + attempt,
        )
        if limiter.filter(line):
            passed.append(line.getMessage())
        clock.now += 0.5
    assert passed == ["Request attempt 0 failed; will retry: GET /api/v1/pods?resourceVersion=4711"]
    clock.now = 1061.0
    later = record(
        "Request attempt %d failed; will retry: GET /api/v1/pods?resourceVersion=%d", 200, 9000
    )
    assert limiter.filter(later)
    assert later.getMessage() == (
        "Request attempt 200 failed; will retry: GET /api/v1/pods?resourceVersion=9000 "
        "[and 117 more like this in the 61 s before]"
    )
    # Counted afresh from there.
    clock.now += 1.0
    assert not limiter.filter(
        record(
            "Request attempt %d failed; will retry: GET /api/v1/pods?resourceVersion=%d", 201, 9001
        )
    )


@pytest.mark.parametrize(
    ("other", "passes"),
    [
        (record("Failed to post an event. Ignoring and continuing."), True),  # another cause
        (
            record("Request attempt 1 failed; will retry: GET /api/v1/pods", level=logging.WARNING),
            True,
        ),  # another level
        (
            record("Request attempt 1 failed; will retry: GET /api/v1/pods", name="kopf.objects"),
            True,
        ),  # another logger
        (
            record("Request attempt 7 failed; will retry: GET /api/v1/pods"),
            False,
        ),  # only the number differs
        (
            record("policy ns/chat: mode Auto; ...", level=logging.INFO),
            True,
        ),  # INFO is never held back
    ],
)
def test_a_cause_is_logger_level_and_message_without_its_numbers(
    other: logging.LogRecord, passes: bool
) -> None:
    limiter = RepeatLimiter(interval_s=60.0, clock=Clock())
    assert limiter.filter(record("Request attempt 1 failed; will retry: GET /api/v1/pods"))
    assert limiter.filter(other) is passes


def decision(slo_met: bool | None = True) -> Decision:
    target = Knobs(max_concurrency=48)
    return Decision(
        time_s=0.0,
        target=target,
        per_pod={"chat-0": target, "chat-1": target},
        actuate=True,
        reasons=(),
        quality=ModelQuality(40, 0.1, True),
        conditions=Conditions(True, True, slo_met),
        step_seconds={},
    )


@pytest.mark.parametrize(
    ("report", "level", "line"),
    [
        (
            CycleReport(
                Mode.AUTO,
                PodCounts(2, 2, 2),
                decision(),
                ActuationReport(Knobs(max_concurrency=48), 2, (), ("chat-0", "chat-1")),
            ),
            logging.INFO,
            "mode Auto; pods 2/2 ready, 2 reporting; SLO met; recommends cap=48 tokens=none fcfs deadline=none "
            "(model); at target 2/2, changed chat-0, chat-1",
        ),
        (
            CycleReport(
                Mode.RECOMMEND,
                PodCounts(2, 2, 2),
                decision(None),
                held=HeldReport(Knobs(max_concurrency=15), 2),
            ),
            logging.INFO,
            "mode Recommend; pods 2/2 ready, 2 reporting; SLO not judged; recommends cap=48 tokens=none fcfs "
            "deadline=none (model); 2/2 still run cap=15 tokens=none fcfs deadline=none from Auto",
        ),
        (
            CycleReport(Mode.RECOMMEND, PodCounts(1, 1), decision(False)),
            logging.INFO,
            "mode Recommend; pods 1/1 ready, - reporting; SLO missed; recommends cap=48 tokens=none fcfs "
            "deadline=none (model); nothing applied",
        ),
        (
            CycleReport(
                Mode.AUTO,
                PodCounts(2, 2),
                problem=(ConditionReason.METRICS_UNAVAILABLE, "connection refused"),
            ),
            logging.WARNING,
            "mode Auto; no step (MetricsUnavailable: connection refused)",
        ),
    ],
)
def test_one_line_per_step_says_what_it_decided(report: CycleReport, level: int, line: str) -> None:
    assert step_line(report) == (level, line)
