"""The typed, validated policy one controller instance runs with.

The operator builds a `Policy` from an InferencePolicy's `spec` with
`Policy.from_spec`; the benchmark adapter builds one directly. Every
constructor validates, and every error names the offending field (the
CR path, e.g. `spec.slo.ttftMs`) and says what would be accepted, so a bad
spec is rejected with a message a user can act on.

Spec shape (camelCase, as in the CR):

```yaml
engine:   {kind: vllm, maxNumSeqs: 512, maxNumBatchedTokens: 8192, runtimeTunable: false,
           kvCacheTokens: 400000}          # optional: the KV cache's size in tokens
slo:      {ttftMs: 2000, tpotMs: 50, percentile: 99}
knobs:                       # which knobs to steer; absent: a default set
  maxConcurrency:   {min: 8, max: 512}
  maxInflightTokens: {min: 20000}            # no max: "no budget" is allowed
  discipline:       {allowed: [fcfs, shortest-prompt-first]}
  queueDeadlineMs:  {min: 100, max: 30000}
  maxNumBatchedTokens: {min: 512, max: 8192}   # only with runtimeTunable
behavior: {intervalSeconds: 30, stabilizationWindowSeconds: 90, maxStepFactor: 4,
           minChangePercent: 10, canary: {enabled: false, intervals: 3}}
mode: Recommend                               # Off | Recommend | Auto
metrics:
  windowSeconds: 60
  stalenessSeconds: 90
  overrides:                                  # per signal, see promql.SIGNALS
    kvUsage: {metric: "vllm:gpu_cache_usage_perc"}
    waiting: {metric: nv_trt_llm_request_metrics, labels: {request_type: waiting}}
```
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any, TypeVar

from batchpilot.controller.knobs import (
    DISCIPLINES,
    MAX_AGING_MS,
    MAX_CONCURRENCY_LIMIT,
    MAX_DEADLINE_MS,
    MAX_TOKENS_LIMIT,
    Knobs,
)

# Prometheus' own grammar for the names batchpilot puts into a query
# unquoted; anything else is rejected rather than escaped.
T = TypeVar("T")

LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class PolicyError(ValueError):
    """The policy is invalid; `field` is the spec path of the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Mode(StrEnum):
    OFF = "Off"
    RECOMMEND = "Recommend"
    AUTO = "Auto"


