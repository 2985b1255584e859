"""`batchpilot report BENCH.json --out DIR`: the benchmark document as plots.

Two figures, from the JSON that `batchpilot bench --json` writes
(../shared/contracts/bench.md plus the harness's per-interval `timeline`):

- ``bench-goodput.png``: goodput per controller, grouped by scenario (bars),
  with each bar's SLO attainment printed on it;
- ``bench-timeline-<scenario>.png``: for one scenario, goodput per control
  interval and the batch cap in effect, one line per controller.

`write_report` is the function other commands call; the command only maps
bad input to a one-line error and exit code 2.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

GOODPUT_PLOT = "bench-goodput.png"


class ReportError(ValueError):
    """The benchmark document cannot be plotted; the message names the field."""


def load_document(path: Path) -> dict[str, Any]:
    """Read and check a benchmark JSON document (only the fields the plots use)."""
    try:
        document = json.loads(path.read_text())
    except OSError as err:
        raise ReportError(f"cannot read {path} ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not JSON (line {err.lineno}: {err.msg})") from err
    check_document(document)
    return document


def check_document(document: Any) -> None:
    scenarios = document.get("scenarios") if isinstance(document, Mapping) else None
    if not isinstance(scenarios, list) or not scenarios:
        raise ReportError(
            "scenarios: the document needs a non-empty `scenarios` list (write one with "
            "`batchpilot bench SCENARIO.yaml --json OUT.json`)"
        )
    for i, scenario in enumerate(scenarios):
        where = f"scenarios[{i}]"
        if not isinstance(scenario, Mapping) or not isinstance(scenario.get("name"), str):
            raise ReportError(f"{where}.name: every scenario needs a name")
        results = scenario.get("results")
        if not isinstance(results, list) or not results:
            raise ReportError(f"{where}.results: needs at least one controller result")
        for j, result in enumerate(results):
            if not isinstance(result, Mapping) or not isinstance(result.get("controller"), str):
                raise ReportError(f"{where}.results[{j}].controller: missing")
            if not isinstance(result.get("goodput_rps"), int | float):
                raise ReportError(f"{where}.results[{j}].goodput_rps: must be a number")


def write_report(
    document: Mapping[str, Any], out_dir: Path, *, scenario: str | None = None
) -> list[Path]:
    """Write the goodput bars and one scenario's timeline into `out_dir`; return the files."""
    check_document(document)
    scenarios = document["scenarios"]
    chosen = _pick_scenario(scenarios, scenario)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / GOODPUT_PLOT]
    plot_goodput_bars(scenarios, written[0])
    if any(result.get("timeline") for result in chosen["results"]):
        timeline_path = out_dir / f"bench-timeline-{_slug(chosen['name'])}.png"
        plot_timeline(chosen, timeline_path)
        written.append(timeline_path)
    return written


def plot_goodput_bars(scenarios: Sequence[Mapping[str, Any]], path: Path) -> None:
    plt = _pyplot()
    controllers = _controllers_in_order(scenarios)
    width = 0.8 / len(controllers)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(scenarios) * len(controllers) / 2), 4.5))
    for k, controller in enumerate(controllers):
        xs, heights, labels = [], [], []
        for i, scenario in enumerate(scenarios):
            result = _result(scenario, controller)
            if result is None:
                continue
            xs.append(i - 0.4 + width * (k + 0.5))
            heights.append(result["goodput_rps"])
            attainment = result.get("slo_attainment")
            labels.append(f"{attainment:.0%}" if isinstance(attainment, int | float) else "")
        bars = ax.bar(xs, heights, width, label=controller)
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    ax.set_xticks(range(len(scenarios)), [s["name"] for s in scenarios], rotation=15, ha="right")
    ax.set_ylabel("goodput (good requests / s)")
    ax.set_title("goodput per controller (labels: SLO attainment)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(scenario: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (goodput_ax, cap_ax) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for result in scenario["results"]:
        entries = result.get("timeline") or []
        if not entries:
            continue
        minutes = [entry["t_s"] / 60.0 for entry in entries]
        goodput_ax.step(
            minutes,
            [entry["goodput_rps"] for entry in entries],
            where="post",
            label=result["controller"],
        )
        cap_ax.step(
            minutes,
            [_mean_cap(entry.get("knobs") or {}) for entry in entries],
            where="post",
            label=result["controller"],
        )
    goodput_ax.set_ylabel("goodput (req/s)")
    goodput_ax.set_title(f"{scenario['name']}: goodput and batch cap per control interval")
    goodput_ax.legend(fontsize=8)
    goodput_ax.grid(alpha=0.3)
    cap_ax.set_ylabel("batch cap (mean over replicas)")
    cap_ax.set_xlabel("scenario time (min)")
    cap_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(
    bench_json: Annotated[
        Path, typer.Argument(metavar="BENCH.json", help="Output of `batchpilot bench --json`.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Directory for the PNG files (created if missing).")
    ],
    scenario: Annotated[
        str | None,
        typer.Option("--scenario", help="Scenario whose timeline to plot (default: the first)."),
    ] = None,
) -> None:
    """Plot a benchmark result: goodput per controller per scenario, and one scenario over time.

    Examples:

      batchpilot bench ../shared/scenarios/*.yaml --json bench.json

      batchpilot report bench.json --out report/

      batchpilot report bench.json --out report/ --scenario conv-to-code-shift
    """
    try:
        document = load_document(bench_json)
        written = write_report(document, out, scenario=scenario)
    except ReportError as err:
        _fail(str(err))
    for path in written:
        typer.echo(f"wrote {path}")


def _pick_scenario(scenarios: Sequence[Mapping[str, Any]], name: str | None) -> Mapping[str, Any]:
    if name is None:
        return scenarios[0]
    for scenario in scenarios:
        if scenario["name"] == name:
            return scenario
    known = ", ".join(s["name"] for s in scenarios)
    raise ReportError(f"--scenario: no scenario named {name!r} in the document (it has: {known})")


def _controllers_in_order(scenarios: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for scenario in scenarios:
        for result in scenario["results"]:
            seen.setdefault(result["controller"], None)
    return list(seen)


def _result(scenario: Mapping[str, Any], controller: str) -> Mapping[str, Any] | None:
    return next((r for r in scenario["results"] if r["controller"] == controller), None)


def _mean_cap(knobs_by_replica: Mapping[str, Mapping[str, Any]]) -> float:
    """Mean batch cap over replicas; an uncapped replica counts as NaN (a gap in the line)."""
    caps = [k.get("max_concurrency") for k in knobs_by_replica.values()]
    if not caps or any(cap is None for cap in caps):
        return math.nan
    return sum(caps) / len(caps)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "scenario"


def _pyplot() -> Any:
    import matplotlib

    # Agg: files only, no display needed (CI, ssh sessions, the demo's headless mode).
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
