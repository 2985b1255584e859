"""InferencePolicy status: what one control cycle found -> the status document.

Pure functions, no kopf and no clock of their own (`now` is passed in), so the
rules are unit-tested directly:

- `build_status(report, previous, generation, now)` returns the whole desired
  status. Anything that did not really change keeps its old value, including
  timestamps: a condition's `lastTransitionTime` moves only when its status
  does, the recommendation's `time` only when its knobs do. That is what lets
  an unchanged cycle produce an identical document. The conditions' rules
  are in conditions.py.
- `merge_patch(current, desired)` is the JSON merge patch from one to the
  other, or None when they are equal; the operator writes status only when
  there is a patch,
  because every write costs the API server, wakes every watcher (GitOps
  controllers included) and resets kopf's idle timers.

Numbers that wobble from window to window are rounded before they reach the
document (the model's held-out error to two significant digits), and reasons
are rendered without their per-window measurements, for the same reason. The
per-class numbers of a policy with SLO classes (`status.classes`) move more
than those, so each also keeps its published value while the new one is
within a dead band of it (`_steady`): 10% for rates and latencies, 0.002 for
an attainment, and never across the class's objective, so the published
numbers and `sloMet` always agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from batchpilot.contract.knobs import Knobs, knobs_document, knobs_summary
from batchpilot.contract.reasons import ConditionReason
from batchpilot.controller.explain import ClassReport, Decision, reason_text
from batchpilot.controller.policy import Mode
from batchpilot.operator.conditions import conditions

# At most this many reasons and laggards in status: a 64-pod rollout must
# not turn the status into a log.
MAX_REASONS = 12
MAX_LAGGARDS = 10
# Dead bands of the per-class numbers (module docstring): a rate or latency
# within 10% of its published value is noise at a 60 s window, and so is an
# attainment within 0.002 (two requests in a thousand).
RELATIVE_BAND = 0.10
ATTAINMENT_BAND = 0.002
# Between a laggard's pod and why, in its status line; no pod name has it.
_LAGGARD_SEPARATOR = ": "


@dataclass(frozen=True, slots=True)
class PodCounts:
    selected: int = 0
    ready: int = 0
    # Ready pods with fresh metrics; None when no step read metrics.
    reporting: int | None = None


@dataclass(frozen=True, slots=True)
class Laggard:
    """A Ready pod not at the settings `status.applied` names, and why.

    The CRD keeps `applied.laggards` a list of strings, so the status carries
    each as one line, `chat-1: gate admin API ... unreachable`: `text` writes
    it, `parse` reads it back (`batchpilot explain`), nothing else does either.
    """

    pod: str
    why: str

    @property
    def text(self) -> str:
        return f"{self.pod}{_LAGGARD_SEPARATOR}{self.why}"

    @classmethod
    def parse(cls, line: str) -> Laggard | None:
        """None for a line that names no pod: the `... and N more` that ends a capped list."""
        pod, separator, why = line.partition(_LAGGARD_SEPARATOR)
        return cls(pod, why) if separator else None


@dataclass(frozen=True, slots=True)
class ActuationReport:
    """What applying one decision to the pods' gates did (mode Auto)."""

    target: Knobs
    up_to_date: int
    # Every Ready pod not confirmed at its target.
    laggards: tuple[Laggard, ...] = ()
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
    # What each other pod runs instead, or why its gate did not answer.
    others: tuple[Laggard, ...] = ()


@dataclass(frozen=True, slots=True)
class CycleReport:
    mode: Mode
    pods: PodCounts = field(default_factory=PodCounts)
    decision: Decision | None = None
    actuation: ActuationReport | None = None
    # (why, message) when the cycle stopped before or during its step.
    problem: tuple[ConditionReason, str] | None = None
    # The settings last seen meeting the SLOs, from the controller's state.
    last_known_good: Knobs | None = None
    # Mode Recommend only: batchpilot's settings the pods still run, if any.
    held: HeldReport | None = None


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
        if decision.classes:
            status["classes"] = class_statuses(decision.classes, previous.get("classes"))
            worst = worst_class(status["classes"])
            if worst is not None:
                status["worstClass"] = worst
    else:
        # A skipped cycle keeps what the last step found: the recommendation is
        # still the best known, and the conditions below say it is not fresh.
        for key in ("recommendation", "model", "classes", "worstClass"):
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

    status["conditions"] = conditions(report, previous.get("conditions") or [], generation, stamp)
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


