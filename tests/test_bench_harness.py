"""The benchmark harness and its baselines on a small, fast scenario."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from stack.workloads import CALIBRATION

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.bench_adapter import ControllerContext
from batchpilot.sim import baselines
from batchpilot.sim.bench import Simulation, run_controller
from batchpilot.sim.controllers import (
    ControllerError,
    build_controller,
    register_online,
)
from batchpilot.sim.metrics import ReplicaGauges, ReplicaMetrics
from batchpilot.sim.scenario import Scenario, load_scenario
from batchpilot.sim.workload import build_workload

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
pytestmark = pytest.mark.skipif(not CALIBRATION.exists(), reason="../shared data not present")


def small_scenario_data(runtime_tunable: bool = False, replicas: int = 2) -> dict[str, Any]:
    """Two minutes: a steady phase, then an overload burst the grid can react to."""
    lengths = {
        "prompt_tokens": {"dist": "lognormal", "p50": 1500, "p90": 4000, "max": 8000},
        "output_tokens": {"dist": "lognormal", "p50": 60, "p90": 200, "max": 400},
    }
    return {
        "name": "small",
        "seed": 11,
        "engine": {
            "calibration": str(CALIBRATION),
            "model": "meta-llama/Meta-Llama-3.1-8B",
            "system": "h100_sxm",
            "kv_cache_tokens": 200_000,
            "max_num_seqs": 256,
            "max_num_batched_tokens": 8192,
            "runtime_tunable": runtime_tunable,
        },
        "replicas": replicas,
        "slo": {"ttft_ms": 1500, "tpot_ms": 50},
        "control_interval_s": 6,
        "workload": [
            {
                "duration_s": 60,
                "synthetic": {"arrival": {"process": "poisson", "rate_rps": 8}, **lengths},
            },
            {
                "duration_s": 60,
                "synthetic": {"arrival": {"process": "gamma", "rate_rps": 40, "cv": 2}, **lengths},
            },
        ],
    }


def write_scenario(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return load_scenario(write_scenario(tmp_path_factory.mktemp("s"), small_scenario_data()))


def strip_wall(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "wall_s"}


def test_every_request_ends_and_goes_round_robin(small: Scenario) -> None:
    workload = build_workload(small)
    sim = Simulation(small, workload, knobs=Knobs(max_concurrency=8, queue_deadline_ms=1500))
    sim.run_to_completion()
    assert len(sim.requests) == len(workload)
    assert {r.status for r in sim.requests} <= {"finished", "shed"}
    per_replica = [sum(1 for i in range(len(workload)) if i % 2 == k) for k in range(2)]
    seen = [
        r.metrics.gate_admitted_total + sum(r.metrics.gate_shed_total.values())
        for r in sim.replicas
    ]
    assert seen == per_replica


def test_static_best_is_at_least_static_default(small: Scenario) -> None:
    workload = build_workload(small)
    default = run_controller(small, workload, "static-default")
    best = run_controller(small, workload, "static-best")
    assert best["good"] >= default["good"]
    assert best["good"] > 0
    assert default["config_changes"] == best["config_changes"] == 0


def test_hindsight_searches_are_identical_in_parallel(small: Scenario) -> None:
    workload = build_workload(small)
    serial = [run_controller(small, workload, name) for name in ("static-best", "oracle")]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parallel = [
            run_controller(small, workload, name, executor=pool)
            for name in ("static-best", "oracle")
        ]
    assert [strip_wall(r) for r in serial] == [strip_wall(r) for r in parallel]


def test_oracle_switches_at_window_starts_only(small: Scenario) -> None:
    workload = build_workload(small)
    result = run_controller(small, workload, "oracle")
    window = small.control_interval_s * baselines.ORACLE_WINDOW_INTERVALS
    entries = result["timeline"]
    for previous, entry in itertools.pairwise(entries):
        if entry["t_s"] % window:
            assert entry["knobs"] == previous["knobs"]
    assert result["config_changes"] <= 2 * (math.ceil(small.duration_s / window) - 1)


@pytest.mark.parametrize(
    ("tunable", "max_num_seqs", "caps", "budgets"),
    [
        (False, 512, {16, 32, 64, 128, 256, 512}, {None}),
        (True, 512, {16, 32, 64, 128, 256, 512}, {2048, 8192, 16384}),
        (False, 100, {12, 16, 25, 32, 50, 64, 100}, {None}),
        # A 16-slot engine (llama.cpp) still gets a grid to search.
        (False, 16, {2, 4, 8, 16}, {None}),
    ],
)
def test_knob_grid(
    tmp_path: Path, tunable: bool, max_num_seqs: int, caps: set[int], budgets: set[int | None]
) -> None:
    data = small_scenario_data(runtime_tunable=tunable)
    data["engine"]["max_num_seqs"] = max_num_seqs
    grid = baselines.knob_grid(load_scenario(write_scenario(tmp_path, data)))
    assert {k.max_concurrency for k in grid} == caps
    assert {k.queue_deadline_ms for k in grid} == {None, 1500}
    assert {k.max_num_batched_tokens for k in grid} == budgets
    assert len(set(grid)) == len(grid) == len(caps) * 2 * len(budgets)


def context(names: tuple[str, ...] = ("replica-0",)) -> ControllerContext:
    return ControllerContext(
        slo_ttft_ms=1000, slo_tpot_ms=50, control_interval_s=30, replica_names=names,
        max_num_seqs=512, max_num_batched_tokens=8192, runtime_tunable=False,
    )  # fmt: skip


def snapshot(metrics: ReplicaMetrics) -> dict[str, float]:
    gauges = ReplicaGauges(0, 0, 0.0, 0, 0, 0, Knobs(), 1)
    return metrics.snapshot(gauges)


@pytest.mark.parametrize(
    ("ttft_s", "itl_s", "expected_cap"),
    [
        (0.2, 0.02, baselines.AIMD_START_CAP + baselines.AIMD_INCREASE),  # SLO holds: add
        (3.0, 0.02, math.floor(baselines.AIMD_START_CAP * baselines.AIMD_DECREASE)),  # TTFT missed
        (0.2, 0.08, math.floor(baselines.AIMD_START_CAP * baselines.AIMD_DECREASE)),  # TPOT missed
        (None, None, baselines.AIMD_START_CAP),  # nothing observed: hold
    ],
)
def test_aimd_reacts_to_the_slo_signal(
    ttft_s: float | None, itl_s: float | None, expected_cap: int
) -> None:
    controller = build_controller("aimd", context())
    metrics = ReplicaMetrics(block_size=16, num_gpu_blocks=100)
    metrics.ttft.observe(5.0, 100)  # old history: must not count, only the interval's delta does
    first = controller.decide(0.0, {"replica-0": snapshot(metrics)})
    assert first["replica-0"].max_concurrency == baselines.AIMD_START_CAP
    if ttft_s is not None and itl_s is not None:
        metrics.ttft.observe(ttft_s, 50)
        metrics.itl.observe(itl_s, 500)
    second = controller.decide(30.0, {"replica-0": snapshot(metrics)})
    assert second["replica-0"].max_concurrency == expected_cap


class RecordingController:
    """Test double: records what the harness shows it and halves the cap once."""

    calls: ClassVar[list[tuple[float, tuple[str, ...]]]] = []

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx

    def decide(
        self, now_s: float, snapshots: Mapping[str, Mapping[str, float]]
    ) -> Mapping[str, Knobs]:
        RecordingController.calls.append((now_s, tuple(snapshots)))
        assert all("vllm:num_requests_running" in s for s in snapshots.values())
        if now_s == 0.0:
            return {name: Knobs(max_concurrency=64) for name in self.ctx.replica_names}
        if now_s == 60.0:
            return {"replica-1": Knobs(max_concurrency=32)}
        return {}


def make_recording(ctx: ControllerContext) -> RecordingController:
    return RecordingController(ctx)


def test_online_controller_interface(small: Scenario) -> None:
    register_online("recording", f"{__name__}:make_recording")
    RecordingController.calls.clear()
    result = run_controller(small, build_workload(small), "recording")
    times = [t for t, _ in RecordingController.calls]
    assert times[:3] == [0.0, 6.0, 12.0]
    assert all(names == ("replica-0", "replica-1") for _, names in RecordingController.calls)
    assert result["config_changes"] == 1  # the t = 0 setting is the startup config
    timeline = {entry["t_s"]: entry for entry in result["timeline"]}
    assert timeline[54.0]["knobs"]["replica-1"]["max_concurrency"] == 64
    assert timeline[60.0]["knobs"]["replica-1"]["max_concurrency"] == 32
    assert timeline[60.0]["knobs"]["replica-0"]["max_concurrency"] == 64
    assert sum(e["arrived"] for e in result["timeline"]) == len(build_workload(small))


def test_unknown_and_unavailable_controllers() -> None:
    with pytest.raises(ControllerError, match="unknown controller 'nope'"):
        build_controller("nope", context())
    register_online("broken", "batchpilot.sim.no_such_module:make")
    with pytest.raises(ControllerError, match="'broken' is not available: cannot import"):
        build_controller("broken", context())
    with pytest.raises(ControllerError, match="module:attribute"):
        register_online("bad", "no-colon")


def test_results_are_json_serialisable(small: Scenario) -> None:
    result = run_controller(small, build_workload(small), "aimd")
    assert json.loads(json.dumps(result)) == result
