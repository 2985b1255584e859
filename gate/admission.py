"""Admission control shared by the real gate and the simulator's model of it.

Pure and clock-agnostic: callers pass `now` in seconds (the event loop's clock
in the gate, virtual time in the simulator), so the benchmark measures exactly
the logic that runs in the pod.

Every request belongs to one SLO class (`Knobs.classes`; with none declared,
every request is in the default class and the gate behaves as one queue).
Each class has its own queue, ordered by the discipline, each expressed as a
*static* sort key, which keeps a queue a plain heap:

- `fcfs`: arrival time.
- `priority`: arrival time minus `priority * aging`, where `priority` is the
  request's own (`x-priority`); a request of priority p is treated as if it
  had arrived p agings earlier, so a low-priority request is overtaken only
  by higher ones that arrive within that window: it cannot starve.
- `shortest-prompt-first`: arrival time plus `aging` per 1,000 prompt tokens;
  short prompts go first, and a long one waits at most its length-scaled
  penalty.

Between classes, the next admission goes to:

1. the class of the highest priority band, with aging: a class head's rank
   is its arrival time minus `class priority * aging`, as for requests, so a
   lower class is overtaken only by higher-class requests that arrived less
   than (priority difference x aging) after its head, and waits at most that
   long behind them (its queue deadline sheds it before then if shorter);
2. within a band of equal priority, the class that has been served the
   fewest tokens per unit of weight (a virtual token counter: each admission
   adds prompt + requested output tokens / weight). A class that was idle is
   lifted to the band's current counter when it queues again, so idle time is
   not banked as credit to flood the band with later;
3. a class at its own `max_concurrency` is passed over, not waited for.

Admission is head-of-line: when the chosen request does not fit the gate's
concurrency cap or token budget, nothing is admitted behind it either, so a
large request is never starved by a stream of small ones. A request larger
than the whole token budget is admitted alone once nothing else is in flight,
rather than blocking the queue forever. A queued request is shed at its
class's queue deadline (the knobs' own when the class sets none).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from batchpilot.contract.knobs import DEFAULT_CLASS, Knobs, ServiceClass


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
    # The SLO class it is served in; a name the gate does not serve means
    # the default class.
    service_class: str = DEFAULT_CLASS

    @property
    def tokens(self) -> int:
        """What the request may occupy in the KV cache at its longest."""
        return self.prompt_tokens + self.max_output_tokens


@dataclass(frozen=True, slots=True)
class ClassLoad:
    """One class's share of the gate right now (the per-class gauges)."""

    name: str
    queued: int
    in_flight: int
    inflight_tokens: int


class _ClassQueue:
    """One class's queue, counts and virtual token counter."""

    __slots__ = (
        "by_arrival",
        "heap",
        "in_flight",
        "inflight_tokens",
        "name",
        "queued",
        "served",
        "settings",
    )

    def __init__(self, settings: ServiceClass) -> None:
        self.name = settings.name
        self.settings = settings
        self.heap: list[tuple[float, int, Ticket]] = []
        # Arrival order, for deadline expiry without scanning the heap.
        self.by_arrival: deque[Ticket] = deque()
        self.queued = 0
        self.in_flight = 0
        self.inflight_tokens = 0
        # Tokens admitted / weight since the gate started (minus lifts).
        self.served = 0.0

    def head(self) -> Ticket | None:
        heap = self.heap
        while heap:
            ticket = heap[0][2]
            if ticket.state is TicketState.QUEUED:
                return ticket
            heapq.heappop(heap)
        return None

    def oldest(self) -> Ticket | None:
        arrivals = self.by_arrival
        while arrivals and arrivals[0].state is not TicketState.QUEUED:
            arrivals.popleft()
        return arrivals[0] if arrivals else None

    def at_cap(self) -> bool:
        cap = self.settings.max_concurrency
        return cap is not None and self.in_flight >= cap


