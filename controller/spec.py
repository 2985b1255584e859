"""The controller's part of the InferencePolicy spec, declared once.

Each class here is both a value the controller runs with and the declaration
of its part of the spec: its fields carry their wire contract (contract/schema.py),
from which the CRD's schema, the spec parser and docs/api.md all come.
`ControllerSpec` is the controller's part of `spec`; `Policy.from_spec`
(policy.py) parses one and derives the knob bounds from it. The operator's
`InferencePolicySpec` (operator/spec.py) adds the Kubernetes-only fields.

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
  endpoint: default                           # a name in the operator's configuration
  windowSeconds: 60
  stalenessSeconds: 90
  overrides:                                  # per signal, see signals.Signal
    kvUsage: {metric: "vllm:gpu_cache_usage_perc"}
    waiting: {metric: nv_trt_llm_request_metrics, labels: {request_type: waiting}}
```

Values built in code (the simulator, the benchmark, tests) are checked
against the same contract on construction (`check_fields`); errors then name
the field relative to the value (`ttftMs`), and `parse` puts the spec path in
front (`spec.slo.ttftMs`).
"""

# `wired` is dataclasses.field with a wire contract; ruff knows only `field` as safe.

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from batchpilot.contract.knobs import (
    CLASS_HEADER,
    CLASS_PRIORITY_LIMIT,
    DEFAULT_CLASS,
    MAX_CLASS_WEIGHT,
    MAX_CLASSES,
    MAX_CONCURRENCY_LIMIT,
    MAX_MATCH_VALUES,
    MAX_TOKENS_LIMIT,
    ClassMatch,
)
from batchpilot.contract.schema import PolicyError, Rule, Wire, check_fields, wired
from batchpilot.controller.knobspec import KnobsSpec

# Prometheus' own grammar for the names batchpilot puts into a query
# unquoted; anything else is rejected rather than escaped.
LABEL_NAME = "[a-zA-Z_][a-zA-Z0-9_]*"
METRIC_NAME = "[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME_RE = re.compile(LABEL_NAME)
METRIC_NAME_RE = re.compile(METRIC_NAME)
_NOT_A_LABEL = "{value!r} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"


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


