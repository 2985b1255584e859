"""`batchpilot bench`: the benchmark command of ../shared/contracts/bench.md.

Exit 0 on success; exit 2 with one line on a bad scenario file, an unknown
or unavailable controller, or a controller that cannot run a scenario (all
are checked before any simulation starts).
"""

from __future__ import annotations

import json
import multiprocessing
import shlex
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batchpilot.cli.app import fail, ms_text
from batchpilot.cli.report import write_report
from batchpilot.sim.bench import check_supported, result_rows, run_benchmark
from batchpilot.sim.controllers import ControllerError, ensure_available
from batchpilot.sim.scenario import ScenarioError, load_scenario

DEFAULT_CONTROLLERS = "static-default,static-best,aimd,oracle"


def bench(
    scenarios: Annotated[
        list[Path], typer.Argument(metavar="SCENARIO.yaml...", help="Scenario files.")
    ],
    controllers: Annotated[
        str, typer.Option("--controllers", help="Comma-separated controller names.")
    ] = DEFAULT_CONTROLLERS,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results document here.")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, help="Processes for the hindsight grid searches (1 = serial)."
        ),
    ] = 2,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--report", help="Also plot the results into this directory (batchpilot report)."
        ),
    ] = None,
) -> None:
    """Replay scenarios against each controller and report goodput and SLO attainment."""
    names = [name.strip() for name in controllers.split(",") if name.strip()]
    if not names:
        fail("--controllers: give at least one controller name")
    try:
        ensure_available(names)
    except ControllerError as err:
        fail(f"--controllers: {err}")
    loaded = []
    for path in scenarios:
        try:
            scenario = load_scenario(path)
            check_supported(scenario, names)
        except ScenarioError as err:
            fail(f"{path}: {err}")
        except ControllerError as err:
            fail(f"{path}: --controllers: {err}")
        loaded.append(scenario)
    started = time.perf_counter()
    document = {
        "command": _command_line(scenarios, names, json_out, report_dir),
        **_run(loaded, names, workers),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    _print_table(document)
    for scenario in document["scenarios"]:
        for warning in scenario.get("warnings", ()):
            typer.echo(f"warning: {scenario['name']}: {warning}", err=True)
    if json_out is not None:
        # Written whole or not at all: a run cut short must not leave a
        # document that reads as complete.
        partial = json_out.with_name(json_out.name + ".partial")
        partial.write_text(json.dumps(document, indent=2) + "\n")
        partial.replace(json_out)
        typer.echo(f"wrote {json_out}")
    if report_dir is not None:
        for path in write_report(document, report_dir):
            typer.echo(f"wrote {path}")


def _command_line(
    scenarios: list[Path], names: list[str], json_out: Path | None, report_dir: Path | None
) -> str:
    """The command that reproduces this document (workers left out: they change no result)."""
    words = ["batchpilot", "bench", *map(str, scenarios), "--controllers", ",".join(names)]
    if json_out is not None:
        words += ["--json", str(json_out)]
    if report_dir is not None:
        words += ["--report", str(report_dir)]
    return shlex.join(words)


def _run(scenarios: list[Any], names: list[str], workers: int) -> dict[str, Any]:
    console = Console(stderr=True)
    # spawn, not fork: the progress bar runs a thread, and forking a process
    # with threads can copy a held lock into the child.
    executor = (
        ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        if workers > 1
        else None
    )
    try:
        if not console.is_terminal:
            return run_benchmark(scenarios, names, executor=executor)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("benchmark", total=len(scenarios) * len(names))

            def report(label: str, fraction: float) -> None:
                progress.update(task, advance=fraction, description=label)

            return run_benchmark(scenarios, names, executor=executor, on_progress=report)
    finally:
        if executor is not None:
            executor.shutdown()


def _print_table(document: dict[str, Any]) -> None:
    table = Table(title="benchmark (TTFT/TPOT in ms)")
    for column in (
        "scenario", "controller", "good", "goodput/s", "SLO att.", "TTFT p50", "TTFT p99",
        "TPOT p50", "TPOT p99", "shed", "preempt", "changes", "wall s",
    ):  # fmt: skip
        table.add_column(
            column, justify="left" if column in ("scenario", "controller") else "right"
        )
    for row in result_rows(document):
        table.add_row(
            row["scenario"],
            row["controller"],
            str(row["good"]),
            f"{row['goodput_rps']:.2f}",
            f"{row['slo_attainment']:.1%}",
            ms_text(row["ttft_p50_ms"]),
            ms_text(row["ttft_p99_ms"]),
            ms_text(row["tpot_p50_ms"]),
            ms_text(row["tpot_p99_ms"]),
            str(row["shed"]),
            str(row["preemptions"]),
            str(row["config_changes"]),
            f"{row['wall_s']:.1f}",
        )
    Console(width=160).print(table)
    _print_class_table(document)


def _print_class_table(document: dict[str, Any]) -> None:
    """Per SLO class, for the scenarios that have classes (docs/benchmark.md "Classes")."""
    rows = [row for row in result_rows(document) if row.get("classes")]
    if not rows:
        return
    table = Table(title="per SLO class (TTFT/TPOT in ms; Jain: served-token fairness)")
    for column in (
        "scenario", "controller", "class", "arrived", "good", "goodput/s", "SLO att.",
        "TTFT p99", "TPOT p99", "shed", "served tok", "Jain",
    ):  # fmt: skip
        table.add_column(
            column, justify="left" if column in ("scenario", "controller", "class") else "right"
        )
    for row in rows:
        jain = row.get("jain_index")
        for name, outcome in row["classes"].items():
            table.add_row(
                row["scenario"],
                row["controller"],
                name,
                str(outcome["arrived"]),
                str(outcome["good"]),
                f"{outcome['goodput_rps']:.2f}",
                f"{outcome['slo_attainment']:.1%}",
                ms_text(outcome["ttft_p99_ms"]),
                ms_text(outcome["tpot_p99_ms"]),
                str(outcome["shed"]),
                str(outcome["served_tokens"]),
                "-" if jain is None else f"{jain:.3f}",
            )
    Console(width=160).print(table)