class EngineKind(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"
    TGI = "tgi"
    TRITON = "triton"
    LLAMACPP = "llamacpp"
    GENERIC = "generic"


# Knobs the controller can steer, with the CR's camelCase spelling.
NUMERIC_KNOBS = (
    "max_concurrency",
    "max_inflight_tokens",
    "queue_deadline_ms",
    "aging_ms",
    "max_num_batched_tokens",
)
STEERABLE_KNOBS = (*NUMERIC_KNOBS, "discipline")
CAMEL_NAMES = {
    "max_concurrency": "maxConcurrency",
    "max_inflight_tokens": "maxInflightTokens",
    "queue_deadline_ms": "queueDeadlineMs",
    "aging_ms": "agingMs",
    "max_num_batched_tokens": "maxNumBatchedTokens",
    "discipline": "discipline",
}
_FROM_CAMEL = {camel: snake for snake, camel in CAMEL_NAMES.items()}
# Hard limits of each numeric knob (the same ones `Knobs` validates).
_KNOB_LIMITS = {
    "max_concurrency": (1, MAX_CONCURRENCY_LIMIT),
    "max_inflight_tokens": (1, MAX_TOKENS_LIMIT),
    "queue_deadline_ms": (1, MAX_DEADLINE_MS),
    "aging_ms": (1, MAX_AGING_MS),
    "max_num_batched_tokens": (16, MAX_TOKENS_LIMIT),
}


@dataclass(frozen=True, slots=True)
class Slo:
    """Per-request latency objectives, met at `percentile` (e.g. 99: p99)."""

    ttft_ms: int
    tpot_ms: int
    percentile: float = 99.0

    def __post_init__(self) -> None:
        _require_int("slo.ttftMs", self.ttft_ms, 1, 3_600_000)
        _require_int("slo.tpotMs", self.tpot_ms, 1, 60_000)
        if not isinstance(self.percentile, int | float) or not 50.0 <= self.percentile < 100.0:
            raise PolicyError(
                "slo.percentile", f"must be a number in [50, 100), e.g. 99; got {self.percentile!r}"
            )

    @property
    def quantile(self) -> float:
        return self.percentile / 100.0


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What the engine was started with: ceilings the gate can only lower."""

    kind: EngineKind = EngineKind.VLLM
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # True when the engine accepts a new prefill budget while running
    # (SGLang's set_internal_state); otherwise it stays at its startup value.
    runtime_tunable: bool = False
    # The KV cache's capacity in tokens (llama.cpp: --ctx-size with
    # --kv-unified; vLLM logs it at startup as "GPU KV cache size"). The token
    # budget is kept under it from the first decision; otherwise it is learned
    # from a KV-usage gauge, which some engines (llama.cpp) do not export.
    kv_cache_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, EngineKind):
            try:
                object.__setattr__(self, "kind", EngineKind(self.kind))
            except ValueError:
                raise PolicyError(
                    "engine.kind",
                    f"{self.kind!r} is not one of {', '.join(k.value for k in EngineKind)}",
                ) from None
        _require_int("engine.maxNumSeqs", self.max_num_seqs, 1, MAX_CONCURRENCY_LIMIT)
        _require_int("engine.maxNumBatchedTokens", self.max_num_batched_tokens, 16, MAX_TOKENS_LIMIT)
        if not isinstance(self.runtime_tunable, bool):
            raise PolicyError("engine.runtimeTunable", f"must be true or false, got {self.runtime_tunable!r}")
        if self.runtime_tunable and self.kind is EngineKind.LLAMACPP:
            raise PolicyError(
                "engine.runtimeTunable",
                "llama-server fixes its prefill budget (--batch-size) at startup and has no live API "
                "for it; set runtimeTunable to false",
            )
        if self.kv_cache_tokens is not None:
            _require_int(
                "engine.kvCacheTokens",
                self.kv_cache_tokens,
                16,
                MAX_TOKENS_LIMIT,
                fix="set it to the engine's KV-cache size in tokens (llama.cpp: --ctx-size; vLLM: "
                '"GPU KV cache size" in its startup log), or leave it out',
            )


@dataclass(frozen=True, slots=True)
class KnobBounds:
    """Range a numeric knob is steered in; `high=None` allows "no limit"."""

    knob: str
    low: int
    high: int | None

    def __post_init__(self) -> None:
        where = f"knobs.{CAMEL_NAMES.get(self.knob, self.knob)}"
        if self.knob not in NUMERIC_KNOBS:
            raise PolicyError(where, f"not a numeric knob; numeric knobs are {', '.join(CAMEL_NAMES[k] for k in NUMERIC_KNOBS)}")
        floor, ceiling = _KNOB_LIMITS[self.knob]
        _require_int(f"{where}.min", self.low, floor, ceiling)
        if self.high is not None:
            _require_int(f"{where}.max", self.high, floor, ceiling)
            if self.high < self.low:
                raise PolicyError(f"{where}.max", f"must be at least min ({self.low}), got {self.high}")

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
class Behavior:
    """How fast and how carefully recommendations turn into changes."""

    interval_s: float = 30.0
    # A move is taken only as far as every recommendation in this window
    # agrees (HPA's stabilization, in both directions); urgent moves (an SLO
    # breach, a shift in the length mix) are exempt.
    stabilization_window_s: float = 90.0
    # A numeric knob changes by at most this factor per interval (x4 or /4):
    # from the engine default of 256 down to 16 takes two intervals.
    max_step_factor: float = 4.0
    # Changes smaller than this fraction are not worth a reconfiguration.
    min_change_fraction: float = 0.10
    canary: bool = False
    canary_intervals: int = 3

    def __post_init__(self) -> None:
        _require_number("behavior.intervalSeconds", self.interval_s, 1.0, 3600.0)
        _require_number("behavior.stabilizationWindowSeconds", self.stabilization_window_s, 0.0, 86_400.0)
        _require_number("behavior.maxStepFactor", self.max_step_factor, 1.01, 1000.0)
        _require_number("behavior.minChangePercent", self.min_change_fraction * 100.0, 0.0, 100.0)
        if not isinstance(self.canary, bool):
            raise PolicyError("behavior.canary.enabled", f"must be true or false, got {self.canary!r}")
        _require_int("behavior.canary.intervals", self.canary_intervals, 1, 100)


@dataclass(frozen=True, slots=True)
class MetricOverride:
    """Read a signal from another metric: a name plus fixed label matchers.

    Deliberately not free-form PromQL: names are validated and values are
    escaped, so an override can choose a series but never rewrite a query.
    `scale` converts units into the signal's (0.001 for a histogram in ms).
    """

    metric: str
    labels: tuple[tuple[str, str], ...] = ()
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not METRIC_NAME_RE.fullmatch(self.metric):
            raise PolicyError(
                "metric", f"{self.metric!r} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
            )
        for name, value in self.labels:
            if not isinstance(name, str) or not LABEL_NAME_RE.fullmatch(name):
                raise PolicyError(
                    f"labels.{name}", "not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
                )
            if not isinstance(value, str):
                raise PolicyError(f"labels.{name}", f"value must be a string, got {value!r}")
        if not isinstance(self.scale, int | float) or not math.isfinite(self.scale) or self.scale <= 0:
            raise PolicyError("scale", f"must be a positive number, got {self.scale!r}")


@dataclass(frozen=True, slots=True)
class MetricsSpec:
    # 60 s: four scrapes at Prometheus' common 15 s interval, two at 30 s;
    # rate() needs two samples inside the window.
    window_s: float = 60.0
    # A pod whose newest sample is older than this is reported missing.
    staleness_s: float = 90.0
    pod_label: str = "pod"
    namespace_label: str = "namespace"
    overrides: Mapping[str, MetricOverride] = field(default_factory=dict)
    # Prometheus HTTP request timeout.
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _require_number("metrics.windowSeconds", self.window_s, 1.0, 86_400.0)
        _require_number("metrics.stalenessSeconds", self.staleness_s, 1.0, 86_400.0)
        _require_number("metrics.timeoutSeconds", self.timeout_s, 0.1, 600.0)
        for where, name in (("metrics.podLabel", self.pod_label), ("metrics.namespaceLabel", self.namespace_label)):
            if not isinstance(name, str) or not LABEL_NAME_RE.fullmatch(name):
                raise PolicyError(where, f"{name!r} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)")
        # Imported here, not at the top: signals.py builds its engine presets
        # from this module's MetricOverride.
        from batchpilot.controller.signals import SIGNAL_NAMES

        for signal, override in self.overrides.items():
            if signal not in SIGNAL_NAMES:
                raise PolicyError(
                    f"metrics.overrides.{signal}",
                    f"unknown signal; signals are {', '.join(sorted(SIGNAL_NAMES))}",
                )
            if not isinstance(override, MetricOverride):
                raise PolicyError(f"metrics.overrides.{signal}", "expected a MetricOverride")


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
                raise PolicyError(f"knobs.{CAMEL_NAMES.get(knob, knob)}", f"bounds are for {bound.knob}")
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
            disciplines=("fcfs", "shortest-prompt-first"),
            **kwargs,
        )

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], *, name: str = "policy", namespace: str = "default") -> Policy:
        """Build from an InferencePolicy `spec` (see the module docstring)."""
        _expect_mapping("spec", spec)
        _reject_unknown("spec", spec, {"engine", "slo", "knobs", "behavior", "mode", "metrics", "selector"})
        if "slo" not in spec:
            raise PolicyError("spec.slo", "required: {ttftMs: <int>, tpotMs: <int>}")
        slo = _slo_from_spec(spec["slo"])
        engine = _engine_from_spec(spec.get("engine", {}))
        if "knobs" in spec:
            bounds, disciplines = _knobs_from_spec(spec["knobs"], engine, slo)
        else:
            bounds, disciplines = default_bounds(engine, slo), ("fcfs", "shortest-prompt-first")
        behavior = _behavior_from_spec(spec.get("behavior", {}))
        metrics = _metrics_from_spec(spec.get("metrics", {}))
        return _prefixed_policy(
            "spec",
            lambda: cls(
                slo=slo,
                engine=engine,
                bounds=bounds,
                disciplines=disciplines,
                behavior=behavior,
                mode=spec.get("mode", Mode.RECOMMEND.value),
                metrics=metrics,
                name=name,
                namespace=namespace,
            ),
        )

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
        "max_inflight_tokens": KnobBounds("max_inflight_tokens", engine.max_num_batched_tokens, None),
        # 100 ms: below one prefill of a long prompt a deadline sheds requests
        # that would still have met their TTFT.
        "queue_deadline_ms": KnobBounds("queue_deadline_ms", min(100, slo.ttft_ms), None),
    }
    if engine.runtime_tunable:
        # 512: smaller chunks make every prefill step pay the fixed per-step
        # cost (~6 ms on an H100 for an 8B model) for too few tokens.
        bounds["max_num_batched_tokens"] = KnobBounds(
            "max_num_batched_tokens", min(512, engine.max_num_batched_tokens), engine.max_num_batched_tokens
        )
    return bounds


# -- spec parsing ------------------------------------------------------------


def _slo_from_spec(raw: Any) -> Slo:
    _expect_mapping("spec.slo", raw)
    _reject_unknown("spec.slo", raw, {"ttftMs", "tpotMs", "percentile"})
    for key in ("ttftMs", "tpotMs"):
        if key not in raw:
            raise PolicyError(f"spec.slo.{key}", "required: an integer number of milliseconds")
    return _prefixed_policy("spec", lambda: Slo(raw["ttftMs"], raw["tpotMs"], raw.get("percentile", 99.0)))


def _engine_from_spec(raw: Any) -> EngineSpec:
    _expect_mapping("spec.engine", raw)
    _reject_unknown(
        "spec.engine", raw, {"kind", "maxNumSeqs", "maxNumBatchedTokens", "runtimeTunable", "kvCacheTokens"}
    )
    defaults = EngineSpec()
    return _prefixed_policy(
        "spec",
        lambda: EngineSpec(
            kind=raw.get("kind", defaults.kind),
            max_num_seqs=raw.get("maxNumSeqs", defaults.max_num_seqs),
            max_num_batched_tokens=raw.get("maxNumBatchedTokens", defaults.max_num_batched_tokens),
            runtime_tunable=raw.get("runtimeTunable", defaults.runtime_tunable),
            kv_cache_tokens=raw.get("kvCacheTokens", defaults.kv_cache_tokens),
        ),
    )


def _knobs_from_spec(raw: Any, engine: EngineSpec, slo: Slo) -> tuple[dict[str, KnobBounds], tuple[str, ...]]:
    _expect_mapping("spec.knobs", raw)
    _reject_unknown("spec.knobs", raw, set(_FROM_CAMEL))
    defaults = default_bounds(engine, slo)
    bounds: dict[str, KnobBounds] = {}
    disciplines: tuple[str, ...] = ()
    for camel, entry in raw.items():
        knob = _FROM_CAMEL[camel]
        where = f"spec.knobs.{camel}"
        entry = {} if entry is None else entry
        _expect_mapping(where, entry)
        if knob == "discipline":
            _reject_unknown(where, entry, {"allowed"})
            allowed = entry.get("allowed", list(DISCIPLINES))
            if not isinstance(allowed, list) or not allowed:
                raise PolicyError(f"{where}.allowed", f"must be a non-empty list of {', '.join(DISCIPLINES)}")
            disciplines = tuple(allowed)
            continue
        _reject_unknown(where, entry, {"min", "max"})
        fallback = defaults.get(knob) or _fallback_bounds(knob, engine)
        high = entry.get("max", fallback.high)
        bounds[knob] = _prefixed_policy("spec", partial(KnobBounds, knob, entry.get("min", fallback.low), high))
    return bounds, disciplines


def _fallback_bounds(knob: str, engine: EngineSpec) -> KnobBounds:
    if knob == "aging_ms":
        # 100 ms .. 60 s: shorter ages make every discipline fcfs; longer ones
        # let a request wait longer than any TTFT objective worth having.
        return KnobBounds("aging_ms", 100, 60_000)
    # max_num_batched_tokens without runtimeTunable: Policy rejects it later
    # with a message about runtimeTunable, which is the real problem.
    return KnobBounds(knob, min(512, engine.max_num_batched_tokens), engine.max_num_batched_tokens)


def _behavior_from_spec(raw: Any) -> Behavior:
    _expect_mapping("spec.behavior", raw)
    _reject_unknown(
        "spec.behavior",
        raw,
        {"intervalSeconds", "stabilizationWindowSeconds", "maxStepFactor", "minChangePercent", "canary"},
    )
    canary = raw.get("canary", {})
    _expect_mapping("spec.behavior.canary", canary)
    _reject_unknown("spec.behavior.canary", canary, {"enabled", "intervals"})
    defaults = Behavior()
    min_change = raw.get("minChangePercent", defaults.min_change_fraction * 100.0)
    if not isinstance(min_change, int | float) or isinstance(min_change, bool):
        raise PolicyError("spec.behavior.minChangePercent", f"must be a number in [0, 100], got {min_change!r}")
    return _prefixed_policy(
        "spec",
        lambda: Behavior(
            interval_s=raw.get("intervalSeconds", defaults.interval_s),
            stabilization_window_s=raw.get("stabilizationWindowSeconds", defaults.stabilization_window_s),
            max_step_factor=raw.get("maxStepFactor", defaults.max_step_factor),
            min_change_fraction=min_change / 100.0,
            canary=canary.get("enabled", defaults.canary),
            canary_intervals=canary.get("intervals", defaults.canary_intervals),
        ),
    )


def _metrics_from_spec(raw: Any) -> MetricsSpec:
    _expect_mapping("spec.metrics", raw)
    _reject_unknown(
        "spec.metrics",
        raw,
        {"windowSeconds", "stalenessSeconds", "podLabel", "namespaceLabel", "overrides", "timeoutSeconds"},
    )
    overrides_raw = raw.get("overrides", {})
    _expect_mapping("spec.metrics.overrides", overrides_raw)
    overrides: dict[str, MetricOverride] = {}
    for signal, entry in overrides_raw.items():
        where = f"spec.metrics.overrides.{signal}"
        _expect_mapping(where, entry)
        _reject_unknown(where, entry, {"metric", "labels", "scale"})
        if "metric" not in entry:
            raise PolicyError(f"{where}.metric", "required: the metric name to read this signal from")
        labels = entry.get("labels", {})
        _expect_mapping(f"{where}.labels", labels)
        overrides[signal] = _prefixed_policy(where, partial(_override, entry, labels))
    defaults = MetricsSpec()
    return _prefixed_policy(
        "spec",
        lambda: MetricsSpec(
            window_s=raw.get("windowSeconds", defaults.window_s),
            staleness_s=raw.get("stalenessSeconds", defaults.staleness_s),
            pod_label=raw.get("podLabel", defaults.pod_label),
            namespace_label=raw.get("namespaceLabel", defaults.namespace_label),
            overrides=overrides,
            timeout_s=raw.get("timeoutSeconds", defaults.timeout_s),
        ),
    )


def _override(entry: Mapping[str, Any], labels: Mapping[str, Any]) -> MetricOverride:
    return MetricOverride(entry["metric"], tuple(sorted(labels.items())), entry.get("scale", 1.0))


def _prefixed_policy(prefix: str, build: Callable[[], T]) -> T:
    """Run a constructor; re-raise its PolicyError with the spec path in front."""
    try:
        return build()
    except PolicyError as err:
        if err.field.startswith(prefix):
            raise
        raise PolicyError(f"{prefix}.{err.field}", err.message) from None


def _expect_mapping(where: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise PolicyError(where, f"expected an object, got {type(value).__name__}")


def _reject_unknown(where: str, raw: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PolicyError(f"{where}.{unknown[0]}", f"unknown field; known fields are {', '.join(sorted(known))}")


def _require_int(where: str, value: Any, low: int, high: int, fix: str = "") -> None:
    # bool is an int subclass; `true` for a token count is a mistake, not 1.
    hint = f"; {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(where, f"must be an integer, got {value!r}{hint}")
    if not low <= value <= high:
        raise PolicyError(where, f"must be between {low} and {high}, got {value}{hint}")


def _require_number(where: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(where, f"must be a number, got {value!r}")
    if not low <= value <= high:
        raise PolicyError(where, f"must be between {low:g} and {high:g}, got {value:g}")
