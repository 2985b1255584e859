"""The operator's log: one line per control step, one line per cause of trouble per minute.

Each control step logs one line with its decision (`step_line`): INFO when
the step ran, WARNING when a problem stopped it. `kubectl logs` then tells
what the operator did, step by step, without reading Events.

Trouble repeats: during an API server outage kopf's watches, Event posts
and the status writer each fail and log every second or so, and a policy
with a bad spec logs its problem at every tick. `RepeatLimiter`, a filter
on the log handlers, lets the first WARNING-or-worse line of each cause
through, holds back its repeats for `REPEAT_INTERVAL_S`, and appends their
count to the first line of that cause after the interval. A cause is the
logger, the level and the message with its numbers blanked out (attempt
counters, resource versions, addresses and delays differ on every try).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from batchpilot.contract.knobs import knobs_summary
from batchpilot.operator.status import CycleReport

# One line per cause per minute: an outage of an hour is ~60 lines per cause,
# and a cause that clears is never more than a minute from its last line.
REPEAT_INTERVAL_S = 60.0
# Causes remembered at once; past this, those quiet for a whole interval are
# forgotten (a new message per pod or policy name must not grow the map).
MAX_CAUSES = 512
# Numbers, and objects' addresses (`at 0x7f3a...`) in quoted exceptions.
_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")


@dataclass(slots=True)
class _Cause:
    logged_s: float  # when its last line went through
    held: int = 0  # repeats held back since


class RepeatLimiter(logging.Filter):
    """Passes one WARNING-or-worse line per cause per interval; INFO and below always."""

    def __init__(
        self,
        interval_s: float = REPEAT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        # kopf logs from its worker threads as well as from the event loop.
        self._lock = threading.Lock()
        self._causes: dict[tuple[str, int, str], _Cause] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        key = (record.name, record.levelno, _NUMBERS.sub("#", message))
        now = self._clock()
        with self._lock:
            cause = self._causes.get(key)
            if cause is not None and now - cause.logged_s < self._interval_s:
                cause.held += 1
                return False
            if cause is None and len(self._causes) >= MAX_CAUSES:
                self._forget_quiet(now)
            self._causes[key] = _Cause(now)
        if cause is not None and cause.held:
            record.msg = (
                f"{message} [and {cause.held} more like this in the "
                f"{now - cause.logged_s:.0f} s before]"
            )
            record.args = None
        return True

    def _forget_quiet(self, now: float) -> None:
        quiet = [
            key
            for key, cause in self._causes.items()
            if now - cause.logged_s >= self._interval_s and not cause.held
        ]
        for key in quiet:
            del self._causes[key]


def install(logger: logging.Logger) -> None:
    """One RepeatLimiter on every handler of `logger` (the root one that kopf configures)."""
    limiter = RepeatLimiter()
    for handler in logger.handlers:
        handler.addFilter(limiter)


def step_line(report: CycleReport) -> tuple[int, str]:
    """(level, line) for one control step: what it decided, or why it did not run."""
    mode = report.mode.value
    if report.problem is not None:
        reason, message = report.problem
        return logging.WARNING, f"mode {mode}; no step ({reason}: {message})"
    decision = report.decision
    assert decision is not None  # a report without a problem comes from a step
    pods = report.pods
    reporting = "-" if pods.reporting is None else str(pods.reporting)
    slo = {True: "met", False: "missed", None: "not judged"}[decision.conditions.slo_met]
    model = "model" if decision.quality.trusted else "feedback rule"
    parts = [
        f"mode {mode}",
        f"pods {pods.ready}/{pods.selected} ready, {reporting} reporting",
        f"SLO {slo}",
        f"recommends {knobs_summary(decision.target)} ({model})",
    ]
    actuation, held = report.actuation, report.held
    if actuation is not None:
        applied = f"at target {actuation.up_to_date}/{pods.ready}"
        if actuation.changed:
            applied += f", changed {', '.join(actuation.changed)}"
        if actuation.laggards:
            applied += f", {len(actuation.laggards)} laggard(s)"
        parts.append(applied)
    elif held is not None:
        parts.append(f"{held.running}/{pods.ready} still run {knobs_summary(held.knobs)} from Auto")
    else:
        parts.append("nothing applied")
    return logging.INFO, "; ".join(parts)
