"""The signals the controller reads, and where each engine exposes them.

A signal is one quantity (arrivals, prompt lengths, TTFT, ...) of one kind
(a counter read as a rate, a gauge averaged over the window, a histogram
read as bucket rates, or a labelled gauge read at its latest value). Each
engine preset names the metric(s) that carry it; a policy may override any
of them (`MetricOverride`). Both metric sources, Prometheus and the
simulator's snapshots, read exactly these series, so they agree.

Metric names were checked against each engine's metrics reference:
vLLM (V1 engine names), SGLang (`sglang:` collector), TGI (`tgi_` router
metrics), Triton with the TensorRT-LLM backend (`nv_trt_llm_*` gauges,
`nv_llm_*_token_len` histograms, and `nv_inference_first_response_histogram_ms`
when histogram latencies are enabled), llama.cpp's llama-server (`llamacpp:`
counters and gauges with --metrics). An engine that lacks a signal simply
reports it missing; the gate's own metrics fill the most important gaps
(arrivals, queueing, TTFT including queueing).

llama-server exports no latency histogram at all, so its preset reads TPOT
from the gate's per-request `batchpilot_gate_time_per_output_token_seconds`,
and TTFT comes from the gate's TTFT histogram, which observe.py prefers for
every engine anyway (it includes the gate's queue). Only the llama.cpp preset
names the gate's TPOT histogram: in GATE_METRICS it would also replace the
ITL-based TPOT estimate of engines without a per-request TPOT histogram
(SGLang, Triton), a change of its own.

SLO classes: a policy with `spec.classes` also reads the gate's per-class
series (CLASS_METRICS) split by their `class` label, `sum by (pod, class)`
(and `le` for a histogram): one reading per class per pod. A policy without
classes reads none of them, so it issues exactly the queries it did before
classes existed (22 for vLLM).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum

from batchpilot.contract.gate_metrics import CLASS_LABEL, DISCIPLINE_LABEL, KNOB_LABEL, GateMetric
from batchpilot.controller.policy import EngineKind, MetricOverride


class Kind(Enum):
    # A signal with a `by_label` other than LABELLED is also grouped by that
    # label: sum by (pod, class) (...), one reading per label value.
    # sum by (pod) (rate(m[w])): events per second.
    COUNTER = "counter"
    # sum by (pod) (avg_over_time(m[w])): a count averaged over the window.
    GAUGE_SUM = "gauge_sum"
    # max by (pod) (avg_over_time(m[w])): a fraction (KV usage) that must not add up.
    GAUGE_MAX = "gauge_max"
    # sum by (pod, le) (rate(m_bucket[w])) plus the rate of m_sum.
    HISTOGRAM = "histogram"
    # max by (pod, <label>) (last_over_time(m[w])): the gate's applied settings.
    LABELLED = "labelled"


class Signal(StrEnum):
    """Signal names, as used in `spec.metrics.overrides`."""

    ADMITTED = "admitted"
    SHED = "shed"
    COMPLETED = "completed"
    PROMPT_TOKENS = "promptTokens"
    OUTPUT_TOKENS = "outputTokens"
    PROMPT_TOKENS_PROCESSED = "promptTokensProcessed"
    GENERATION_TOKENS = "generationTokens"
    RUNNING = "running"
    WAITING = "waiting"
    KV_USAGE = "kvUsage"
    PREEMPTIONS = "preemptions"
    TTFT = "ttft"
    ITL = "itl"
    TPOT = "tpot"
    E2E = "e2e"
    GATE_TTFT = "gateTtft"
    GATE_QUEUE_WAIT = "gateQueueWait"
    GATE_QUEUE = "gateQueue"
    GATE_INFLIGHT = "gateInflight"
    GATE_INFLIGHT_TOKENS = "gateInflightTokens"
    GATE_KNOB = "gateKnob"
    GATE_DISCIPLINE = "gateDiscipline"
    # Per SLO class (read only for a policy with classes).
    CLASS_ADMITTED = "classAdmitted"
    CLASS_SHED = "classShed"
    CLASS_TTFT = "classTtft"
    CLASS_TPOT = "classTpot"
    CLASS_INFLIGHT = "classInflight"


SIGNAL_NAMES = frozenset(s.value for s in Signal)


@dataclass(frozen=True, slots=True)
class SignalSpec:
    signal: Signal
    kind: Kind
    # Every series of this metric that carries the matchers is summed (e.g.
    # all `reason`s of the shed counter).
    metric: MetricOverride
    # The label that splits a LABELLED signal (knob, discipline), or groups
    # a per-class signal (class).
    by_label: str | None = None

    @property
    def grouped(self) -> bool:
        """Read one value per `by_label` value (a per-class signal)."""
        return self.by_label is not None and self.kind is not Kind.LABELLED


KINDS: Mapping[Signal, Kind] = {
    Signal.ADMITTED: Kind.COUNTER,
    Signal.SHED: Kind.COUNTER,
    Signal.COMPLETED: Kind.COUNTER,
    Signal.PROMPT_TOKENS: Kind.HISTOGRAM,
    Signal.OUTPUT_TOKENS: Kind.HISTOGRAM,
    Signal.PROMPT_TOKENS_PROCESSED: Kind.COUNTER,
    Signal.GENERATION_TOKENS: Kind.COUNTER,
    Signal.RUNNING: Kind.GAUGE_SUM,
    Signal.WAITING: Kind.GAUGE_SUM,
    Signal.KV_USAGE: Kind.GAUGE_MAX,
    Signal.PREEMPTIONS: Kind.COUNTER,
    Signal.TTFT: Kind.HISTOGRAM,
    Signal.ITL: Kind.HISTOGRAM,
    Signal.TPOT: Kind.HISTOGRAM,
    Signal.E2E: Kind.HISTOGRAM,
    Signal.GATE_TTFT: Kind.HISTOGRAM,
    Signal.GATE_QUEUE_WAIT: Kind.HISTOGRAM,
    Signal.GATE_QUEUE: Kind.GAUGE_SUM,
    Signal.GATE_INFLIGHT: Kind.GAUGE_SUM,
    Signal.GATE_INFLIGHT_TOKENS: Kind.GAUGE_SUM,
    Signal.GATE_KNOB: Kind.LABELLED,
    Signal.GATE_DISCIPLINE: Kind.LABELLED,
    Signal.CLASS_ADMITTED: Kind.COUNTER,
    Signal.CLASS_SHED: Kind.COUNTER,
    Signal.CLASS_TTFT: Kind.HISTOGRAM,
    Signal.CLASS_TPOT: Kind.HISTOGRAM,
    Signal.CLASS_INFLIGHT: Kind.GAUGE_SUM,
}

# The gate's per-class series (contract/gate_metrics.py), each read by class.
CLASS_METRICS: Mapping[Signal, str] = {
    Signal.CLASS_ADMITTED: GateMetric.CLASS_ADMITTED_TOTAL,
    Signal.CLASS_SHED: GateMetric.CLASS_SHED_TOTAL,
    Signal.CLASS_TTFT: GateMetric.CLASS_TIME_TO_FIRST_TOKEN_SECONDS,
    Signal.CLASS_TPOT: GateMetric.CLASS_TIME_PER_OUTPUT_TOKEN_SECONDS,
    Signal.CLASS_INFLIGHT: GateMetric.CLASS_INFLIGHT_REQUESTS,
}

BY_LABEL: Mapping[Signal, str] = {
    Signal.GATE_KNOB: KNOB_LABEL,
    Signal.GATE_DISCIPLINE: DISCIPLINE_LABEL,
    **{signal: CLASS_LABEL for signal in CLASS_METRICS},
}

# The series the controller reads from the gate (contract/gate_metrics.py).
GATE_METRICS: Mapping[Signal, str] = {
    Signal.ADMITTED: GateMetric.ADMITTED_TOTAL,
    Signal.SHED: GateMetric.SHED_TOTAL,
    Signal.GATE_TTFT: GateMetric.TIME_TO_FIRST_TOKEN_SECONDS,
    Signal.GATE_QUEUE_WAIT: GateMetric.QUEUE_WAIT_SECONDS,
    Signal.GATE_QUEUE: GateMetric.QUEUE_LENGTH,
    Signal.GATE_INFLIGHT: GateMetric.INFLIGHT_REQUESTS,
    Signal.GATE_INFLIGHT_TOKENS: GateMetric.INFLIGHT_TOKENS,
    Signal.GATE_KNOB: GateMetric.KNOB,
    Signal.GATE_DISCIPLINE: GateMetric.DISCIPLINE,
}


def _m(name: str, scale: float = 1.0, **labels: str) -> MetricOverride:
    return MetricOverride(name, tuple(sorted(labels.items())), scale)


ENGINE_PRESETS: Mapping[EngineKind, Mapping[Signal, MetricOverride]] = {
    EngineKind.VLLM: {
        Signal.COMPLETED: _m("vllm:request_success_total"),
        Signal.PROMPT_TOKENS: _m("vllm:request_prompt_tokens"),
        Signal.OUTPUT_TOKENS: _m("vllm:request_generation_tokens"),
        Signal.PROMPT_TOKENS_PROCESSED: _m("vllm:prompt_tokens_total"),
        Signal.GENERATION_TOKENS: _m("vllm:generation_tokens_total"),
        Signal.RUNNING: _m("vllm:num_requests_running"),
        Signal.WAITING: _m("vllm:num_requests_waiting"),
        # V1 name; V0 engines export vllm:gpu_cache_usage_perc (override it).
        Signal.KV_USAGE: _m("vllm:kv_cache_usage_perc"),
        Signal.PREEMPTIONS: _m("vllm:num_preemptions_total"),
        Signal.TTFT: _m("vllm:time_to_first_token_seconds"),
        Signal.ITL: _m("vllm:inter_token_latency_seconds"),
        # Per request: mean time per output token, what the TPOT SLO is about.
        Signal.TPOT: _m("vllm:request_time_per_output_token_seconds"),
        Signal.E2E: _m("vllm:e2e_request_latency_seconds"),
    },
    EngineKind.SGLANG: {
        Signal.COMPLETED: _m("sglang:num_requests_total"),
        Signal.PROMPT_TOKENS: _m("sglang:prompt_tokens_histogram"),
        Signal.OUTPUT_TOKENS: _m("sglang:generation_tokens_histogram"),
        Signal.PROMPT_TOKENS_PROCESSED: _m("sglang:prompt_tokens_total"),
        Signal.GENERATION_TOKENS: _m("sglang:generation_tokens_total"),
        Signal.RUNNING: _m("sglang:num_running_reqs"),
        Signal.WAITING: _m("sglang:num_queue_reqs"),
        Signal.KV_USAGE: _m("sglang:token_usage"),
        # SGLang "retracts" a running request when its KV pool runs out.
        Signal.PREEMPTIONS: _m("sglang:num_retracted_reqs_total"),
        Signal.TTFT: _m("sglang:time_to_first_token_seconds"),
        Signal.ITL: _m("sglang:inter_token_latency_seconds"),
        Signal.E2E: _m("sglang:e2e_request_latency_seconds"),
    },
    EngineKind.TGI: {
        Signal.COMPLETED: _m("tgi_request_success"),
        Signal.PROMPT_TOKENS: _m("tgi_request_input_length"),
        Signal.OUTPUT_TOKENS: _m("tgi_request_generated_tokens"),
        Signal.RUNNING: _m("tgi_batch_current_size"),
        Signal.WAITING: _m("tgi_queue_size"),
        # Per request inference time / generated tokens: includes prefill, so
        # it reads higher than vLLM's TPOT; the gate's TTFT covers the start.
        Signal.TPOT: _m("tgi_request_mean_time_per_token_duration"),
        Signal.E2E: _m("tgi_request_duration"),
    },
    EngineKind.TRITON: {
        Signal.COMPLETED: _m("nv_inference_request_success"),
        Signal.PROMPT_TOKENS: _m(
            "nv_llm_input_token_len", response_metric_type="total_input_tokens"
        ),
        Signal.OUTPUT_TOKENS: _m(
            "nv_llm_output_token_len", response_metric_type="total_output_tokens"
        ),
        Signal.RUNNING: _m("nv_trt_llm_request_metrics", request_type="scheduled"),
        Signal.WAITING: _m("nv_trt_llm_request_metrics", request_type="waiting"),
        Signal.KV_USAGE: _m("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="fraction"),
        # Only with --metrics-config histogram_latencies=true; milliseconds.
        Signal.TTFT: _m("nv_inference_first_response_histogram_ms", scale=0.001),
    },
    EngineKind.LLAMACPP: {
        # Request lengths from the gate (gate/metrics.py): llama-server exports none.
        Signal.PROMPT_TOKENS: _m(GateMetric.PROMPT_TOKENS),
        Signal.OUTPUT_TOKENS: _m(GateMetric.OUTPUT_TOKENS),
        Signal.PROMPT_TOKENS_PROCESSED: _m("llamacpp:prompt_tokens_total"),
        Signal.GENERATION_TOKENS: _m("llamacpp:tokens_predicted_total"),
        # Slots decoding or prefilling; deferred: requests with no free slot.
        Signal.RUNNING: _m("llamacpp:requests_processing"),
        Signal.WAITING: _m("llamacpp:requests_deferred"),
        # The gate's histogram (gate/metrics.py): llama-server has none.
        Signal.TPOT: _m(GateMetric.TIME_PER_OUTPUT_TOKEN_SECONDS),
    },
    EngineKind.GENERIC: {},
}


def signal_specs(
    engine: EngineKind, overrides: Mapping[str, MetricOverride], *, classes: bool = False
) -> dict[Signal, SignalSpec]:
    """Every signal this engine (plus the gate, plus overrides) provides;
    the per-class ones only with `classes` (a policy with spec.classes)."""
    sources: dict[Signal, MetricOverride] = {
        signal: _m(name) for signal, name in GATE_METRICS.items()
    }
    sources.update(ENGINE_PRESETS[engine])
    if classes:
        sources.update({signal: _m(name) for signal, name in CLASS_METRICS.items()})
    sources.update(
        {
            Signal(name): metric
            for name, metric in overrides.items()
            if classes or Signal(name) not in CLASS_METRICS
        }
    )
    return {
        signal: SignalSpec(signal, KINDS[signal], metric, BY_LABEL.get(signal))
        for signal, metric in sources.items()
    }
