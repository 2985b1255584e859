"""The series one simulated replica exports, as Prometheus would scrape them.

Two families share one snapshot: the vLLM engine's own metrics (names and
bucket boundaries as vLLM V1's Prometheus logger defines them,
vllm/v1/metrics/loggers.py) and the batchpilot gate's metrics (names binding
for the real gate too), so a controller reads the same series from the
simulator as from a pod.

The hot path is plain Python: a histogram is a list of per-bucket counts and
`observe` is one bisect, because the engine records an observation per request
and per engine step (tens of thousands per simulated minute), where a
prometheus_client registry would cost microseconds each under a lock.

Semantics worth knowing:
- vllm:time_to_first_token_seconds and vllm:e2e_request_latency_seconds start
  when the engine receives the request, i.e. after gate queueing;
  batchpilot_gate_time_to_first_token_seconds starts at arrival at the gate.
- vllm:inter_token_latency_seconds gets one observation per request per step
  that produced a token after its first (vLLM V1 records it per iteration).
- A cancelled request (its client left) is counted as vLLM V1 counts a client
  abort: what was recorded as its tokens came (its prompt at its first token,
  then each token, TTFT and inter-token latencies) stays, and it never
  reaches the series recorded when a request finishes (e2e latency,
  request_prompt_tokens, request_generation_tokens). vLLM declares
  vllm:request_success_total{finished_reason="abort"} but does not increment
  it on a client abort (vllm-project/vllm issue 31503, open); the simulator
  exports no request_success_total, and the controller then counts
  completions from the e2e histogram, which likewise leaves aborts out. The
  gate model counts the request in
  batchpilot_gate_failed_total{reason="client_disconnect"} if it was admitted.
- Per SLO class (GateMetric.CLASS_*, label `class`), as the real gate
  (gate/metrics.py) exports them: a class's series start when the knobs
  first configure it and stay (cumulative) after it is reconfigured away, so
  they are bounded by the classes ever configured, never by the names
  requests send. A request counts in the class it is served in (an unknown
  name is the default class). Its TPOT observation is its mean time per
  output token, at its end (requests of one token have none); `shed` counts
  queue-deadline sheds.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from batchpilot.contract.gate_metrics import (
    CLASS_LABEL,
    DISCIPLINE_LABEL,
    HELP,
    KNOB_LABEL,
    TPOT_BUCKETS_S,
    TTFT_BUCKETS_S,
    TYPE,
    GateMetric,
)
from batchpilot.contract.knobs import DISCIPLINES, NUMERIC_KNOBS, Knobs
from batchpilot.gate.admission import ClassLoad

# vLLM V1 time_to_first_token_seconds buckets; the gate's seconds histograms
# use them too, so both come from the gate's metric contract.
TTFT_BUCKETS: tuple[float, ...] = TTFT_BUCKETS_S
# vLLM V1 inter_token_latency_seconds (same as time_per_output_token_seconds).
ITL_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# vLLM V1 request_latency_buckets (e2e, queue, prefill, decode, inference).
E2E_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# Llama-3.1's default max_model_len; vLLM builds its token-count buckets up to it.
DEFAULT_MAX_MODEL_LEN = 131_072


def build_1_2_5_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value, as vLLM builds its token-count buckets."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(float(b) for b in buckets)
            buckets.append(value)
        exponent += 1


class ReplicaHistogram:
    """Per-bucket counts (not cumulative) plus the +Inf bucket, a sum and a count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's `le` bucket.
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def observe_series(self, first: float, step: float, length: int, times: int) -> None:
        """Observe first, first+step, ..., first+(length-1)*step, each `times` times."""
        if length <= 0 or times <= 0:
            return
        last = first + step * (length - 1)
        bounds = self.bounds
        low = bisect.bisect_left(bounds, first)
        high = bisect.bisect_left(bounds, last)
        if low == high or step <= 0:
            self.counts[low] += length * times
        else:
            placed = 0
            for index in range(low, high):
                # values first + step*j <= bound, for j in [0, length)
                upto = min(length, math.floor((bounds[index] - first) / step) + 1)
                self.counts[index] += (upto - placed) * times
                placed = upto
            self.counts[high] += (length - placed) * times
        self.sum += (first * length + step * length * (length - 1) / 2) * times
        self.count += length * times

    def cumulative(self) -> list[int]:
        total = 0
        out = []
        for c in self.counts:
            total += c
            out.append(total)
        return out


