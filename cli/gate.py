"""`batchpilot gate`, and `batchpilot-gate`: the same command as a program of its own.

`batchpilot-gate` is the gate image's entry point. This module imports only
the gate, the contract and their own dependencies, never the other commands
of cli/main.py (the controller, the operator, the simulator and their
numpy, scikit-learn and kopf): the image ships gate/, contract/ and this
file alone (gate/Dockerfile), and tests/test_gate_packaging.py holds the
module to that.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
import uvloop

from batchpilot.cli.app import new_app
from batchpilot.gate.server import GateServer
from batchpilot.gate.settings import GateSettingsError, load_settings


def gate(
    upstream: Annotated[
        str | None, typer.Option(help="Engine base URL.", show_default="http://127.0.0.1:8000")
    ] = None,
    listen: Annotated[
        str | None, typer.Option(help="Client-facing HOST:PORT.", show_default="0.0.0.0:8080")
    ] = None,
    admin: Annotated[
        str | None, typer.Option(help="Admin/metrics HOST:PORT.", show_default="0.0.0.0:9090")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML file of settings (keys as the options, plus knobs:).")
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the bearer token for PUT /config.")
    ] = None,
    annotations_file: Annotated[
        Path | None,
        typer.Option(help="Downward API annotations file to watch for batchpilot.dev/knobs."),
    ] = None,
    knobs: Annotated[
        str | None, typer.Option(help="Startup knobs as JSON, e.g. '{\"max_concurrency\": 64}'.")
    ] = None,
    native: Annotated[
        str | None,
        typer.Option(help="Engine-native live tuning: off, sglang or vllm.", show_default="off"),
    ] = None,
    shutdown_delay_s: Annotated[
        float | None,
        typer.Option(
            help="On SIGTERM, keep accepting (not ready) this long while the pod leaves "
            "the Service's endpoints.",
            show_default="5",
        ),
    ] = None,
    grace_period_s: Annotated[
        float | None,
        typer.Option(
            help="Then drain admitted and queued requests for up to this long.", show_default="20"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Python logging level.")] = "INFO",
) -> None:
    """Run the gate: admission control in front of an OpenAI-compatible engine, tunable live.

    Every option can also come from the environment as BATCHPILOT_GATE_<OPTION>
    (e.g. BATCHPILOT_GATE_UPSTREAM, BATCHPILOT_GATE_TOKEN_FILE; BATCHPILOT_GATE_TOKEN
    holds the token itself) or from --config; the command line wins.
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, Any] = {
        "upstream": upstream,
        "listen": listen,
        "admin": admin,
        "config": config,
        "token_file": token_file,
        "annotations_file": annotations_file,
        "native": native,
        "shutdown_delay_s": shutdown_delay_s,
        "grace_period_s": grace_period_s,
    }
    try:
        if knobs is not None:
            try:
                overrides["knobs"] = json.loads(knobs)
            except json.JSONDecodeError as err:
                raise GateSettingsError("knobs", f"--knobs is not valid JSON ({err.msg})") from err
        settings = load_settings(overrides, os.environ)
    except GateSettingsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    try:
        # uvloop: about a fifth less CPU per relayed chunk than asyncio's own
        # loop (bench/gate_overhead.py), on the path every token takes.
        uvloop.run(GateServer(settings).run())
    except OSError as err:
        # Almost always a port already in use or a host that is not local.
        typer.echo(f"error: gate cannot start: {err}", err=True)
        raise typer.Exit(1) from err


# `batchpilot-gate [OPTIONS]`: the gate command alone, as a program.
app = new_app(name="batchpilot-gate")
app.command()(gate)


def main() -> None:
    app(prog_name="batchpilot-gate")


if __name__ == "__main__":
    main()