def class_statuses(reports: Sequence[ClassReport], previous: Any) -> list[dict[str, Any]]:
    """`status.classes`: each class as the decision reports it (highest priority
    first), its noisy numbers kept at their published values while they stay
    within their dead band."""
    published = {
        old.get("name"): old
        for old in (previous if isinstance(previous, list) else [])
        if isinstance(old, Mapping)
    }
    return [_class_status(report, published.get(report.name) or {}) for report in reports]


def worst_class(classes: Sequence[Mapping[str, Any]]) -> str | None:
    """`interactive 97.1%`: the class with the lowest published attainment (the
    first of equals), for the printer column; None while no class has one."""
    judged = [c for c in classes if c.get("attainment") is not None]
    if not judged:
        return None
    worst = min(judged, key=lambda c: float(c["attainment"]))
    return f"{worst['name']} {float(worst['attainment']) * 100:.1f}%"


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
    knobs: Knobs, up_to_date: int, laggards: Sequence[Laggard], summary: str
) -> dict[str, Any]:
    return {
        "knobs": knobs_document(knobs),
        "upToDate": up_to_date,
        "laggards": _capped([laggard.text for laggard in laggards], MAX_LAGGARDS),
        "summary": summary,
    }


def _capped(lines: Sequence[str], limit: int) -> list[str]:
    """At most `limit` lines, then one counting the rest."""
    kept = list(lines[:limit])
    if len(lines) > limit:
        kept.append(f"... and {len(lines) - limit} more")
    return kept


def _class_status(report: ClassReport, old: Mapping[str, Any]) -> dict[str, Any]:
    old_observed = old.get("observed") or {}
    objective = {"ttftMs": report.slo_ttft_ms, "tpotMs": report.slo_tpot_ms}
    observed = {
        "ttftMs": _steady(report.ttft_q_ms, old_observed.get("ttftMs"), report.slo_ttft_ms),
        "tpotMs": _steady(report.tpot_q_ms, old_observed.get("tpotMs"), report.slo_tpot_ms),
    }
    document: dict[str, Any] = {
        "name": report.name,
        "priority": report.priority,
        "objective": objective,
        "observed": {key: value for key, value in observed.items() if value is not None},
    }
    if report.ttft_q_ms is not None and report.tpot_q_ms is not None:
        document["sloMet"] = (
            report.ttft_q_ms <= report.slo_ttft_ms and report.tpot_q_ms <= report.slo_tpot_ms
        )
    attainment = _steady_attainment(report.attainment, old.get("attainment"))
    optional = {
        "attainment": attainment,
        "arrivalRps": _steady(report.arrival_rps, old.get("arrivalRps")),
        "shedRps": _steady(report.shed_rps, old.get("shedRps")),
        # What the gate runs for the class: set values, never noisy.
        "queueDeadlineMs": report.queue_deadline_ms,
        "maxConcurrency": report.max_concurrency,
    }
    document.update({key: value for key, value in optional.items() if value is not None})
    return document


def _steady(value: float | None, old: Any, objective: float | None = None) -> float | None:
    """`value` to two significant digits, or the published `old` while `value`
    is within RELATIVE_BAND of it and on the same side of `objective`."""
    if value is None:
        return None
    if isinstance(old, int | float) and not isinstance(old, bool):
        same_side = objective is None or (value <= objective) == (old <= objective)
        if same_side and abs(value - old) <= RELATIVE_BAND * abs(old):
            return old
    rounded = _significant(value)
    if objective is not None and (rounded <= objective) != (value <= objective):
        # 801 ms against 800 would read 800, within the objective: keep the digits.
        return _significant(value, 6)
    return rounded


def _steady_attainment(value: float | None, old: Any) -> float | None:
    if value is None:
        return None
    numeric = isinstance(old, int | float) and not isinstance(old, bool)
    if numeric and abs(value - old) <= ATTAINMENT_BAND:
        return float(old)
    return round(value, 3)


def _significant(value: float, digits: int = 2) -> float:
    """`digits` significant digits, as a whole number when it is one (1200, not 1200.0)."""
    rounded = float(f"{value:.{digits}g}")
    return int(rounded) if rounded.is_integer() else rounded
