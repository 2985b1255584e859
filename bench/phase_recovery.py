"""After each phase change, how many control intervals until a controller is back near the oracle.

Reads a `batchpilot bench` JSON (which must hold the controller and `oracle`,
with their per-interval timelines) and the scenario files it was run on (for
the phase boundaries, which only this analysis reads: the controllers never
see them). For every phase change at time T, interval 1 is the control
interval that contains T; the answer is the first interval k in which the
controller's goodput is at least `--share` (0.95) of the oracle's. Also given:
the controller's goodput over the whole next phase as a share of the oracle's.

    python bench/phase_recovery.py out/bench.json ../shared/scenarios/*.yaml \
        [--controller adaptive] [--share 0.95] [--json out/recovery.json]

Issue #5's target: within 5% of the oracle within 3 intervals.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchpilot.sim.scenario import load_scenario

TARGET_INTERVALS = 3


def phase_changes(durations: Sequence[float]) -> list[float]:
    """Start times of every phase but the first."""
    starts, at = [], 0.0
    for duration in durations[:-1]:
        at += duration
        starts.append(at)
    return starts


def recovery(
    controller: Sequence[Mapping[str, Any]],
    oracle: Sequence[Mapping[str, Any]],
    change_s: float,
    next_change_s: float,
    interval_s: float,
    share: float,
) -> dict[str, Any]:
    """Intervals (1 = the one holding the change) until `controller` reaches `share` of `oracle`."""
    by_start = {round(row["t_s"], 6): row for row in oracle}
    pairs = [
        (row, by_start[round(row["t_s"], 6)])
        for row in controller
        if row["t_s"] + interval_s > change_s
        and row["t_s"] < next_change_s
        and round(row["t_s"], 6) in by_start
    ]
    recovered = next(
        (
            index
            for index, (mine, best) in enumerate(pairs, start=1)
            if mine["goodput_rps"] >= share * best["goodput_rps"]
        ),
        None,
    )
    good_mine = sum(mine["good"] for mine, _ in pairs)
    good_best = sum(best["good"] for _, best in pairs)
    return {
        "change_s": change_s,
        "intervals_to_recover": recovered,
        "met": recovered is not None and recovered <= TARGET_INTERVALS,
        "phase_goodput_share": round(good_mine / good_best, 4) if good_best else None,
    }


def analyse(
    document: Mapping[str, Any], scenario_paths: Sequence[Path], controller: str, share: float
) -> list[dict[str, Any]]:
    scenarios = {scenario.name: scenario for scenario in map(load_scenario, scenario_paths)}
    rows = []
    for entry in document["scenarios"]:
        scenario = scenarios.get(entry["name"])
        if scenario is None:
            raise SystemExit(f"no scenario file given for {entry['name']!r}")
        results = {result["controller"]: result for result in entry["results"]}
        missing = {controller, "oracle"} - set(results)
        if missing:
            raise SystemExit(
                f"{entry['name']}: the bench JSON has no {', '.join(sorted(missing))} results"
            )
        changes = phase_changes([phase.duration_s for phase in scenario.workload])
        # Each change with the end of the phase it starts (single-phase scenarios have none).
        for change, next_change in itertools.pairwise([*changes, scenario.duration_s]):
            rows.append(
                {
                    "scenario": entry["name"],
                    **recovery(
                        results[controller]["timeline"],
                        results["oracle"]["timeline"],
                        change,
                        next_change,
                        entry["control_interval_s"],
                        share,
                    ),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("scenarios", type=Path, nargs="+")
    parser.add_argument("--controller", default="adaptive")
    parser.add_argument("--share", type=float, default=0.95)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = analyse(
        json.loads(args.bench_json.read_text()), args.scenarios, args.controller, args.share
    )

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{args.controller}: intervals after a phase change until >= {args.share:.0%} of oracle"
    )
    for column in (
        "scenario",
        "change at s",
        "intervals",
        f"<= {TARGET_INTERVALS}",
        "next phase vs oracle",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["scenario"],
            f"{row['change_s']:.0f}",
            str(row["intervals_to_recover"] or "never"),
            "yes" if row["met"] else "NO",
            f"{row['phase_goodput_share']:.3f}" if row["phase_goodput_share"] is not None else "-",
        )
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"controller": args.controller, "share": args.share, "changes": rows}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
