"""How fast the simulator is, against its two budgets; prints JSON.

1. One controller (static-default) over conv-steady (1,800 s, ~30,000
   requests): budget 10 s wall.
2. The public suite (5 scenarios) with the four baselines, the way
   `batchpilot bench` runs it: budget 15 minutes wall.

    python bench/sim_speed.py [--repeat 3] [--skip-suite] [--workers 2]

Run from the repository root with ../shared beside it. The machine is shared,
so the single-run figure is the best of `--repeat` runs, and `load_avg`
records how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from batchpilot.sim.bench import run_benchmark, run_controller
from batchpilot.sim.scenario import load_scenario
from batchpilot.sim.workload import build_workload

SCENARIOS = Path(__file__).resolve().parents[1].parent / "shared" / "scenarios"
SINGLE_BUDGET_S = 10.0
SUITE_BUDGET_S = 15 * 60.0
BASELINES = ("static-default", "static-best", "aimd", "oracle")


def measure_single(repeat: int) -> dict[str, Any]:
    scenario = load_scenario(SCENARIOS / "conv-steady.yaml")
    workload = build_workload(scenario)
    walls = []
    for _ in range(repeat):
        started = time.perf_counter()
        run_controller(scenario, workload, "static-default")
        walls.append(time.perf_counter() - started)
    best = min(walls)
    return {
        "scenario": scenario.name,
        "controller": "static-default",
        "requests": len(workload),
        "simulated_s": scenario.duration_s,
        "wall_s": [round(w, 3) for w in walls],
        "best_wall_s": round(best, 3),
        "requests_per_wall_s": round(len(workload) / best),
        "budget_s": SINGLE_BUDGET_S,
        "within_budget": best <= SINGLE_BUDGET_S,
    }


def measure_suite(workers: int) -> dict[str, Any]:
    scenarios = [load_scenario(path) for path in sorted(SCENARIOS.glob("*.yaml"))]
    executor = (
        ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        if workers > 1
        else None
    )

    def report(label: str, fraction: float) -> None:
        if fraction and sys.stderr.isatty():
            print(f"\r{label:<45}", end="", file=sys.stderr, flush=True)

    started = time.perf_counter()
    try:
        document = run_benchmark(scenarios, BASELINES, executor=executor, on_progress=report)
    finally:
        if executor is not None:
            executor.shutdown()
    wall = time.perf_counter() - started
    return {
        "scenarios": [s.name for s in scenarios],
        "controllers": list(BASELINES),
        "workers": workers,
        "wall_s": round(wall, 1),
        "per_run_wall_s": {
            f"{entry['name']}/{row['controller']}": row["wall_s"]
            for entry in document["scenarios"]
            for row in entry["results"]
        },
        "budget_s": SUITE_BUDGET_S,
        "within_budget": wall <= SUITE_BUDGET_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="single-run repetitions (best counts)"
    )
    parser.add_argument("--skip-suite", action="store_true", help="only the single-controller run")
    parser.add_argument("--workers", type=int, default=2, help="processes for the grid searches")
    args = parser.parse_args()
    if not SCENARIOS.is_dir():
        parser.error(
            f"scenarios not found at {SCENARIOS}: run with ../shared beside the repository"
        )
    result: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "single": measure_single(max(1, args.repeat)),
    }
    if not args.skip_suite:
        result["suite"] = measure_suite(args.workers)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
