"""Metric sources: live metrics -> raw readings, from Prometheus or from snapshots.

The two `MetricsSource`s (observe.py) read the same signals (signals.py) over
the same window and return the same raw readings, one per signal per pod:

- `PrometheusSource`: one PromQL query per signal (promql.py) through
  prometheus-api-client's `PrometheusConnect.custom_query`, one after
  another or all at once on an executor (the operator's query pool);
- `SnapshotSource`: fed cumulative metric snapshots (exposition sample name
  with labels -> value, as the simulator's sim/metrics.py produces them),
  applying Prometheus' own rate / avg_over_time / last_over_time (promstats).

observe.py's `observe()` turns either's readings into observations.

A per-class signal (signals.SignalSpec.grouped, a policy with SLO classes)
comes back from either as one `ByLabel` reading per pod: the class label's
value -> that class's rate, gauge or histogram.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

from prometheus_api_client.exceptions import PrometheusApiClientException

from batchpilot.controller.observe import (
    ByLabel,
    MetricsUnavailable,
    RawWindow,
    Reading,
    WindowHistogram,
)
from batchpilot.controller.policy import Policy
from batchpilot.controller.promql import SUM_PSEUDO_BUCKET, QueryBuilder
from batchpilot.controller.promstats import (
    Bucket,
    Sample,
    avg_over_time,
    extrapolated_rate,
    last_over_time,
)
from batchpilot.controller.signals import Kind, Signal, SignalSpec, signal_specs

# -- Prometheus ----------------------------------------------------------------


class PromQueryClient(Protocol):
    """The one method of prometheus_api_client.PrometheusConnect used here."""

    def custom_query(
        self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any: ...


class PrometheusSource:
    """One instant query per signal at `now_s`, aggregated by pod.

    A read's queries wait on Prometheus, not on this process: with an
    `executor` they go out together, so a read takes about one query's time
    instead of ~22 queries' in a row. The executor bounds how many are in
    flight (the operator shares one pool among all policies). Either way the
    readings are the same, and the first failed query in signal order fails
    the read.
    """

    def __init__(
        self, client: PromQueryClient, policy: Policy, executor: Executor | None = None
    ) -> None:
        self._client = client
        self._executor = executor
        self._specs = signal_specs(
            policy.engine.kind, policy.metrics.overrides, classes=bool(policy.classes)
        )
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
        specs = list(self._specs.values())
        queries = [self._builder.query(spec, pods) for spec in specs]
        ask = partial(self._ask, now_s)
        if self._executor is None:
            results = [ask(spec, query) for spec, query in zip(specs, queries, strict=True)]
        else:
            # Executor.map yields in submission order and raises the first
            # failure in that order; the queries not started yet are cancelled.
            results = list(self._executor.map(ask, specs, queries))
        for spec, result in zip(specs, results, strict=True):
            readings[spec.signal] = self._parse(spec, result, now_s)
        return RawWindow(now_s, readings)

    def _ask(self, now_s: float, spec: SignalSpec, query: str) -> Any:
        try:
            return self._client.custom_query(
                query,
                params={"time": now_s, "timeout": f"{self._timeout_s:g}s"},
                timeout=self._timeout_s,
            )
        # requests' errors (connection, timeout, bad JSON) are OSErrors;
        # prometheus-api-client indexes the JSON answer unchecked
        # (`response.json()["data"]["result"]`), so a 200 answer of
        # another shape (a proxy's error page as JSON, `[]`) surfaces as
        # KeyError or TypeError.
        except (OSError, PrometheusApiClientException, KeyError, TypeError) as err:
            raise MetricsUnavailable(
                f"Prometheus query for {spec.signal.value} failed: {err}"
            ) from err

    def _parse(self, spec: SignalSpec, result: Any, now_s: float) -> dict[str, Reading]:
        if not isinstance(result, list):
            raise MetricsUnavailable(
                f"Prometheus answered {type(result).__name__} for {spec.signal.value}, not a vector"
            )
        if spec.grouped:
            return self._parse_grouped(spec, result, now_s)
        by_pod: dict[str, Reading] = {}
        histograms: dict[str, tuple[list[Bucket], list[float]]] = {}
        for item in result:
            labels = item.get("metric") if isinstance(item, dict) else None
            if not isinstance(labels, dict):
                continue
            pod = labels.get(self._pod_label)
            value = _sample_value(
                item.get("value") if isinstance(item, dict) else None, now_s, self._staleness_s
            )
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
                by_pod[pod] = WindowHistogram(tuple(sorted(buckets)), sums[0] if sums else None)
        return by_pod

    def _parse_grouped(
        self, spec: SignalSpec, result: list[Any], now_s: float
    ) -> dict[str, Reading]:
        """A per-class answer: each (pod, class) group parsed as an ungrouped answer."""
        label = spec.by_label or ""
        groups: dict[str, list[Any]] = {}
        for item in result:
            labels = item.get("metric") if isinstance(item, dict) else None
            if not isinstance(labels, dict) or not isinstance(labels.get(label), str):
                continue
            groups.setdefault(labels[label], []).append(item)
        plain = replace(spec, by_label=None)
        by_pod: dict[str, dict[str, float | WindowHistogram]] = {}
        for value, items in groups.items():
            for pod, reading in self._parse(plain, items, now_s).items():
                if isinstance(reading, float | WindowHistogram):
                    by_pod.setdefault(pod, {})[value] = reading
        return {pod: ByLabel(values) for pod, values in by_pod.items()}


def _sample_value(value: Any, now_s: float, staleness_s: float) -> float | None:
    """A result's [timestamp, "value"] pair as a float; None if NaN or stale.

    +-Inf pass through (the gate exports an unset limit as +Inf); consumers
    that need finite numbers treat them as missing.
    """
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    # float() straight from the JSON values: this runs for every series of
    # every answer: 7% of the operator's CPU (py-spy, 100 policies) when it
    # went through str() first.
    try:
        stamp, parsed = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    if math.isnan(parsed) or abs(now_s - stamp) > staleness_s:
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
        labels[label.group(1)] = re.sub(
            r"\\.", lambda m: _EXPOSITION_UNESCAPES.get(m.group(0), m.group(0)), label.group(2)
        )
        position = label.end()
    return name, labels


@dataclass(slots=True)
class _SeriesIndex:
    """Which snapshot keys feed which signal, resolved once per key."""

    # signal -> key -> grouping label value ("le" bound, knob name, or "")
    members: dict[Signal, dict[str, str]] = field(default_factory=dict)
    # histogram signal -> keys of its _sum series
    sums: dict[Signal, set[str]] = field(default_factory=dict)
    # per-class signal -> key -> its class (the spec's by_label value)
    grouped_by: dict[Signal, dict[str, str]] = field(default_factory=dict)
    # keys that feed some signal; only these are kept
    relevant: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)


class SnapshotSource:
    """Cumulative per-pod snapshots in, Prometheus-equivalent readings out.

    Keeps, per pod, the samples of the series the signals use, for one
    window plus one staleness period; nothing else is stored.
    """

    def __init__(self, policy: Policy) -> None:
        self._specs = signal_specs(
            policy.engine.kind, policy.metrics.overrides, classes=bool(policy.classes)
        )
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
                if spec.grouped:
                    label = labels.get(spec.by_label or "")
                    if label is None:
                        continue
                    index.grouped_by.setdefault(signal, {})[key] = label
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
        sums = self._index.sums.get(spec.signal, set())
        if not spec.grouped:
            return self._read_keys(spec, keys, sums, history, now_s)
        # Per class: the class's own series, read as an ungrouped signal.
        label_of = self._index.grouped_by.get(spec.signal, {})
        plain = replace(spec, by_label=None)
        values: dict[str, float | WindowHistogram] = {}
        for label in sorted(set(label_of.values())):
            reading = self._read_keys(
                plain,
                {k: g for k, g in keys.items() if label_of.get(k) == label},
                {k for k in sums if label_of.get(k) == label},
                history,
                now_s,
            )
            if isinstance(reading, float | WindowHistogram):
                values[label] = reading
        return ByLabel(values) if values else None

    def _read_keys(
        self,
        spec: SignalSpec,
        keys: Mapping[str, str],
        sums: Iterable[str],
        history: deque[tuple[float, dict[str, float]]],
        now_s: float,
    ) -> Reading | None:
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
        sum_rate = _sum_present(extrapolated_rate(samples(k), now_s, window) for k in sums)
        return WindowHistogram(
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
