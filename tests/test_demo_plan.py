"""`batchpilot demo`: how a scenario is fitted to the run, the wall-clock policy, scraping,
bad input, and (slow) the whole demo against its promise: adaptive beats static after the shift."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchpilot.cli.demo import (
    BUILTIN_CLASSES_SCENARIO_NAME,
    MIN_INTERVAL_S,
    PLOT_FILE,
    SUMMARY_FILE,
    TERMINAL_FILE,
    _builtin_without_shared,
    builtin_scenario_path,
    demo_policy,
    load_demo_scenario,
    plan_demo,
    snapshot_from_text,
)
from batchpilot.cli.main import app
from batchpilot.contract.knobs import Knobs
from batchpilot.controller.signals import Signal
from batchpilot.sim.calibration import BUILTIN_STEP_COST
from batchpilot.sim.engine import Replica

ROOT = Path(__file__).resolve().parents[1]
SHARED_SHIFT = ROOT.parent / "shared" / "scenarios" / "conv-to-code-shift.yaml"


@pytest.fixture(scope="module")
def builtin():
    return load_demo_scenario(None)


@pytest.mark.parametrize(
    ("time_scale", "duration_s", "interval_wall_s", "windows"),
    [
        (0.25, 90.0, 5.0, 18),  # the default run: the scenario as written
        # Phases twice as long in scenario time: the interval follows, so each
        # phase still gets as many control intervals as the scenario intends.
        (0.5, 90.0, 5.0, 18),
        (0.25, 180.0, 10.0, 18),
        (1.0, 20.0, MIN_INTERVAL_S, 10),  # 1.25 s wall would be too short a window: clamped
    ],
)
def test_plan_scales_phases_to_the_run(
    builtin, time_scale, duration_s, interval_wall_s, windows
) -> None:
    plan = plan_demo(builtin, time_scale=time_scale, duration_s=duration_s)
    stretch = duration_s * time_scale / builtin.duration_s
    assert plan.scenario.duration_s == pytest.approx(duration_s * time_scale)
    for original, scaled in zip(builtin.workload, plan.scenario.workload, strict=True):
        assert scaled.duration_s == pytest.approx(original.duration_s * stretch)
    assert plan.interval_wall_s == pytest.approx(interval_wall_s)
    assert plan.interval_s == pytest.approx(interval_wall_s * time_scale)
    assert plan.windows == windows
    assert plan.shift_s == pytest.approx(builtin.workload[0].duration_s * stretch)
    assert plan.workload.arrival_s.max() < plan.scenario.duration_s
    assert set(plan.workload.phase.tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("time_scale", "duration_s", "field"),
    [
        (0.0, 90.0, "--time-scale"),
        (-1.0, 90.0, "--time-scale"),
        (math.nan, 90.0, "--time-scale"),
        (0.25, 5.0, "--duration"),
    ],
)
def test_plan_rejects_bad_options_naming_them(builtin, time_scale, duration_s, field) -> None:
    from batchpilot.cli.demo import DemoError

    with pytest.raises(DemoError, match=f"^{field}:"):
        plan_demo(builtin, time_scale=time_scale, duration_s=duration_s)


@pytest.mark.parametrize("time_scale", [0.25, 0.5, 2.0])
def test_policy_is_in_wall_clock_units(builtin, time_scale) -> None:
    plan = plan_demo(builtin, time_scale=time_scale, duration_s=90.0)
    policy = demo_policy(plan)
    assert policy.slo.ttft_ms == round(builtin.slo.ttft_ms / time_scale)
    assert policy.slo.tpot_ms == round(builtin.slo.tpot_ms / time_scale)
    assert policy.behavior.interval_s == pytest.approx(plan.interval_wall_s)
    assert policy.mode.value == "Auto"
    # The engine's histograms are in scenario seconds: 1 scenario s = 1/time_scale wall s.
    for signal in (Signal.TTFT, Signal.ITL, Signal.TPOT, Signal.E2E):
        assert policy.metrics.overrides[signal.value].scale == pytest.approx(1.0 / time_scale)


def test_scraped_text_gives_the_replicas_own_snapshot(builtin) -> None:
    replica = Replica(
        builtin.engine.config(), Knobs(max_concurrency=64, queue_deadline_ms=900), name="r"
    )
    for i in range(40):
        replica.submit(i * 0.05, prompt_tokens=300 + 37 * i, max_output_tokens=20 + i)
    replica.advance(3.0)
    expected = replica.snapshot(3.0)
    assert snapshot_from_text(replica.render_text(3.0)) == pytest.approx(expected)
    assert expected['batchpilot_gate_knob{knob="max_concurrency"}'] == 64.0


def test_builtin_scenario_runs_without_the_shared_calibration(builtin) -> None:
    fallback = _builtin_without_shared(builtin_scenario_path())
    for name, value in BUILTIN_STEP_COST.items():
        assert getattr(fallback.engine.cost, name) == pytest.approx(value, rel=1e-4)
    assert fallback.workload == builtin.workload


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--time-scale", "0"], "--time-scale: must be a positive number"),
        (["--duration", "3"], "--duration: must be at least"),
        (["--scenario", "no-such-file.yaml"], "cannot read scenario file"),
    ],
)
def test_bad_input_exits_2_with_the_option_named(args, message) -> None:
    result = CliRunner().invoke(app, ["demo", "--headless", *args])
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.slow
def test_demo_adaptive_beats_static_after_the_shift(tmp_path: Path) -> None:
    """The README's main job: `batchpilot demo --headless --duration 90` in about two minutes."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchpilot.cli.main",
            "demo",
            "--headless",
            "--out",
            str(tmp_path),
            "--duration",
            "90",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "150"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    adaptive, static = summary["fleets"]["adaptive"], summary["fleets"]["static"]
    assert adaptive["after_shift"]["arrived"] == static["after_shift"]["arrived"] > 100
    assert adaptive["after_shift"]["goodput_rps"] > static["after_shift"]["goodput_rps"]
    assert summary["decisions"], "the controller never ran"
    assert not summary["actuation_errors"]
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "adaptive" in (tmp_path / TERMINAL_FILE).read_text()


