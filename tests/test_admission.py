"""The admission core shared by the gate and the simulator: caps, budget, order, deadline."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from batchpilot.contract.knobs import KnobError, Knobs, ServiceClass
from batchpilot.gate.admission import AdmissionQueue, Ticket, TicketState


def _ticket(
    arrival_s: float, prompt: int = 100, output: int = 10, priority: int = 0, name: str = ""
) -> Ticket:
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


# SLO classes: a queue per class, priority bands with aging between them, a
# virtual token counter between classes of equal priority.


def _class_knobs(*classes: ServiceClass, **knobs: Any) -> Knobs:
    return Knobs(classes=classes, **knobs)


def _in(service_class: str, arrival_s: float, prompt: int = 100, output: int = 10) -> Ticket:
    ticket = _ticket(arrival_s, prompt=prompt, output=output, name=f"{service_class}@{arrival_s:g}")
    ticket.service_class = service_class
    return ticket


@pytest.mark.parametrize(
    ("batch_at", "interactive_at", "first"),
    [
        # The higher class goes first when it arrives within aging of the head.
        (0.0, 0.5, "interactive"),
        (0.0, 0.99, "interactive"),
        # Aging: a batch head that waited longer than (priority difference x
        # aging) = 1 x 1 s before the interactive request came keeps its turn.
        (0.0, 1.01, "batch"),
        (0.0, 3.0, "batch"),
        # Arrived before the batch head: first whatever the aging.
        (1.0, 0.0, "interactive"),
    ],
)
def test_higher_class_goes_first_until_the_lower_head_has_aged(
    batch_at: float, interactive_at: float, first: str
) -> None:
    knobs = _class_knobs(
        ServiceClass("interactive", priority=1),
        ServiceClass("batch"),
        max_concurrency=1,
        aging_ms=1000,
    )
    queue = AdmissionQueue(knobs)
    for name, arrival in sorted(
        [("batch", batch_at), ("interactive", interactive_at)], key=lambda x: x[1]
    ):
        queue.push(_in(name, arrival))
    order = _drain_order(queue, now=5.0)
    assert [name.split("@")[0] for name in order] == [
        first,
        "batch" if first == "interactive" else "interactive",
    ]


def test_priority_difference_scales_the_aging_window() -> None:
    # Priority 3 over 0 with 1 s aging: a head 2.5 s old is still overtaken.
    knobs = _class_knobs(
        ServiceClass("top", priority=3), ServiceClass("low"), max_concurrency=1, aging_ms=1000
    )
    queue = AdmissionQueue(knobs)
    queue.push(_in("low", 0.0))
    queue.push(_in("low", 0.1))
    queue.push(_in("top", 2.5))
    assert [name.split("@")[0] for name in _drain_order(queue, now=3.0)] == ["top", "low", "low"]


def _backlogged_shares(
    classes: tuple[ServiceClass, ...], prompts: dict[str, int], admissions: int, cap: int = 1
) -> dict[str, int]:
    """Admitted tokens per class, every class kept backlogged, one admission at a time."""
    queue = AdmissionQueue(_class_knobs(*classes, max_concurrency=cap))
    clock = itertools.count()
    for name, prompt in prompts.items():
        for _ in range(4):
            queue.push(_in(name, next(clock) * 0.001, prompt=prompt))
    served = dict.fromkeys(prompts, 0)
    running: list[Ticket] = []
    for _ in range(admissions):
        now = next(clock) * 0.001
        if len(running) == cap:
            queue.release(running.pop(0))
        (ticket,) = queue.admit(now, at_most=1)
        running.append(ticket)
        served[ticket.service_class] += ticket.tokens
        # Closed loop: the class sends another as soon as one is admitted.
        queue.push(_in(ticket.service_class, now, prompt=prompts[ticket.service_class]))
    return served


def _jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


@pytest.mark.parametrize("cap", [1, 4])
def test_equal_priority_classes_share_tokens_not_requests(cap: int) -> None:
    # A sends 5,000-token prompts, B 50-token ones: per request, A would get
    # 99% of the tokens; per token, each gets half.
    served = _backlogged_shares(
        (ServiceClass("a"), ServiceClass("b")), {"a": 5_000, "b": 50}, admissions=3_000, cap=cap
    )
    assert _jain([served["a"], served["b"]]) > 0.99
    assert 0.9 < served["a"] / served["b"] < 1.1


@pytest.mark.parametrize(
    ("weights", "prompts"),
    [((2.0, 1.0), (500, 500)), ((2.0, 1.0), (50, 2_000)), ((1.0, 3.0), (300, 300))],
)
def test_weights_divide_the_tokens(weights: tuple[float, float], prompts: tuple[int, int]) -> None:
    classes = (ServiceClass("a", weight=weights[0]), ServiceClass("b", weight=weights[1]))
    served = _backlogged_shares(classes, {"a": prompts[0], "b": prompts[1]}, admissions=3_000)
    ratio = served["a"] / served["b"]
    assert ratio == pytest.approx(weights[0] / weights[1], rel=0.05)
    # Per unit of weight, the shares are fair.
    assert _jain([served["a"] / weights[0], served["b"] / weights[1]]) > 0.99


def test_a_class_at_its_cap_is_passed_over_not_waited_for() -> None:
    knobs = _class_knobs(
        ServiceClass("capped", priority=1, max_concurrency=1),
        ServiceClass("other"),
        max_concurrency=4,
    )
    queue = AdmissionQueue(knobs)
    capped = [_in("capped", t) for t in (0.0, 0.1, 0.2)]
    other = [_in("other", t) for t in (1.0, 1.1)]
    for ticket in [*capped, *other]:
        queue.push(ticket)
    # The higher class gets its one slot; its next requests wait while the
    # lower class fills the free slots behind it.
    assert queue.admit(2.0) == [capped[0], *other]
    assert queue.in_flight == 3 and queue.queued == 2
    queue.release(capped[0])
    assert queue.admit(2.1) == [capped[1]]
    assert {load.name: load.in_flight for load in queue.class_loads()} == {
        "capped": 1,
        "other": 2,
        "default": 0,
    }


def test_class_deadlines_shed_only_that_class() -> None:
    knobs = _class_knobs(
        ServiceClass("interactive", priority=1, queue_deadline_ms=200),
        ServiceClass("batch"),
        max_concurrency=1,
        queue_deadline_ms=5_000,
    )
    queue = AdmissionQueue(knobs)
    blocker = _in("batch", 0.0)
    queue.push(blocker)
    assert queue.admit(0.0) == [blocker]
    waiting = [
        _in("interactive", 0.1),
        _in("interactive", 0.5),
        _in("batch", 0.1),
        _in("default", 0.1),
    ]
    for ticket in waiting:
        queue.push(ticket)
    # The interactive class's own deadline comes first; the others use the knobs'.
    assert queue.next_expiry_s() == pytest.approx(0.3)
    shed = queue.expire(now=0.4)
    assert shed == [waiting[0]]
    assert queue.next_expiry_s() == pytest.approx(0.7)
    assert queue.expire(now=1.0) == [waiting[1]]
    # The batch and default classes wait the knobs' 5 s.
    assert queue.expire(now=5.0) == []
    assert queue.expire(now=5.2) == [waiting[2], waiting[3]]
    assert queue.queued == 0 and blocker.state is TicketState.ADMITTED


def test_reconfiguring_a_class_away_moves_its_queue_to_default_and_keeps_counts_exact() -> None:
    two = _class_knobs(ServiceClass("a", priority=1), ServiceClass("b"), max_concurrency=2)
    queue = AdmissionQueue(two)
    running = [_in("a", 0.0), _in("a", 0.1)]
    for ticket in running:
        queue.push(ticket)
    assert queue.admit(0.2) == running
    waiting = [_in("a", 0.3), _in("b", 0.4), _in("a", 0.5)]
    for ticket in waiting:
        queue.push(ticket)
    queue.reconfigure(_class_knobs(ServiceClass("b"), max_concurrency=2))
    loads = {load.name: load for load in queue.class_loads()}
    assert set(loads) == {"b", "default"}
    assert (loads["default"].queued, loads["b"].queued) == (2, 1)
    assert [t.service_class for t in waiting] == ["default", "b", "default"]
    # Requests already running in the removed class are released exactly.
    assert queue.in_flight == 2 and queue.inflight_tokens == 220
    for ticket in running:
        queue.release(ticket)
    assert (queue.in_flight, queue.inflight_tokens) == (0, 0)
    assert queue._retired == {}
    admitted = queue.admit(1.0)
    assert len(admitted) == 2 and queue.queued == 1
    loads = {load.name: load for load in queue.class_loads()}
    assert sum(load.in_flight for load in loads.values()) == queue.in_flight == 2
    assert sum(load.queued for load in loads.values()) == queue.queued == 1
    # Putting the class back while nothing of it runs starts it afresh.
    queue.reconfigure(two)
    assert {load.name for load in queue.class_loads()} == {"a", "b", "default"}


def test_an_idle_class_is_lifted_to_the_band_and_banks_no_credit() -> None:
    queue = AdmissionQueue(_class_knobs(ServiceClass("a"), ServiceClass("b"), max_concurrency=1))
    # A is served alone for a long time: 1,000 admissions while B is idle.
    for step in range(1_000):
        ticket = _in("a", step * 0.01)
        queue.push(ticket)
        assert queue.admit(step * 0.01) == [ticket]
        queue.release(ticket)
    # Then both are backlogged with equal requests: they alternate at once;
    # B does not get 1,000 admissions in a row for the time it was idle.
    for step in range(20):
        queue.push(_in("a", 20.0 + step * 0.001))
        queue.push(_in("b", 20.0 + step * 0.001))
    order = [name.split("@")[0] for name in _drain_order(queue, now=21.0)]
    assert order[:10].count("b") <= 6
    longest_run = max(len(list(run)) for _, run in itertools.groupby(order[:30]))
    assert longest_run <= 2


def test_a_class_named_by_no_configuration_is_served_in_default() -> None:
    queue = AdmissionQueue(_class_knobs(ServiceClass("a"), max_concurrency=1))
    stray = _in("nonexistent", 0.0)
    queue.push(stray)
    assert stray.service_class == "default"
    assert queue.admit(0.1) == [stray]
    queue.release(stray)
    assert {load.name: load.in_flight for load in queue.class_loads()} == {"a": 0, "default": 0}


@pytest.mark.parametrize("discipline", ["fcfs", "shortest-prompt-first", "priority"])
def test_one_busy_class_admits_exactly_as_no_classes(discipline: str) -> None:
    plain = AdmissionQueue(
        Knobs(max_concurrency=3, max_inflight_tokens=6_000, discipline=discipline)
    )
    classed = AdmissionQueue(
        Knobs(
            max_concurrency=3,
            max_inflight_tokens=6_000,
            discipline=discipline,
            classes=(ServiceClass("only", priority=2, weight=3.0), ServiceClass("idle")),
        )
    )
    orders: list[list[str]] = []
    for queue in (plain, classed):
        steps = random.Random(discipline)
        running: list[Ticket] = []
        order = []
        for step in range(400):
            now = step * 0.01
            ticket = _in("only", now, prompt=steps.randint(1, 3_000))
            ticket.priority = steps.randint(0, 3)
            ticket.payload = f"r{step}"
            queue.push(ticket)
            admitted = queue.admit(now)
            order += [t.payload for t in admitted]
            running += admitted
            while running and steps.random() < 0.5:
                queue.release(running.pop(steps.randrange(len(running))))
        orders.append(order)
    assert orders[0] == orders[1] and len(orders[0]) > 300
