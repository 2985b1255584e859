"""Admission control shared by the real gate and the simulator's model of it.

Pure and clock-agnostic: callers pass `now` in seconds (the event loop's clock
in the gate, virtual time in the simulator), so the benchmark measures exactly
the logic that runs in the pod.

Every queue discipline is expressed as a *static* sort key, which keeps the
queue a plain heap:

- `fcfs`: arrival time.
- `priority`: arrival time minus `priority * aging`; a request of priority p
  is treated as if it had arrived p agings earlier, so a low-priority request
  is overtaken only by higher ones that arrive within that window: it cannot
  starve.
- `shortest-prompt-first`: arrival time plus `aging` per 1,000 prompt tokens;
  short prompts go first, and a long one waits at most its length-scaled
  penalty.

Admission is head-of-line: when the best-ranked request does not fit the
concurrency cap or the token budget, nothing behind it is admitted either,
so a large request is never starved by a stream of small ones. A request
larger than the whole token budget is admitted alone once nothing else is in
flight, rather than blocking the queue forever.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from batchpilot.contract.knobs import Knobs


class TicketState(Enum):
    QUEUED = "queued"
    ADMITTED = "admitted"
    RELEASED = "released"
    SHED = "shed"
    CANCELLED = "cancelled"


@dataclass(slots=True, eq=False)
class Ticket:
    """One request waiting for, or holding, a place in the engine."""

    prompt_tokens: int
    max_output_tokens: int
    arrival_s: float
    priority: int = 0
    payload: Any = None
    state: TicketState = TicketState.QUEUED
    admitted_s: float | None = None

    @property
    def tokens(self) -> int:
        """What the request may occupy in the KV cache at its longest."""
        return self.prompt_tokens + self.max_output_tokens


class AdmissionQueue:
    """A queue in front of the engine with a concurrency cap and a token budget.

    Reconfiguring never drops a request: queued ones are re-ranked under the
    new discipline, admitted ones keep running, and a lower cap only stops
    further admissions until enough of them finish.
    """

    def __init__(self, knobs: Knobs) -> None:
        self._knobs = knobs
        self._heap: list[tuple[float, int, Ticket]] = []
        # Arrival order, for deadline expiry without scanning the heap.
        self._by_arrival: deque[Ticket] = deque()
        self._seq = itertools.count()
        self.queued = 0
        self.in_flight = 0
        self.inflight_tokens = 0

    @property
    def knobs(self) -> Knobs:
        return self._knobs

    def reconfigure(self, knobs: Knobs) -> None:
        rekey = (knobs.discipline, knobs.aging_ms) != (self._knobs.discipline, self._knobs.aging_ms)
        self._knobs = knobs
        if rekey:
            live = [entry for entry in self._heap if entry[2].state is TicketState.QUEUED]
            self._heap = [(self._key(t), seq, t) for _, seq, t in live]
            heapq.heapify(self._heap)

    def push(self, ticket: Ticket) -> None:
        """Queue a request; callers push in arrival order."""
        ticket.state = TicketState.QUEUED
        heapq.heappush(self._heap, (self._key(ticket), next(self._seq), ticket))
        self._by_arrival.append(ticket)
        self.queued += 1

    def admit(self, now: float, at_most: int | None = None) -> list[Ticket]:
        """Admit, in discipline order, every queued request that fits now (up to `at_most`)."""
        admitted: list[Ticket] = []
        cap = self._knobs.max_concurrency
        budget = self._knobs.max_inflight_tokens
        heap = self._heap
        while heap and (at_most is None or len(admitted) < at_most):
            ticket = heap[0][2]
            if ticket.state is not TicketState.QUEUED:
                heapq.heappop(heap)
                continue
            if cap is not None and self.in_flight >= cap:
                break
            if (
                budget is not None
                and self.in_flight > 0
                and self.inflight_tokens + ticket.tokens > budget
            ):
                break
            heapq.heappop(heap)
            ticket.state = TicketState.ADMITTED
            ticket.admitted_s = now
            self.queued -= 1
            self.in_flight += 1
            self.inflight_tokens += ticket.tokens
            admitted.append(ticket)
        self._forget_departed()
        return admitted

    def expire(self, now: float) -> list[Ticket]:
        """Shed queued requests that have waited longer than the queue deadline."""
        deadline_ms = self._knobs.queue_deadline_ms
        arrivals = self._by_arrival
        shed: list[Ticket] = []
        while arrivals:
            ticket = arrivals[0]
            if ticket.state is not TicketState.QUEUED:
                arrivals.popleft()
                continue
            if deadline_ms is None or (now - ticket.arrival_s) * 1000.0 <= deadline_ms:
                break
            arrivals.popleft()
            ticket.state = TicketState.SHED
            self.queued -= 1
            shed.append(ticket)
        return shed

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw a queued request (its client went away); no-op otherwise."""
        if ticket.state is TicketState.QUEUED:
            ticket.state = TicketState.CANCELLED
            self.queued -= 1
            self._forget_departed()

    def release(self, ticket: Ticket) -> None:
        """Return an admitted request's place; call exactly once when it ends."""
        if ticket.state is not TicketState.ADMITTED:
            raise ValueError(f"release of a request in state {ticket.state.value}")
        ticket.state = TicketState.RELEASED
        self.in_flight -= 1
        self.inflight_tokens -= ticket.tokens

    def oldest_wait_s(self, now: float) -> float:
        """How long the longest-waiting queued request has waited (0 when none)."""
        for ticket in self._by_arrival:
            if ticket.state is TicketState.QUEUED:
                return now - ticket.arrival_s
        return 0.0

    def _forget_departed(self) -> None:
        # Without a queue deadline nothing else trims the arrival list, and a
        # gate that runs for weeks would keep every request it ever saw.
        arrivals = self._by_arrival
        while arrivals and arrivals[0].state is not TicketState.QUEUED:
            arrivals.popleft()

    def _key(self, ticket: Ticket) -> float:
        discipline = self._knobs.discipline
        if discipline == "fcfs":
            return ticket.arrival_s
        aging_s = self._knobs.aging_ms / 1000.0
        if discipline == "priority":
            return ticket.arrival_s - ticket.priority * aging_s
        return ticket.arrival_s + ticket.prompt_tokens / 1000.0 * aging_s