@dataclass(frozen=True, slots=True)
class Slo:
    """Per-request latency objectives, met at `percentile` (e.g. 99: p99)."""

    ttft_ms: int = wired(
        "Time to first token, milliseconds, from arrival at the gate (queueing included).",
        required="an integer number of milliseconds",
        minimum=1,
        maximum=3_600_000,
    )
    tpot_ms: int = wired(
        "Mean time per output token after the first (inter-token latency), milliseconds.",
        required="an integer number of milliseconds",
        minimum=1,
        maximum=60_000,
    )
    percentile: float = wired(
        "The percentile the objectives hold at (default 99).",
        default=99.0,
        minimum=50,
        maximum=100,
        exclusive_maximum=True,
        invalid="must be a number in [50, 100), e.g. 99; got {value!r}",
    )

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def quantile(self) -> float:
        return self.percentile / 100.0


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What the engine was started with: ceilings the gate can only lower."""

    kind: EngineKind = wired(
        "Engine, which decides the metric names read (default vllm; llamacpp: llama-server's "
        "llamacpp:* token counters and slot gauges, with TTFT and TPOT from the gate's histograms; "
        "generic: gate metrics only).",
        default=EngineKind.VLLM,
    )
    max_num_seqs: int = wired(
        "The engine's startup max concurrent sequences (vLLM --max-num-seqs, llama.cpp --parallel); "
        "the batch cap never exceeds it (default 256).",
        default=256,
        minimum=1,
        maximum=MAX_CONCURRENCY_LIMIT,
    )
    max_num_batched_tokens: int = wired(
        "The engine's startup prefill token budget per step (vLLM --max-num-batched-tokens, "
        "llama.cpp --batch-size; default 8192).",
        default=8192,
        minimum=16,
        maximum=MAX_TOKENS_LIMIT,
    )
    # Known, the token budget is kept under it from the first decision;
    # otherwise it is learned from a KV-usage gauge, which some engines
    # (llama.cpp) do not export.
    kv_cache_tokens: int | None = wired(
        "The engine's KV-cache capacity in tokens (llama.cpp --ctx-size with --kv-unified; vLLM "
        'logs it at startup as "GPU KV cache size"). The in-flight token budget stays under it '
        "from the first decision; without it the capacity is learned from the engine's KV-usage "
        "gauge, which llama.cpp does not export.",
        default=None,
        minimum=16,
        maximum=MAX_TOKENS_LIMIT,
        fix="set it to the engine's KV-cache size in tokens (llama.cpp: --ctx-size; vLLM: "
        '"GPU KV cache size" in its startup log), or leave it out',
    )
    # True when the engine accepts a new prefill budget while running
    # (SGLang's set_internal_state); otherwise it stays at its startup value.
    runtime_tunable: bool = wired(
        "True when the engine accepts a new prefill budget while running (through the gate's "
        "native adapter; never llamacpp); default false.",
        default=False,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.runtime_tunable and self.kind is EngineKind.LLAMACPP:
            raise PolicyError(
                "runtimeTunable",
                "llama-server fixes its prefill budget (--batch-size) at startup and has no live API "
                "for it; set runtimeTunable to false",
            )


@dataclass(frozen=True, slots=True)
class Canary:
    """Try a change on one pod before the rest."""

    enabled: bool = wired("Canary changes on one pod first (default false).", default=False)
    intervals: int = wired(
        "Control steps the canary runs before the rollout (default 3).",
        default=3,
        minimum=1,
        maximum=100,
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True, slots=True)
class Behavior:
    """How fast and how carefully recommendations turn into changes.

    The seconds are whole on the wire (the CRD's integers) and may be
    fractions in code: the simulator runs the controller on a scaled clock.
    """

    interval_s: float = wired(
        "Seconds between control steps (default 30).",
        name="intervalSeconds",
        default=30.0,
        minimum=1,
        maximum=3600,
        schema_type="integer",
    )
    # A move is taken only as far as every recommendation in this window
    # agrees (HPA's stabilization, in both directions); urgent moves (an SLO
    # breach, a shift in the length mix) are exempt.
    stabilization_window_s: float = wired(
        "A move is taken only as far as every recommendation in this window agrees (default 90); "
        "SLO breaches are exempt.",
        name="stabilizationWindowSeconds",
        default=90.0,
        minimum=0,
        maximum=86_400,
        schema_type="integer",
    )
    # A numeric knob changes by at most this factor per interval (x4 or /4):
    # from the engine default of 256 down to 16 takes two intervals.
    max_step_factor: float = wired(
        "A numeric knob changes by at most this factor per step (default 4: x4 or /4).",
        default=4.0,
        minimum=1.01,
        maximum=1000,
    )
    # Changes smaller than this are not worth a reconfiguration.
    min_change_percent: float = wired(
        "Smaller changes are not applied (default 10).", default=10.0, minimum=0, maximum=100
    )
    canary: Canary = wired(
        "Apply a change to one pod first, and to the rest only when it does not regress.",
        default_factory=Canary,
    )

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def min_change_fraction(self) -> float:
        return self.min_change_percent / 100.0


@dataclass(frozen=True, slots=True)
class MetricOverride:
    """Read a signal from another metric: a name plus fixed label matchers.

    Deliberately not free-form PromQL: names are validated and values are
    escaped, so an override can choose a series but never rewrite a query.
    `scale` converts units into the signal's (0.001 for a histogram in ms).
    """

    metric: str = wired(
        "Prometheus metric name (a histogram's base name).",
        required="the metric name to read this signal from",
        pattern=f"^{METRIC_NAME}$",
        max_length=256,
        invalid="{value!r} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)",
    )
    labels: tuple[tuple[str, str], ...] = wired(
        "Label matchers every series must carry (equality).",
        default=(),
        max_properties=16,
        item=Wire(max_length=256),
    )
    scale: float = wired(
        "Multiplier into the signal's units (0.001 for a histogram in milliseconds); default 1.",
        default=1.0,
        minimum=0,
        exclusive_minimum=True,
        invalid="must be a positive number, got {value!r}",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        for name, _ in self.labels:
            if not isinstance(name, str) or not LABEL_NAME_RE.fullmatch(name):
                raise PolicyError(
                    f"labels.{name}", "not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
                )


def _signal_rules() -> tuple[Rule, ...]:
    # Imported here, not at the top: signals.py builds its engine presets
    # from this module's MetricOverride.
    from batchpilot.controller.signals import Signal

    names = [signal.value for signal in Signal]
    listed = ", ".join(f"'{name}'" for name in names)
    return (
        Rule(f"self.all(k, k in [{listed}])", f"unknown signal; signals are {', '.join(names)}"),
    )


@dataclass(frozen=True, slots=True)
class MetricsSpec:
    """Where and over which window live metrics are read; the operator turns
    `endpoint` into a URL from its own configuration."""

    endpoint: str = wired(
        "Name of a Prometheus-compatible endpoint in the operator's configuration (not a URL: the "
        "operator's owner decides which servers it queries).",
        default="default",
        pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        publish_default=True,
        invalid="{value!r} is not an endpoint name: the operator's configuration names its "
        "Prometheus endpoints with DNS labels (a-z, 0-9, -)",
    )
    # 60 s: four scrapes at Prometheus' common 15 s interval, two at 30 s;
    # rate() needs two samples inside the window.
    window_s: float = wired(
        "Window of every rate and quantile (default 60: four scrapes at the common 15 s interval).",
        name="windowSeconds",
        default=60.0,
        minimum=1,
        maximum=86_400,
        schema_type="integer",
    )
    # A pod whose newest sample is older than this is reported missing.
    staleness_s: float = wired(
        "A pod whose newest sample is older than this counts as not reporting (default 90).",
        name="stalenessSeconds",
        default=90.0,
        minimum=1,
        maximum=86_400,
        schema_type="integer",
    )
    # Prometheus HTTP request timeout.
    timeout_s: float = wired(
        "Timeout of one query (default 10).",
        name="timeoutSeconds",
        default=10.0,
        minimum=0.1,
        maximum=600,
    )
    pod_label: str = wired(
        "Label that carries the pod name on every series (default pod).",
        default="pod",
        pattern=f"^{LABEL_NAME}$",
        max_length=128,
        invalid=_NOT_A_LABEL,
    )
    namespace_label: str = wired(
        "Label that carries the namespace on every series (default namespace).",
        default="namespace",
        pattern=f"^{LABEL_NAME}$",
        max_length=128,
        invalid=_NOT_A_LABEL,
    )
    overrides: Mapping[str, MetricOverride] = wired(
        "Per signal, the metric to read instead of the engine's default (a metric name and fixed "
        "labels, never free-form PromQL).",
        default_factory=dict,
        max_properties=32,
        rules=_signal_rules,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        # Imported here for the reason _signal_rules gives.
        from batchpilot.controller.signals import SIGNAL_NAMES

        for signal in self.overrides:
            if signal not in SIGNAL_NAMES:
                raise PolicyError(
                    f"overrides.{signal}",
                    f"unknown signal; signals are {', '.join(sorted(SIGNAL_NAMES))}",
                )


_MATCH_VALUES_RULE = (
    "values must be listed exactly when header is set: the header's values that select the class"
)
# The gate reads x-batchpilot-class as a class name before any match rule
# (gate/estimate.py's classify), so a rule on it could never match.
_CLASS_HEADER_RULE = (
    f"header {CLASS_HEADER} already names the class itself and is read before any match rule; "
    "match on another header (a tenant or API-key header), or drop match and let requests send "
    "the class's name"
)


@dataclass(frozen=True, slots=True)
class ClassMatchSpec:
    """Which requests belong to a class, besides those that name it in the x-batchpilot-class header."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "has(self.header) == (has(self.values) && size(self.values) > 0)",
            _MATCH_VALUES_RULE,
        ),
        Rule(
            f"!has(self.header) || self.header != '{CLASS_HEADER}'", _CLASS_HEADER_RULE, ".header"
        ),
    )

    header: str | None = wired(
        "A request header whose value selects the class: the tenant or API-key header an "
        "authenticating gateway sets (lower-case name).",
        default=None,
        pattern="^[a-z0-9!#$%&'*+.^_`|~-]{1,64}$",
        max_length=64,
        invalid="{value!r} is not a lower-case HTTP header name such as x-tenant",
    )
    values: tuple[str, ...] = wired(
        "Values of `header` that belong to the class.",
        default=(),
        max_items=MAX_MATCH_VALUES,
        item=Wire(min_length=1, max_length=256),
    )
    models: tuple[str, ...] = wired(
        "Values of the request body's `model` field that belong to the class.",
        default=(),
        max_items=MAX_MATCH_VALUES,
        item=Wire(min_length=1, max_length=256),
    )

    def check_spec(self) -> None:
        if (self.header is not None) != bool(self.values):
            raise PolicyError("values", _MATCH_VALUES_RULE.removeprefix("values "))
        if self.header == CLASS_HEADER:
            raise PolicyError("header", _CLASS_HEADER_RULE.removeprefix("header "))

    def gate_match(self) -> ClassMatch:
        return ClassMatch(header=self.header, values=self.values, models=self.models)


