"""The six conditions of an InferencePolicy's status, from one cycle's report.

Each condition's rule in one function (`_ready`, ...): what makes it True, False or
Unknown, with which reason (contract/reasons.py) and message. Messages leave
out numbers that change every step (the model's sample count is in
`status.model`), so a steady policy keeps the same conditions and causes no
status write; a condition's `lastTransitionTime` moves only when its status
does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from batchpilot.contract.reasons import ConditionReason, ConditionStatus, ConditionType
from batchpilot.controller.policy import Mode

if TYPE_CHECKING:
    # Only for annotations: status.py builds the document and imports this module.
    from batchpilot.controller.explain import Decision
    from batchpilot.operator.status import CycleReport

TRUE, FALSE, UNKNOWN = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN
# Ready's reason when the step ran: the mode it ran in.
_MODE_REASONS = {
    Mode.OFF: ConditionReason.MODE_OFF,
    Mode.RECOMMEND: ConditionReason.MODE_RECOMMEND,
    Mode.AUTO: ConditionReason.MODE_AUTO,
}


def condition_map(conditions: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {c["type"]: c for c in conditions if isinstance(c, Mapping) and "type" in c}


def conditions(
    report: CycleReport, previous: Sequence[Mapping[str, Any]], generation: int, stamp: str
) -> list[dict[str, Any]]:
    """Every condition, in ConditionType's order, each with `observedGeneration`."""
    old = condition_map(previous)
    wanted = _wanted(report)
    out = []
    for kind in ConditionType:
        status, reason, message = wanted[kind]
        before = old.get(kind)
        transition = (
            before.get("lastTransitionTime") if before and before.get("status") == status else None
        )
        # Plain strings, not enum members: the status is plain data for every dumper.
        out.append(
            {
                "type": kind.value,
                "status": status.value,
                "reason": reason.value,
                "message": message,
                "lastTransitionTime": transition or stamp,
                "observedGeneration": generation,
            }
        )
    return out


# One condition's (status, reason, message) for this cycle.
_Wanted = tuple[ConditionStatus, ConditionReason, str]


def _wanted(report: CycleReport) -> dict[ConditionType, _Wanted]:
    """type -> (status, reason, message) for this cycle, each by its own rule."""
    return {
        ConditionType.READY: _ready(report),
        ConditionType.METRICS_AVAILABLE: _metrics_available(report),
        ConditionType.MODEL_TRUSTED: _model_trusted(report),
        ConditionType.SLO_MET: _slo_met(report),
        ConditionType.PROGRESSING: _progressing(report),
        ConditionType.DEGRADED: _degraded(report),
    }


def _ready(report: CycleReport) -> _Wanted:
    problem, actuation = report.problem, report.actuation
    if problem is not None:
        reason, message = problem
        return FALSE, reason, message
    if actuation is not None and actuation.laggards and actuation.up_to_date == 0:
        return (
            FALSE,
            ConditionReason.ACTUATION_FAILED,
            f"no pod accepted the settings: {actuation.laggards[0].text}",
        )
    return TRUE, _MODE_REASONS[report.mode], _ready_message(report)


def _metrics_available(report: CycleReport) -> _Wanted:
    decision, problem = report.decision, report.problem
    if problem is not None and problem[0] is ConditionReason.METRICS_UNAVAILABLE:
        return FALSE, ConditionReason.QUERY_FAILED, problem[1]
    if decision is None:
        return UNKNOWN, ConditionReason.NO_STEP, "no control step has read metrics"
    if not decision.conditions.metrics_available:
        return FALSE, ConditionReason.MISSING_OR_STALE, _missing_message(report)
    return TRUE, ConditionReason.FRESH, _reporting_message(report)


def _model_trusted(report: CycleReport) -> _Wanted:
    decision = report.decision
    if decision is None:
        return UNKNOWN, ConditionReason.NO_STEP, "no control step has fitted the model"
    if decision.conditions.model_trusted:
        return TRUE, ConditionReason.HELD_OUT_ERROR_LOW, _model_message(decision)
    steering = "; steering by the feedback rule"
    return FALSE, ConditionReason.FEEDBACK_RULE, _model_message(decision) + steering


