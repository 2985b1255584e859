"""Guard: the safety chain between a raw recommendation and what pods run.

Each guard is a small pure function with ONE signature,

    guard(policy, state, recommendation) -> recommendation

that may change the policy-wide target (or, for the canary, the per-pod
assignment) and records why as a `Reason`. `run_chain` runs them in order;
a guard that raises passes its input through unchanged and the failure is
recorded, so a bug in one safety step never stops the loop (as the VPA's
capping post-processor does).

Order matters, and is `CHAIN`:
1. hold on missing metrics (keep the last-known-good setting),
2. stabilization window (move only as far as recent recommendations agree),
3. max step per interval,
4. minimum change (skip changes too small to be worth a reconfiguration),
5. clamp to the policy's bounds — after 4, so a value held by the minimum
   change can never stay outside bounds the user just tightened,
6. canary (one pod first, then roll out or roll back).

SLO classes: each class's queue deadline (where the policy steers the
deadline) and max_concurrency are numeric knobs of their own, keyed by
class name, and the step guards treat them as the shared ones: the
stabilization window, the max step and the minimum change apply per class,
so a deadline that wobbles a few percent with the window's prefill estimate
is not rewritten every interval. A class that appears or goes (a reserve
cap on the implicit default class, a spec edit) is not a step from
anything and passes; its name, priority, weight and match are the policy's
and pass as they are. Clamp keeps class deadlines inside the deadline's
bounds and class caps at the user's per-class max_concurrency.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from batchpilot.contract.knobs import (
    NUMERIC_KNOBS,
    STEERABLE_KNOBS,
    WIRE_NAMES,
    Knobs,
    ServiceClass,
)
from batchpilot.controller.explain import CanaryState, Reason, Recommendation
from batchpilot.controller.policy import Policy

# A canary whose pods score this much worse than the others in any interval
# (0.10 = ten points of SLO attainment) is rolled back at once; over the
# whole canary a mean gap down to -0.02 still counts as "no worse" (noise
# between pods of one policy in one 30-60 s window is of that order).
CANARY_ABORT_GAP = -0.10
CANARY_TOLERANCE = -0.02


@dataclass(frozen=True, slots=True)
class GuardState:
    """What the guards may look at; they never change it (the loop does)."""

    now_s: float
    pods: tuple[str, ...]
    # The policy-wide setting the pods run now (what the gates report).
    current: Knobs
    last_known_good: Knobs
    metrics_available: bool = True
    # Earlier raw recommendations (time, target), oldest first.
    history: tuple[tuple[float, Knobs], ...] = ()
    # Since when `history` is complete: a controller that took over pods
    # another one steered (an operator restart) has not seen that one's.
    history_from_s: float = -math.inf
    canary: CanaryState | None = None
    # This window's estimated SLO attainment per pod, for the canary verdict.
    pod_scores: Mapping[str, float] = field(default_factory=dict)


Guard = Callable[[Policy, GuardState, Recommendation], Recommendation]


def hold_on_missing_metrics(
    policy: Policy, state: GuardState, rec: Recommendation
) -> Recommendation:
    if state.metrics_available:
        return rec
    held = replace(rec, target=state.last_known_good, urgent=False)
    return held.because(
        Reason(
            "guard:hold",
            "metrics missing or stale: holding the last-known-good setting",
            data={"pods": len(state.pods)},
        )
    )


def stabilize(policy: Policy, state: GuardState, rec: Recommendation) -> Recommendation:
    """Take a move only as far as every recommendation in the window agrees."""
    window = policy.behavior.stabilization_window_s
    if rec.urgent or window <= 0:
        return rec
    recent = [knobs for t, knobs in state.history if t > state.now_s - window] + [rec.target]
    seen_s = state.now_s - state.history_from_s
    disagree = f"recommendations in the last {window:g} s disagree: moving only as far as all agree"
    if seen_s < window:
        # The recommendations made before this controller took over are
        # lost with the one that made them: the unseen part of the window
        # counts as a recommendation to stay where the pods are, so the
        # first unagreed move waits for a full window after a restart.
        recent.append(state.current)
        disagree = (
            f"this controller took over the pods less than {window:g} s ago (an operator "
            "restart or a spec change): holding until a full window of recommendations agrees"
        )
    changes: dict[str, Any] = {}
    for knob, current, wanted in _steered(policy, state.current, rec.target):
        agreed = _agreed(
            current, wanted, [policy.effective(knob, getattr(k, knob)) for k in recent]
        )
        if agreed != wanted:
            changes[knob] = _from_effective(agreed)
    class_changes: dict[tuple[str, str], int | None] = {}
    for key, current, wanted in _class_steered(policy, state.current, rec.target):
        agreed = _agreed(current, wanted, [_class_value(k, *key) for k in recent])
        if agreed != wanted:
            class_changes[key] = _from_effective(agreed)
    rec = _retarget_classes(
        rec, class_changes, _class_reasons("guard:stabilize", disagree, rec, class_changes)
    )
    reasons = _knob_reasons("guard:stabilize", disagree, rec, changes)
    discipline_disputed = any(k.discipline != rec.target.discipline for k in recent)
    if (
        policy.steers("discipline")
        and discipline_disputed
        and rec.target.discipline != state.current.discipline
    ):
        held = {"discipline": state.current.discipline}
        changes.update(held)
        why = f"discipline not recommended throughout the last {window:g} s"
        reasons += _knob_reasons("guard:stabilize", why, rec, held)
    return _retarget(rec, changes, reasons)


def limit_step(policy: Policy, state: GuardState, rec: Recommendation) -> Recommendation:
    """At most x`max_step_factor` (or /) per interval for each numeric knob.

    An urgent move (a mix shift, an SLO breach) may take two steps at once:
    a 10x shift in prompt/output ratio needs ~10x smaller limits, and two
    intervals of a wrong setting cost more than the jump.
    """
    factor = policy.behavior.max_step_factor
    if rec.urgent:
        factor *= factor
    changes: dict[str, Any] = {}
    for knob, current, wanted in _steered(policy, state.current, rec.target):
        if math.isinf(current) or current == wanted:
            # Setting a limit where there was none is not a step from anything.
            continue
        if wanted > current * factor:
            stepped: float = math.floor(current * factor)
        elif wanted < current / factor:
            stepped = math.ceil(current / factor)
        else:
            continue
        changes[knob] = _from_effective(stepped)
    class_changes: dict[tuple[str, str], int | None] = {}
    for key, current, wanted in _class_steered(policy, state.current, rec.target):
        if math.isinf(current) or current == wanted:
            continue
        if wanted > current * factor:
            class_changes[key] = _from_effective(math.floor(current * factor))
        elif wanted < current / factor:
            class_changes[key] = _from_effective(math.ceil(current / factor))
    why = f"limited to x{factor:g} per interval"
    reasons = _class_reasons("guard:max-step", why, rec, class_changes)
    rec = _retarget_classes(rec, class_changes, reasons)
    return _retarget(rec, changes, _knob_reasons("guard:max-step", why, rec, changes))


def skip_small_changes(policy: Policy, state: GuardState, rec: Recommendation) -> Recommendation:
    """Keep the current value where the change is below `min_change_fraction`."""
    threshold = policy.behavior.min_change_fraction
    changes: dict[str, Any] = {}
    for knob, current, wanted in _steered(policy, state.current, rec.target):
        if current == wanted or math.isinf(current) or math.isinf(wanted):
            continue
        if abs(wanted - current) < threshold * current:
            changes[knob] = getattr(state.current, knob)
    class_changes: dict[tuple[str, str], int | None] = {}
    for key, current, wanted in _class_steered(policy, state.current, rec.target):
        if current == wanted or math.isinf(current) or math.isinf(wanted):
            continue
        if abs(wanted - current) < threshold * current:
            class_changes[key] = _from_effective(current)
    why = f"change below {threshold:.0%} is not worth a reconfiguration"
    reasons = _class_reasons("guard:min-change", why, rec, class_changes)
    rec = _retarget_classes(rec, class_changes, reasons)
    return _retarget(rec, changes, _knob_reasons("guard:min-change", why, rec, changes))


def clamp(policy: Policy, state: GuardState, rec: Recommendation) -> Recommendation:
    clamped = policy.clamp(rec.target)
    reasons = tuple(
        Reason(
            "guard:clamp",
            "outside the policy's bounds",
            name,
            getattr(rec.target, name),
            getattr(clamped, name),
        )
        for name in STEERABLE_KNOBS
        if getattr(clamped, name) != getattr(rec.target, name)
    )
    rec = rec.retarget(clamped, reasons) if reasons else rec
    class_changes: dict[tuple[str, str], int | None] = {}
    user_caps = {c.name: c.max_concurrency for c in policy.classes}
    deadline_bound = policy.bounds.get("queue_deadline_ms")
    for service_class in rec.target.classes:
        deadline = service_class.queue_deadline_ms
        if deadline_bound is not None and deadline is not None:
            bounded = deadline_bound.clamp(deadline)
            if bounded != deadline:
                class_changes[(service_class.name, "queue_deadline_ms")] = bounded
        cap, user_cap = service_class.max_concurrency, user_caps.get(service_class.name)
        if user_cap is not None and (cap is None or cap > user_cap):
            class_changes[(service_class.name, "max_concurrency")] = user_cap
    why = "outside the policy's bounds"
    return _retarget_classes(
        rec, class_changes, _class_reasons("guard:clamp", why, rec, class_changes)
    )


def canary(policy: Policy, state: GuardState, rec: Recommendation) -> Recommendation:
    """One pod runs a new setting first; the others follow only if it does no worse."""
    if not policy.behavior.canary.enabled:
        return rec
    if len(state.pods) < 2:
        if rec.target != state.current:
            return rec.because(
                Reason("guard:canary", "one pod only: no other pod to compare a canary with")
            )
        return rec
    running = state.canary
    if running is None or running.pod not in state.pods:
        if rec.target == state.current:
            return rec
        pod = state.pods[0]
        started = CanaryState(pod, rec.target, state.current, state.now_s)
        return replace(
            rec,
            per_pod=_assign(state.pods, state.current, {pod: rec.target}),
            canary=started,
            reasons=(
                *rec.reasons,
                Reason(
                    "guard:canary",
                    f"trying the new setting on {pod} for {policy.behavior.canary.intervals} interval(s) first",
                    data={"pod": pod},
                ),
            ),
        )
    gap = _score_gap(running.pod, state.pod_scores)
    gaps = running.score_gaps if gap is None else (*running.score_gaps, gap)
    progressed = replace(running, intervals_done=running.intervals_done + 1, score_gaps=gaps)
    if gap is not None and gap < CANARY_ABORT_GAP:
        return _canary_end(
            rec, state, progressed, roll_out=False, why="the canary pod scores clearly worse"
        )
    if progressed.intervals_done < policy.behavior.canary.intervals:
        return replace(
            rec,
            target=running.baseline,
            per_pod=_assign(state.pods, running.baseline, {running.pod: running.candidate}),
            canary=progressed,
            reasons=(
                *rec.reasons,
                Reason(
                    "guard:canary",
                    "canary in progress: other pods keep the baseline",
                    data={"pod": running.pod, "interval": progressed.intervals_done, "gap": gap},
                ),
            ),
        )
    mean_gap = statistics.fmean(gaps) if gaps else None
    if mean_gap is None:
        return _canary_end(
            rec, state, progressed, roll_out=False, why="no scores to compare the canary by"
        )
    if mean_gap >= CANARY_TOLERANCE:
        return _canary_end(rec, state, progressed, roll_out=True, why="the canary pod did no worse")
    return _canary_end(rec, state, progressed, roll_out=False, why="the canary pod scored worse")


def _canary_end(
    rec: Recommendation, state: GuardState, finished: CanaryState, *, roll_out: bool, why: str
) -> Recommendation:
    chosen = finished.candidate if roll_out else finished.baseline
    mean_gap = statistics.fmean(finished.score_gaps) if finished.score_gaps else None
    return replace(
        rec,
        target=chosen,
        per_pod=_assign(state.pods, chosen, {}),
        canary=None,
        urgent=False,
        reasons=(
            *rec.reasons,
            Reason(
                "guard:canary",
                f"{why}: {'rolling out to every pod' if roll_out else 'rolling back'}",
                data={
                    "pod": finished.pod,
                    "meanGap": mean_gap,
                    "intervals": finished.intervals_done,
                },
            ),
        ),
    )


def _score_gap(pod: str, scores: Mapping[str, float]) -> float | None:
    if pod not in scores:
        return None
    others = [score for other, score in scores.items() if other != pod]
    if not others:
        return None
    return scores[pod] - statistics.fmean(others)


def _steered(policy: Policy, current: Knobs, target: Knobs) -> Iterator[tuple[str, float, float]]:
    """(knob, current, wanted) for each numeric knob the policy steers, as
    effective numbers (no limit is +inf), the form every step guard compares."""
    for knob in NUMERIC_KNOBS:
        if policy.steers(knob):
            yield (
                knob,
                policy.effective(knob, getattr(current, knob)),
                policy.effective(knob, getattr(target, knob)),
            )


# The per-class settings the step guards treat as numeric knobs.
CLASS_KNOBS = ("queue_deadline_ms", "max_concurrency")


def _class_steered(
    policy: Policy, current: Knobs, target: Knobs
) -> Iterator[tuple[tuple[str, str], float, float]]:
    """((class, knob), current, wanted) for each class in both settings, as
    effective numbers (unset is +inf); deadlines only where the policy steers
    the deadline, caps always (the controller's reserve)."""
    before = {c.name for c in current.classes}
    for service_class in target.classes:
        if service_class.name not in before:
            continue
        for knob in CLASS_KNOBS:
            if knob == "queue_deadline_ms" and not policy.steers(knob):
                continue
            key = (service_class.name, knob)
            yield key, _class_value(current, *key), _class_value(target, *key)


def _class_value(knobs: Knobs, name: str, knob: str) -> float:
    value = getattr(knobs.service_class(name), knob)
    return math.inf if value is None else float(value)


def _class_reasons(
    step: str, message: str, rec: Recommendation, changes: Mapping[tuple[str, str], Any]
) -> list[Reason]:
    """As _knob_reasons, the knob named `classes.<class>.<wire name>`."""
    return [
        Reason(
            step,
            message,
            f"classes.{name}.{WIRE_NAMES[knob]}",
            getattr(rec.target.service_class(name), knob),
            value,
        )
        for (name, knob), value in changes.items()
    ]


def _retarget_classes(
    rec: Recommendation, changes: Mapping[tuple[str, str], int | None], reasons: list[Reason]
) -> Recommendation:
    if not changes:
        return rec

    def changed(service_class: ServiceClass) -> ServiceClass:
        fields: dict[str, Any] = {
            knob: value for (name, knob), value in changes.items() if name == service_class.name
        }
        return replace(service_class, **fields)

    classes = tuple(changed(c) for c in rec.target.classes)
    return rec.retarget(rec.target.with_changes(classes=classes), tuple(reasons))


def _assign(
    pods: Sequence[str], default: Knobs, overrides: Mapping[str, Knobs]
) -> dict[str, Knobs]:
    return {pod: overrides.get(pod, default) for pod in pods}


def _agreed(current: float, wanted: float, values: list[float]) -> float:
    """How far toward `wanted` every recommendation in the window agrees to move from `current`."""
    if wanted > current:
        return max(current, min(values))
    if wanted < current:
        return min(current, max(values))
    return wanted


def _from_effective(value: float) -> int | None:
    """Back from a number to a knob value: +inf is "no limit"."""
    if math.isinf(value):
        return None
    return int(value)


def _knob_reasons(
    step: str, message: str, rec: Recommendation, changes: Mapping[str, Any]
) -> list[Reason]:
    """One reason per changed knob: what the steps before wanted, what `step` let through."""
    return [
        Reason(step, message, knob, getattr(rec.target, knob), value)
        for knob, value in changes.items()
    ]


def _retarget(
    rec: Recommendation, changes: Mapping[str, Any], reasons: list[Reason]
) -> Recommendation:
    if not changes:
        return rec
    return rec.retarget(rec.target.with_changes(**changes), tuple(reasons))


CHAIN: tuple[tuple[str, Guard], ...] = (
    ("hold", hold_on_missing_metrics),
    ("stabilize", stabilize),
    ("max-step", limit_step),
    ("min-change", skip_small_changes),
    ("clamp", clamp),
    ("canary", canary),
)

# The exception families a pure function over plain numbers and mappings
# raises when it has a bug; anything else (KeyboardInterrupt, MemoryError)
# must still stop the process.
_GUARD_BUG_ERRORS = (ArithmeticError, LookupError, TypeError, ValueError, AttributeError)


def run_chain(
    policy: Policy,
    state: GuardState,
    rec: Recommendation,
    chain: Sequence[tuple[str, Guard]] = CHAIN,
) -> Recommendation:
    """Every guard in order; fill in per-pod targets where no guard assigned them."""
    for name, guard in chain:
        try:
            rec = guard(policy, state, rec)
        except _GUARD_BUG_ERRORS as err:
            rec = rec.because(
                Reason(
                    f"guard:{name}",
                    f"guard failed ({type(err).__name__}: {err}); its input passed through unchanged",
                )
            )
    if set(rec.per_pod) != set(state.pods):
        rec = replace(rec, per_pod=_assign(state.pods, rec.target, rec.per_pod))
    return rec
