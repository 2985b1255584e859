"""`oracle-full`: a hindsight search over the adaptive controller's whole action space."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from test_bench_harness import CALIBRATION, small_scenario_data, strip_wall, write_scenario

from batchpilot.sim import baselines
from batchpilot.sim.bench import bound_violations, run_controller
from batchpilot.sim.oracle_full import action_space
from batchpilot.sim.scenario import Scenario, load_scenario
from batchpilot.sim.workload import build_workload

pytestmark = pytest.mark.skipif(not CALIBRATION.exists(), reason="../shared data not present")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return load_scenario(write_scenario(tmp_path_factory.mktemp("s"), small_scenario_data()))


def test_oracle_full_bounds_the_grid_oracle_static_best_and_adaptive(small: Scenario) -> None:
    workload = build_workload(small)
    good = {
        name: run_controller(small, workload, name)["good"]
        for name in ("static-best", "oracle", "adaptive", "oracle-full")
    }
    assert good["oracle-full"] >= max(good["oracle"], good["static-best"], good["adaptive"]), good
    # It steers more than the grid can: some window runs a setting outside the grid.
    result = run_controller(small, workload, "oracle-full")
    assert result["good"] == good["oracle-full"]
    grid = [knobs.to_mapping() for knobs in baselines.knob_grid(small)]
    chosen = [knobs for entry in result["timeline"] for knobs in entry["knobs"].values()]
    assert any(knobs not in grid for knobs in chosen)


def test_oracle_full_is_the_same_in_parallel(small: Scenario) -> None:
    workload = build_workload(small)
    serial = run_controller(small, workload, "oracle-full")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parallel = run_controller(small, workload, "oracle-full", executor=pool)
    assert strip_wall(serial) == strip_wall(parallel)
    # One setting per control interval, for every replica at once.
    intervals = len(serial["timeline"])
    assert 0 < serial["config_changes"] <= intervals * small.replicas
    for entry in serial["timeline"]:
        assert len({str(knobs) for knobs in entry["knobs"].values()}) == 1


@pytest.mark.parametrize("tunable", [False, True])
def test_action_space_spans_the_engine_limits(tmp_path: Path, tunable: bool) -> None:
    data = small_scenario_data(runtime_tunable=tunable)
    data["engine"]["max_num_seqs"] = 100
    space = action_space(load_scenario(write_scenario(tmp_path, data)))
    assert space["max_concurrency"] == (1, 2, 4, 8, 16, 32, 64, 100)
    tokens = space["max_inflight_tokens"]
    assert tokens[0] is None and tokens[1] == 1024 and tokens[-1] == 200_000
    assert space["queue_deadline_ms"] == (None, 750, 900, 1050, 1200, 1350, 1500)
    assert ("fcfs", 2000) in space["order"] and ("shortest-prompt-first", 500) in space["order"]
    assert ("max_num_batched_tokens" in space) is tunable


def test_the_bench_warns_when_a_controller_beats_oracle_full() -> None:
    results = [
        {"controller": "adaptive", "good": 10},
        {"controller": "oracle", "good": 9},
        {"controller": "oracle-full", "good": 9},
    ]
    (warning,) = bound_violations(results)
    assert warning.startswith("adaptive (10 good) beats oracle-full (9)")
    assert bound_violations(results[1:]) == []
    assert bound_violations(results[:2]) == []  # no oracle-full, nothing to check
