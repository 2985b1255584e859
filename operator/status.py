"""InferencePolicy status: what one control cycle found -> the status document.

Pure functions, no kopf and no clock of their own (`now` is passed in), so the
rules are unit-tested directly:

- `build_status(report, previous, generation, now)` returns the whole desired
  status. Anything that did not really change keeps its old value, including
  timestamps: a condition's `lastTransitionTime` moves only when its status
  does, the recommendation's `time` only when its knobs do. That is what lets
  an unchanged cycle produce an identical document.
- `merge_patch(current, desired)` is the JSON merge patch from one to the
  other, or None when they are equal; the operator writes status only when
  there is a patch,
  because every write costs the API server, wakes every watcher (GitOps
  controllers included) and resets kopf's idle timers.

Numbers that wobble from window to window are rounded before they reach the
document (the model's held-out error to two significant digits), and reasons
are rendered without their per-window measurements, for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from batchpilot.controller.explain import Decision, Reason
from batchpilot.controller.knobs import Knobs
from batchpilot.controller.policy import CAMEL_NAMES, Mode

# Condition types, in the order they are listed.
READY = "Ready"
METRICS_AVAILABLE = "MetricsAvailable"
MODEL_TRUSTED = "ModelTrusted"
SLO_MET = "SLOMet"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONDITION_TYPES = (READY, METRICS_AVAILABLE, MODEL_TRUSTED, SLO_MET, PROGRESSING, DEGRADED)

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"
# At most this many reasons and laggards in status: a 64-pod rollout must
# not turn the status into a log.
MAX_REASONS = 12
MAX_LAGGARDS = 10


class Problem:
    """Why a cycle did not run its control step (the Ready condition's reason)."""

    INVALID_SPEC = "InvalidSpec"
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    NO_PODS = "NoPodsSelected"
    NO_READY_PODS = "NoReadyPods"
    TARGET_NOT_FOUND = "TargetNotFound"
    TOKEN_UNAVAILABLE = "TokenUnavailable"


@dataclass(frozen=True, slots=True)
class PodCounts:
    selected: int = 0
    ready: int = 0
    # Ready pods with fresh metrics; None when no step read metrics.
    reporting: int | None = None


@dataclass(frozen=True, slots=True)
class ActuationReport:
    """What applying one decision to the pods' gates did (mode Auto)."""

    target: Knobs
    up_to_date: int
    # "pod: why" for every Ready pod not confirmed at its target.
    laggards: tuple[str, ...] = ()
    # Pods whose gate changed its settings in this cycle.
    changed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeldReport:
    """Mode Recommend after Auto: what the pods batchpilot configured still run.

    Leaving Auto for Recommend changes no pod (Off is what gives the pods
    their startup settings back), so the status says what their gates,
    asked this step, run: never "not applied" while batchpilot's settings do.
    """

    knobs: Knobs  # the setting most of them run
    running: int  # Ready pods whose gate reports `knobs`
    # "pod: what it runs instead, or why its gate did not answer".
    others: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CycleReport:
    mode: Mode
    pods: PodCounts = field(default_factory=PodCounts)
    decision: Decision | None = None
    actuation: ActuationReport | None = None
    # (Problem.*, message) when the cycle stopped before or during its step.
    problem: tuple[str, str] | None = None
    # The settings last seen meeting the SLOs, from the controller's state.
    last_known_good: Knobs | None = None
    # Mode Recommend only: batchpilot's settings the pods still run, if any.
    held: HeldReport | None = None


def knobs_document(knobs: Knobs) -> dict[str, Any]:
    """camelCase knob settings; an unset limit (None) is left out: absent means no limit."""
    return {
        CAMEL_NAMES[name]: value for name, value in knobs.to_mapping().items() if value is not None
    }


def knobs_summary(knobs: Knobs) -> str:
    """`cap=64 tokens=200000 fcfs deadline=none` for one-line displays."""

    def text(value: int | None) -> str:
        return "none" if value is None else str(value)

    return (
        f"cap={text(knobs.max_concurrency)} tokens={text(knobs.max_inflight_tokens)} "
        f"{knobs.discipline} deadline={text(knobs.queue_deadline_ms)}"
    )


def reason_text(reason: Reason) -> str:
    """`guard:max-step: limited to x4 per interval (maxConcurrency: wanted 256, allowed 64)`.

    Never an arrow: in Events "A -> B" is what a pod ran and what it runs
    now, and a guard's pair is something else (what was wanted, what it let
    through), often with the pods at the second value all along.
    """
    text = f"{reason.step}: {reason.message}"
    if reason.knob is not None:
        name = CAMEL_NAMES.get(reason.knob, reason.knob)
        text += f" ({name}: wanted {_value(reason.wanted)}, allowed {_value(reason.allowed)})"
    return text


def build_status(
    report: CycleReport, previous: Mapping[str, Any], *, generation: int, now: datetime
) -> dict[str, Any]:
    """The desired status after this cycle; unchanged facts keep their old timestamps."""
    stamp = timestamp(now)
    status: dict[str, Any] = {"observedGeneration": generation, "mode": report.mode.value}
    status["pods"] = _pods(report.pods)

    decision = report.decision
    if decision is not None:
        status["recommendation"] = _recommendation(decision, previous.get("recommendation"), stamp)
        status["model"] = {
            "samples": decision.quality.samples,
            "trusted": decision.quality.trusted,
            **(
                {"heldOutError": float(f"{decision.quality.heldout_error:.2g}")}
                if decision.quality.heldout_error is not None
                else {}
            ),
        }
    else:
        # A skipped cycle keeps what the last step found: the recommendation is
        # still the best known, and the conditions below say it is not fresh.
        for key in ("recommendation", "model"):
            if key in previous:
                status[key] = previous[key]

    actuation, held, ready = report.actuation, report.held, report.pods.ready
    if actuation is not None:
        status["applied"] = _applied(
            actuation.target,
            actuation.up_to_date,
            actuation.laggards,
            f"{actuation.up_to_date}/{ready} {knobs_summary(actuation.target)}",
        )
    elif held is not None:
        status["applied"] = _applied(
            held.knobs,
            held.running,
            held.others,
            f"{held.running}/{ready} still {knobs_summary(held.knobs)} "
            f"from Auto (mode {report.mode.value})",
        )
    elif report.mode is not Mode.AUTO:
        status["applied"] = {"summary": f"not applied (mode {report.mode.value})"}
    elif "applied" in previous:
        status["applied"] = previous["applied"]

    good = report.last_known_good
    if good is not None:
        old = previous.get("lastKnownGood") or {}
        document = knobs_document(good)
        status["lastKnownGood"] = {
            "knobs": document,
            "time": old.get("time", stamp) if old.get("knobs") == document else stamp,
        }
    elif "lastKnownGood" in previous:
        status["lastKnownGood"] = previous["lastKnownGood"]

    if report.actuation is not None and report.actuation.changed:
        status["lastChangeTime"] = stamp
    elif "lastChangeTime" in previous:
        status["lastChangeTime"] = previous["lastChangeTime"]

    status["conditions"] = _conditions(report, previous.get("conditions") or [], generation, stamp)
    return status


def merge_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """RFC 7386 patch turning `current` into `desired`; None when they are equal.

    Keys missing from `desired` become null (delete); lists are replaced whole,
    as merge patch does.
    """
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            nested = merge_patch(old, value)
            if nested is not None:
                patch[key] = nested
        elif old != value or key not in current:
            patch[key] = value
    for key in current:
        if key not in desired:
            patch[key] = None
    return patch or None


def condition_map(conditions: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {c["type"]: c for c in conditions if isinstance(c, Mapping) and "type" in c}


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC to the second, as Kubernetes writes metav1.Time."""
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- parts ---------------------------------------------------------------------


def _pods(counts: PodCounts) -> dict[str, Any]:
    pods: dict[str, Any] = {
        "selected": counts.selected,
        "ready": counts.ready,
        "summary": f"{counts.ready}/{counts.selected}",
    }
    if counts.reporting is not None:
        pods["reporting"] = counts.reporting
    return pods


def _recommendation(decision: Decision, previous: Any, stamp: str) -> dict[str, Any]:
    knobs = knobs_document(decision.target)
    old = previous if isinstance(previous, Mapping) else {}
    return {
        "knobs": knobs,
        "reasons": _capped([reason_text(r) for r in decision.reasons], MAX_REASONS),
        "time": old.get("time", stamp) if old.get("knobs") == knobs else stamp,
    }


def _applied(
    knobs: Knobs, up_to_date: int, laggards: Sequence[str], summary: str
) -> dict[str, Any]:
    return {
        "knobs": knobs_document(knobs),
        "upToDate": up_to_date,
        "laggards": _capped(laggards, MAX_LAGGARDS),
        "summary": summary,
    }


def _capped(lines: Sequence[str], limit: int) -> list[str]:
    """At most `limit` lines, then one counting the rest."""
    kept = list(lines[:limit])
    if len(lines) > limit:
        kept.append(f"... and {len(lines) - limit} more")
    return kept


def _conditions(
    report: CycleReport, previous: Sequence[Mapping[str, Any]], generation: int, stamp: str
) -> list[dict[str, Any]]:
    old = condition_map(previous)
    wanted = _wanted_conditions(report)
    out = []
    for kind in CONDITION_TYPES:
        status, reason, message = wanted[kind]
        before = old.get(kind)
        transition = (
            before.get("lastTransitionTime") if before and before.get("status") == status else None
        )
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": transition or stamp,
                "observedGeneration": generation,
            }
        )
    return out


def _wanted_conditions(report: CycleReport) -> dict[str, tuple[str, str, str]]:
    """type -> (status, reason, message) for this cycle."""
    decision, problem, actuation = report.decision, report.problem, report.actuation
    wanted: dict[str, tuple[str, str, str]] = {}

    if problem is not None:
        reason, message = problem
        wanted[READY] = (FALSE, reason, message)
    elif actuation is not None and actuation.laggards and actuation.up_to_date == 0:
        wanted[READY] = (
            FALSE,
            "ActuationFailed",
            f"no pod accepted the settings: {actuation.laggards[0]}",
        )
    else:
        wanted[READY] = (TRUE, f"Mode{report.mode.value}", _ready_message(report))

    if problem is not None and problem[0] == Problem.METRICS_UNAVAILABLE:
        wanted[METRICS_AVAILABLE] = (FALSE, "QueryFailed", problem[1])
    elif decision is None:
        wanted[METRICS_AVAILABLE] = (UNKNOWN, "NoStep", "no control step has read metrics")
    elif not decision.conditions.metrics_available:
        wanted[METRICS_AVAILABLE] = (FALSE, "MissingOrStale", _missing_message(report))
    else:
        wanted[METRICS_AVAILABLE] = (TRUE, "Fresh", _reporting_message(report))

    if decision is None:
        wanted[MODEL_TRUSTED] = (UNKNOWN, "NoStep", "no control step has fitted the model")
    elif decision.conditions.model_trusted:
        wanted[MODEL_TRUSTED] = (TRUE, "HeldOutErrorLow", _model_message(decision))
    else:
        wanted[MODEL_TRUSTED] = (
            FALSE,
            "FeedbackRule",
            _model_message(decision) + "; steering by the feedback rule",
        )

    slo_met = None if decision is None else decision.conditions.slo_met
    if problem is not None and problem[0] == Problem.METRICS_UNAVAILABLE:
        wanted[SLO_MET] = (UNKNOWN, "QueryFailed", f"not judged: {problem[1]}")
    elif decision is None:
        wanted[SLO_MET] = (UNKNOWN, "NoStep", "no control step has judged the objectives")
    elif not decision.conditions.metrics_available:
        wanted[SLO_MET] = (
            UNKNOWN,
            "MissingOrStale",
            "not judged: " + _reporting_message(report),
        )
    elif slo_met is None:
        wanted[SLO_MET] = (
            UNKNOWN,
            "NoCompletedRequests",
            "no completed requests in the window to judge by",
        )
    elif slo_met:
        wanted[SLO_MET] = (TRUE, "WithinObjectives", "latency objectives met over the last window")
    else:
        wanted[SLO_MET] = (
            FALSE,
            "ObjectivesMissed",
            "latency objectives missed over the last window",
        )

    if actuation is not None and (actuation.changed or actuation.laggards):
        pending = len(actuation.laggards)
        wanted[PROGRESSING] = (
            TRUE,
            "RollingOut",
            f"{len(actuation.changed)} pod(s) changed this step, {pending} not yet at the target",
        )
    elif decision is not None and len(set(decision.per_pod.values())) > 1:
        # Pods with different targets: a canary runs the new settings first.
        wanted[PROGRESSING] = (TRUE, "Canary", "a canary pod runs the new settings first")
    else:
        wanted[PROGRESSING] = (FALSE, "Stable", "no change in progress")

    if problem is not None:
        # The step did not run: nothing is steered until the cause clears.
        wanted[DEGRADED] = (TRUE, problem[0], f"no control step ran: {problem[1]}")
    elif actuation is not None and actuation.laggards:
        wanted[DEGRADED] = (TRUE, "ActuationFailed", "; ".join(actuation.laggards[:3]))
    elif (
        decision is not None
        and report.pods.reporting is not None
        and report.pods.reporting < report.pods.ready
    ):
        silent = report.pods.ready - report.pods.reporting
        wanted[DEGRADED] = (
            TRUE,
            "PodsNotReporting",
            f"{silent} ready pod(s) have no fresh metrics",
        )
    else:
        wanted[DEGRADED] = (FALSE, "Healthy", _healthy_message(report))
    return wanted


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


def _value(value: Any) -> str:
    return "none" if value is None else str(value)