def class_histogram_buckets(
    snapshot: Mapping[str, float],
    name: str,
    class_name: str,
    previous: Mapping[str, float] | None = None,
) -> list[tuple[float, float]]:
    """`histogram_buckets` of one class's series of a per-class histogram (GateMetric.CLASS_*)."""
    return _bucket_pairs(snapshot, f'{name}_bucket{{{CLASS_LABEL}="{class_name}",le="', previous)


def class_key(metric: str, class_name: str, suffix: str = "") -> str:
    """Snapshot key of one class's sample: `name{class="x"}`, or `name_sum{class="x"}` etc."""
    return f'{metric}{suffix}{{{CLASS_LABEL}="{class_name}"}}'


def format_le(bound: float) -> str:
    """Bucket label as prometheus_client writes it ("0.1", "1.0", "+Inf")."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def histogram_quantile(quantile: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (le, count) pairs sorted by le.

    Linear interpolation inside the bucket; NaN when there are no observations;
    the highest finite bound when the quantile falls in the +Inf bucket.
    """
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = quantile * buckets[-1][1]
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return previous_bound


def histogram_buckets(
    snapshot: Mapping[str, float], name: str, previous: Mapping[str, float] | None = None
) -> list[tuple[float, float]]:
    """Cumulative (le, count) pairs of histogram `name` in a snapshot, optionally as a delta."""
    return _bucket_pairs(snapshot, f'{name}_bucket{{le="', previous)


def _bucket_pairs(
    snapshot: Mapping[str, float], prefix: str, previous: Mapping[str, float] | None
) -> list[tuple[float, float]]:
    """(le, count) of the bucket samples whose key starts with `prefix` (up to the bound)."""
    pairs = []
    for key, value in snapshot.items():
        if key.startswith(prefix):
            bound = float(key[len(prefix) : -2])
            base = previous.get(key, 0.0) if previous is not None else 0.0
            pairs.append((bound, value - base))
    pairs.sort()
    return pairs


@dataclass(frozen=True, slots=True)
class ReplicaGauges:
    """The current values the replica computes at snapshot time."""

    running: int
    waiting: int
    kv_usage: float
    gate_queued: int
    gate_in_flight: int
    gate_inflight_tokens: int
    knobs: Knobs
    config_version: int
    # The gate's classes now (AdmissionQueue.class_loads), in knobs.class_names order.
    class_loads: tuple[ClassLoad, ...] = ()


class ClassSeries:
    """One SLO class's counters and histograms at the gate model."""

    __slots__ = ("admitted", "admitted_tokens", "queue_wait", "shed", "tpot", "ttft")

    def __init__(self) -> None:
        self.admitted = 0
        self.admitted_tokens = 0
        self.shed = 0
        self.queue_wait = ReplicaHistogram(TTFT_BUCKETS)
        self.ttft = ReplicaHistogram(TTFT_BUCKETS)
        self.tpot = ReplicaHistogram(TPOT_BUCKETS_S)


