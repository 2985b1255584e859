"""Request streams for the benchmark: trace replay and seeded synthetic phases.

A scenario's phases play back to back; the result is one time-sorted stream
of (arrival, prompt tokens, output tokens), dealt round-robin to replicas.

Trace replay (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``): a row's trace
time is its timestamp minus the first row's. ``start_s`` is an offset in
*trace* seconds: replay starts at the first row at or after it. Scenario time
is trace time divided by ``rate_scale`` (3.0 plays the trace three times as
fast). When the trace runs out it wraps to its first row, one mean
inter-arrival gap after its last row, as many times as the phase needs.

Synthetic phases draw inter-arrival gaps from a gamma distribution with mean
1/rate and the given coefficient of variation (cv 1 is a Poisson process) and
lengths from a lognormal fitted to the p50 and p90, rounded and clipped to
[1, max]. Each phase has its own generator seeded by (scenario seed, phase
index), so editing one phase never changes another's requests.

SLO classes (sim/scenario.py): each class's phases play back to back from
t = 0, beside the other classes'; the streams merge in time order (at equal
times, in the scenario's class order: the default class first). A declared
class's synthetic phase i draws from its own generator seeded by (scenario
seed, i, CRC-32 of the class name), the default class's by (seed, i) as
without classes, so editing (or adding, removing, reordering) one class never
changes another's requests. `Workload.service_class` holds each request's
class as an index into `Workload.class_names`.
"""

from __future__ import annotations

import csv
import functools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from batchpilot.sim.scenario import (
        LengthDist,
        Scenario,
        ScenarioClass,
        SyntheticPhase,
        TracePhase,
    )

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# Standard normal quantile at 0.9: ln(p90) = mu + Z90 * sigma.
Z90 = 1.2815515655446004


class TraceError(ValueError):
    """A trace file cannot be replayed; the message says why."""


@dataclass(frozen=True)
class Trace:
    offsets_s: np.ndarray  # seconds since the first row, non-decreasing
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    @property
    def span_s(self) -> float:
        return float(self.offsets_s[-1])

    @property
    def period_s(self) -> float:
        """Trace span plus one mean gap: where the wrapped replay's first row lands."""
        return self.span_s + self.span_s / (len(self.offsets_s) - 1)


@dataclass(frozen=True)
class Workload:
    """Every request of a scenario, sorted by arrival time."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    phase: np.ndarray  # index of the phase within its class's workload
    duration_s: float
    # Each request's SLO class, an index into class_names (None: all in the first).
    service_class: np.ndarray | None = None
    class_names: tuple[str, ...] = ("default",)

    def __len__(self) -> int:
        return len(self.arrival_s)

    def class_of(self) -> np.ndarray:
        """Each request's class index (zeros when the workload has one class)."""
        if self.service_class is None:
            return np.zeros(len(self.arrival_s), dtype=np.int16)
        return self.service_class


def load_trace(path: Path) -> Trace:
    try:
        mtime_ns = path.stat().st_mtime_ns
    except OSError as err:
        raise TraceError(f"cannot read trace {path} ({err.strerror})") from err
    return _load_trace_cached(str(path.resolve()), mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_trace_cached(path: str, mtime_ns: int) -> Trace:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:3]) != TRACE_COLUMNS:
            raise TraceError(f"{path}: header must be {','.join(TRACE_COLUMNS)}, got {header}")
        stamps, prompts, outputs = [], [], []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                stamps.append(row[0])
                prompts.append(int(row[1]))
                outputs.append(int(row[2]))
            except (IndexError, ValueError) as err:
                raise TraceError(f"{path}:{line}: bad row {row} ({err})") from err
    if len(stamps) < 2:
        raise TraceError(f"{path}: needs at least 2 rows, has {len(stamps)}")
    try:
        times = np.array(stamps, dtype="datetime64[ns]")
    except ValueError as err:
        raise TraceError(f"{path}: TIMESTAMP is not an ISO date-time ({err})") from err
    offsets = (times - times[0]).astype(np.int64) / 1e9
    if np.any(np.diff(offsets) < 0):
        raise TraceError(f"{path}: TIMESTAMP must not decrease")
    prompt = np.maximum(np.array(prompts, dtype=np.int64), 1)
    output = np.maximum(np.array(outputs, dtype=np.int64), 1)
    return Trace(offsets, prompt, output)