# The default class's objectives are spec.slo: a second statement of them
# in spec.classes could only disagree.
_DEFAULT_SLO_RULE = (
    f"the {DEFAULT_CLASS} class's objectives are spec.slo; change spec.slo instead, or drop this "
    f"slo (the {DEFAULT_CLASS} class may still set its priority, weight and maxConcurrency here)"
)


@dataclass(frozen=True, slots=True)
class ClassSpec:
    """One SLO class: which requests, their objectives, their priority and share."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(f"self.name != '{DEFAULT_CLASS}' || !has(self.slo)", _DEFAULT_SLO_RULE, ".slo"),
    )

    name: str = wired(
        "The class's name: what a request sends in x-batchpilot-class, and the `class` label of "
        "the gate's per-class metrics. `default` names the class of every request that matches "
        "no other (declared or not).",
        required="a class name such as interactive",
        pattern="^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$",
        # The pattern's own bound, stated for the API server's CEL cost estimate.
        max_length=32,
        invalid="{value!r} is not a class name: 1-32 lower-case letters, digits and dashes, "
        "starting and ending with a letter or digit",
    )
    slo: Slo | None = wired(
        "The class's own objectives; absent: spec.slo. At most as loose as spec.slo, which is the "
        "default class's.",
        default=None,
    )
    priority: int = wired(
        "Higher is served first; a lower class waits at most (priority difference x agingMs) "
        "behind higher ones, or is shed at its deadline first (default 0).",
        default=0,
        minimum=-CLASS_PRIORITY_LIMIT,
        maximum=CLASS_PRIORITY_LIMIT,
    )
    weight: float = wired(
        "Share of admissions, counted in tokens, among classes of equal priority under "
        "contention (default 1).",
        default=1.0,
        minimum=0,
        exclusive_minimum=True,
        maximum=MAX_CLASS_WEIGHT,
        invalid="must be a number above 0, e.g. 1 or 2.5; got {value!r}",
    )
    max_concurrency: int | None = wired(
        "At most this many of the class's requests in flight per pod; absent: no limit of its own.",
        default=None,
        minimum=1,
        maximum=MAX_CONCURRENCY_LIMIT,
    )
    match: ClassMatchSpec = wired(
        "Requests that belong to the class without naming it.", default_factory=ClassMatchSpec
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def check_spec(self) -> None:
        if self.name == DEFAULT_CLASS and self.slo is not None:
            raise PolicyError("slo", _DEFAULT_SLO_RULE)


_UNIQUE_NAMES = "class names must be unique; rename or merge the duplicates"
# The gate takes the first class whose rule a request matches (gate/estimate.py's
# classify): a value or model listed by two classes is dead in the second.
_FIRST_ONLY = "the gate serves its requests in the first of them only: list each {} in one class"
_UNIQUE_VALUES = "two classes match the same value of the same header; " + _FIRST_ONLY.format(
    "value"
)
_UNIQUE_MODELS = "two classes match the same model; " + _FIRST_ONLY.format("model")


def _class_rules() -> tuple[Rule, ...]:
    return (
        MessageRule(
            "self.all(c, self.exists_one(d, d.name == c.name))",
            _UNIQUE_NAMES,
            message_expression='"class name " + '
            + _first_item(
                "self",
                lambda c: f"!self.exists_one(d, d.name == {c}.name)",
                lambda c, _: f"{c}.name",
            )
            + f' + " is used twice; {_UNIQUE_NAMES}"',
        ),
        Rule(
            "self.all(c, !has(c.match) || !has(c.match.header) || !has(c.match.values) || "
            "c.match.values.all(v, self.filter(d, has(d.match) && has(d.match.header) && "
            "has(d.match.values) && d.match.header == c.match.header && v in d.match.values)"
            ".size() == 1))",
            _UNIQUE_VALUES,
        ),
        Rule(
            "self.all(c, !has(c.match) || !has(c.match.models) || c.match.models.all(m, "
            "self.filter(d, has(d.match) && has(d.match.models) && m in d.match.models)"
            ".size() == 1))",
            _UNIQUE_MODELS,
        ),
    )


_DEFAULT_PERCENTILE = 99.0
_LOOSER_SLO = (
    "is looser than spec.slo, the default class's objectives, which bound every class's: a "
    "class's ttftMs and tpotMs must be at most spec.slo's and its percentile at least spec.slo's; "
    "tighten the class's slo, or loosen spec.slo"
)


def _percentile(slo: str) -> str:
    return f"(has({slo}.percentile) ? {slo}.percentile : {_DEFAULT_PERCENTILE})"


def _looser(slo: str) -> str:
    """CEL: the class objectives `slo` are looser than the policy's (`self.slo`)."""
    return (
        f"({slo}.ttftMs > self.slo.ttftMs || {slo}.tpotMs > self.slo.tpotMs || "
        f"{_percentile(slo)} < {_percentile('self.slo')})"
    )