@pytest.mark.skipif(not SHARED_SHIFT.is_file(), reason="../shared/scenarios is absent")
def test_a_shared_scenario_plans_with_a_usable_interval() -> None:
    plan = plan_demo(load_demo_scenario(SHARED_SHIFT), time_scale=0.25, duration_s=120.0)
    # 2,400 scenario s squeezed into 30: the 30 s interval would be 1.5 wall s.
    assert plan.interval_wall_s == MIN_INTERVAL_S
    assert len(plan.phase_starts_s) == 3


@pytest.fixture(scope="module")
def classes_scenario():
    return load_demo_scenario(builtin_scenario_path(BUILTIN_CLASSES_SCENARIO_NAME))


def test_classes_plan_scales_every_class_and_marks_the_flood(classes_scenario) -> None:
    plan = plan_demo(classes_scenario, time_scale=0.5, duration_s=90.0)
    stretch = 90.0 * 0.5 / classes_scenario.duration_s
    for original, scaled in zip(classes_scenario.classes, plan.scenario.classes, strict=True):
        assert scaled.duration_s == pytest.approx(original.duration_s * stretch)
    # The batch class's three phases (steady, flood, steady) are the timeline's.
    assert len(plan.phases) == 3
    assert plan.phase_starts_s[1] == pytest.approx(5.0 * stretch)
    names = {plan.workload.class_names[i] for i in set(plan.workload.class_of().tolist())}
    assert names == {"interactive", "batch"}


def test_classes_policy_states_each_class_objective_in_wall_time(classes_scenario) -> None:
    plan = plan_demo(classes_scenario, time_scale=0.25, duration_s=90.0)
    policy = demo_policy(plan)
    (interactive,) = [c for c in policy.classes if c.name == "interactive"]
    assert interactive.priority == 1
    # 1,000 scenario ms at a quarter of real speed is 4,000 wall ms.
    assert (interactive.slo.ttft_ms, interactive.slo.tpot_ms) == (4000, 320)
    (batch,) = [c for c in policy.classes if c.name == "batch"]
    assert batch.slo is None  # the policy's own slo: the default class's, in wall time
    assert policy.slo.ttft_ms == 40_000


def test_classes_and_scenario_together_are_refused() -> None:
    result = CliRunner().invoke(app, ["demo", "--classes", "--scenario", "x.yaml"])
    assert result.exit_code == 2
    assert "--classes" in result.output


@pytest.mark.slow
def test_demo_classes_keeps_interactive_within_its_slo_through_a_batch_flood(
    tmp_path: Path,
) -> None:
    """docs/slo-classes.md's demo: `batchpilot demo --classes --headless`."""
    completed = subprocess.run(
        [sys.executable, "-m", "batchpilot.cli.main", "demo", "--classes", "--headless",
         "--out", str(tmp_path), "--duration", "90"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "150"},
        check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    adaptive = summary["fleets"]["adaptive"]["classes"]
    static = summary["fleets"]["static"]["classes"]
    assert adaptive["interactive"]["arrived"] == static["interactive"]["arrived"] > 100
    # FCFS puts chat behind the flood; the class-aware gate does not.
    assert adaptive["interactive"]["slo_attainment"] > static["interactive"]["slo_attainment"] + 0.1
    assert adaptive["interactive"]["slo_attainment"] >= 0.9
    assert not summary["actuation_errors"]
    assert "each SLO class" in (tmp_path / TERMINAL_FILE).read_text()
