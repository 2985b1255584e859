"""The gate's waiting room and applied configuration, on one asyncio event loop.

`AdmissionQueue` decides who goes next; this module turns its decisions into
awakened requests. Each queued request awaits a future that the queue's
"pump" resolves: True when admitted, False when shed at its deadline. The
pump runs whenever something changes (arrival, release, reconfiguration) and
at the next queue deadline, via one timer, so a request is shed on time even
when nothing else happens.

Reconfiguration is one synchronous step on the event loop (queue reconfigure
+ version bump), so no request ever sees half a configuration, and no
request is dropped: queued ones are re-ranked, admitted ones keep running.
A write's conditions (its fencing token, the version it expects) are checked
in that same step, so no other write can land between the check and the apply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from batchpilot.contract.gate_api import FENCE_HEADER, ConfigSource, GateConfig
from batchpilot.contract.gate_metrics import ConfigRejectReason, FailedReason, ShedReason
from batchpilot.contract.knobs import DEFAULT_CLASS, Knobs
from batchpilot.gate.admission import AdmissionQueue, Ticket, TicketState
from batchpilot.gate.estimate import RequestSize
from batchpilot.gate.metrics import GateMetrics
from batchpilot.gate.native import FAILURE_STATUSES, NativeAdapter, NativeResult

log = logging.getLogger("batchpilot.gate")

# Fire the deadline timer this long after a deadline passes: expiry uses a
# strict "waited longer than", and asyncio timers may fire ~1 ms early.
_DEADLINE_SLACK_S = 0.002


@dataclass(frozen=True, slots=True)
class AppliedConfig:
    knobs: Knobs
    version: int
    source: ConfigSource
    applied_unix_s: float


@dataclass(frozen=True, slots=True)
class WriteConditions:
    """What a configuration write is based on (see contract/gate_api.py)."""

    # The writer's fencing token; None: an unfenced write (a person, or an
    # operator without leader election), accepted whatever the gate has seen.
    fence: int | None = None
    # The versions `If-Match` names; None: whichever version is applied.
    versions: frozenset[int] | None = None


class WriteRefused(Exception):
    """A write whose conditions no longer hold; nothing was applied.

    `details` are the numbers the refusal compared, for the caller to read
    without parsing the message.
    """

    def __init__(
        self, reason: ConfigRejectReason, message: str, field: str, details: Mapping[str, int]
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.details = details


class Gate:
    """Admission and configuration state of one gate process."""

    def __init__(self, knobs: Knobs, native: NativeAdapter | None = None) -> None:
        self.queue = AdmissionQueue(knobs)
        # Reported by GET /config so that whoever steers the gate can always
        # put back what it started with, even after losing its own record.
        self.startup_knobs = knobs
        self.config = AppliedConfig(knobs, 1, ConfigSource.STARTUP, time.time())
        self.native = native
        self.native_result: NativeResult | None = None
        # The highest fencing token accepted since the start; None before the
        # first fenced write. Kept in memory only: after a restart the next
        # leader's write sets it again (see docs/gate.md for the window).
        self.fence: int | None = None
        self.metrics = GateMetrics(lambda: self.queue, lambda: self.config.version)
        self._apply_lock = asyncio.Lock()
        self._deadline_timer: asyncio.TimerHandle | None = None

    async def acquire(
        self, size: RequestSize, arrival_s: float, service_class: str = DEFAULT_CLASS
    ) -> Ticket | None:
        """Wait for a place in the engine: the admitted ticket, or None when shed.

        `arrival_s` is on the event loop's clock; `service_class` is the SLO
        class to queue in (`estimate.classify`). The ticket's `service_class`
        is where it was admitted or shed: the default class when its own was
        configured away while it waited. If the caller is cancelled
        (its client went away) the request leaves the queue, or gives its
        place back if it was admitted in the meantime.
        """
        loop = asyncio.get_running_loop()
        decision: asyncio.Future[bool] = loop.create_future()
        ticket = Ticket(
            size.prompt_tokens,
            size.max_output_tokens,
            arrival_s,
            size.priority,
            payload=decision,
            service_class=service_class,
        )
        self.queue.push(ticket)
        self._pump()
        try:
            admitted = await decision
        except asyncio.CancelledError:
            if ticket.state is TicketState.QUEUED:
                self.queue.cancel(ticket)
            elif ticket.state is TicketState.ADMITTED:
                self.release(ticket)
            raise
        return ticket if admitted else None

    def release(self, ticket: Ticket) -> None:
        """Give an admitted request's place back and admit whoever fits now."""
        self.queue.release(ticket)
        self._pump()

    def reconfigure(self, knobs: Knobs, source: ConfigSource) -> bool:
        """Apply `knobs` atomically; False (and no version bump) when nothing changes."""
        if knobs == self.queue.knobs:
            return False
        self.queue.reconfigure(knobs)
        self.metrics.serve_classes(knobs.class_names)
        self.config = AppliedConfig(knobs, self.config.version + 1, source, time.time())
        log.info("applied knobs version %d from %s: %s", self.config.version, source, knobs)
        self._pump()
        return True

    async def apply(
        self, knobs: Knobs, source: ConfigSource, conditions: WriteConditions | None = None
    ) -> bool:
        """Reconfigure, then pass the engine-native part on; returns whether the gate changed.

        Raises `WriteRefused`, having applied nothing, when `conditions` do
        not hold. They are checked after the lock is taken and with no await
        before the reconfiguration, so a write queued behind a newer one is
        judged against what that newer one left.

        The native call is made even when the gate's own knobs are unchanged,
        so that repeating a write retries an engine that refused it before.
        Calls are serialized so the engine sees changes in the order applied.
        """
        async with self._apply_lock:
            if conditions is not None:
                self._admit_write(conditions)
            changed = self.reconfigure(knobs, source)
            await self._send_native()
            return changed

    def _admit_write(self, conditions: WriteConditions) -> None:
        """Raise `WriteRefused` unless `conditions` hold; raise the fence when they do."""
        fence = conditions.fence
        if fence is not None and self.fence is not None and fence < self.fence:
            self.metrics.config_writes_rejected[ConfigRejectReason.STALE_FENCE] += 1
            raise WriteRefused(
                ConfigRejectReason.STALE_FENCE,
                f"{FENCE_HEADER}: fence {fence} is lower than fence {self.fence}, which this gate "
                "already accepted: a newer leader has written since, so this writer is no longer "
                "the leader; nothing was applied",
                FENCE_HEADER,
                {"fence": fence, "highest_fence": self.fence},
            )
        version = self.config.version
        if conditions.versions is not None and version not in conditions.versions:
            self.metrics.config_writes_rejected[ConfigRejectReason.VERSION_MISMATCH] += 1
            expected = " or ".join(str(v) for v in sorted(conditions.versions))
            raise WriteRefused(
                ConfigRejectReason.VERSION_MISMATCH,
                f"If-Match: names version {expected}, but version {version} is applied, so "
                "nothing was applied: GET /config, decide again from what it shows, and send "
                "its version",
                "If-Match",
                {"version": version},
            )
        if fence is not None and (self.fence is None or fence > self.fence):
            before = "none" if self.fence is None else self.fence
            log.info("accepted fence %d (highest before: %s): a new leader writes", fence, before)
            self.fence = fence

    async def resend_native(self) -> None:
        """Send the applied knobs to the engine again (after it restarted)."""
        async with self._apply_lock:
            await self._send_native()

    async def _send_native(self) -> None:
        if self.native is None:
            return
        result = await self.native.apply(self.queue.knobs)
        self.native_result = result
        if result.status in FAILURE_STATUSES:
            self.metrics.failed[FailedReason.NATIVE_APPLY] += 1
            log.warning("native %s adapter: %s: %s", result.adapter, result.status, result.detail)

    def describe(self) -> GateConfig:
        """What `GET /config` answers."""
        return GateConfig(
            knobs=self.config.knobs,
            version=self.config.version,
            source=self.config.source,
            startup=self.startup_knobs,
            applied_unix_s=self.config.applied_unix_s,
            native=None if self.native_result is None else self.native_result.to_mapping(),
            fence=self.fence,
        )

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        metrics = self.metrics
        # A ticket's class is one the gate serves (the queue puts any other in
        # the default class), and every such class has its metrics.
        for ticket in self.queue.expire(now):
            metrics.shed[ShedReason.QUEUE_DEADLINE] += 1
            metrics.classes[ticket.service_class].shed += 1
            _resolve(ticket, False)
        for ticket in self.queue.admit(now):
            waited_s = now - ticket.arrival_s
            metrics.admitted += 1
            metrics.queue_wait.observe(waited_s)
            served = metrics.classes[ticket.service_class]
            served.admitted += 1
            served.admitted_tokens += ticket.tokens
            served.queue_wait.observe(waited_s)
            _resolve(ticket, True)
        self._arm_deadline_timer(loop, now)

    def _arm_deadline_timer(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        expiry = self.queue.next_expiry_s()
        due = None if expiry is None else expiry + _DEADLINE_SLACK_S
        timer = self._deadline_timer
        if timer is not None and due is not None and timer.when() == due:
            return
        if timer is not None:
            timer.cancel()
        self._deadline_timer = None if due is None else loop.call_at(due, self._pump)


def _resolve(ticket: Ticket, admitted: bool) -> None:
    decision: asyncio.Future[bool] = ticket.payload
    # Already cancelled: the waiter is unwinding and will release or
    # withdraw the ticket itself (see Gate.acquire).
    if not decision.done():
        decision.set_result(admitted)
