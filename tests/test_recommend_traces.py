"""`batchpilot recommend`: the tie rule, per-phase recommendations on the shared traces, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchpilot.cli.demo import (
    BUILTIN_CLASSES_SCENARIO_NAME,
    builtin_scenario_path,
    load_demo_scenario,
)
from batchpilot.cli.main import app
from batchpilot.cli.recommend import Outcome, pick_best, recommend_for, scenario_from_trace
from batchpilot.contract.knobs import Knobs

SHARED = Path(__file__).resolve().parents[2] / "shared"
CALIBRATION = SHARED / "data" / "calibration" / "llama3.1-8b_vllm_step_latency.csv"
TRACES = SHARED / "data" / "traces"
needs_shared = pytest.mark.skipif(
    not CALIBRATION.is_file(), reason="../shared/data is absent (traces and calibration live there)"
)


def outcome(cap: int, good: int, ttft_p99_ms: float | None, deadline: int | None = None) -> Outcome:
    return Outcome(
        Knobs(max_concurrency=cap, queue_deadline_ms=deadline),
        1000,
        good,
        60.0,
        ttft_p99_ms,
        20.0,
        0,
    )


@pytest.mark.parametrize(
    ("outcomes", "chosen_cap"),
    [
        # Clear winner.
        ([outcome(16, 500, 100), outcome(64, 900, 300), outcome(256, 700, 900)], 64),
        # Near-tie (within 0.5%): the lower p99 TTFT wins, even with a larger cap.
        ([outcome(64, 998, 1800), outcome(128, 1000, 200), outcome(256, 1000, 200)], 128),
        # Exact tie in everything: the first in grid order (the smaller cap).
        ([outcome(32, 1000, 200), outcome(64, 1000, 200)], 32),
        # Outside the tolerance, latency does not matter.
        ([outcome(16, 900, 50), outcome(32, 1000, 1900)], 32),
        # No first token at all counts as the worst latency.
        ([outcome(16, 0, None), outcome(32, 0, 5000)], 32),
    ],
)
def test_pick_best(outcomes, chosen_cap) -> None:
    assert pick_best(outcomes).knobs.max_concurrency == chosen_cap


def trace_scenario(
    name: str, rate_scale: float, start_s: float, duration_s: float, phase_s: float | None = None
):
    return scenario_from_trace(
        TRACES / f"azure_llm_{name}_2023.csv",
        calibration=CALIBRATION,
        model="meta-llama/Meta-Llama-3.1-8B",
        system="h100_sxm",
        slo_ttft_ms=2000,
        slo_tpot_ms=50,
        rate_scale=rate_scale,
        start_s=start_s,
        duration_s=duration_s,
        phase_s=phase_s,
        kv_cache_tokens=400_000,
        max_num_seqs=512,
        max_num_batched_tokens=8192,
        slowdown=1.0,
        replicas=1,
    )


@needs_shared
def test_long_prompt_code_trace_gets_a_lower_batch_cap_than_conversation() -> None:
    # The rates of ../shared/scenarios/conv-to-code-shift.yaml, 120 s of each trace.
    conv = recommend_for(trace_scenario("conv", 3.0, 0.0, 120.0))
    code = recommend_for(trace_scenario("code", 5.0, 600.0, 120.0))
    conv_cap = conv.phases[0].best.knobs.max_concurrency
    code_cap = code.phases[0].best.knobs.max_concurrency
    assert code.phases[0].prompt_p50 > conv.phases[0].prompt_p50
    assert code_cap < conv_cap, (code_cap, conv_cap)
    # The recommendation is the best of the grid for its phase by construction;
    # check that it is not a tie everyone shares: the engine default does worse.
    default = next(c for c in code.phases[0].candidates if c.knobs == Knobs(max_concurrency=256))
    assert code.phases[0].best.good > default.good


@needs_shared
def test_phases_of_a_trace_and_the_overall_static_setting() -> None:
    result = recommend_for(trace_scenario("code", 5.0, 600.0, 90.0, phase_s=30.0))
    assert [p.start_s for p in result.phases] == [0.0, 30.0, 60.0]
    # The phases split the same requests the whole-workload runs replay.
    assert sum(p.arrived for p in result.phases) == result.overall.arrived
    for phase in result.phases:
        # Per phase, the recommendation is at least as good as the single static setting.
        assert phase.best.good >= phase.static_best.good
        assert phase.static_best.knobs == result.overall.knobs
    best = max(c.good for c in result.overall_candidates)
    assert result.overall.good >= best - max(1, 0.005 * best)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such.yaml"], "cannot read scenario file"),
        (["trace.txt"], "neither a scenario (.yaml) nor a trace (.csv)"),
        (["trace.csv"], "--calibration: a trace needs"),
    ],
)
def test_bad_input_exits_2_naming_the_fix(tmp_path: Path, args, message) -> None:
    (tmp_path / "trace.txt").write_text("x")
    (tmp_path / "trace.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    result = CliRunner().invoke(app, ["recommend", *[str(tmp_path / a) for a in args]])
    assert result.exit_code == 2
    assert message in result.output


@needs_shared
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rate-scale", "0"], "--rate-scale: must be a positive number"),
        (["--kv-cache-tokens", "3"], "--kv-cache-tokens: must be >= 16"),
        (["--model", "no-such-model"], "--model:"),
        (["--start-s", "999999"], "--start-s: must be below the trace's span"),
    ],
)
def test_bad_trace_options_are_named(options, message) -> None:
    result = CliRunner().invoke(
        app,
        [
            "recommend",
            str(TRACES / "azure_llm_code_2023.csv"),
            "--calibration",
            str(CALIBRATION),
            *options,
        ],
    )
    assert result.exit_code == 2
    assert message in result.output


@needs_shared
def test_command_prints_the_table_and_plots(tmp_path: Path) -> None:
    plot = tmp_path / "rec.png"
    result = CliRunner().invoke(
        app,
        [
            *(
                "recommend",
                str(TRACES / "azure_llm_conv_2023.csv"),
                "--calibration",
                str(CALIBRATION),
            ),
            *("--rate-scale", "3", "--duration-s", "60", "--phase-s", "30", "--plot", str(plot)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "best single static setting" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_class_scenario_gets_one_setting_with_a_deadline_per_class() -> None:
    scenario = load_demo_scenario(builtin_scenario_path(BUILTIN_CLASSES_SCENARIO_NAME))
    result = recommend_for(scenario)
    assert result.phases == ()  # classes overlap in time: no phase is the whole traffic
    best = result.overall
    assert best.classes is not None and set(best.classes) == {"interactive", "batch"}
    # Chosen as static-best chooses on classes: the top class first, then good requests.
    assert best.class_rank == max(c.class_rank for c in result.overall_candidates)
    assert best.classes["interactive"]["slo_attainment"] >= 0.99
    assert {c.name for c in best.knobs.classes} == {"interactive", "batch"}
    # Each request is judged against its own class's objectives.
    assert best.good == sum(c["good"] for c in best.classes.values())
