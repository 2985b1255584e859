"""The gate's Prometheus metrics, as contract/gate_metrics.py names them.

State gauges (queue length, in-flight, knobs, version) are read from the
gate at scrape time instead of being set on every request, so the request
path pays only for a few integer increments.

Per SLO class: one `ClassMetrics` per class name the gate has served under
some applied configuration (`serve_classes`, called on every apply), never
one per class header a client sent, so the `class` label's values are
bounded by configuration. A class's counters start at zero when it is first
configured, so rate() works from the first scrape, and stay after it is
configured away: a counter that vanished and came back would read as a reset.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from batchpilot.contract.gate_metrics import (
    CLASS_LABEL,
    DISCIPLINE_LABEL,
    HELP,
    KNOB_LABEL,
    TOKEN_BUCKETS,
    TPOT_BUCKETS_S,
    TTFT_BUCKETS_S,
    ClassDefaultReason,
    ConfigRejectReason,
    FailedReason,
    GateMetric,
    RetriedOutcome,
    RetryReason,
    ShedReason,
)
from batchpilot.contract.knobs import DISCIPLINES, NUMERIC_KNOBS
from batchpilot.gate.admission import AdmissionQueue


class Histogram:
    """Cumulative-bucket histogram kept as plain numbers (one event loop, no lock needed)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: GateMetric) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, HELP[name], buckets=self.buckets(), sum_value=self.sum)

    def buckets(self) -> list[tuple[str, float]]:
        """(`le`, cumulative count) pairs, +Inf last."""
        cumulative = itertools.accumulate(self.counts)
        return [
            (floatToGoString(bound), count)  # type: ignore[no-untyped-call]
            for bound, count in zip((*self.bounds, math.inf), cumulative, strict=True)
        ]


class ClassMetrics:
    """One SLO class's counters and histograms (its gauges come from the queue)."""

    __slots__ = (
        "admitted",
        "admitted_tokens",
        "queue_wait",
        "shed",
        "time_per_output_token",
        "time_to_first_token",
    )

    def __init__(self) -> None:
        self.admitted = 0
        # Prompt + requested output tokens: what the class was charged.
        self.admitted_tokens = 0
        self.shed = 0
        self.queue_wait = Histogram(TTFT_BUCKETS_S)
        self.time_to_first_token = Histogram(TTFT_BUCKETS_S)
        self.time_per_output_token = Histogram(TPOT_BUCKETS_S)