class ReplicaMetrics:
    """Counters and histograms of one replica; gauges come in at snapshot time."""

    def __init__(
        self, *, block_size: int, num_gpu_blocks: int, max_model_len: int = DEFAULT_MAX_MODEL_LEN
    ) -> None:
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.ttft = ReplicaHistogram(TTFT_BUCKETS)
        self.itl = ReplicaHistogram(ITL_BUCKETS)
        self.e2e = ReplicaHistogram(E2E_BUCKETS)
        self.prompt_tokens_hist = ReplicaHistogram(token_buckets)
        self.generation_tokens_hist = ReplicaHistogram(token_buckets)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.preemptions_total = 0
        self.gate_queue_wait = ReplicaHistogram(TTFT_BUCKETS)
        self.gate_ttft = ReplicaHistogram(TTFT_BUCKETS)
        self.gate_admitted_total = 0
        self.gate_shed_total: dict[str, int] = {}
        self.gate_failed_total: dict[str, int] = {}
        # Per SLO class, every class configured so far, in first-configured order.
        self.classes: dict[str, ClassSeries] = {}

    def serve_classes(self, names: Iterable[str]) -> None:
        """Start series for the classes configured now; those of earlier ones stay."""
        for name in names:
            if name not in self.classes:
                self.classes[name] = ClassSeries()

    def count_shed(self, reason: str) -> None:
        self.gate_shed_total[reason] = self.gate_shed_total.get(reason, 0) + 1

    def count_failed(self, reason: str) -> None:
        self.gate_failed_total[reason] = self.gate_failed_total.get(reason, 0) + 1

    def snapshot(self, gauges: ReplicaGauges) -> dict[str, float]:
        return {name: value for name, _, value in self._samples(gauges)}

    def render_text(self, gauges: ReplicaGauges) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        by_family: dict[str, list[str]] = {}
        for name, family, value in self._samples(gauges):
            by_family.setdefault(family, []).append(f"{name} {_format_value(value)}")
        lines: list[str] = []
        for family, kind, help_text in _FAMILIES:
            # prometheus_client (which vLLM exports with) names a counter's
            # HELP and TYPE lines as its samples, `_total` included; without
            # it, parsers read the samples as a second, untyped family.
            exposed = f"{family}_total" if kind == "counter" else family
            lines.append(f"# HELP {exposed} {help_text}")
            lines.append(f"# TYPE {exposed} {kind}")
            lines.extend(by_family.get(family, ()))
        return "\n".join(lines) + "\n"

    def _samples(self, g: ReplicaGauges) -> Iterable[tuple[str, str, float]]:
        yield "vllm:num_requests_running", "vllm:num_requests_running", float(g.running)
        yield "vllm:num_requests_waiting", "vllm:num_requests_waiting", float(g.waiting)
        yield "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", g.kv_usage
        info = f'vllm:cache_config_info{{block_size="{self.block_size}",num_gpu_blocks="{self.num_gpu_blocks}"}}'
        yield info, "vllm:cache_config_info", 1.0
        yield "vllm:prompt_tokens_total", "vllm:prompt_tokens", float(self.prompt_tokens_total)
        yield (
            "vllm:generation_tokens_total",
            "vllm:generation_tokens",
            float(self.generation_tokens_total),
        )
        yield "vllm:num_preemptions_total", "vllm:num_preemptions", float(self.preemptions_total)
        for name, hist in (
            ("vllm:time_to_first_token_seconds", self.ttft),
            ("vllm:inter_token_latency_seconds", self.itl),
            ("vllm:e2e_request_latency_seconds", self.e2e),
            ("vllm:request_prompt_tokens", self.prompt_tokens_hist),
            ("vllm:request_generation_tokens", self.generation_tokens_hist),
            (GateMetric.QUEUE_WAIT_SECONDS, self.gate_queue_wait),
            (GateMetric.TIME_TO_FIRST_TOKEN_SECONDS, self.gate_ttft),
        ):
            yield from _histogram_samples(name, hist)
        yield from _gauge(GateMetric.QUEUE_LENGTH, g.gate_queued)
        yield from _gauge(GateMetric.INFLIGHT_REQUESTS, g.gate_in_flight)
        yield from _gauge(GateMetric.INFLIGHT_TOKENS, g.gate_inflight_tokens)
        yield from _counter(GateMetric.ADMITTED_TOTAL, {"": self.gate_admitted_total})
        yield from _counter(GateMetric.SHED_TOTAL, self.gate_shed_total)
        yield from _counter(GateMetric.FAILED_TOTAL, self.gate_failed_total)
        for name in NUMERIC_KNOBS:
            value = getattr(g.knobs, name)
            yield (
                f'{GateMetric.KNOB}{{{KNOB_LABEL}="{name}"}}',
                GateMetric.KNOB,
                math.inf if value is None else float(value),
            )
        for discipline in DISCIPLINES:
            yield (
                f'{GateMetric.DISCIPLINE}{{{DISCIPLINE_LABEL}="{discipline}"}}',
                GateMetric.DISCIPLINE,
                1.0 if g.knobs.discipline == discipline else 0.0,
            )
        yield from _gauge(GateMetric.CONFIG_VERSION, g.config_version)
        yield from self._class_samples(g)

    def _class_samples(self, g: ReplicaGauges) -> Iterable[tuple[str, str, float]]:
        for load in g.class_loads:
            yield _class_sample(GateMetric.CLASS_QUEUE_LENGTH, load.name, load.queued)
        for load in g.class_loads:
            yield _class_sample(GateMetric.CLASS_INFLIGHT_REQUESTS, load.name, load.in_flight)
        classes = self.classes
        for name, series in classes.items():
            yield _class_sample(GateMetric.CLASS_ADMITTED_TOTAL, name, series.admitted)
        for name, series in classes.items():
            yield _class_sample(
                GateMetric.CLASS_ADMITTED_TOKENS_TOTAL, name, series.admitted_tokens
            )
        for name, series in classes.items():
            yield _class_sample(GateMetric.CLASS_SHED_TOTAL, name, series.shed)
        for metric, attribute in (
            (GateMetric.CLASS_QUEUE_WAIT_SECONDS, "queue_wait"),
            (GateMetric.CLASS_TIME_TO_FIRST_TOKEN_SECONDS, "ttft"),
            (GateMetric.CLASS_TIME_PER_OUTPUT_TOKEN_SECONDS, "tpot"),
        ):
            for name, series in classes.items():
                yield from _class_histogram_samples(metric, name, getattr(series, attribute))


