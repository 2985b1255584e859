"""Each guard of the safety chain, and the chain itself."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.explain import CanaryState, Recommendation
from batchpilot.controller.guards import (
    CANARY_ABORT_GAP,
    GuardState,
    canary,
    clamp,
    hold_on_missing_metrics,
    limit_step,
    run_chain,
    skip_small_changes,
    stabilize,
)
from batchpilot.controller.policy import Behavior, Canary, EngineSpec, KnobBounds, Policy, Slo

ENGINE = EngineSpec(max_num_seqs=512)
POLICY = Policy(
    slo=Slo(2000, 50),
    engine=ENGINE,
    bounds={
        "max_concurrency": KnobBounds("max_concurrency", 4, 512),
        "max_inflight_tokens": KnobBounds("max_inflight_tokens", 8192, None),
        "queue_deadline_ms": KnobBounds("queue_deadline_ms", 100, 10_000),
    },
    disciplines=("fcfs", "shortest-prompt-first"),
    behavior=Behavior(stabilization_window_s=60.0, max_step_factor=2.0, min_change_percent=10.0, canary=Canary(enabled=True, intervals=2)),
)
CURRENT = Knobs(max_concurrency=64, max_inflight_tokens=100_000, queue_deadline_ms=1800)
PODS = ("p0", "p1", "p2")


def state(**changes: object) -> GuardState:
    base = GuardState(now_s=300.0, pods=PODS, current=CURRENT, last_known_good=CURRENT)
    return replace(base, **changes)  # type: ignore[arg-type]


def rec(urgent: bool = False, **knobs: object) -> Recommendation:
    return Recommendation(CURRENT.with_changes(**knobs), urgent=urgent)


def test_hold_keeps_last_known_good_when_metrics_are_missing() -> None:
    good = CURRENT.with_changes(max_concurrency=32)
    out = hold_on_missing_metrics(POLICY, state(metrics_available=False, last_known_good=good), rec(max_concurrency=200, urgent=True))
    assert out.target == good
    assert not out.urgent
    assert out.reasons[-1].step == "guard:hold"
    unchanged = rec(max_concurrency=200)
    assert hold_on_missing_metrics(POLICY, state(), unchanged) is unchanged


@pytest.mark.parametrize(
    ("history", "wanted", "urgent", "expected"),
    [
        # every recommendation in the window wanted more: take the smallest of them
        ([(250.0, 100), (280.0, 90)], 120, False, 90),
        # one of them wanted less than now: no increase at all
        ([(250.0, 40), (280.0, 90)], 120, False, 64),
        # decreases: take the largest of them
        ([(250.0, 50), (280.0, 30)], 20, False, 50),
        # outside the 60 s window: ignored
        ([(200.0, 40)], 120, False, 120),
        # urgent moves skip the window
        ([(250.0, 40), (280.0, 90)], 120, True, 120),
    ],
)
def test_stabilize(history: list[tuple[float, int]], wanted: int, urgent: bool, expected: int) -> None:
    past = tuple((t, CURRENT.with_changes(max_concurrency=cap)) for t, cap in history)
    out = stabilize(POLICY, state(history=past), rec(urgent=urgent, max_concurrency=wanted))
    assert out.target.max_concurrency == expected
    assert any(r.step == "guard:stabilize" for r in out.reasons) == (expected != wanted)


@pytest.mark.parametrize(
    ("took_over_s", "wanted", "urgent", "expected"),
    [
        # 20 s of a 60 s window seen since an operator restart: the unseen 40 s count as "stay"
        (280.0, 120, False, 64),
        (280.0, 20, False, 64),
        # a whole window seen: the move is taken as the recommendations agree
        (240.0, 120, False, 120),
        # urgent moves skip the window, restart or not
        (280.0, 120, True, 120),
    ],
)
def test_stabilize_after_a_takeover_waits_a_full_window(took_over_s: float, wanted: int, urgent: bool,
                                                        expected: int) -> None:
    """The first unagreed change after an operator restart waits a whole window, not 9 s."""
    out = stabilize(POLICY, state(history_from_s=took_over_s), rec(urgent=urgent, max_concurrency=wanted))
    assert out.target.max_concurrency == expected
    held = [r for r in out.reasons if r.step == "guard:stabilize"]
    if expected != wanted:
        (reason,) = held
        assert "took over the pods less than 60 s ago" in reason.message
        assert (reason.wanted, reason.allowed) == (wanted, 64)
    else:
        assert held == []


def test_stabilize_holds_the_discipline_after_a_takeover() -> None:
    out = stabilize(POLICY, state(history_from_s=290.0), rec(discipline="shortest-prompt-first"))
    assert out.target.discipline == "fcfs"


@pytest.mark.parametrize(
    ("guard", "guard_state", "wanted", "allowed"),
    [
        (stabilize, state(history=((280.0, CURRENT.with_changes(max_concurrency=90)),)), 120, 90),
        (limit_step, state(), 512, 128),
        (skip_small_changes, state(), 68, 64),
        (clamp, state(), 600, 512),
    ],
)
def test_a_guards_reason_records_what_was_wanted_and_what_it_allowed(
    guard: Any, guard_state: GuardState, wanted: int, allowed: int
) -> None:
    """Not "old -> new": the pods may run `allowed` all along (the reason status and explain render)."""
    out = guard(POLICY, guard_state, rec(max_concurrency=wanted))
    (reason,) = out.reasons
    assert (reason.knob, reason.wanted, reason.allowed) == ("max_concurrency", wanted, allowed)
    assert out.target.max_concurrency == allowed


def test_stabilize_holds_a_disputed_discipline() -> None:
    past = ((280.0, CURRENT),)
    out = stabilize(POLICY, state(history=past), rec(discipline="shortest-prompt-first"))
    assert out.target.discipline == "fcfs"


@pytest.mark.parametrize(
    ("knob", "wanted", "urgent", "expected"),
    [
        ("max_concurrency", 512, False, 128),  # x2 at most
        ("max_concurrency", 4, False, 32),  # /2 at most
        ("max_concurrency", 100, False, 100),  # within the step
        ("max_concurrency", 512, True, 256),  # urgent: two steps (x4)
        ("max_inflight_tokens", 1_000_000, False, 200_000),
        ("max_inflight_tokens", None, False, 200_000),  # "no limit" is infinitely far
        ("queue_deadline_ms", 100, False, 900),
    ],
)
def test_limit_step(knob: str, wanted: int | None, urgent: bool, expected: int | None) -> None:
    out = limit_step(POLICY, state(), rec(urgent=urgent, **{knob: wanted}))
    assert getattr(out.target, knob) == expected


def test_limit_step_lets_a_limit_be_set_where_there_was_none() -> None:
    unlimited = CURRENT.with_changes(max_inflight_tokens=None)
    out = limit_step(POLICY, state(current=unlimited), rec(max_inflight_tokens=20_000))
    assert out.target.max_inflight_tokens == 20_000


@pytest.mark.parametrize(
    ("knob", "wanted", "expected"),
    [
        ("max_concurrency", 68, 64),  # 6% change: skipped
        ("max_concurrency", 71, 71),  # 11%: taken
        ("max_inflight_tokens", 95_000, 100_000),
        ("max_inflight_tokens", None, None),  # removing a limit always counts
        ("queue_deadline_ms", 1700, 1800),
    ],
)
def test_skip_small_changes(knob: str, wanted: int | None, expected: int | None) -> None:
    out = skip_small_changes(POLICY, state(), rec(**{knob: wanted}))
    assert getattr(out.target, knob) == expected


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({"max_concurrency": 1000}, {"max_concurrency": 512}),
        ({"max_concurrency": 1}, {"max_concurrency": 4}),
        ({"max_concurrency": None}, {"max_concurrency": 512}),  # "no limit" is the top of the range
        ({"max_inflight_tokens": 100}, {"max_inflight_tokens": 8192}),
        ({"queue_deadline_ms": None}, {"queue_deadline_ms": 10_000}),
        ({"discipline": "priority"}, {"discipline": "fcfs"}),  # not allowed: the first allowed
    ],
)
def test_clamp(knobs: dict[str, object], expected: dict[str, object]) -> None:
    out = clamp(POLICY, state(), rec(**knobs))
    for name, value in expected.items():
        assert getattr(out.target, name) == value
    assert {r.knob for r in out.reasons} == set(expected)


def test_canary_starts_on_one_pod() -> None:
    out = canary(POLICY, state(), rec(max_concurrency=100))
    assert out.canary is not None and out.canary.pod == "p0"
    assert out.per_pod == {"p0": CURRENT.with_changes(max_concurrency=100), "p1": CURRENT, "p2": CURRENT}


def running_canary(gaps: tuple[float, ...] = (), done: int = 0) -> CanaryState:
    return CanaryState("p0", CURRENT.with_changes(max_concurrency=100), CURRENT, 240.0, done, gaps)


@pytest.mark.parametrize(
    ("scores", "done", "expected_cap", "still_running"),
    [
        # first interval, no worse: keep going, others on the baseline
        ({"p0": 0.97, "p1": 0.96, "p2": 0.96}, 0, 64, True),
        # last interval, no worse on average: roll out
        ({"p0": 0.97, "p1": 0.96, "p2": 0.96}, 1, 100, False),
        # last interval, clearly worse on average: roll back
        ({"p0": 0.90, "p1": 0.96, "p2": 0.96}, 1, 64, False),
        # any interval far worse: roll back at once
        ({"p0": 0.96 + CANARY_ABORT_GAP - 0.05, "p1": 0.96, "p2": 0.96}, 0, 64, False),
    ],
)
def test_canary_verdict(scores: dict[str, float], done: int, expected_cap: int, still_running: bool) -> None:
    out = canary(POLICY, state(canary=running_canary(done=done), pod_scores=scores), rec(max_concurrency=300))
    assert out.target.max_concurrency == expected_cap
    assert (out.canary is not None) == still_running
    if not still_running:
        assert set(out.per_pod.values()) == {out.target}


def test_canary_needs_two_pods() -> None:
    out = canary(POLICY, state(pods=("p0",)), rec(max_concurrency=100))
    assert out.canary is None
    assert out.target.max_concurrency == 100
    assert "one pod" in out.reasons[-1].message


def test_a_failing_guard_passes_its_input_through() -> None:
    def broken(policy: Policy, guard_state: GuardState, recommendation: Recommendation) -> Recommendation:
        raise ZeroDivisionError("division by zero")

    before = rec(max_concurrency=100)
    out = run_chain(POLICY, state(), before, chain=(("broken", broken), ("clamp", clamp)))
    assert out.target == before.target
    assert "guard failed (ZeroDivisionError" in out.reasons[0].message
    assert out.per_pod == dict.fromkeys(PODS, before.target)


def test_full_chain_keeps_bounds_even_when_holding_small_changes() -> None:
    # The policy now caps concurrency at 60; the pods run 64 and the model
    # wants 62 (a 3% change): min-change would keep 64, clamp must still win.
    tightened = replace(POLICY, bounds={**POLICY.bounds, "max_concurrency": KnobBounds("max_concurrency", 4, 60)}, behavior=replace(POLICY.behavior, canary=Canary(enabled=False)))
    out = run_chain(tightened, state(), rec(max_concurrency=62))
    assert out.target.max_concurrency == 60
