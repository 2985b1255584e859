"""Explain: every recommendation carries its reasons as plain data.

A `Reason` is one sentence plus the numbers behind it, attributed to the
step that produced it (`decide`, `guard:max-step`, ...) and, where a guard
changed a knob, the knob with the value the steps before it wanted and the
value it allowed. That is not "old -> new" (what the pods ran, what they
run next, as SettingsApplied Events say), so it is never written with an
arrow: `maxConcurrency: wanted 209, allowed 512`.

`reason_text` is the one rendering of a reason: the operator writes it into
the status' `recommendation.reasons`, the demo shows it, and `batchpilot
explain` reads the status back with `parse_reason_text`, its inverse, so
what a user reads is what the controller did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from batchpilot.contract.knobs import WIRE_NAMES, Knobs, value_text

Scalar = float | int | str | bool | None

# Step names carry no ": " (`guard:max-step`), so in a reason's text the
# first one ends the step.
_STEP_END = ": "
# The guards' steps (controller/guards.py), the safety chain after the decision.
_GUARD_PREFIX = "guard:"


@dataclass(frozen=True, slots=True)
class Reason:
    step: str
    message: str
    knob: str | None = None
    # What the steps before this one wanted for `knob`, and what this step let through.
    wanted: Scalar = None
    allowed: Scalar = None
    data: Mapping[str, Scalar] = field(default_factory=dict)


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


@dataclass(frozen=True, slots=True)
class Conditions:
    metrics_available: bool
    model_trusted: bool
    # None when the window had no completed requests to judge by.
    slo_met: bool | None


@dataclass(frozen=True, slots=True)
class ClassReport:
    """One SLO class over the window: how it fared, and what the target gives it.

    Every number is None when the window does not show it (no traffic in the
    class, or the gate's per-class series are missing).
    """

    name: str
    priority: int
    slo_ttft_ms: int
    slo_tpot_ms: int
    # Share of the class's requests that met both of its objectives.
    attainment: float | None = None
    # TTFT and TPOT at the SLO percentile, milliseconds.
    ttft_q_ms: float | None = None
    tpot_q_ms: float | None = None
    # Requests per second arriving at the gates (admitted + shed), and shed.
    arrival_rps: float | None = None
    shed_rps: float | None = None
    # What the target knobs give the class at the gate.
    queue_deadline_ms: int | None = None
    max_concurrency: int | None = None


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
    # Per SLO class (policy.classes plus the default class), highest priority
    # first; empty for a policy without classes.
    classes: tuple[ClassReport, ...] = ()


def reason_text(reason: Reason) -> str:
    """`guard:max-step: limited to x4 per interval (maxConcurrency: wanted 256, allowed 64)`.

    Never an arrow: in Events "A -> B" is what a pod ran and what it runs
    now, and a guard's pair is something else (what was wanted, what it let
    through), often with the pods at the second value all along. The numbers
    in `data` are left out: they change every window, and a status that
    carries this text would be written every window for them.
    """
    text = f"{reason.step}{_STEP_END}{reason.message}"
    if reason.knob is not None:
        name = WIRE_NAMES.get(reason.knob, reason.knob)
        wanted, allowed = value_text(reason.wanted), value_text(reason.allowed)
        text += f" ({name}: wanted {wanted}, allowed {allowed})"
    return text


def parse_reason_text(text: str) -> tuple[str, str]:
    """(step, the rest) of a `reason_text` line: what `batchpilot explain` reads from a status."""
    step, _, rest = text.partition(_STEP_END)
    return step, rest


def is_guard_step(step: str) -> bool:
    """Whether a guard, not the decision, gave a reason of this step."""
    return step.startswith(_GUARD_PREFIX)
