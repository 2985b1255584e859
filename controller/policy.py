"""The typed, validated policy one controller instance runs with.

The operator builds a `Policy` from an InferencePolicy's `spec` with
`Policy.from_spec` (or, having parsed the whole spec, `from_document`); the
benchmark adapter builds one directly. Every constructor validates, and every
error names the offending field (the CR path, e.g. `spec.slo.ttftMs`) and
says what would be accepted, so a bad spec is rejected with a message a user
can act on.

The spec's fields, their bounds and their wire names are declared once, in
spec.py; here the listed knobs become the ranges the controller steers in,
with defaults derived from the engine and the SLO.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchpilot.contract.knobs import DISCIPLINES, KNOB_LIMITS, NUMERIC_KNOBS, WIRE_NAMES, Knobs
from batchpilot.contract.schema import PolicyError, parse, prefixed
from batchpilot.controller.knobspec import KnobsSpec
from batchpilot.controller.spec import (
    LABEL_NAME_RE,
    METRIC_NAME_RE,
    Behavior,
    Canary,
    ClassSpec,
    ControllerSpec,
    EngineKind,
    EngineSpec,
    MetricOverride,
    MetricsSpec,
    Mode,
    Slo,
)

# The spec's types, importable from here as before they moved to spec.py.
__all__ = [
    "LABEL_NAME_RE",
    "METRIC_NAME_RE",
    "Behavior",
    "Canary",
    "ClassSpec",
    "EngineKind",
    "EngineSpec",
    "KnobBounds",
    "MetricOverride",
    "MetricsSpec",
    "Mode",
    "Policy",
    "PolicyError",
    "Slo",
    "default_bounds",
]

# Absent `knobs`: the two disciplines that need no request priorities.
DEFAULT_DISCIPLINES = ("fcfs", "shortest-prompt-first")


@dataclass(frozen=True, slots=True)
class KnobBounds:
    """Range a numeric knob is steered in; `high=None` allows "no limit"."""

    knob: str
    low: int
    high: int | None

    def __post_init__(self) -> None:
        where = f"knobs.{WIRE_NAMES.get(self.knob, self.knob)}"
        if self.knob not in NUMERIC_KNOBS:
            raise PolicyError(
                where,
                f"not a numeric knob; numeric knobs are {', '.join(WIRE_NAMES[k] for k in NUMERIC_KNOBS)}",
            )
        floor, ceiling = KNOB_LIMITS[self.knob]
        _require_int(f"{where}.min", self.low, floor, ceiling)
        if self.high is not None:
            _require_int(f"{where}.max", self.high, floor, ceiling)
            if self.high < self.low:
                raise PolicyError(
                    f"{where}.max", f"must be at least min ({self.low}), got {self.high}"
                )

    def clamp(self, value: int | None) -> int | None:
        """`None` is "no limit": the top of the range."""
        if value is None:
            return self.high
        if value < self.low:
            return self.low
        if self.high is not None and value > self.high:
            return self.high
        return value


@dataclass(frozen=True, slots=True)
class Policy:
    slo: Slo
    engine: EngineSpec = field(default_factory=EngineSpec)
    # Numeric knobs to steer and their ranges; knobs not listed are left as applied.
    bounds: Mapping[str, KnobBounds] = field(default_factory=dict)
    # Disciplines the controller may choose; empty: discipline is not steered.
    disciplines: tuple[str, ...] = ()
    behavior: Behavior = field(default_factory=Behavior)
    mode: Mode = Mode.RECOMMEND
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    name: str = "policy"
    namespace: str = "default"
    # SLO classes (spec.classes); empty: every request in one class, `slo`.
    classes: tuple[ClassSpec, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Mode):
            try:
                object.__setattr__(self, "mode", Mode(self.mode))
            except ValueError:
                raise PolicyError(
                    "mode", f"{self.mode!r} is not one of {', '.join(m.value for m in Mode)}"
                ) from None
        for knob, bound in self.bounds.items():
            if knob != bound.knob:
                raise PolicyError(
                    f"knobs.{WIRE_NAMES.get(knob, knob)}", f"bounds are for {bound.knob}"
                )
        for discipline in self.disciplines:
            if discipline not in DISCIPLINES:
                raise PolicyError(
                    "knobs.discipline.allowed",
                    f"{discipline!r} is not one of {', '.join(DISCIPLINES)}",
                )
        if "max_num_batched_tokens" in self.bounds and not self.engine.runtime_tunable:
            raise PolicyError(
                "knobs.maxNumBatchedTokens",
                "the engine does not accept a live prefill budget (engine.runtimeTunable is false); "
                "remove this knob or set runtimeTunable",
            )

    @classmethod
    def default_for(cls, slo: Slo, engine: EngineSpec, **kwargs: Any) -> Policy:
        """The default knob set for an engine: everything the gate can steer."""
        return cls(
            slo=slo,
            engine=engine,
            bounds=default_bounds(engine, slo),
            disciplines=DEFAULT_DISCIPLINES,
            **kwargs,
        )

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any], *, name: str = "policy", namespace: str = "default"
    ) -> Policy:
        """Build from the controller's part of an InferencePolicy `spec` (spec.py)."""
        return cls.from_document(
            parse(ControllerSpec, spec, "spec"), name=name, namespace=namespace
        )

    @classmethod
    def from_document(
        cls, document: ControllerSpec, *, name: str = "policy", namespace: str = "default"
    ) -> Policy:
        """Build from a parsed spec; errors name the spec path."""

        def build() -> Policy:
            slo, engine = document.slo, document.engine
            disciplines: tuple[str, ...]
            if document.knobs is None:
                bounds, disciplines = default_bounds(engine, slo), DEFAULT_DISCIPLINES
            else:
                bounds, disciplines = _listed_bounds(document.knobs, engine, slo)
            return cls(
                slo=slo,
                engine=engine,
                bounds=bounds,
                disciplines=disciplines,
                behavior=document.behavior,
                mode=document.mode,
                metrics=document.metrics,
                name=name,
                namespace=namespace,
                classes=document.classes,
            )

        return prefixed("spec", build)

    def steers(self, knob: str) -> bool:
        if knob == "discipline":
            return bool(self.disciplines)
        return knob in self.bounds

    def effective(self, knob: str, value: int | None) -> float:
        """A numeric knob as a number: `None` is the engine ceiling, or +inf where there is none."""
        if value is not None:
            return float(value)
        if knob == "max_concurrency":
            return float(self.engine.max_num_seqs)
        if knob == "max_num_batched_tokens":
            return float(self.engine.max_num_batched_tokens)
        return math.inf

    def clamp(self, knobs: Knobs) -> Knobs:
        """Every steered knob inside its range; unsteered knobs untouched."""
        changes: dict[str, Any] = {}
        for knob, bound in self.bounds.items():
            value = getattr(knobs, knob)
            clamped = bound.clamp(value)
            if clamped != value:
                changes[knob] = clamped
        if self.disciplines and knobs.discipline not in self.disciplines:
            changes["discipline"] = self.disciplines[0]
        return knobs.with_changes(**changes) if changes else knobs


