"""Explain: every recommendation carries its reasons as plain data.

A `Reason` is one sentence plus the numbers behind it, attributed to the
step that produced it (`decide`, `guard:max-step`, ...) and, where a guard
changed a knob, the knob with the value the steps before it wanted and the
value it allowed. That is not "old -> new" (what the pods ran, what they
run next, as SettingsApplied Events say), so it is never written with an
arrow: `maxConcurrency: wanted 209, allowed 512`. The same records
feed the CR status (`Decision.to_status()`) and `batchpilot explain`
(`reason_rows()`), so what a user reads is what the controller did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from batchpilot.controller.knobs import Knobs
from batchpilot.controller.policy import CAMEL_NAMES

Scalar = float | int | str | bool | None


@dataclass(frozen=True, slots=True)
class Reason:
    step: str
    message: str
    knob: str | None = None
    # What the steps before this one wanted for `knob`, and what this step let through.
    wanted: Scalar = None
    allowed: Scalar = None
    data: Mapping[str, Scalar] = field(default_factory=dict)

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "message": self.message}
        if self.knob is not None:
            out.update(knob=self.knob, wanted=self.wanted, allowed=self.allowed)
        if self.data:
            out["data"] = {k: _rounded(v) for k, v in self.data.items()}
        return out


@dataclass(frozen=True, slots=True)
class CanaryState:
    """A candidate running on one pod while the others keep the baseline."""

    pod: str
    candidate: Knobs
    baseline: Knobs
    started_s: float
    intervals_done: int = 0
    # Per interval: canary pod's score minus the other pods' mean score.
    score_gaps: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Recommendation:
    """What one iteration proposes: a policy-wide target and, per pod, what to run."""

    target: Knobs
    per_pod: Mapping[str, Knobs] = field(default_factory=dict)
    # Urgent moves (an SLO breach, a shift in the length mix) skip the
    # stabilization window; they are still clamped and step-limited.
    urgent: bool = False
    reasons: tuple[Reason, ...] = ()
    canary: CanaryState | None = None

    def because(self, reason: Reason) -> Recommendation:
        return replace(self, reasons=(*self.reasons, reason))

    def retarget(self, target: Knobs, reasons: tuple[Reason, ...]) -> Recommendation:
        return replace(self, target=target, reasons=(*self.reasons, *reasons))


@dataclass(frozen=True, slots=True)
class ModelQuality:
    samples: int
    # Mean absolute error of the log prediction on windows the model had not
    # been fitted on yet (0.1 ~ predictions off by ~10%); None until scored.
    heldout_error: float | None
    trusted: bool

    def to_mapping(self) -> dict[str, Any]:
        return {"samples": self.samples, "heldoutError": _rounded(self.heldout_error), "trusted": self.trusted}


@dataclass(frozen=True, slots=True)
class Conditions:
    metrics_available: bool
    model_trusted: bool
    # None when the window had no completed requests to judge by.
    slo_met: bool | None

    def to_list(self) -> list[dict[str, str]]:
        def status(value: bool | None) -> str:
            return "Unknown" if value is None else ("True" if value else "False")

        return [
            {"type": "MetricsAvailable", "status": status(self.metrics_available)},
            {"type": "ModelTrusted", "status": status(self.model_trusted)},
            {"type": "SLOMet", "status": status(self.slo_met)},
        ]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one iteration, whatever the mode: always published."""

    time_s: float
    target: Knobs
    per_pod: Mapping[str, Knobs]
    # Whether the mode lets the operator apply it (Auto) or only publish it.
    actuate: bool
    reasons: tuple[Reason, ...]
    quality: ModelQuality
    conditions: Conditions
    step_seconds: Mapping[str, float]
    signals: Mapping[str, Scalar] = field(default_factory=dict)
    predictions: Mapping[str, Scalar] = field(default_factory=dict)
    # The pod running a canary of a new setting (guards.canary), if one runs:
    # the operator marks its record so a restart can tell it from the fleet.
    canary_pod: str | None = None

    def to_status(self) -> dict[str, Any]:
        """The CR status fragment: plain JSON-ready data."""
        return {
            "recommendation": _knobs_camel(self.target),
            "perPod": {pod: _knobs_camel(knobs) for pod, knobs in sorted(self.per_pod.items())},
            "actuate": self.actuate,
            "conditions": self.conditions.to_list(),
            "model": self.quality.to_mapping(),
            "signals": {k: _rounded(v) for k, v in self.signals.items()},
            "predictions": {k: _rounded(v) for k, v in self.predictions.items()},
            "reasons": [reason.to_mapping() for reason in self.reasons],
            "stepSeconds": {k: round(v, 6) for k, v in self.step_seconds.items()},
        }


def reason_rows(decision: Decision) -> list[tuple[str, str, str, str]]:
    """(step, knob, change, why) rows for a `batchpilot explain` table."""
    rows = []
    for reason in decision.reasons:
        change = "" if reason.knob is None else f"wanted {_text(reason.wanted)}, allowed {_text(reason.allowed)}"
        numbers = ", ".join(f"{k}={_text(_rounded(v))}" for k, v in reason.data.items())
        why = f"{reason.message} ({numbers})" if numbers else reason.message
        rows.append((reason.step, reason.knob or "", change, why))
    return rows


def _knobs_camel(knobs: Knobs) -> dict[str, Any]:
    return {CAMEL_NAMES[name]: value for name, value in knobs.to_mapping().items()}


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def _text(value: Any) -> str:
    return "none" if value is None else str(value)
