"""`batchpilot sim ...`: the simulator's commands (`serve` and `load` are in cli/sim_live.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from batchpilot.sim.calibration import CalibrationError, fit, read_rows

app = typer.Typer(
    name="sim",
    help="The calibrated serving-engine simulator.",
    no_args_is_help=True,
)


@app.command()
def calibrate(
    csv_path: Annotated[
        Path,
        typer.Argument(metavar="CSV", help="Step-latency CSV (model,system,backend,tp,kind,...)."),
    ],
    model: Annotated[str, typer.Option("--model", help="Value of the CSV's model column to fit.")],
    system: Annotated[
        str, typer.Option("--system", help="Value of the CSV's system column, e.g. h100_sxm.")
    ],
    tp: Annotated[
        int | None,
        typer.Option(
            "--tp", min=1, help="Tensor-parallel degree; needed only when the CSV has several."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write coefficients and per-kind errors here.")
    ] = None,
    shared_kv_cache: Annotated[
        bool,
        typer.Option(
            "--shared-kv-cache",
            help="The engine attends over one cache shared by all sequences (llama.cpp "
            "--kv-unified): read mixed rows that way.",
        ),
    ] = False,
) -> None:
    """Fit the step-cost model to measured step latencies and report its error per kind."""
    try:
        calibration = fit(read_rows(csv_path), model, system, tp, shared_kv_cache=shared_kv_cache)
    except CalibrationError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err

    console = Console()
    errors = Table(title=f"{model} on {system}, tp {calibration.tp}: fit error per kind")
    errors.add_column("kind")
    errors.add_column("rows", justify="right")
    errors.add_column("mean abs % err", justify="right")
    errors.add_column("max abs % err", justify="right")
    for item in calibration.errors:
        errors.add_row(
            item.kind, str(item.rows), f"{item.mean_ape_pct:.2f}", f"{item.max_ape_pct:.2f}"
        )
    console.print(errors)
    coefficients = Table(title="coefficients (ms)")
    coefficients.add_column("name")
    coefficients.add_column("value", justify="right")
    for name, value in calibration.cost.to_dict().items():
        coefficients.add_row(name, f"{value:.6g}")
    console.print(coefficients)
    if json_out is not None:
        document = {"source": str(csv_path), **calibration.to_json()}
        json_out.write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"wrote {json_out}")