def default_bounds(engine: EngineSpec, slo: Slo) -> dict[str, KnobBounds]:
    bounds = {
        # 4: below that an engine leaves most of a GPU idle. An engine
        # started with few slots (llama.cpp's 16 on a CPU) was sized so that
        # each one costs much of a step, and there one sequence can be what
        # meets the TPOT objective: a sixteenth of its slots, at least 1.
        # The ceiling is the startup limit, which the gate cannot raise.
        "max_concurrency": KnobBounds(
            "max_concurrency", max(1, min(4, engine.max_num_seqs // 16)), engine.max_num_seqs
        ),
        # One full prefill step: a smaller budget leaves the engine's steps
        # underfilled while prompts wait at the gate.
        "max_inflight_tokens": KnobBounds(
            "max_inflight_tokens", engine.max_num_batched_tokens, None
        ),
        # 100 ms: below one prefill of a long prompt a deadline sheds requests
        # that would still have met their TTFT.
        "queue_deadline_ms": KnobBounds("queue_deadline_ms", min(100, slo.ttft_ms), None),
    }
    if engine.runtime_tunable:
        # 512: smaller chunks make every prefill step pay the fixed per-step
        # cost (~6 ms on an H100 for an 8B model) for too few tokens.
        bounds["max_num_batched_tokens"] = KnobBounds(
            "max_num_batched_tokens",
            min(512, engine.max_num_batched_tokens),
            engine.max_num_batched_tokens,
        )
    return bounds


def _listed_bounds(
    knobs: KnobsSpec, engine: EngineSpec, slo: Slo
) -> tuple[dict[str, KnobBounds], tuple[str, ...]]:
    """The knobs a spec lists, each end not given taken from the defaults."""
    defaults = default_bounds(engine, slo)
    bounds: dict[str, KnobBounds] = {}
    for knob, listed in knobs.ranges().items():
        fallback = defaults.get(knob) or _fallback_bounds(knob, engine)
        low = fallback.low if listed.min is None else listed.min
        high = fallback.high if listed.max is None else listed.max
        bounds[knob] = KnobBounds(knob, low, high)
    disciplines = () if knobs.discipline is None else knobs.discipline.allowed
    return bounds, disciplines


def _fallback_bounds(knob: str, engine: EngineSpec) -> KnobBounds:
    if knob == "aging_ms":
        # 100 ms .. 60 s: shorter ages make every discipline fcfs; longer ones
        # let a request wait longer than any TTFT objective worth having.
        return KnobBounds("aging_ms", 100, 60_000)
    # max_num_batched_tokens without runtimeTunable: Policy rejects it later
    # with a message about runtimeTunable, which is the real problem.
    return KnobBounds(knob, min(512, engine.max_num_batched_tokens), engine.max_num_batched_tokens)


def _require_int(where: str, value: Any, low: int, high: int) -> None:
    # bool is an int subclass; `true` for a token count is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(where, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise PolicyError(where, f"must be between {low} and {high}, got {value}")
