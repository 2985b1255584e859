"""Prometheus arithmetic against hand-computed Prometheus 3.x semantics."""

from __future__ import annotations

import math

import pytest

from batchpilot.controller.promstats import (
    avg_over_time,
    extrapolated_rate,
    histogram_fraction_below,
    histogram_quantile,
    in_range,
    last_over_time,
)

INF = math.inf


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        # rank 0.5*100 = 50 falls in (1, 2]: 1 + (2-1) * (50-40)/(80-40) = 1.25
        (0.5, [(1.0, 40), (2.0, 80), (INF, 100)], 1.25),
        # rank 99 lies in the +Inf bucket: the largest finite bound answers
        (0.99, [(1.0, 40), (2.0, 80), (INF, 100)], 2.0),
        # first bucket: lower bound 0 -> 0 + 1.0 * 20/40
        (0.2, [(1.0, 40), (2.0, 80), (INF, 100)], 0.5),
        # unsorted input and a duplicated bound are merged (40 + 0 at le=1)
        (0.5, [(INF, 100), (2.0, 80), (1.0, 40), (1.0, 0)], 1.25),
        # a non-monotonic count (60 after 80) is lifted to 80
        (0.7, [(1.0, 40), (2.0, 80), (3.0, 60), (INF, 100)], 1.75),
        # first bucket with a bound <= 0 answers that bound
        (0.1, [(-1.0, 50), (1.0, 80), (INF, 100)], -1.0),
        # q outside [0, 1]
        (-0.1, [(1.0, 1), (INF, 1)], -INF),
        (1.1, [(1.0, 1), (INF, 1)], INF),
    ],
)
def test_histogram_quantile_matches_prometheus(q: float, buckets: list[tuple[float, float]], expected: float) -> None:
    assert histogram_quantile(q, buckets) == pytest.approx(expected)


@pytest.mark.parametrize(
    "buckets",
    [
        [(1.0, 0), (INF, 0)],  # no observations
        [(1.0, 5), (2.0, 10)],  # no +Inf bucket
        [(INF, 10)],  # fewer than two buckets
        [],
    ],
)
def test_histogram_quantile_undefined_is_nan(buckets: list[tuple[float, float]]) -> None:
    assert math.isnan(histogram_quantile(0.9, buckets))


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (1.25, 0.5),  # the inverse of the quantile case above
        (0.5, 0.2),
        (2.0, 0.8),
        (10.0, 0.8),  # beyond the last finite bound: only what is known to lie below
        (0.0, 0.0),
    ],
)
def test_fraction_below_inverts_quantile(threshold: float, expected: float) -> None:
    buckets = [(1.0, 40), (2.0, 80), (INF, 100)]
    assert histogram_fraction_below(threshold, buckets) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("samples", "end", "window", "expected"),
    [
        # samples every 15 s covering the 60 s window: no extrapolation past
        # the edges beyond what the samples span; (t=15..60) first at 15 is
        # 15 s after the range start (45 s), within 1.1 x 15 s, so it
        # extrapolates to the start: delta 30 over 45 s -> 40 over 60 s.
        ([(15.0, 10.0), (30.0, 20.0), (45.0, 30.0), (60.0, 40.0)], 60.0, 60.0, 40.0 / 60.0),
        # the sample at the range start (t=0) is outside the left-open range
        ([(0.0, 0.0), (30.0, 30.0), (60.0, 60.0)], 60.0, 60.0, 1.0),
        # series starting inside the range: extrapolated by half an interval
        # only (gap 40 s >= 1.1 x 10 s): delta 20 over 20 s, 20 + 5 s covered
        ([(40.0, 100.0), (50.0, 110.0), (60.0, 120.0)], 60.0, 60.0, 20.0 * 25.0 / 20.0 / 60.0),
        # counter reset: 5 -> 2 adds back the 5 lost, increase 2 - 1 + 5 = 6;
        # its zero point (40 s x 1/6 before the first sample) limits the
        # extrapolation towards the start to 6.67 s
        ([(20.0, 1.0), (40.0, 5.0), (60.0, 2.0)], 60.0, 60.0, 6.0 * (40.0 + 40.0 / 6.0) / 40.0 / 60.0),
        # zero point: a young counter (first value 2, slope 10 per 30 s)
        # extrapolates back only to where it was 0, 6 s before its first sample
        ([(30.0, 2.0), (60.0, 12.0)], 60.0, 60.0, 10.0 * 36.0 / 30.0 / 60.0),
    ],
)
def test_extrapolated_rate_matches_prometheus(
    samples: list[tuple[float, float]], end: float, window: float, expected: float
) -> None:
    assert extrapolated_rate(samples, end, window) == pytest.approx(expected)


def test_rate_needs_two_samples_in_range() -> None:
    assert extrapolated_rate([(0.0, 1.0), (60.0, 5.0)], 60.0, 60.0) is None
    assert extrapolated_rate([], 60.0, 60.0) is None


def test_range_is_left_open() -> None:
    samples = [(0.0, 1.0), (30.0, 3.0), (60.0, 5.0)]
    assert in_range(samples, 60.0, 60.0) == [(30.0, 3.0), (60.0, 5.0)]
    assert avg_over_time(samples, 60.0, 60.0) == pytest.approx(4.0)
    assert last_over_time(samples, 60.0, 60.0) == 5.0
    assert avg_over_time(samples, 100.0, 30.0) is None