@dataclass(frozen=True, slots=True)
class MessageRule(Rule):
    """A rule whose answer the API server computes (`messageExpression`), e.g. to
    name the list item at fault; `message` stays the fallback and the docs' text."""

    message_expression: str = ""

    def schema(self) -> dict[str, str]:
        node = Rule.schema(self)
        node["messageExpression"] = self.message_expression
        return node


def _first_item(items: str, fault: Callable[[str], str], text: Callable[[str, int], str]) -> str:
    """CEL: `text` of the first of the list `items` (at most MAX_CLASSES) where `fault` holds.

    Spelt out item by item, because the API server's cost estimate takes any
    string it cannot bound (string(int), a field of a filter()'s result) for
    megabytes long, and refuses the CRD: a literal or a field with maxLength
    it can bound.
    """
    chain = '"?"'
    for index in reversed(range(MAX_CLASSES)):
        item = f"{items}[{index}]"
        chain = f"(size({items}) > {index} && {fault(item)} ? {text(item, index)} : {chain})"
    return chain


# The rules of spec.classes that read spec.slo too: they live on the spec's
# root (InferencePolicySpec.RULES), the only node that sees both. The answer
# names the first class at fault by its index, as the Python twin does.
CLASS_SLO_RULES: tuple[Rule, ...] = (
    MessageRule(
        f"!has(self.classes) || self.classes.all(c, !has(c.slo) || !{_looser('c.slo')})",
        f"spec.classes[].slo: a class {_LOOSER_SLO}",
        ".classes",
        message_expression='"spec.classes[" + '
        + _first_item(
            "self.classes",
            lambda c: f"has({c}.slo) && {_looser(f'{c}.slo')}",
            lambda c, index: f'"{index}].slo: class " + {c}.name',
        )
        + f' + " {_LOOSER_SLO}"',
    ),
)


