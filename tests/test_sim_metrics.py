"""Histogram bookkeeping and quantiles behind the simulated /metrics."""

from __future__ import annotations

import math
import random

import pytest

from batchpilot.sim.metrics import (
    E2E_BUCKETS,
    ITL_BUCKETS,
    TTFT_BUCKETS,
    ReplicaHistogram,
    build_1_2_5_buckets,
    format_le,
    histogram_buckets,
    histogram_quantile,
)


@pytest.mark.parametrize(
    ("first", "step", "length", "times"),
    [
        (0.005, 0.001, 100, 3),  # crosses several ITL bounds
        (0.02, 0.0, 50, 7),  # constant steps
        (0.01, 0.0025, 9, 1),  # lands exactly on bounds (0.01, 0.025 ...)
        (100.0, 1.0, 5, 2),  # all in +Inf
        (0.06, 1e-7, 1000, 4),  # never leaves one bucket
    ],
)
def test_observe_series_equals_one_by_one(
    first: float, step: float, length: int, times: int
) -> None:
    bulk = ReplicaHistogram(ITL_BUCKETS)
    bulk.observe_series(first, step, length, times)
    single = ReplicaHistogram(ITL_BUCKETS)
    for j in range(length):
        single.observe(first + step * j, times)
    assert bulk.count == single.count == length * times
    assert bulk.sum == pytest.approx(single.sum, rel=1e-12)
    # a value within float error of a bound may fall either side; allow that one-off
    diff = [a - b for a, b in zip(bulk.counts, single.counts, strict=True)]
    assert sum(abs(d) for d in diff) <= 2 * times


def test_observe_uses_le_semantics() -> None:
    hist = ReplicaHistogram((0.1, 1.0))
    for value in (0.1, 0.10001, 1.0, 5.0):
        hist.observe(value)
    assert hist.cumulative() == [1, 3, 4]


def test_vllm_bucket_boundaries() -> None:
    # Copied counts from vllm/v1/metrics/loggers.py: 22, 19 and 21 boundaries.
    assert (len(TTFT_BUCKETS), len(ITL_BUCKETS), len(E2E_BUCKETS)) == (22, 19, 21)
    assert list(TTFT_BUCKETS) == sorted(TTFT_BUCKETS)
    assert build_1_2_5_buckets(100) == (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
    assert build_1_2_5_buckets(131_072)[-1] == 100_000.0


@pytest.mark.parametrize(
    ("bound", "text"), [(0.1, "0.1"), (1.0, "1.0"), (2560.0, "2560.0"), (math.inf, "+Inf")]
)
def test_format_le_matches_prometheus_client(bound: float, text: str) -> None:
    assert format_le(bound) == text


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.1, 10.0), (0.2, 30.0), (0.5, 40.0), (math.inf, 40.0)]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.2 + 0.3 * (39.6 - 30) / 10)
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    # in the +Inf bucket: the highest finite bound
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1


def test_quantile_of_random_samples_is_close() -> None:
    rng = random.Random(4)
    hist = ReplicaHistogram(tuple(i / 100 for i in range(1, 101)))
    values = [rng.random() for _ in range(20_000)]
    for v in values:
        hist.observe(v)
    snapshot = {
        f'h_bucket{{le="{format_le(b)}"}}': float(c)
        for b, c in zip((*hist.bounds, math.inf), hist.cumulative(), strict=True)
    }
    estimate = histogram_quantile(0.9, histogram_buckets(snapshot, "h"))
    assert estimate == pytest.approx(sorted(values)[int(0.9 * len(values))], abs=0.01)


def test_histogram_buckets_delta() -> None:
    before = {'x_bucket{le="1.0"}': 2.0, 'x_bucket{le="+Inf"}': 5.0}
    after = {'x_bucket{le="1.0"}': 3.0, 'x_bucket{le="+Inf"}': 9.0, "x_count": 9.0}
    assert histogram_buckets(after, "x", before) == [(1.0, 1.0), (math.inf, 4.0)]