def trace_requests(
    trace: Trace, duration_s: float, start_s: float, rate_scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrival times (scenario seconds from the phase start) and lengths of a trace phase."""
    first = int(np.searchsorted(trace.offsets_s, start_s, side="left"))
    if first == len(trace.offsets_s):
        raise TraceError(f"start_s {start_s} is past the trace's last row at {trace.span_s:.1f} s")
    horizon = start_s + duration_s * rate_scale  # in trace seconds
    parts_t = [trace.offsets_s[first:]]
    parts_i = [np.arange(first, len(trace.offsets_s))]
    wrap = 1
    while parts_t[-1][-1] < horizon:
        parts_t.append(trace.offsets_s + wrap * trace.period_s)
        parts_i.append(np.arange(len(trace.offsets_s)))
        wrap += 1
    offsets = np.concatenate(parts_t)
    rows = np.concatenate(parts_i)
    keep = offsets < horizon
    arrivals = (offsets[keep] - start_s) / rate_scale
    rows = rows[keep]
    return arrivals, trace.prompt_tokens[rows], trace.output_tokens[rows]


def synthetic_requests(
    phase: SyntheticPhase, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrival = phase.arrival
    shape = 1.0 / (arrival.cv**2)
    scale = 1.0 / (arrival.rate_rps * shape)
    expected = arrival.rate_rps * phase.duration_s
    gaps = rng.gamma(shape, scale, size=int(expected * 1.2 + 10 * math.sqrt(expected) + 16))
    times = np.cumsum(gaps)
    while times[-1] < phase.duration_s:
        more = np.cumsum(rng.gamma(shape, scale, size=len(gaps))) + times[-1]
        times = np.concatenate([times, more])
    times = times[times < phase.duration_s]
    prompt = _lognormal_lengths(phase.prompt_tokens, rng, len(times))
    output = _lognormal_lengths(phase.output_tokens, rng, len(times))
    return times, prompt, output


def _lognormal_lengths(dist: LengthDist, rng: np.random.Generator, size: int) -> np.ndarray:
    mu = math.log(dist.p50)
    sigma = (math.log(dist.p90) - mu) / Z90
    values = np.rint(rng.lognormal(mu, sigma, size=size))
    return np.clip(values, 1, dist.max).astype(np.int64)


def build_workload(scenario: Scenario) -> Workload:
    if not scenario.classes:
        return phases_workload(scenario.workload, scenario.seed)
    return classes_workload(scenario.traffic_classes, scenario.seed)


def classes_workload(classes: Sequence[ScenarioClass], seed: int) -> Workload:
    """Every class's phases from t = 0, merged in time order (ties: class order)."""
    parts = [
        phases_workload(c.workload, seed, salt=None if c.name == "default" else _salt(c.name))
        for c in classes
    ]
    arrival = np.concatenate([p.arrival_s for p in parts])
    # Stable: at equal times, the earlier class and then the earlier request first.
    order = np.argsort(arrival, kind="stable")
    labels = np.concatenate(
        [np.full(len(p), index, dtype=np.int16) for index, p in enumerate(parts)]
    )
    return Workload(
        arrival_s=arrival[order],
        prompt_tokens=np.concatenate([p.prompt_tokens for p in parts])[order],
        output_tokens=np.concatenate([p.output_tokens for p in parts])[order],
        phase=np.concatenate([p.phase for p in parts])[order],
        duration_s=max(p.duration_s for p in parts),
        service_class=labels[order],
        class_names=tuple(c.name for c in classes),
    )


def _salt(name: str) -> int:
    # CRC-32, not hash(): Python salts str hashes per process.
    return zlib.crc32(name.encode())


def phases_workload(
    workload_phases: Sequence[TracePhase | SyntheticPhase], seed: int, *, salt: int | None = None
) -> Workload:
    """The phases' requests back to back; synthetic phase i draws from rng (seed, i[, salt])."""
    from batchpilot.sim.scenario import TracePhase  # runtime import: scenario imports us

    arrivals, prompts, outputs, phases = [], [], [], []
    offset = 0.0
    for index, phase in enumerate(workload_phases):
        if isinstance(phase, TracePhase):
            times, prompt, output = _trace_phase(phase)
        else:
            rng = np.random.default_rng([seed, index] if salt is None else [seed, index, salt])
            times, prompt, output = synthetic_requests(phase, rng)
        arrivals.append(times + offset)
        prompts.append(prompt)
        outputs.append(output)
        phases.append(np.full(len(times), index, dtype=np.int16))
        offset += phase.duration_s
    return Workload(
        arrival_s=np.concatenate(arrivals),
        prompt_tokens=np.concatenate(prompts),
        output_tokens=np.concatenate(outputs),
        phase=np.concatenate(phases),
        duration_s=offset,
    )


def _trace_phase(phase: TracePhase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return trace_requests(
        load_trace(phase.trace), phase.duration_s, phase.start_s, phase.rate_scale
    )