class AdmissionQueue:
    """A queue per class in front of the engine, with a concurrency cap and a token budget.

    Reconfiguring never drops a request: queued ones are re-ranked under the
    new discipline (those of a class that no longer exists move to the default
    class), admitted ones keep running, and a lower cap only stops further
    admissions until enough of them finish.
    """

    def __init__(self, knobs: Knobs) -> None:
        self._knobs = knobs
        self._seq = itertools.count()
        self.queued = 0
        self.in_flight = 0
        self.inflight_tokens = 0
        self._classes: dict[str, _ClassQueue] = {}
        # Classes reconfigured away while requests of theirs were in flight:
        # kept until those are released, so every count stays exact.
        self._retired: dict[str, _ClassQueue] = {}
        # Per priority band: the counter of the class last admitted there,
        # which a class that starts queueing again is lifted to.
        self._band_floor: dict[int, float] = {}
        self._build_classes(knobs)

    @property
    def knobs(self) -> Knobs:
        return self._knobs

    def class_loads(self) -> Iterator[ClassLoad]:
        """Every class the gate serves, in `Knobs.class_names` order."""
        for queue in self._classes.values():
            yield ClassLoad(queue.name, queue.queued, queue.in_flight, queue.inflight_tokens)

    def reconfigure(self, knobs: Knobs) -> None:
        before = self._knobs
        self._knobs = knobs
        if knobs.classes != before.classes:
            self._build_classes(knobs)
        elif (knobs.discipline, knobs.aging_ms) != (before.discipline, before.aging_ms):
            for queue in self._classes.values():
                self._rekey(queue, [t for _, _, t in queue.heap if t.state is TicketState.QUEUED])

    def push(self, ticket: Ticket) -> None:
        """Queue a request; callers push in arrival order."""
        queue = self._classes.get(ticket.service_class)
        if queue is None:
            ticket.service_class = DEFAULT_CLASS
            queue = self._classes[DEFAULT_CLASS]
        if queue.queued == 0 and self._knobs.classes:
            # Idle time is not credit: start level with the band.
            floor = self._band_floor.get(queue.settings.priority)
            if floor is not None and queue.served < floor:
                queue.served = floor
        ticket.state = TicketState.QUEUED
        heapq.heappush(queue.heap, (self._key(ticket), next(self._seq), ticket))
        queue.by_arrival.append(ticket)
        queue.queued += 1
        self.queued += 1

    def admit(self, now: float, at_most: int | None = None) -> list[Ticket]:
        """Admit, in order, every queued request that fits now (up to `at_most`)."""
        admitted: list[Ticket] = []
        cap = self._knobs.max_concurrency
        budget = self._knobs.max_inflight_tokens
        while self.queued and (at_most is None or len(admitted) < at_most):
            queue = self._next_class()
            if queue is None:
                break
            ticket = queue.heap[0][2]
            if cap is not None and self.in_flight >= cap:
                break
            if (
                budget is not None
                and self.in_flight > 0
                and self.inflight_tokens + ticket.tokens > budget
            ):
                break
            heapq.heappop(queue.heap)
            ticket.state = TicketState.ADMITTED
            ticket.admitted_s = now
            tokens = ticket.tokens
            queue.queued -= 1
            queue.in_flight += 1
            queue.inflight_tokens += tokens
            self.queued -= 1
            self.in_flight += 1
            self.inflight_tokens += tokens
            self._band_floor[queue.settings.priority] = queue.served
            queue.served += tokens / queue.settings.weight
            admitted.append(ticket)
        for queue in self._classes.values():
            queue.oldest()  # forget departed requests at the front
        return admitted

    def expire(self, now: float) -> list[Ticket]:
        """Shed queued requests that have waited longer than their class's queue deadline."""
        shed: list[Ticket] = []
        for queue in self._classes.values():
            deadline_ms = self._deadline_ms(queue)
            if deadline_ms is None:
                continue
            while (ticket := queue.oldest()) is not None:
                if (now - ticket.arrival_s) * 1000.0 <= deadline_ms:
                    break
                queue.by_arrival.popleft()
                ticket.state = TicketState.SHED
                queue.queued -= 1
                self.queued -= 1
                shed.append(ticket)
        return shed

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw a queued request (its client went away); no-op otherwise."""
        if ticket.state is TicketState.QUEUED:
            ticket.state = TicketState.CANCELLED
            queue = self._classes[ticket.service_class]
            queue.queued -= 1
            self.queued -= 1
            queue.oldest()

    def release(self, ticket: Ticket) -> None:
        """Return an admitted request's place; call exactly once when it ends."""
        if ticket.state is not TicketState.ADMITTED:
            raise ValueError(f"release of a request in state {ticket.state.value}")
        ticket.state = TicketState.RELEASED
        name = ticket.service_class
        queue = self._classes.get(name) or self._retired[name]
        queue.in_flight -= 1
        queue.inflight_tokens -= ticket.tokens
        if queue.in_flight == 0 and self._retired.get(name) is queue:
            del self._retired[name]
        self.in_flight -= 1
        self.inflight_tokens -= ticket.tokens

    def next_expiry_s(self) -> float | None:
        """When the next queued request passes its class's deadline (None: never)."""
        due = None
        for queue in self._classes.values():
            deadline_ms = self._deadline_ms(queue)
            if deadline_ms is None or not queue.queued:
                continue
            oldest = queue.oldest()
            if oldest is not None:
                at = oldest.arrival_s + deadline_ms / 1000.0
                due = at if due is None or at < due else due
        return due

    def _next_class(self) -> _ClassQueue | None:
        """The class whose head is admitted next (module docstring), or None."""
        if len(self._classes) == 1:
            (only,) = self._classes.values()
            return None if only.at_cap() or only.head() is None else only
        # Per band, the class served the fewest tokens per weight (older head on a tie).
        bands: dict[int, tuple[float, float, _ClassQueue]] = {}
        for queue in self._classes.values():
            if not queue.queued or queue.at_cap():
                continue
            head = queue.head()
            if head is None:
                continue
            priority = queue.settings.priority
            entry = (queue.served, head.arrival_s, queue)
            held = bands.get(priority)
            if held is None or entry[:2] < held[:2]:
                bands[priority] = entry
        if not bands:
            return None
        # Across bands: the oldest head once aged by its band's priority.
        aging_s = self._knobs.aging_ms / 1000.0
        _, _, best = min(
            (arrival_s - priority * aging_s, -priority, queue)
            for priority, (_, arrival_s, queue) in bands.items()
        )
        return best

    def _deadline_ms(self, queue: _ClassQueue) -> int | None:
        own = queue.settings.queue_deadline_ms
        return own if own is not None else self._knobs.queue_deadline_ms

    def _build_classes(self, knobs: Knobs) -> None:
        previous = self._classes
        classes: dict[str, _ClassQueue] = {}
        for name in knobs.class_names:
            settings = knobs.service_class(name)
            queue = previous.pop(name, None) or self._retired.pop(name, None)
            if queue is None:
                queue = _ClassQueue(settings)
            queue.settings = settings
            classes[name] = queue
        self._classes = classes
        default = classes[DEFAULT_CLASS]
        moved: list[Ticket] = []
        for name, queue in previous.items():
            for _, _, ticket in queue.heap:
                if ticket.state is TicketState.QUEUED:
                    ticket.service_class = DEFAULT_CLASS
                    moved.append(ticket)
            queue.heap.clear()
            queue.by_arrival.clear()
            default.queued += queue.queued
            queue.queued = 0
            if queue.in_flight:
                self._retired[name] = queue
        for queue in classes.values():
            live = [t for _, _, t in queue.heap if t.state is TicketState.QUEUED]
            if queue is default:
                live += moved
            self._rekey(queue, live)

    def _rekey(self, queue: _ClassQueue, live: list[Ticket]) -> None:
        live.sort(key=lambda t: t.arrival_s)
        queue.heap = [(self._key(t), next(self._seq), t) for t in live]
        heapq.heapify(queue.heap)
        queue.by_arrival = deque(live)

    def _key(self, ticket: Ticket) -> float:
        discipline = self._knobs.discipline
        if discipline == "fcfs":
            return ticket.arrival_s
        aging_s = self._knobs.aging_ms / 1000.0
        if discipline == "priority":
            return ticket.arrival_s - ticket.priority * aging_s
        return ticket.arrival_s + ticket.prompt_tokens / 1000.0 * aging_s
