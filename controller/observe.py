"""Observe: raw metric readings -> typed observations.

A `MetricsSource` (sources.py: `PrometheusSource` from Prometheus,
`SnapshotSource` from metric snapshots) reads the signals (signals.py) over
the window and returns raw readings, one per signal per pod.

`observe()` then turns raw readings into `Observation`s with ONE shared piece
of code (quantiles, means, unit scales, the gate's applied knobs), so the two
sources cannot drift apart. NaN, +-Inf, absent and stale values come out as
`None` (missing), never as zero; a counter that is really zero (the gate
pre-creates its shed reasons at 0) comes out as 0.0.

A policy with SLO classes also reads the gate's per-class series; a source
returns those as `ByLabel` readings (class -> value), and `observe()` makes
one `ClassObservation` per class of each pod, and of the pooled replica, with
the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from batchpilot.contract.knobs import DISCIPLINES, NUMERIC_KNOBS, KnobError, Knobs
from batchpilot.controller.policy import Policy
from batchpilot.controller.promstats import Bucket, histogram_fraction_below, histogram_quantile
from batchpilot.controller.signals import Signal, signal_specs


class MetricsUnavailable(RuntimeError):
    """The metrics backend could not answer; the iteration holds its last decision."""


@dataclass(frozen=True, slots=True)
class WindowHistogram:
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

    def scaled(self, factor: float) -> WindowHistogram:
        """Bounds and sum in other units (ms -> s: 0.001); rates unchanged."""
        if factor == 1.0:
            return self
        return WindowHistogram(
            tuple((le * factor, rate) for le, rate in self.buckets),
            None if self.sum_rate is None else self.sum_rate * factor,
        )

    def divided(self, replicas: int) -> WindowHistogram:
        """Rates per replica; quantiles and means unchanged."""
        return WindowHistogram(
            tuple((le, rate / replicas) for le, rate in self.buckets),
            None if self.sum_rate is None else self.sum_rate / replicas,
        )


@dataclass(frozen=True, slots=True)
class ByLabel:
    """A per-class signal's reading for one pod: one value per class."""

    values: Mapping[str, float | WindowHistogram]


Reading = float | WindowHistogram | dict[str, float] | ByLabel


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
class ClassObservation:
    """One SLO class of one pod (or of the pooled replica), from the gate's per-class series."""

    arrival_rps: float | None = None  # admitted + shed
    admitted_rps: float | None = None
    shed_rps: float | None = None
    inflight: float | None = None  # requests admitted and not finished, window average
    ttft: WindowHistogram | None = None  # arrival at the gate -> first token
    tpot: WindowHistogram | None = None


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
    prompt_tokens: WindowHistogram | None = None
    output_tokens: WindowHistogram | None = None
    # Arrival at the gate -> first token when the gate reports it (it
    # includes gate queueing); the engine's own TTFT otherwise.
    ttft: WindowHistogram | None = None
    ttft_from_gate: bool = False
    itl: WindowHistogram | None = None
    tpot: WindowHistogram | None = None
    e2e: WindowHistogram | None = None
    queue_wait: WindowHistogram | None = None
    applied: Knobs | None = None
    # Per SLO class, for a policy with classes (empty otherwise).
    classes: Mapping[str, ClassObservation] = field(default_factory=dict)
    missing: tuple[str, ...] = ()

    def summary(self, quantile: float) -> dict[str, float | None]:
        """Flat numbers for a status or an explain table."""

        def q(hist: WindowHistogram | None, p: float) -> float | None:
            return None if hist is None else hist.quantile(p)

        def mean(hist: WindowHistogram | None) -> float | None:
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


def observe(
    source: MetricsSource, policy: Policy, now_s: float, pods: Sequence[str]
) -> Observation:
    """Read the window ending at `now_s` and build typed observations."""
    raw = source.read(now_s, pods)
    specs = signal_specs(policy.engine.kind, policy.metrics.overrides, classes=bool(policy.classes))
    scales = {signal: spec.metric.scale for signal, spec in specs.items()}
    per_pod: dict[str, PodObservation] = {}
    for pod in pods:
        readings = {signal: by_pod[pod] for signal, by_pod in raw.readings.items() if pod in by_pod}
        if readings:
            per_pod[pod] = _pod_observation(readings, scales)
    pooled = (
        _pod_observation(_pool(raw.readings, list(per_pod)), scales)
        if per_pod
        else PodObservation(missing=tuple(s.value for s in Signal if s not in _CLASS_SIGNALS))
    )
    silent = tuple(pod for pod in pods if pod not in per_pod)
    return Observation(now_s, policy.metrics.window_s, per_pod, pooled, silent)


def _pool(
    readings: Mapping[Signal, Mapping[str, Reading]], pods: list[str]
) -> dict[Signal, Reading]:
    pooled: dict[Signal, Reading] = {}
    replicas = len(pods)
    for signal, by_pod in readings.items():
        values = [by_pod[pod] for pod in pods if pod in by_pod]
        if not values:
            continue
        first = values[0]
        if isinstance(first, ByLabel):
            by_label = [v for v in values if isinstance(v, ByLabel)]
            pooled[signal] = _pool_by_label(by_label)
        elif isinstance(first, WindowHistogram):
            hists = [v for v in values if isinstance(v, WindowHistogram)]
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


