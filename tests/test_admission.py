"""The admission core shared by the gate and the simulator: caps, budget, order, deadline."""

from __future__ import annotations

import random

import pytest

from batchpilot.contract.knobs import KnobError, Knobs
from batchpilot.gate.admission import AdmissionQueue, Ticket, TicketState


def _ticket(arrival_s: float, prompt: int = 100, output: int = 10, priority: int = 0, name: str = "") -> Ticket:
    return Ticket(prompt, output, arrival_s, priority, payload=name)


def _drain_order(queue: AdmissionQueue, now: float) -> list[str]:
    """Admit one at a time (release each) and return the payload order."""
    order = []
    while queue.queued:
        admitted = queue.admit(now)
        assert len(admitted) == 1
        order.append(admitted[0].payload)
        queue.release(admitted[0])
    return order


@pytest.mark.parametrize(
    ("knobs", "tickets", "expected"),
    [
        (
            Knobs(max_concurrency=1, discipline="fcfs"),
            [("a", 0.0, 500, 0), ("b", 1.0, 100, 0), ("c", 2.0, 50, 0)],
            ["a", "b", "c"],
        ),
        (
            Knobs(max_concurrency=1, discipline="shortest-prompt-first", aging_ms=1000),
            [("long", 0.0, 5000, 0), ("mid", 0.1, 1000, 0), ("short", 0.2, 100, 0)],
            ["short", "mid", "long"],
        ),
        # Aging: the long prompt's 4 s penalty (4,000 tokens x 1 s) has run out
        # against a short prompt that arrived 5 s later.
        (
            Knobs(max_concurrency=1, discipline="shortest-prompt-first", aging_ms=1000),
            [("long", 0.0, 4000, 0), ("late-short", 5.0, 100, 0)],
            ["long", "late-short"],
        ),
        (
            Knobs(max_concurrency=1, discipline="priority", aging_ms=1000),
            [("low", 0.0, 100, 0), ("high", 0.5, 100, 2), ("mid", 0.6, 100, 1)],
            ["high", "mid", "low"],
        ),
        # Aging: a priority-2 request arriving 3 s after a priority-0 one does
        # not overtake it (2 levels x 1 s < 3 s).
        (
            Knobs(max_concurrency=1, discipline="priority", aging_ms=1000),
            [("old-low", 0.0, 100, 0), ("new-high", 3.0, 100, 2)],
            ["old-low", "new-high"],
        ),
    ],
)
def test_disciplines_order_admissions(knobs, tickets, expected):
    queue = AdmissionQueue(knobs)
    for name, arrival, prompt, priority in tickets:
        queue.push(_ticket(arrival, prompt=prompt, priority=priority, name=name))
    assert _drain_order(queue, now=10.0) == expected


@pytest.mark.parametrize("cap", [1, 3, 8])
def test_concurrency_cap_is_never_exceeded(cap):
    rng = random.Random(cap)
    queue = AdmissionQueue(Knobs(max_concurrency=cap))
    running: list[Ticket] = []
    peak = 0
    for step in range(500):
        queue.push(_ticket(step * 0.01, prompt=rng.randint(1, 4000)))
        running += queue.admit(step * 0.01)
        peak = max(peak, len(running))
        if running and rng.random() < 0.6:
            queue.release(running.pop(rng.randrange(len(running))))
    assert peak == cap
    assert queue.in_flight == len(running)


def test_token_budget_limits_inflight_tokens_and_lets_an_oversized_request_run_alone():
    queue = AdmissionQueue(Knobs(max_inflight_tokens=1000))
    small = [_ticket(i, prompt=290, output=10) for i in range(4)]  # 300 tokens each
    for ticket in small:
        queue.push(ticket)
    admitted = queue.admit(5.0)
    assert len(admitted) == 3 and queue.inflight_tokens == 900
    for ticket in admitted:
        queue.release(ticket)
    huge = _ticket(6.0, prompt=5000)
    queue.push(huge)
    assert queue.admit(7.0) == [small[3]]
    # The oversized request waits for the queue to empty, then runs alone.
    assert queue.admit(7.0) == []
    queue.release(small[3])
    assert queue.admit(8.0) == [huge]


