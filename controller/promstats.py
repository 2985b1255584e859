"""Prometheus' own arithmetic, so the simulator's snapshots read like a query.

The snapshot source computes `rate()`, `avg_over_time()`, `last_over_time()`
from raw cumulative samples, and both sources compute quantiles from bucket
rates with `histogram_quantile`. Implemented to Prometheus 3.x semantics
(promql/functions.go `extrapolatedRate`, promql/quantile.go `BucketQuantile`):

- A range `[w]` evaluated at `t` holds the samples with `t - w < ts <= t`
  (left-open since Prometheus 3.0).
- `rate` needs two samples; it takes last - first (adding back counter
  resets), then extrapolates towards each end of the range by at most half a
  sample interval when the series starts or ends inside it (a gap longer
  than 1.1 sample intervals), and never to before the counter's zero point.
- `histogram_quantile` sorts buckets, requires a `+Inf` bucket, merges equal
  bounds, forces cumulative counts monotonic, finds the bucket holding
  rank = q x total, and interpolates linearly inside it; a rank in the
  `+Inf` bucket answers the largest finite bound; a first bucket with a
  bound <= 0 answers that bound; q outside [0, 1] answers -Inf / +Inf.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

Sample = tuple[float, float]  # (timestamp in seconds, value)
Bucket = tuple[float, float]  # (upper bound `le`, cumulative count or rate)


def in_range(samples: Sequence[Sample], end_s: float, range_s: float) -> list[Sample]:
    """The samples a range selector `[range_s]` evaluated at `end_s` sees."""
    start_s = end_s - range_s
    return [(t, v) for t, v in samples if start_s < t <= end_s]


def extrapolated_rate(
    samples: Sequence[Sample], end_s: float, range_s: float, *, is_counter: bool = True
) -> float | None:
    """`rate(x[range_s])` at `end_s`; None where Prometheus returns no sample."""
    window = in_range(samples, end_s, range_s)
    if len(window) < 2:
        return None
    first_t, first_v = window[0]
    last_t, last_v = window[-1]
    result = last_v - first_v
    if is_counter:
        previous = first_v
        for _, value in window[1:]:
            if value < previous:
                result += previous
            previous = value
    duration_to_start = first_t - (end_s - range_s)
    duration_to_end = end_s - last_t
    sampled_interval = last_t - first_t
    average_interval = sampled_interval / (len(window) - 1)
    threshold = average_interval * 1.1
    if duration_to_start >= threshold:
        duration_to_start = average_interval / 2
    if is_counter and result > 0 and first_v >= 0:
        duration_to_zero = sampled_interval * (first_v / result)
        duration_to_start = min(duration_to_start, duration_to_zero)
    if duration_to_end >= threshold:
        duration_to_end = average_interval / 2
    factor = (sampled_interval + duration_to_start + duration_to_end) / sampled_interval
    return result * factor / range_s


def avg_over_time(samples: Sequence[Sample], end_s: float, range_s: float) -> float | None:
    window = in_range(samples, end_s, range_s)
    if not window:
        return None
    return math.fsum(v for _, v in window) / len(window)


def last_over_time(samples: Sequence[Sample], end_s: float, range_s: float) -> float | None:
    window = in_range(samples, end_s, range_s)
    return window[-1][1] if window else None


def _populated(buckets: Sequence[Bucket]) -> Sequence[Bucket] | None:
    """`_normalised` buckets with a finite bound and some observations; None
    when there is nothing to take a quantile or a share of."""
    ordered = _normalised(buckets)
    if ordered is None or len(ordered) < 2:
        return None
    total = ordered[-1][1]
    if total == 0 or math.isnan(total):
        return None
    return ordered


def _normalised(buckets: Sequence[Bucket]) -> Sequence[Bucket] | None:
    """Sorted, equal bounds merged, counts monotonic; None without a +Inf bucket."""
    if _already_normal(buckets):
        # What exporters write and what the sources build: one pass, no copy.
        return buckets
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]) or ordered[-1][0] < 0:
        return None
    merged: list[Bucket] = []
    for bound, count in ordered:
        if merged and merged[-1][0] == bound:
            merged[-1] = (bound, merged[-1][1] + count)
        else:
            merged.append((bound, count))
    running_max = -math.inf
    monotonic: list[Bucket] = []
    for bound, count in merged:
        running_max = max(running_max, count)
        monotonic.append((bound, running_max))
    return monotonic


def _already_normal(buckets: Sequence[Bucket]) -> bool:
    if not buckets or buckets[-1][0] != math.inf:
        return False
    previous_bound, previous_count = -math.inf, -math.inf
    for bound, count in buckets:
        if not (bound > previous_bound and count >= previous_count):
            return False
        previous_bound, previous_count = bound, count
    return True


def histogram_quantile(q: float, buckets: Sequence[Bucket]) -> float:
    """Prometheus' `histogram_quantile(q, ...)` over cumulative (le, count) pairs; NaN when undefined."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = _populated(buckets)
    if ordered is None:
        return math.nan
    observations = ordered[-1][1]
    rank = q * observations
    counts = [count for _, count in ordered[:-1]]
    index = bisect.bisect_left(counts, rank)  # first bucket with count >= rank
    if index == len(ordered) - 1:
        return ordered[-2][0]
    if index == 0 and ordered[0][0] <= 0:
        return ordered[0][0]
    bucket_start = 0.0
    bucket_end, count = ordered[index]
    if index > 0:
        bucket_start = ordered[index - 1][0]
        count -= ordered[index - 1][1]
        rank -= ordered[index - 1][1]
    if count == 0:
        return math.nan
    return bucket_start + (bucket_end - bucket_start) * (rank / count)


def histogram_fraction_below(threshold: float, buckets: Sequence[Bucket]) -> float:
    """Share of observations <= threshold, interpolating inside a bucket as
    `histogram_quantile` does (its inverse); NaN when undefined.

    Above the largest finite bound the share is the count up to that bound:
    the +Inf bucket says nothing about where its observations lie.
    """
    ordered = _populated(buckets)
    if ordered is None:
        return math.nan
    total = ordered[-1][1]
    below = 0.0
    lower = 0.0
    for bound, count in ordered[:-1]:
        if threshold < bound:
            if threshold <= lower:
                return below / total
            share = (threshold - lower) / (bound - lower)
            return (below + (count - below) * share) / total
        below, lower = count, bound
    return below / total