class GateMetrics(Collector):
    """Everything the gate exports, collected at scrape time.

    Counters and histograms are plain numbers updated on the event loop;
    prometheus_client's own metric objects would add a lock per update and
    `_created` series that are not part of the contract.
    """

    def __init__(
        self,
        queue: Callable[[], AdmissionQueue],
        config_version: Callable[[], int],
    ) -> None:
        self._queue = queue
        self._config_version = config_version
        self.queue_wait = Histogram(TTFT_BUCKETS_S)
        self.time_to_first_token = Histogram(TTFT_BUCKETS_S)
        self.time_per_output_token = Histogram(TPOT_BUCKETS_S)
        self.prompt_tokens = Histogram(TOKEN_BUCKETS)
        self.output_tokens = Histogram(TOKEN_BUCKETS)
        self.admitted = 0
        self.shed: dict[StrEnum, int] = dict.fromkeys(ShedReason, 0)
        self.failed: dict[StrEnum, int] = dict.fromkeys(FailedReason, 0)
        self.upstream_retries: dict[StrEnum, int] = dict.fromkeys(RetryReason, 0)
        self.retried_requests: dict[StrEnum, int] = dict.fromkeys(RetriedOutcome, 0)
        self.config_writes_rejected: dict[StrEnum, int] = dict.fromkeys(ConfigRejectReason, 0)
        # Requests served in the default class because of their class header.
        self.class_defaulted: dict[StrEnum, int] = dict.fromkeys(ClassDefaultReason, 0)
        # Every class served under some applied configuration (bounded by the
        # writes of whoever holds the admin token, never by client headers).
        self.classes: dict[str, ClassMetrics] = {}
        self.serve_classes(queue().knobs.class_names)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def serve_classes(self, names: Iterable[str]) -> None:
        """Start series for classes configured now; those of earlier ones stay."""
        for name in names:
            if name not in self.classes:
                self.classes[name] = ClassMetrics()

    def collect(self) -> Iterator[Metric]:
        queue = self._queue()
        knobs = queue.knobs
        yield _gauge(GateMetric.QUEUE_LENGTH, queue.queued)
        yield _gauge(GateMetric.INFLIGHT_REQUESTS, queue.in_flight)
        yield _gauge(GateMetric.INFLIGHT_TOKENS, queue.inflight_tokens)
        yield self.queue_wait.family(GateMetric.QUEUE_WAIT_SECONDS)
        yield self.time_to_first_token.family(GateMetric.TIME_TO_FIRST_TOKEN_SECONDS)
        yield self.time_per_output_token.family(GateMetric.TIME_PER_OUTPUT_TOKEN_SECONDS)
        yield self.prompt_tokens.family(GateMetric.PROMPT_TOKENS)
        yield self.output_tokens.family(GateMetric.OUTPUT_TOKENS)
        yield CounterMetricFamily(
            GateMetric.ADMITTED_TOTAL, HELP[GateMetric.ADMITTED_TOTAL], value=self.admitted
        )
        yield _by_label(GateMetric.SHED_TOTAL, self.shed)
        yield _by_label(GateMetric.FAILED_TOTAL, self.failed)
        yield _by_label(GateMetric.UPSTREAM_RETRIES_TOTAL, self.upstream_retries)
        yield _by_label(GateMetric.RETRIED_REQUESTS_TOTAL, self.retried_requests, label="outcome")
        knob_family = GaugeMetricFamily(GateMetric.KNOB, HELP[GateMetric.KNOB], labels=[KNOB_LABEL])
        for name in NUMERIC_KNOBS:
            value = getattr(knobs, name)
            knob_family.add_metric([name], math.inf if value is None else float(value))
        yield knob_family
        discipline_family = GaugeMetricFamily(
            GateMetric.DISCIPLINE, HELP[GateMetric.DISCIPLINE], labels=[DISCIPLINE_LABEL]
        )
        for discipline in DISCIPLINES:
            discipline_family.add_metric(
                [discipline], 1.0 if discipline == knobs.discipline else 0.0
            )
        yield discipline_family
        yield _gauge(GateMetric.CONFIG_VERSION, self._config_version())
        yield _by_label(GateMetric.CONFIG_WRITES_REJECTED_TOTAL, self.config_writes_rejected)
        yield from self._collect_classes(queue)

    def _collect_classes(self, queue: AdmissionQueue) -> Iterator[Metric]:
        labels = [CLASS_LABEL]
        queued = GaugeMetricFamily(*_named(GateMetric.CLASS_QUEUE_LENGTH), labels=labels)
        in_flight = GaugeMetricFamily(*_named(GateMetric.CLASS_INFLIGHT_REQUESTS), labels=labels)
        for load in queue.class_loads():
            queued.add_metric([load.name], load.queued)
            in_flight.add_metric([load.name], load.in_flight)
        admitted = CounterMetricFamily(*_named(GateMetric.CLASS_ADMITTED_TOTAL), labels=labels)
        tokens = CounterMetricFamily(*_named(GateMetric.CLASS_ADMITTED_TOKENS_TOTAL), labels=labels)
        shed = CounterMetricFamily(*_named(GateMetric.CLASS_SHED_TOTAL), labels=labels)
        waits, ttfts, tpots = (
            HistogramMetricFamily(*_named(name), labels=labels)
            for name in (
                GateMetric.CLASS_QUEUE_WAIT_SECONDS,
                GateMetric.CLASS_TIME_TO_FIRST_TOKEN_SECONDS,
                GateMetric.CLASS_TIME_PER_OUTPUT_TOKEN_SECONDS,
            )
        )
        # The classes configured now, in their order, then those of earlier configurations.
        configured = queue.knobs.class_names
        names = (*configured, *(name for name in self.classes if name not in configured))
        for name in names:
            metrics = self.classes[name]
            admitted.add_metric([name], metrics.admitted)
            tokens.add_metric([name], metrics.admitted_tokens)
            shed.add_metric([name], metrics.shed)
            for family, histogram in (
                (waits, metrics.queue_wait),
                (ttfts, metrics.time_to_first_token),
                (tpots, metrics.time_per_output_token),
            ):
                family.add_metric([name], histogram.buckets(), histogram.sum)
        yield from (queued, in_flight, admitted, tokens, shed, waits, ttfts, tpots)
        yield _by_label(GateMetric.CLASS_DEFAULTED_TOTAL, self.class_defaulted)


def _named(name: GateMetric) -> tuple[str, str]:
    return name, HELP[name]


def _gauge(name: GateMetric, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, HELP[name], value=value)


def _by_label(
    name: GateMetric, counts: dict[StrEnum, int], label: str = "reason"
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, HELP[name], labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family
