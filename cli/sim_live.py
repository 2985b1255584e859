"""`batchpilot sim serve` and `batchpilot sim load`: the simulator over real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batchpilot.gate.settings import GateSettingsError, parse_host_port
from batchpilot.sim.calibration import CalibrationError, fit_file
from batchpilot.sim.engine import EngineConfig, EngineConfigError
from batchpilot.sim.load import LoadError, LoadProgress, record_rows, replay, summarize
from batchpilot.sim.scenario import ScenarioError, load_scenario
from batchpilot.sim.serve import SimServer
from batchpilot.sim.workload import build_workload


def serve(
    scenario: Annotated[
        Path | None, typer.Option(help="Scenario YAML; its engine section configures the engine.")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="Step-latency CSV (instead of --scenario).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="CSV model rows to use; also the served model name.")
    ] = None,
    system: Annotated[
        str | None, typer.Option(help="CSV system rows to use, e.g. h100_sxm.")
    ] = None,
    tp: Annotated[
        int | None, typer.Option(min=1, help="Tensor-parallel degree, when the CSV has several.")
    ] = None,
    kv_cache_tokens: Annotated[int, typer.Option(min=16, help="KV capacity in tokens.")] = 450_000,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Engine batch ceiling.")] = 512,
    max_num_batched_tokens: Annotated[
        int, typer.Option(min=1, help="Prefill token budget per step.")
    ] = 8192,
    runtime_tunable: Annotated[
        bool, typer.Option(help="Accept the prefill budget live via /set_internal_state.")
    ] = False,
    slowdown: Annotated[float, typer.Option(min=0.01, help="Multiplies every step's cost.")] = 1.0,
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve on.")] = "127.0.0.1:8000",
    time_scale: Annotated[
        float, typer.Option(min=0.001, help="Simulated seconds per wall second.")
    ] = 1.0,
    default_max_tokens: Annotated[
        int, typer.Option(min=1, help="Output tokens when a request sets no max_tokens.")
    ] = 256,
) -> None:
    """Serve the simulated engine in real time on an OpenAI-compatible API (no gate in front)."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_host_port("listen", listen)
        if scenario is not None:
            engine = load_scenario(scenario).engine
            config, served = engine.config(), engine.model
        elif calibration is not None and model is not None and system is not None:
            config = EngineConfig(
                cost=fit_file(calibration, model, system, tp).cost,
                kv_cache_tokens=kv_cache_tokens,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                runtime_tunable=runtime_tunable,
                slowdown=slowdown,
            )
            served = model
        else:
            typer.echo(
                "error: give --scenario FILE, or --calibration CSV with --model and --system",
                err=True,
            )
            raise typer.Exit(2)
    except (GateSettingsError, ScenarioError, CalibrationError, EngineConfigError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err

    async def run() -> None:
        server = SimServer(config, served, time_scale, default_max_tokens)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        bound = await server.start(host, port)
        logging.getLogger("batchpilot.sim.serve").info(
            "sim serve: model %s on port %d, time scale %g", served, bound, time_scale
        )
        try:
            await stop.wait()
        finally:
            await server.stop()

    try:
        asyncio.run(run())
    except OSError as err:
        typer.echo(f"error: sim serve cannot start: {err}", err=True)
        raise typer.Exit(1) from err


def load(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML whose workload to replay.")],
    url: Annotated[
        list[str], typer.Option(help="Server base URL; repeat for replicas (round-robin).")
    ],
    json_out: Annotated[
        Path, typer.Option("--json", help="Write the per-request records and summary here.")
    ],
    time_scale: Annotated[
        float, typer.Option(min=0.001, help="Scenario seconds per wall second (match sim serve's).")
    ] = 1.0,
    duration: Annotated[
        float | None, typer.Option(min=0.0, help="Replay only the first S scenario seconds.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model name to request; default: the first /v1/models entry.")
    ] = None,
) -> None:
    """Replay a scenario's workload against live servers, streaming, and measure at the client."""
    try:
        parsed = load_scenario(scenario)
    except ScenarioError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    workload = build_workload(parsed)
    window_s = parsed.duration_s if duration is None else min(duration, parsed.duration_s)
    total = int((workload.arrival_s < window_s).sum())

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sent {task.fields[sent]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    task = progress.add_task(f"{parsed.name} x{time_scale:g}", total=total, sent=0)

    def on_progress(state: LoadProgress) -> None:
        progress.update(task, completed=state.done, sent=state.sent)

    started = time.monotonic()
    try:
        with progress:
            records = asyncio.run(
                replay(
                    workload,
                    url,
                    time_scale=time_scale,
                    duration_s=window_s,
                    model=model,
                    on_progress=on_progress,
                )
            )
    except LoadError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    summary = summarize(records, window_s, parsed.slo)
    document = {
        "scenario": parsed.name,
        "urls": url,
        "time_scale": time_scale,
        "duration_s": window_s,
        "slo": {"ttft_ms": parsed.slo.ttft_ms, "tpot_ms": parsed.slo.tpot_ms},
        "wall_s": round(time.monotonic() - started, 3),
        "summary": summary,
        "requests": record_rows(records),
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(document) + "\n")

    table = Table(title=f"sim load: {parsed.name}, {window_s:g} scenario s at x{time_scale:g}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key != "by_url":
            table.add_row(
                key,
                "-"
                if value is None
                else f"{value:.4g}"
                if isinstance(value, float)
                else str(value),
            )
    Console().print(table)


def register(sim_app: typer.Typer) -> None:
    """Add `serve` and `load` to the `batchpilot sim` sub-app."""
    sim_app.command()(serve)
    sim_app.command()(load)
