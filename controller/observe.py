"""Observe: live metrics -> typed observations, from Prometheus or from snapshots.

Two `MetricsSource`s read the same signals (signals.py) over the same window
and return the same raw readings, one per signal per pod:

- `PrometheusSource`: one PromQL query per signal (promql.py) through
  prometheus-api-client's `PrometheusConnect.custom_query`;
- `SnapshotSource`: fed cumulative metric snapshots (exposition sample name
  with labels -> value, as the simulator's sim/metrics.py produces them),
  applying Prometheus' own rate / avg_over_time / last_over_time (promstats).

`observe()` then turns raw readings into `Observation`s with ONE shared piece
of code (quantiles, means, unit scales, the gate's applied knobs), so the two
sources cannot drift apart. NaN, +-Inf, absent and stale values come out as
`None` (missing), never as zero; a counter that is really zero (the gate
pre-creates its shed reasons at 0) comes out as 0.0.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np
from prometheus_api_client.exceptions import PrometheusApiClientException

from batchpilot.controller.knobs import DISCIPLINES, KnobError, Knobs
from batchpilot.controller.policy import Policy
from batchpilot.controller.promql import SUM_PSEUDO_BUCKET, QueryBuilder
from batchpilot.controller.promstats import (
    Bucket,
    Sample,
    avg_over_time,
    extrapolated_rate,
    histogram_fraction_below,
    histogram_quantile,
    last_over_time,
)
from batchpilot.controller.signals import Kind, Signal, SignalSpec, signal_specs


class MetricsUnavailable(RuntimeError):
    """The metrics backend could not answer; the iteration holds its last decision."""


@dataclass(frozen=True, slots=True)
class Histogram:
    """Bucket rates of one histogram over the window, in the signal's units."""

    buckets: tuple[Bucket, ...]  # (le, cumulative observations per second), +Inf last
    sum_rate: float | None

    @property
    def count_rate(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    @property
    def mean(self) -> float | None:
        if self.sum_rate is None or self.count_rate <= 0:
            return None
        return _finite(self.sum_rate / self.count_rate)

    def quantile(self, q: float) -> float | None:
        return _finite(histogram_quantile(q, self.buckets))

    def fraction_below(self, threshold: float) -> float | None:
        return _finite(histogram_fraction_below(threshold, self.buckets))

    def scaled(self, factor: float) -> Histogram:
        """Bounds and sum in other units (ms -> s: 0.001); rates unchanged."""
        if factor == 1.0:
            return self
        return Histogram(
            tuple((le * factor, rate) for le, rate in self.buckets),
            None if self.sum_rate is None else self.sum_rate * factor,
        )

    def divided(self, replicas: int) -> Histogram:
        """Rates per replica; quantiles and means unchanged."""
        return Histogram(
            tuple((le, rate / replicas) for le, rate in self.buckets),
            None if self.sum_rate is None else self.sum_rate / replicas,
        )


Reading = float | Histogram | dict[str, float]


@dataclass(frozen=True, slots=True)
class RawWindow:
    """What a source read: signal -> pod -> reading; absent means missing."""

    time_s: float
    readings: Mapping[Signal, Mapping[str, Reading]]


class MetricsSource(Protocol):
    def read(self, now_s: float, pods: Sequence[str]) -> RawWindow:
        """Every signal for `pods` over the policy's window ending at `now_s`.

        Raises MetricsUnavailable when the backend cannot be reached at all.
        """
        ...


@dataclass(frozen=True, slots=True)
class PodObservation:
    """One pod over the window (or the policy's pods pooled into one average replica)."""

    arrival_rps: float | None = None  # admitted + shed at the gate
    admitted_rps: float | None = None
    shed_rps: float | None = None
    completed_rps: float | None = None
    preemptions_rps: float | None = None
    prompt_tps: float | None = None  # prompt tokens processed per second
    generation_tps: float | None = None  # output tokens generated per second
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None  # fraction of the KV cache in use, 0..1
    gate_queue: float | None = None
    gate_inflight: float | None = None
    gate_inflight_tokens: float | None = None
    prompt_tokens: Histogram | None = None
    output_tokens: Histogram | None = None
    # Arrival at the gate -> first token when the gate reports it (it
    # includes gate queueing); the engine's own TTFT otherwise.
    ttft: Histogram | None = None
    ttft_from_gate: bool = False
    itl: Histogram | None = None
    tpot: Histogram | None = None
    e2e: Histogram | None = None
    queue_wait: Histogram | None = None
    applied: Knobs | None = None
    missing: tuple[str, ...] = ()

    def summary(self, quantile: float) -> dict[str, float | None]:
        """Flat numbers for a status or an explain table."""
        def q(hist: Histogram | None, p: float) -> float | None:
            return None if hist is None else hist.quantile(p)

        def mean(hist: Histogram | None) -> float | None:
            return None if hist is None else hist.mean

        return {
            "arrival_rps": self.arrival_rps,
            "shed_rps": self.shed_rps,
            "running": self.running,
            "waiting": self.waiting,
            "gate_queue": self.gate_queue,
            "kv_usage": self.kv_usage,
            "preemptions_rps": self.preemptions_rps,
            "prompt_mean": mean(self.prompt_tokens),
            "prompt_p90": q(self.prompt_tokens, 0.9),
            "output_mean": mean(self.output_tokens),
            "output_p90": q(self.output_tokens, 0.9),
            "ttft_p_s": q(self.ttft, quantile),
            "tpot_p_s": q(self.tpot, quantile),
            "itl_p_s": q(self.itl, quantile),
        }


@dataclass(frozen=True, slots=True)
class Observation:
    time_s: float
    window_s: float
    pods: Mapping[str, PodObservation]
    # The pods that reported, pooled into one average replica: rates and
    # counts per replica, histograms merged (quantiles over every request).
    pooled: PodObservation
    # Pods that reported nothing at all (unreachable, or no fresh sample).
    silent: tuple[str, ...] = ()

    @property
    def reporting(self) -> int:
        return len(self.pods)


def observe(source: MetricsSource, policy: Policy, now_s: float, pods: Sequence[str]) -> Observation:
    """Read the window ending at `now_s` and build typed observations."""
    raw = source.read(now_s, pods)
    specs = signal_specs(policy.engine.kind, policy.metrics.overrides)
    scales = {signal: spec.metric.scale for signal, spec in specs.items()}
    per_pod: dict[str, PodObservation] = {}
    for pod in pods:
        readings = {signal: by_pod[pod] for signal, by_pod in raw.readings.items() if pod in by_pod}
        if readings:
            per_pod[pod] = _pod_observation(readings, scales)
    pooled = _pod_observation(_pool(raw.readings, list(per_pod)), scales) if per_pod else PodObservation(
        missing=tuple(s.value for s in Signal)
    )
    silent = tuple(pod for pod in pods if pod not in per_pod)
    return Observation(now_s, policy.metrics.window_s, per_pod, pooled, silent)


def _pool(readings: Mapping[Signal, Mapping[str, Reading]], pods: list[str]) -> dict[Signal, Reading]:
    pooled: dict[Signal, Reading] = {}
    replicas = len(pods)
    for signal, by_pod in readings.items():
        values = [by_pod[pod] for pod in pods if pod in by_pod]
        if not values:
            continue
        first = values[0]
        if isinstance(first, Histogram):
            hists = [v for v in values if isinstance(v, Histogram)]
            pooled[signal] = _merge(hists).divided(len(hists))
        elif isinstance(first, dict):
            # Applied settings: pooled only where every pod agrees.
            dicts = [v for v in values if isinstance(v, dict)]
            if all(d == first for d in dicts) and len(dicts) == replicas:
                pooled[signal] = first
        else:
            floats = [float(v) for v in values if isinstance(v, float | int)]
            # Per average replica: a pod that did not report this signal is
            # left out of the mean rather than counted as zero. Summing v/n
            # cannot overflow (fsum raises on 1e308 + 1e308), and a
            # non-finite value makes the mean missing (fsum raises on
            # inf + -inf).
            if all(math.isfinite(v) for v in floats):
                pooled[signal] = math.fsum(v / len(floats) for v in floats)
    return pooled


def _merge(hists: Sequence[Histogram]) -> Histogram:
    sums = [h.sum_rate for h in hists]
    total_sum = None if any(s is None for s in sums) else math.fsum(s for s in sums if s is not None)
    try:
        stacked = np.array([h.buckets for h in hists], dtype=float)  # (pods, buckets, 2)
    except ValueError:  # bucket counts differ between pods
        stacked = None
    if stacked is not None and np.array_equal(stacked[:, :, 0], np.broadcast_to(stacked[0, :, 0], stacked.shape[:2])):
        # The usual case, every pod with the same buckets: one vector sum.
        rates = stacked[:, :, 1].sum(axis=0)
        return Histogram(tuple(zip(stacked[0, :, 0].tolist(), rates.tolist(), strict=True)), total_sum)
    by_bound: dict[float, float] = {}
    for hist in hists:
        for le, rate in hist.buckets:
            by_bound[le] = by_bound.get(le, 0.0) + rate
    return Histogram(tuple(sorted(by_bound.items())), total_sum)


_FLOAT_FIELDS: Mapping[Signal, str] = {
    Signal.ADMITTED: "admitted_rps",
    Signal.SHED: "shed_rps",
    Signal.COMPLETED: "completed_rps",
    Signal.PREEMPTIONS: "preemptions_rps",
    Signal.PROMPT_TOKENS_PROCESSED: "prompt_tps",
    Signal.GENERATION_TOKENS: "generation_tps",
    Signal.RUNNING: "running",
    Signal.WAITING: "waiting",
    Signal.KV_USAGE: "kv_usage",
    Signal.GATE_QUEUE: "gate_queue",
    Signal.GATE_INFLIGHT: "gate_inflight",
    Signal.GATE_INFLIGHT_TOKENS: "gate_inflight_tokens",
}
_HISTOGRAM_FIELDS: Mapping[Signal, str] = {
    Signal.PROMPT_TOKENS: "prompt_tokens",
    Signal.OUTPUT_TOKENS: "output_tokens",
    Signal.ITL: "itl",
    Signal.TPOT: "tpot",
    Signal.E2E: "e2e",
    Signal.GATE_QUEUE_WAIT: "queue_wait",
}


def _pod_observation(readings: Mapping[Signal, Reading], scales: Mapping[Signal, float]) -> PodObservation:
    values: dict[str, Any] = {}
    missing: list[str] = []
    for signal, name in _FLOAT_FIELDS.items():
        value = readings.get(signal)
        if isinstance(value, float | int) and math.isfinite(value):
            values[name] = float(value) * scales.get(signal, 1.0)
        else:
            missing.append(signal.value)
    for signal, name in _HISTOGRAM_FIELDS.items():
        hist = _valid_histogram(readings.get(signal), scales.get(signal, 1.0))
        if hist is None:
            missing.append(signal.value)
        values[name] = hist
    gate_ttft = _valid_histogram(readings.get(Signal.GATE_TTFT), scales.get(Signal.GATE_TTFT, 1.0))
    engine_ttft = _valid_histogram(readings.get(Signal.TTFT), scales.get(Signal.TTFT, 1.0))
    if "completed_rps" not in values and values.get("e2e") is not None:
        # Engines without a request counter still count requests in their
        # end-to-end latency histogram, one observation per finished request.
        values["completed_rps"] = values["e2e"].count_rate
    values["ttft"] = gate_ttft or engine_ttft
    values["ttft_from_gate"] = gate_ttft is not None
    if values["ttft"] is None:
        missing.append(Signal.TTFT.value)
    if "admitted_rps" in values:
        # The shed counter is labelled by reason, and a labelled series exists
        # only once it has counted something (unless the exporter pre-creates
        # it): with the admitted counter present, an absent shed series has
        # shed nothing yet.
        arrival_rps = values["admitted_rps"] + values.get("shed_rps", 0.0)
        # Two finite rates near 1e308 add up to inf: missing, not infinite.
        if math.isfinite(arrival_rps):
            values["arrival_rps"] = arrival_rps
    values["applied"] = _applied_knobs(readings.get(Signal.GATE_KNOB), readings.get(Signal.GATE_DISCIPLINE))
    if values["applied"] is None:
        missing.append(Signal.GATE_KNOB.value)
    return PodObservation(**values, missing=tuple(missing))


def _valid_histogram(reading: Reading | None, scale: float) -> Histogram | None:
    """A histogram with observations, a +Inf bucket and finite rates; else missing."""
    if not isinstance(reading, Histogram) or len(reading.buckets) < 2:
        return None
    if not math.isinf(reading.buckets[-1][0]):
        return None
    if not all(map(math.isfinite, [rate for _, rate in reading.buckets])):
        return None
    if reading.count_rate <= 0:
        return None
    sum_rate = reading.sum_rate if reading.sum_rate is not None and math.isfinite(reading.sum_rate) else None
    return Histogram(reading.buckets, sum_rate).scaled(scale)


_NUMERIC_KNOBS = tuple(f.name for f in fields(Knobs) if f.name != "discipline")


def _applied_knobs(knob_values: Reading | None, discipline_flags: Reading | None) -> Knobs | None:
    """The gate's applied settings from its gauges (+Inf: no limit)."""
    if not isinstance(knob_values, dict) or not isinstance(discipline_flags, dict):
        return None
    settings: dict[str, Any] = {}
    for name in _NUMERIC_KNOBS:
        value = knob_values.get(name)
        if value is None or math.isnan(value) or value == -math.inf:
            return None
        settings[name] = None if value == math.inf else round(value)
    active = [name for name, flag in discipline_flags.items() if flag == 1.0 and name in DISCIPLINES]
    if len(active) != 1:
        return None
    settings["discipline"] = active[0]
    try:
        return Knobs(**settings)
    except KnobError:
        # A gauge outside the knob's valid range is a scrape or gate bug;
        # treating the applied settings as unknown is the safe reading.
        return None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- Prometheus ----------------------------------------------------------------


class PromQueryClient(Protocol):
    """The one method of prometheus_api_client.PrometheusConnect used here."""

    def custom_query(
        self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any: ...


class PrometheusSource:
    """One instant query per signal at `now_s`, aggregated by pod."""

    def __init__(self, client: PromQueryClient, policy: Policy) -> None:
        self._client = client
        self._specs = signal_specs(policy.engine.kind, policy.metrics.overrides)
        self._builder = QueryBuilder(policy.metrics, policy.namespace)
        self._pod_label = policy.metrics.pod_label
        self._timeout_s = policy.metrics.timeout_s
        # Prometheus stamps an instant result with the evaluation time; a
        # result stamped elsewhere (a caching proxy, a clock problem) is stale.
        self._staleness_s = policy.metrics.staleness_s

    def read(self, now_s: float, pods: Sequence[str]) -> RawWindow:
        readings: dict[Signal, Mapping[str, Reading]] = {}
        if not pods:
            return RawWindow(now_s, readings)
        for signal, spec in self._specs.items():
            query = self._builder.query(spec, pods)
            try:
                result = self._client.custom_query(
                    query, params={"time": now_s, "timeout": f"{self._timeout_s:g}s"}, timeout=self._timeout_s
                )
            # requests' errors (connection, timeout, bad JSON) are OSErrors;
            # prometheus-api-client indexes the JSON answer unchecked
            # (`response.json()["data"]["result"]`), so a 200 answer of
            # another shape (a proxy's error page as JSON, `[]`) surfaces as
            # KeyError or TypeError.
            except (OSError, PrometheusApiClientException, KeyError, TypeError) as err:
                raise MetricsUnavailable(f"Prometheus query for {signal.value} failed: {err}") from err
            readings[signal] = self._parse(spec, result, now_s)
        return RawWindow(now_s, readings)

    def _parse(self, spec: SignalSpec, result: Any, now_s: float) -> dict[str, Reading]:
        if not isinstance(result, list):
            raise MetricsUnavailable(f"Prometheus answered {type(result).__name__} for {spec.signal.value}, not a vector")
        by_pod: dict[str, Reading] = {}
        histograms: dict[str, tuple[list[Bucket], list[float]]] = {}
        for item in result:
            labels = item.get("metric") if isinstance(item, dict) else None
            if not isinstance(labels, dict):
                continue
            pod = labels.get(self._pod_label)
            value = _sample_value(item.get("value") if isinstance(item, dict) else None, now_s, self._staleness_s)
            if pod is None or value is None:
                continue
            if spec.kind is Kind.HISTOGRAM:
                buckets, sums = histograms.setdefault(pod, ([], []))
                le = labels.get("le")
                if le == SUM_PSEUDO_BUCKET:
                    sums.append(value)
                elif le is not None:
                    bound = _parse_float(le)
                    if bound is not None:
                        buckets.append((bound, value))
            elif spec.kind is Kind.LABELLED:
                key = labels.get(spec.by_label or "")
                if key is not None:
                    entry = by_pod.setdefault(pod, {})
                    if isinstance(entry, dict):
                        entry[key] = value
            else:
                by_pod[pod] = value
        for pod, (buckets, sums) in histograms.items():
            if buckets:
                by_pod[pod] = Histogram(tuple(sorted(buckets)), sums[0] if sums else None)
        return by_pod


def _sample_value(value: Any, now_s: float, staleness_s: float) -> float | None:
    """A result's [timestamp, "value"] pair as a float; None if NaN or stale.

    +-Inf pass through (the gate exports an unset limit as +Inf); consumers
    that need finite numbers treat them as missing.
    """
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    stamp, text = value
    parsed_stamp = _parse_float(str(stamp))
    parsed = _parse_float(str(text))
    if parsed_stamp is None or parsed is None or math.isnan(parsed):
        return None
    if abs(now_s - parsed_stamp) > staleness_s:
        return None
    return parsed


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# -- Snapshots ---------------------------------------------------------------

_SAMPLE_NAME_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\Z", re.DOTALL)
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?', re.DOTALL)
_EXPOSITION_UNESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_sample_name(key: str) -> tuple[str, dict[str, str]]:
    """`name{a="x",le="0.1"}` (text exposition format) -> (name, labels)."""
    match = _SAMPLE_NAME_RE.match(key)
    if match is None:
        raise ValueError(f"not an exposition sample name: {key!r}")
    name, body = match.group(1), match.group(2) or ""
    labels: dict[str, str] = {}
    position = 0
    while position < len(body):
        label = _LABEL_RE.match(body, position)
        if label is None or label.end() == position:
            raise ValueError(f"malformed labels in sample name: {key!r}")
        labels[label.group(1)] = re.sub(r"\\.", lambda m: _EXPOSITION_UNESCAPES.get(m.group(0), m.group(0)), label.group(2))
        position = label.end()
    return name, labels


@dataclass(slots=True)
class _SeriesIndex:
    """Which snapshot keys feed which signal, resolved once per key."""

    # signal -> key -> grouping label value ("le" bound, knob name, or "")
    members: dict[Signal, dict[str, str]] = field(default_factory=dict)
    # histogram signal -> keys of its _sum series
    sums: dict[Signal, set[str]] = field(default_factory=dict)
    # keys that feed some signal; only these are kept
    relevant: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)


class SnapshotSource:
    """Cumulative per-pod snapshots in, Prometheus-equivalent readings out.

    Keeps, per pod, the samples of the series the signals use, for one
    window plus one staleness period; nothing else is stored.
    """

    def __init__(self, policy: Policy) -> None:
        self._specs = signal_specs(policy.engine.kind, policy.metrics.overrides)
        self._window_s = policy.metrics.window_s
        self._staleness_s = policy.metrics.staleness_s
        self._index = _SeriesIndex()
        # pod -> deque of (time, {key: value}) restricted to indexed keys
        self._history: dict[str, deque[tuple[float, dict[str, float]]]] = {}

    def ingest(self, now_s: float, snapshots: Mapping[str, Mapping[str, float]]) -> None:
        for pod, snapshot in snapshots.items():
            self._index_keys(snapshot)
            relevant = self._index.relevant
            kept = {key: float(value) for key, value in snapshot.items() if key in relevant}
            history = self._history.setdefault(pod, deque())
            history.append((now_s, kept))
        horizon = now_s - self._window_s - self._staleness_s
        for pod in list(self._history):
            history = self._history[pod]
            while history and history[0][0] <= horizon:
                history.popleft()
            if not history:
                del self._history[pod]

    def read(self, now_s: float, pods: Sequence[str]) -> RawWindow:
        readings: dict[Signal, dict[str, Reading]] = {signal: {} for signal in self._specs}
        for pod in pods:
            history = self._history.get(pod)
            if not history or history[-1][0] < now_s - self._staleness_s:
                continue
            for signal, spec in self._specs.items():
                reading = self._read_signal(spec, history, now_s)
                if reading is not None:
                    readings[signal][pod] = reading
        return RawWindow(now_s, readings)

    def _index_keys(self, snapshot: Mapping[str, float]) -> None:
        index = self._index
        new_keys = [key for key in snapshot if key not in index.seen]
        if not new_keys:
            return
        for key in new_keys:
            index.seen.add(key)
            try:
                name, labels = parse_sample_name(key)
            except ValueError:
                continue
            for signal, spec in self._specs.items():
                group = _membership(spec, name, labels)
                if group is None:
                    continue
                index.relevant.add(key)
                if group == SUM_PSEUDO_BUCKET and spec.kind is Kind.HISTOGRAM:
                    index.sums.setdefault(signal, set()).add(key)
                else:
                    index.members.setdefault(signal, {})[key] = group

    def _read_signal(
        self, spec: SignalSpec, history: deque[tuple[float, dict[str, float]]], now_s: float
    ) -> Reading | None:
        keys = self._index.members.get(spec.signal, {})
        if not keys:
            return None

        def samples(key: str) -> list[Sample]:
            return [(t, snap[key]) for t, snap in history if key in snap]

        window = self._window_s
        if spec.kind is Kind.COUNTER:
            return _sum_present(extrapolated_rate(samples(k), now_s, window) for k in keys)
        if spec.kind is Kind.GAUGE_SUM:
            return _sum_present(avg_over_time(samples(k), now_s, window) for k in keys)
        if spec.kind is Kind.GAUGE_MAX:
            return _max_present(avg_over_time(samples(k), now_s, window) for k in keys)
        if spec.kind is Kind.LABELLED:
            grouped: dict[str, list[float]] = {}
            for key, group in keys.items():
                value = last_over_time(samples(key), now_s, window)
                if value is not None and not math.isnan(value):
                    grouped.setdefault(group, []).append(value)
            return {group: max(values) for group, values in grouped.items()} or None
        by_bound: dict[float, list[float]] = {}
        for key, group in keys.items():
            rate = extrapolated_rate(samples(key), now_s, window)
            bound = _parse_float(group)
            if rate is not None and not math.isnan(rate) and bound is not None:
                by_bound.setdefault(bound, []).append(rate)
        if not by_bound:
            return None
        sum_rate = _sum_present(
            extrapolated_rate(samples(k), now_s, window) for k in self._index.sums.get(spec.signal, ())
        )
        return Histogram(
            tuple(sorted((bound, math.fsum(rates)) for bound, rates in by_bound.items())), sum_rate
        )


def _membership(spec: SignalSpec, name: str, labels: Mapping[str, str]) -> str | None:
    """The group a series belongs to within `spec`, or None if it is not part of it."""
    metric = spec.metric
    if any(labels.get(label) != value for label, value in metric.labels):
        return None
    if spec.kind is Kind.HISTOGRAM:
        if name == f"{metric.metric}_bucket" and "le" in labels:
            return labels["le"]
        if name == f"{metric.metric}_sum":
            return SUM_PSEUDO_BUCKET
        return None
    if name != metric.metric:
        return None
    if spec.kind is Kind.LABELLED:
        return labels.get(spec.by_label or "")
    return ""


def _sum_present(values: Iterable[float | None]) -> float | None:
    """sum by (pod): series without a result drop out; NaN propagates."""
    present = [v for v in values if v is not None]
    return math.fsum(present) if present else None


def _max_present(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None