def _slo_met(report: CycleReport) -> _Wanted:
    decision, problem = report.decision, report.problem
    if problem is not None and problem[0] is ConditionReason.METRICS_UNAVAILABLE:
        return UNKNOWN, ConditionReason.QUERY_FAILED, f"not judged: {problem[1]}"
    if decision is None:
        return UNKNOWN, ConditionReason.NO_STEP, "no control step has judged the objectives"
    if not decision.conditions.metrics_available:
        return (
            UNKNOWN,
            ConditionReason.MISSING_OR_STALE,
            "not judged: " + _reporting_message(report),
        )
    slo_met = decision.conditions.slo_met
    if slo_met is None:
        return (
            UNKNOWN,
            ConditionReason.NO_COMPLETED_REQUESTS,
            "no completed requests in the window to judge by",
        )
    message = f"latency objectives {'met' if slo_met else 'missed'} over the last window"
    missed = [
        c.name
        for c in decision.classes
        if c.ttft_q_ms is not None
        and c.tpot_q_ms is not None
        and (c.ttft_q_ms > c.slo_ttft_ms or c.tpot_q_ms > c.slo_tpot_ms)
    ]
    if missed:
        # Which classes, not by how much: the message changes only when the set does.
        message += f"; classes missing their own: {', '.join(missed)}"
    if slo_met:
        return TRUE, ConditionReason.WITHIN_OBJECTIVES, message
    return FALSE, ConditionReason.OBJECTIVES_MISSED, message


def _progressing(report: CycleReport) -> _Wanted:
    decision, actuation = report.decision, report.actuation
    if actuation is not None and (actuation.changed or actuation.laggards):
        pending = len(actuation.laggards)
        return (
            TRUE,
            ConditionReason.ROLLING_OUT,
            f"{len(actuation.changed)} pod(s) changed this step, {pending} not yet at the target",
        )
    if decision is not None and len(set(decision.per_pod.values())) > 1:
        # Pods with different targets: a canary runs the new settings first.
        return TRUE, ConditionReason.CANARY, "a canary pod runs the new settings first"
    return FALSE, ConditionReason.STABLE, "no change in progress"


def _degraded(report: CycleReport) -> _Wanted:
    decision, problem, actuation = report.decision, report.problem, report.actuation
    if problem is not None:
        # The step did not run: nothing is steered until the cause clears.
        return TRUE, problem[0], f"no control step ran: {problem[1]}"
    if actuation is not None and actuation.laggards:
        laggards = "; ".join(laggard.text for laggard in actuation.laggards[:3])
        return TRUE, ConditionReason.ACTUATION_FAILED, laggards
    pods = report.pods
    if decision is not None and pods.reporting is not None and pods.reporting < pods.ready:
        silent = pods.ready - pods.reporting
        return (
            TRUE,
            ConditionReason.PODS_NOT_REPORTING,
            f"{silent} ready pod(s) have no fresh metrics",
        )
    return FALSE, ConditionReason.HEALTHY, _healthy_message(report)


def _healthy_message(report: CycleReport) -> str:
    if report.mode is Mode.AUTO:
        return "the step ran and every ready pod is at its target"
    return f"the step ran (mode {report.mode.value})"


def _ready_message(report: CycleReport) -> str:
    if report.mode is Mode.AUTO:
        return "recommending and applying settings to the ready pods"
    if report.held is not None:
        return (
            "recommending settings; the pods keep the settings Auto last applied, "
            "nothing new is applied (mode Recommend; mode Off restores their startup settings)"
        )
    if report.mode is Mode.RECOMMEND:
        return "recommending settings; nothing is applied (mode Recommend)"
    return "observing only; the pods run their startup settings (mode Off)"


def _reporting_message(report: CycleReport) -> str:
    reporting = report.pods.reporting
    return f"{reporting if reporting is not None else 0} of {report.pods.ready} ready pod(s) reported fresh metrics"


def _missing_message(report: CycleReport) -> str:
    return _reporting_message(report) + "; holding the last-known-good settings"


def _model_message(decision: Decision) -> str:
    # The sample count is in status.model; here it would change the
    # condition (and cause a write) on every step while the model grows.
    quality = decision.quality
    if quality.heldout_error is None:
        return "held-out error not yet scored"
    return f"held-out error {quality.heldout_error:.2g}"
