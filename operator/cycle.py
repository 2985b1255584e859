"""One control cycle of one InferencePolicy, as plain async functions (no kopf).

A cycle: (re)parse the spec when its generation changed -> select the pods
from the pod index -> run the controller's step in a worker thread (queries
and model fitting must never block the event loop) -> in Auto, bring every
Ready pod's gate to its target (actuation.py); in Recommend, read what the
pods configured in Auto still run; in Off, restore them -> describe the
outcome as a `CycleReport` for status.py, plus the Events to post. kopf's
handlers (handlers.py) call `run_cycle` and only translate the outcome into
kopf's terms (status patch, Events, TemporaryError).

Errors are mapped here, once: an invalid spec, a missing workload, no pods,
a metrics outage each become a condition reason with a message. Nothing
here raises for them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from batchpilot.contract.knobs import knobs_text
from batchpilot.contract.reasons import ConditionReason, EventReason, EventType
from batchpilot.controller.explain import Decision
from batchpilot.controller.policy import Mode, PolicyError
from batchpilot.operator.actuation import (
    apply_decision,
    held_settings,
    restore_pods,
    startup_setting,
)
from batchpilot.operator.control import Stepper
from batchpilot.operator.kube import KubeError, read_workload_selector
from batchpilot.operator.pods import PodInfo, fleet_setting
from batchpilot.operator.runtime import (
    WORKLOAD_SELECTOR_TTL_S,
    EventNote,
    Operator,
    PolicyRuntime,
)
from batchpilot.operator.spec import LabelSelector, PolicySpec, parse_policy
from batchpilot.operator.status import CycleReport, PodCounts

# Retry soon when pods or their workload are missing: 10 s, or the policy's
# interval if that is shorter.
NOT_READY_RETRY_S = 10.0


@dataclass(slots=True)
class CycleOutcome:
    report: CycleReport | None  # None: nothing was due, status stays as it is
    events: list[EventNote] = field(default_factory=list)
    # Set when the cycle could not run for a reason that clears by itself
    # (pods not ready yet): the handler raises kopf.TemporaryError with it.
    retry_after_s: float | None = None
    retry_message: str = ""
    # Time the step waited for one of the operator's step slots.
    slot_wait_s: float = 0.0


def refresh_spec(
    op: Operator, runtime: PolicyRuntime, spec: Mapping[str, Any], generation: int
) -> None:
    """Re-parse the spec and rebuild the controller when the generation changed."""
    if runtime.generation == generation:
        return
    runtime.generation = generation
    runtime.next_step_s = 0.0  # a changed spec takes effect at the next tick
    try:
        parsed = parse_policy(
            spec, name=runtime.name, namespace=runtime.namespace, config=op.config
        )
    except PolicyError as err:
        runtime.spec, runtime.spec_error, runtime.stepper = None, err, None
        return
    # The controller's state (history, canary, model) is rebuilt with the
    # policy: bounds, objectives or metrics may all have changed.
    runtime.spec, runtime.spec_error, runtime.seen_good = parsed, None, False
    runtime.cleared(EventReason.INVALID_SPEC)
    runtime.stepper = op.stepper_factory(
        parsed.policy, op.query_client(parsed.endpoint, parsed.prometheus_url)
    )
    runtime.resumed = False
    runtime.workload_read_s = -WORKLOAD_SELECTOR_TTL_S


async def run_cycle(
    op: Operator,
    runtime: PolicyRuntime,
    *,
    spec: Mapping[str, Any],
    generation: int,
    pods: Iterable[PodInfo],
    now_mono: float,
    now_wall: datetime,
) -> CycleOutcome:
    """One tick for one policy: run its control step if it is due."""
    refresh_spec(op, runtime, spec, generation)
    if runtime.spec_error is not None:
        mode = spec.get("mode")
        message = str(runtime.spec_error)
        report = CycleReport(
            Mode(mode) if mode in {m.value for m in Mode} else Mode.RECOMMEND,
            problem=(ConditionReason.INVALID_SPEC, message),
        )
        outcome = CycleOutcome(report)
        runtime.warn_once(outcome.events, EventReason.INVALID_SPEC, message)
        op.metrics.errors.labels(ConditionReason.INVALID_SPEC).inc()
        return outcome
    parsed, stepper = runtime.spec, runtime.stepper
    assert parsed is not None and stepper is not None
    if now_mono < runtime.next_step_s:
        return CycleOutcome(None)
    runtime.next_step_s = next_due(now_mono, parsed.policy.behavior.interval_s, runtime.phase)
    started = time.perf_counter()
    outcome = await _step(op, runtime, parsed, stepper, list(pods), now_mono, now_wall)
    # The step's own time; waiting for a free slot is exported on its own.
    op.metrics.cycle_seconds.observe(time.perf_counter() - started - outcome.slot_wait_s)
    return outcome


def next_due(now: float, interval: float, phase: float) -> float:
    """The first time after `now` at `phase` (a fraction of the interval) in the interval grid.

    Each policy steps at its own phase, so 100 policies created together
    (or resumed together when the operator restarts) spread their queries
    over the interval instead of all querying Prometheus in the same second.
    """
    offset = phase * interval
    return offset + (math.floor((now - offset) / interval) + 1) * interval


def now_utc() -> datetime:
    return datetime.now(UTC)


async def _step(
    op: Operator,
    runtime: PolicyRuntime,
    parsed: PolicySpec,
    stepper: Stepper,
    pods: list[PodInfo],
    now_mono: float,
    now_wall: datetime,
) -> CycleOutcome:
    mode = parsed.mode
    retry_s = min(NOT_READY_RETRY_S, parsed.policy.behavior.interval_s)

    def stopped(
        counts: PodCounts, problem: ConditionReason, message: str, retry: float | None
    ) -> CycleOutcome:
        op.metrics.errors.labels(problem).inc()
        if retry is not None:
            runtime.next_step_s = now_mono + retry
        report = CycleReport(mode, counts, problem=(problem, message))
        return CycleOutcome(report, retry_after_s=retry, retry_message=message)

    try:
        selector = await _selector(op, runtime, parsed)
    except KubeError as err:
        return stopped(PodCounts(), ConditionReason.TARGET_NOT_FOUND, str(err), retry_s)
    selected = [pod for pod in pods if selector.matches(pod.label_map)]
    ready = sorted((pod for pod in selected if pod.ready and pod.ip), key=lambda pod: pod.name)
    counts = PodCounts(len(selected), len(ready))
    if not selected:
        return stopped(
            counts, ConditionReason.NO_PODS_SELECTED, "the selector matches no pods", retry_s
        )
    if not ready:
        return stopped(
            counts,
            ConditionReason.NO_READY_PODS,
            f"none of the {len(selected)} selected pod(s) is Ready",
            retry_s,
        )

    if not runtime.resumed:
        runtime.resumed = True
        left_on = fleet_setting(ready, runtime.name)
        if left_on is not None:
            # The records say an earlier controller steered these pods: its
            # stabilization window went with it (an operator restart).
            stepper.resume(left_on, steered_until_s=now_wall.timestamp())
        else:
            left_on = await startup_setting(op, parsed, ready)
            if left_on is not None:
                stepper.resume(left_on)
    names = [pod.name for pod in ready]
    waiting = time.perf_counter()
    async with op.step_slots:
        slot_wait_s = time.perf_counter() - waiting
        op.metrics.slot_wait_seconds.observe(slot_wait_s)
        phase_started = time.perf_counter()
        decision = await asyncio.get_running_loop().run_in_executor(
            op.step_threads, stepper.run_once, now_wall.timestamp(), names
        )
    if stepper.outage is not None:
        # Prometheus did not answer: nothing was observed, so nothing is
        # applied; the status keeps the last recommendation and says why.
        outcome = stopped(counts, ConditionReason.METRICS_UNAVAILABLE, stepper.outage, None)
        runtime.warn_once(outcome.events, EventReason.METRICS_UNAVAILABLE, stepper.outage)
        outcome.slot_wait_s = slot_wait_s
        return outcome
    op.metrics.step_seconds.labels("controller").observe(time.perf_counter() - phase_started)
    for phase, seconds in decision.step_seconds.items():
        op.metrics.step_seconds.labels(phase).observe(seconds)
    op.metrics.decisions.labels(mode.value).inc()
    runtime.cleared(EventReason.METRICS_UNAVAILABLE)
    outcome = CycleOutcome(None, slot_wait_s=slot_wait_s)
    rollback = _rollback_message(decision)
    if rollback is not None:
        outcome.events.append(EventNote(EventType.WARNING, EventReason.ROLLED_BACK, rollback))
        op.metrics.policy_rollbacks.labels(runtime.namespace, runtime.name).inc()

    actuation = None
    phase_started = time.perf_counter()
    if mode is Mode.AUTO:
        async with runtime.lock:
            actuation, notes = await apply_decision(op, runtime, parsed, decision, ready, now_wall)
        outcome.events.extend(notes)
    elif mode is Mode.OFF and any(pod.steered_by(runtime.name) for pod in selected):
        async with runtime.lock:
            outcome.events.extend(await restore_pods(op, runtime, parsed, selected))
    held = None
    if mode is Mode.RECOMMEND:
        held = await held_settings(op, runtime, parsed, ready)
    op.metrics.step_seconds.labels("actuate").observe(time.perf_counter() - phase_started)

    runtime.seen_good = runtime.seen_good or decision.conditions.slo_met is True
    outcome.report = CycleReport(
        mode=mode,
        pods=PodCounts(len(selected), len(ready), _reporting(decision)),
        decision=decision,
        actuation=actuation,
        # Until some window met the SLOs, "last known good" would only be the
        # starting point, which nothing has shown to be good.
        last_known_good=stepper.last_known_good if runtime.seen_good else None,
        held=held,
    )
    return outcome


async def _selector(op: Operator, runtime: PolicyRuntime, parsed: PolicySpec) -> LabelSelector:
    if parsed.selector is not None:
        return parsed.selector
    assert parsed.workload is not None
    now = time.monotonic()
    if runtime.workload_selector is None or now - runtime.workload_read_s > WORKLOAD_SELECTOR_TTL_S:
        runtime.workload_selector = await asyncio.to_thread(
            read_workload_selector, op.kube, runtime.namespace, parsed.workload
        )
        runtime.workload_read_s = now
    return runtime.workload_selector


def _reporting(decision: Decision) -> int | None:
    reporting = decision.signals.get("reporting_pods")
    return int(reporting) if isinstance(reporting, int | float) else None


def _rollback_message(decision: Decision) -> str | None:
    """The RolledBack Event's message when the canary guard rolled back, else None."""
    reason = next(
        (r for r in decision.reasons if r.step == "guard:canary" and "rolling back" in r.message),
        None,
    )
    if reason is None:
        return None
    return f"{reason.message}; every pod returns to {knobs_text(decision.target)}"