def test_head_of_line_blocks_smaller_requests_behind_a_large_one():
    queue = AdmissionQueue(Knobs(max_inflight_tokens=1000))
    first = _ticket(0.0, prompt=600)
    queue.push(first)
    assert queue.admit(0.0) == [first]
    queue.push(_ticket(1.0, prompt=800, name="big"))
    queue.push(_ticket(2.0, prompt=10, name="small"))
    assert queue.admit(2.0) == []


def test_deadline_sheds_only_requests_that_waited_too_long():
    queue = AdmissionQueue(Knobs(max_concurrency=1, queue_deadline_ms=1500))
    tickets = [_ticket(t, name=str(t)) for t in (0.0, 0.5, 1.0, 2.0)]
    for ticket in tickets:
        queue.push(ticket)
    assert queue.admit(0.0) == [tickets[0]]
    shed = queue.expire(now=2.2)
    assert [t.payload for t in shed] == ["0.5"]
    assert all(t.state is TicketState.SHED for t in shed)
    assert queue.queued == 2
    # Admitted requests are never shed, however long they run.
    assert tickets[0].state is TicketState.ADMITTED


def test_reconfigure_keeps_every_request_and_rekeys_the_queue():
    queue = AdmissionQueue(Knobs(max_concurrency=2))
    tickets = [_ticket(i * 0.1, prompt=1000 - i * 100, name=f"r{i}") for i in range(6)]
    for ticket in tickets:
        queue.push(ticket)
    running = queue.admit(1.0)
    assert len(running) == 2
    # Lowering the cap below what runs stops admissions but kills nothing.
    queue.reconfigure(Knobs(max_concurrency=1, discipline="shortest-prompt-first", aging_ms=60_000))
    assert queue.admit(1.0) == [] and queue.in_flight == 2
    for ticket in running:
        queue.release(ticket)
    assert _drain_order(queue, now=2.0) == ["r5", "r4", "r3", "r2"]


def test_cancelled_request_is_never_admitted_and_release_twice_is_an_error():
    queue = AdmissionQueue(Knobs(max_concurrency=1))
    gone, stays = _ticket(0.0, name="gone"), _ticket(1.0, name="stays")
    queue.push(gone)
    queue.push(stays)
    queue.cancel(gone)
    admitted = queue.admit(2.0)
    assert admitted == [stays]
    queue.release(stays)
    with pytest.raises(ValueError, match="released"):
        queue.release(stays)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"max_inflight_tokens": -5}, "max_inflight_tokens"),
        ({"discipline": "lifo"}, "discipline"),
        ({"queue_deadline_ms": 1.5}, "queue_deadline_ms"),
        ({"max_num_batched_tokens": 8}, "max_num_batched_tokens"),
        ({"batch_size": 8}, "batch_size"),
    ],
)
def test_invalid_knobs_name_the_field(data, field):
    with pytest.raises(KnobError) as caught:
        Knobs.from_mapping(data)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_knobs_round_trip_through_a_mapping():
    knobs = Knobs(max_concurrency=64, discipline="priority", queue_deadline_ms=2000)
    assert Knobs.from_mapping(knobs.to_mapping()) == knobs


def test_requests_that_left_are_forgotten_without_a_deadline():
    queue = AdmissionQueue(Knobs(max_concurrency=4))
    for step in range(10_000):
        queue.push(_ticket(float(step)))
        for ticket in queue.admit(float(step)):
            queue.release(ticket)
    # Bounded memory over a long life: only waiting requests are remembered.
    assert queue.queued == 0
    assert all(not load.queued for load in queue.class_loads())
    assert sum(len(q.by_arrival) + len(q.heap) for q in queue._classes.values()) == 0