def check_classes(slo: Slo, classes: tuple[ClassSpec, ...]) -> None:
    """The Python twin of spec.classes' rules that span classes or read spec.slo.

    Errors name the field relative to the spec (`classes[1].slo`).
    """
    names: dict[str, int] = {}
    header_values: dict[tuple[str, str], int] = {}
    models: dict[str, int] = {}
    for index, service_class in enumerate(classes):
        where = f"classes[{index}]"
        if service_class.name in names:
            raise PolicyError(
                f"{where}.name",
                f"{service_class.name!r} is also classes[{names[service_class.name]}].name; "
                f"{_UNIQUE_NAMES}",
            )
        names[service_class.name] = index
        match = service_class.match
        for value in match.values:
            key = (match.header or "", value)
            first = header_values.setdefault(key, index)
            if first != index:
                raise PolicyError(
                    f"{where}.match.values",
                    f"{match.header}: {value!r} is also matched by classes[{first}]; "
                    + _FIRST_ONLY.format("value"),
                )
        for model in match.models:
            first = models.setdefault(model, index)
            if first != index:
                raise PolicyError(
                    f"{where}.match.models",
                    f"{model!r} is also matched by classes[{first}]; "
                    + _FIRST_ONLY.format("model"),
                )
        own = service_class.slo
        if own is not None and (
            own.ttft_ms > slo.ttft_ms
            or own.tpot_ms > slo.tpot_ms
            or own.percentile < slo.percentile
        ):
            raise PolicyError(
                f"{where}.slo",
                f"class {service_class.name} {_LOOSER_SLO} (the class: ttftMs {own.ttft_ms}, "
                f"tpotMs {own.tpot_ms}, percentile {own.percentile:g}; spec.slo: ttftMs "
                f"{slo.ttft_ms}, tpotMs {slo.tpot_ms}, percentile {slo.percentile:g})",
            )


