"""Request streams: trace replay semantics, synthetic distributions, determinism."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from batchpilot.sim.scenario import Arrival, LengthDist, SyntheticPhase, load_scenario
from batchpilot.sim.workload import (
    Trace,
    TraceError,
    build_workload,
    load_trace,
    synthetic_requests,
    trace_requests,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(
    not (SHARED / "scenarios").exists(), reason="../shared not present"
)


def tiny_trace() -> Trace:
    # rows at trace seconds 0, 1, 2, 3: the mean gap is 1 s, so a wrap lands at 4
    return Trace(np.array([0.0, 1.0, 2.0, 3.0]), np.array([10, 11, 12, 13]), np.array([1, 2, 3, 4]))


@pytest.mark.parametrize(
    ("duration", "start", "scale", "expected_times", "expected_prompts"),
    [
        (4.0, 0.0, 1.0, [0, 1, 2, 3], [10, 11, 12, 13]),
        (2.0, 0.0, 2.0, [0, 0.5, 1, 1.5], [10, 11, 12, 13]),
        (3.0, 2.0, 1.0, [0, 1, 2], [12, 13, 10]),  # wraps to the first row at trace time 4
        (
            5.0,
            1.0,
            2.0,
            [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5],
            [11, 12, 13, 10, 11, 12, 13, 10, 11, 12],
        ),
    ],
)
def test_trace_replay_offset_scale_and_wrap(
    duration: float,
    start: float,
    scale: float,
    expected_times: list[float],
    expected_prompts: list[int],
) -> None:
    times, prompts, outputs = trace_requests(tiny_trace(), duration, start, scale)
    assert times.tolist() == expected_times
    assert prompts.tolist() == expected_prompts
    assert (outputs == prompts - 9).all()


def test_start_past_the_trace_is_an_error() -> None:
    with pytest.raises(TraceError, match="past the trace"):
        trace_requests(tiny_trace(), 1.0, 3.5, 1.0)


def test_trace_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("TIME,A,B\n1,2,3\n")
    with pytest.raises(TraceError, match="header must be"):
        load_trace(bad)
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,1,1\n")
    with pytest.raises(TraceError, match="at least 2 rows"):
        load_trace(bad)
    bad.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:05,1,1\n2023-11-16 18:00:00,1,1\n"
    )
    with pytest.raises(TraceError, match="must not decrease"):
        load_trace(bad)


def phase(
    process: str = "gamma", rate: float = 10.0, cv: float = 1.0, duration: float = 3000.0
) -> SyntheticPhase:
    return SyntheticPhase(
        duration_s=duration,
        arrival=Arrival(process, rate, cv),
        prompt_tokens=LengthDist("lognormal", 1000, 2700, 8000),
        output_tokens=LengthDist("lognormal", 50, 120, 100),
    )


@pytest.mark.parametrize(("rate", "cv"), [(10.0, 1.0), (4.0, 2.0), (20.0, 0.5)])
def test_synthetic_arrivals_have_the_asked_rate_and_cv(rate: float, cv: float) -> None:
    times, _, _ = synthetic_requests(phase(rate=rate, cv=cv), np.random.default_rng(9))
    gaps = np.diff(times)
    assert len(times) / 3000.0 == pytest.approx(rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)
    assert times.min() >= 0 and times.max() < 3000.0


def test_lognormal_lengths_hit_p50_p90_and_respect_max() -> None:
    _, prompts, outputs = synthetic_requests(phase(), np.random.default_rng(2))
    assert np.percentile(prompts, 50) == pytest.approx(1000, rel=0.04)
    assert np.percentile(prompts, 90) == pytest.approx(2700, rel=0.05)
    assert prompts.max() <= 8000 and prompts.min() >= 1
    assert outputs.max() == 100  # p90 120 > max 100: clipped


@needs_shared
@pytest.mark.parametrize("name", ["flash-crowd", "summaries-to-reports"])
def test_workload_is_deterministic_per_seed(name: str) -> None:
    scenario = load_scenario(SHARED / "scenarios" / f"{name}.yaml")
    first = build_workload(scenario)
    again = build_workload(scenario)
    for field in ("arrival_s", "prompt_tokens", "output_tokens", "phase"):
        assert np.array_equal(getattr(first, field), getattr(again, field))
    other = build_workload(dataclasses.replace(scenario, seed=scenario.seed + 1))
    assert not np.array_equal(first.arrival_s, other.arrival_s)


@needs_shared
def test_phases_play_back_to_back() -> None:
    scenario = load_scenario(SHARED / "scenarios" / "conv-to-code-shift.yaml")
    workload = build_workload(scenario)
    assert workload.duration_s == 2400.0
    assert np.all(np.diff(workload.arrival_s) >= 0)
    bounds = np.cumsum([0.0] + [p.duration_s for p in scenario.workload])
    for index in range(3):
        mine = workload.arrival_s[workload.phase == index]
        assert mine.min() >= bounds[index] and mine.max() < bounds[index + 1]
    # the code phase is prefill-heavy and short-output, the conv phases are not
    code = workload.phase == 1
    assert np.median(workload.output_tokens[code]) < 0.5 * np.median(workload.output_tokens[~code])