def _class_sample(metric: GateMetric, class_name: str, value: float) -> tuple[str, str, float]:
    return class_key(metric, class_name), _family(metric), float(value)


def _class_histogram_samples(
    name: str, class_name: str, hist: ReplicaHistogram
) -> Iterable[tuple[str, str, float]]:
    running = 0
    for key, count in zip(
        _class_bucket_keys(name, class_name, hist.bounds), hist.counts, strict=True
    ):
        running += count
        yield key, name, float(running)
    yield class_key(name, class_name, "_sum"), name, hist.sum
    yield class_key(name, class_name, "_count"), name, float(hist.count)


@functools.lru_cache(maxsize=256)
def _class_bucket_keys(name: str, class_name: str, bounds: tuple[float, ...]) -> tuple[str, ...]:
    return tuple(
        f'{name}_bucket{{{CLASS_LABEL}="{class_name}",le="{format_le(b)}"}}'
        for b in (*bounds, math.inf)
    )


def _family(metric: GateMetric) -> str:
    """The family a series belongs to: a counter's without its `_total`."""
    return metric.removesuffix("_total") if TYPE[metric] == "counter" else metric


def _gauge(metric: GateMetric, value: float) -> Iterable[tuple[str, str, float]]:
    yield str(metric), str(metric), float(value)


def _counter(metric: GateMetric, counts: Mapping[str, int]) -> Iterable[tuple[str, str, float]]:
    """One sample per `reason` value (`""`: the unlabelled counter), sorted."""
    for reason, count in sorted(counts.items()):
        name = f'{metric}{{reason="{reason}"}}' if reason else str(metric)
        yield name, _family(metric), float(count)


_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    ("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig"),
    ("vllm:prompt_tokens", "counter", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "counter", "Number of generation tokens processed."),
    ("vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine."),
    (
        "vllm:time_to_first_token_seconds",
        "histogram",
        "Histogram of time to first token in seconds.",
    ),
    (
        "vllm:inter_token_latency_seconds",
        "histogram",
        "Histogram of inter-token latency in seconds.",
    ),
    (
        "vllm:e2e_request_latency_seconds",
        "histogram",
        "Histogram of e2e request latency in seconds.",
    ),
    ("vllm:request_prompt_tokens", "histogram", "Number of prefill tokens processed."),
    ("vllm:request_generation_tokens", "histogram", "Number of generation tokens processed."),
    *(
        (_family(metric), TYPE[metric], HELP[metric])
        for metric in (
            GateMetric.QUEUE_LENGTH,
            GateMetric.INFLIGHT_REQUESTS,
            GateMetric.INFLIGHT_TOKENS,
            GateMetric.QUEUE_WAIT_SECONDS,
            GateMetric.TIME_TO_FIRST_TOKEN_SECONDS,
            GateMetric.ADMITTED_TOTAL,
            GateMetric.SHED_TOTAL,
            GateMetric.FAILED_TOTAL,
            GateMetric.KNOB,
            GateMetric.DISCIPLINE,
            GateMetric.CONFIG_VERSION,
            GateMetric.CLASS_QUEUE_LENGTH,
            GateMetric.CLASS_INFLIGHT_REQUESTS,
            GateMetric.CLASS_ADMITTED_TOTAL,
            GateMetric.CLASS_ADMITTED_TOKENS_TOTAL,
            GateMetric.CLASS_SHED_TOTAL,
            GateMetric.CLASS_QUEUE_WAIT_SECONDS,
            GateMetric.CLASS_TIME_TO_FIRST_TOKEN_SECONDS,
            GateMetric.CLASS_TIME_PER_OUTPUT_TOKEN_SECONDS,
        )
    ),
)


def _histogram_samples(name: str, hist: ReplicaHistogram) -> Iterable[tuple[str, str, float]]:
    running = 0
    for key, count in zip(_bucket_keys(name, hist.bounds), hist.counts, strict=True):
        running += count
        yield key, name, float(running)
    yield f"{name}_sum", name, hist.sum
    yield f"{name}_count", name, float(hist.count)


@functools.lru_cache(maxsize=64)
def _bucket_keys(name: str, bounds: tuple[float, ...]) -> tuple[str, ...]:
    # Controllers snapshot every interval and tests every few ms: format once.
    return tuple(f'{name}_bucket{{le="{format_le(b)}"}}' for b in (*bounds, math.inf))


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