@dataclass(frozen=True, slots=True)
class ControllerSpec:
    """The controller's part of an InferencePolicy `spec`, as written."""

    slo: Slo = wired("Per-request latency objectives.", required="{ttftMs: <int>, tpotMs: <int>}")
    engine: EngineSpec = wired(
        "The serving engine and the ceilings it was started with; the gate can lower them, never "
        "raise them.",
        default_factory=EngineSpec,
    )
    metrics: MetricsSpec = wired(
        "Where and over which window live metrics are read.", default_factory=MetricsSpec
    )
    knobs: KnobsSpec | None = wired(
        "Which knobs to steer and within which bounds; knobs not listed are left as they are. "
        "Absent: batch cap, in-flight token budget and queue deadline, within engine-derived "
        "bounds, plus fcfs or shortest-prompt-first.",
        default=None,
    )
    behavior: Behavior = wired(
        "How fast and how carefully recommendations become changes.", default_factory=Behavior
    )
    mode: Mode = wired(
        "Off: observe only, and return the pods to their startup settings. Recommend: publish the "
        "recommendation in status, change nothing. Auto: apply it to every Ready pod.",
        default=Mode.RECOMMEND,
        publish_default=True,
    )
    classes: tuple[ClassSpec, ...] = wired(
        "SLO classes sharing the pods (docs/slo-classes.md), each with its own queue at the gate; "
        "absent: one class, spec.slo. A request is in the class it names in x-batchpilot-class, "
        "else in the first class whose match it meets, else in `default`.",
        default=(),
        max_items=MAX_CLASSES,
        rules=_class_rules,
    )

    def check_spec(self) -> None:
        """The Python twins of the CEL rules on spec.classes that span classes."""
        check_classes(self.slo, self.classes)