def _pool_by_label(readings: Sequence[ByLabel]) -> ByLabel:
    """Per class, per average replica of the pods that reported the signal:
    a pod without a class's series had none of its traffic (rates add 0)."""
    replicas = len(readings)
    grouped: dict[str, list[float | WindowHistogram]] = {}
    for reading in readings:
        for label, value in reading.values.items():
            grouped.setdefault(label, []).append(value)
    pooled: dict[str, float | WindowHistogram] = {}
    for label, values in grouped.items():
        hists = [v for v in values if isinstance(v, WindowHistogram)]
        if hists:
            pooled[label] = _merge(hists).divided(replicas)
            continue
        floats = [float(v) for v in values if isinstance(v, float | int)]
        if floats and all(math.isfinite(v) for v in floats):
            pooled[label] = math.fsum(v / replicas for v in floats)
    return ByLabel(pooled)


def _merge(hists: Sequence[WindowHistogram]) -> WindowHistogram:
    sums = [h.sum_rate for h in hists]
    total_sum = (
        None if any(s is None for s in sums) else math.fsum(s for s in sums if s is not None)
    )
    try:
        stacked = np.array([h.buckets for h in hists], dtype=float)  # (pods, buckets, 2)
    except ValueError:  # bucket counts differ between pods
        stacked = None
    if stacked is not None and np.array_equal(
        stacked[:, :, 0], np.broadcast_to(stacked[0, :, 0], stacked.shape[:2])
    ):
        # The usual case, every pod with the same buckets: one vector sum.
        rates = stacked[:, :, 1].sum(axis=0)
        return WindowHistogram(
            tuple(zip(stacked[0, :, 0].tolist(), rates.tolist(), strict=True)), total_sum
        )
    by_bound: dict[float, float] = {}
    for hist in hists:
        for le, rate in hist.buckets:
            by_bound[le] = by_bound.get(le, 0.0) + rate
    return WindowHistogram(tuple(sorted(by_bound.items())), total_sum)


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


def _pod_observation(
    readings: Mapping[Signal, Reading], scales: Mapping[Signal, float]
) -> PodObservation:
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
    values["applied"] = _applied_knobs(
        readings.get(Signal.GATE_KNOB), readings.get(Signal.GATE_DISCIPLINE)
    )
    if values["applied"] is None:
        missing.append(Signal.GATE_KNOB.value)
    values["classes"] = _class_observations(readings, scales)
    return PodObservation(**values, missing=tuple(missing))


def _class_observations(
    readings: Mapping[Signal, Reading], scales: Mapping[Signal, float]
) -> dict[str, ClassObservation]:
    """One ClassObservation per class any per-class signal names."""
    by_signal = {
        signal: reading.values
        for signal in _CLASS_SIGNALS
        if isinstance(reading := readings.get(signal), ByLabel)
    }
    names = sorted({name for values in by_signal.values() for name in values})
    classes: dict[str, ClassObservation] = {}
    for name in names:

        def number(signal: Signal, name: str = name) -> float | None:
            value = by_signal.get(signal, {}).get(name)
            if isinstance(value, float | int) and math.isfinite(value):
                return float(value) * scales.get(signal, 1.0)
            return None

        def histogram(signal: Signal, name: str = name) -> WindowHistogram | None:
            value = by_signal.get(signal, {}).get(name)
            return _valid_histogram(value, scales.get(signal, 1.0)) if value is not None else None

        admitted, shed = number(Signal.CLASS_ADMITTED), number(Signal.CLASS_SHED)
        # As for the pooled counters: with the admitted series present, an
        # absent shed series has shed nothing yet.
        arrival = None if admitted is None else admitted + (shed or 0.0)
        classes[name] = ClassObservation(
            arrival_rps=arrival if arrival is not None and math.isfinite(arrival) else None,
            admitted_rps=admitted,
            shed_rps=shed,
            inflight=number(Signal.CLASS_INFLIGHT),
            ttft=histogram(Signal.CLASS_TTFT),
            tpot=histogram(Signal.CLASS_TPOT),
        )
    return classes


_CLASS_SIGNALS = (
    Signal.CLASS_ADMITTED,
    Signal.CLASS_SHED,
    Signal.CLASS_INFLIGHT,
    Signal.CLASS_TTFT,
    Signal.CLASS_TPOT,
)


def _valid_histogram(reading: Reading | None, scale: float) -> WindowHistogram | None:
    """A histogram with observations, a +Inf bucket and finite rates; else missing."""
    if not isinstance(reading, WindowHistogram) or len(reading.buckets) < 2:
        return None
    if not math.isinf(reading.buckets[-1][0]):
        return None
    if not all(map(math.isfinite, [rate for _, rate in reading.buckets])):
        return None
    if reading.count_rate <= 0:
        return None
    sum_rate = (
        reading.sum_rate
        if reading.sum_rate is not None and math.isfinite(reading.sum_rate)
        else None
    )
    return WindowHistogram(reading.buckets, sum_rate).scaled(scale)


def _applied_knobs(knob_values: Reading | None, discipline_flags: Reading | None) -> Knobs | None:
    """The gate's applied settings from its gauges (+Inf: no limit)."""
    if not isinstance(knob_values, dict) or not isinstance(discipline_flags, dict):
        return None
    settings: dict[str, Any] = {}
    for name in NUMERIC_KNOBS:
        value = knob_values.get(name)
        if value is None or math.isnan(value) or value == -math.inf:
            return None
        settings[name] = None if value == math.inf else round(value)
    active = [
        name for name, flag in discipline_flags.items() if flag == 1.0 and name in DISCIPLINES
    ]
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
