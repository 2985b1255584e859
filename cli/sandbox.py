"""`batchpilot sandbox up | status | env | down`: the whole stack on this machine.

See batchpilot.sim.sandbox.session for what runs; docs/try-it-locally.md for
the walk-through. Needs the binaries `scripts/dev-setup --sandbox` installs
(kube-apiserver, Prometheus, kubectl); `scripts/sandbox up` runs it first.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from rich.console import Console
from rich.table import Table

from batchpilot.cli.app import fail
from batchpilot.operator.kube import GROUP, PLURAL, VERSION
from batchpilot.sim.sandbox import session
from batchpilot.sim.sandbox.session import (
    SCENARIO,
    SandboxState,
    default_directory,
    run_supervisor,
)
from batchpilot.sim.sandbox.tools import StackError

app = typer.Typer(
    name="sandbox",
    help="The whole stack on this machine: API server, Prometheus, gated simulated pods, "
    "load, the operator.",
    no_args_is_help=True,
)

DirectoryOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Where the sandbox keeps its state and logs (default: $BATCHPILOT_CACHE_DIR/sandbox).",
    ),
]
# Exit codes of `status`, for scripts: 0 everything answers, 1 a part is
# down, 3 no sandbox runs (as `systemctl status` does for a stopped unit).
STATUS_DOWN_PART, STATUS_NOT_RUNNING = 1, 3


def _directory(directory: Path | None) -> Path:
    return (directory or default_directory()).resolve()



@app.command()
def up(
    directory: DirectoryOption = None,
    scenario: Annotated[
        Path | None,
        typer.Option(
            help="Scenario whose traffic the load generator replays in a loop "
            "(default: chat, then code completion, then chat again)."
        ),
    ] = None,
) -> None:
    """Start the sandbox (or show the one already running) and print what to type next."""
    # Soft wrap: a long path stays on one line, whole, for copying (and for
    # the docs' test that reads this output).
    console = Console(soft_wrap=True)
    where = _directory(directory)
    if scenario is not None and not scenario.is_file():
        fail(f"--scenario: no such file {scenario}", code=1)
    already = SandboxState.read(where)
    if already is not None and already.supervisor_alive():
        console.print(f"the sandbox in {where} is already running")
        state = already
    else:
        console.print(f"starting the sandbox in {where}")
        started = time.monotonic()
        try:
            state = session.up(
                where,
                scenario=(scenario or SCENARIO).resolve(),
                on_progress=lambda line: console.print(f"  {line}"),
            )
        except StackError as error:
            fail(str(error), code=1)
        console.print(f"up in {time.monotonic() - started:.0f} s")
    _print_endpoints(console, state, where)


def _print_endpoints(console: Console, state: SandboxState, where: Path) -> None:
    console.print(f"  kubeconfig   {state.kubeconfig}  (namespace {state.namespace})")
    console.print(f"  prometheus   {state.prometheus_url}")
    for pod in state.pods:
        console.print(f"  {pod.name}  gate {pod.gate_url}  admin {pod.admin_url}")
    dir_option = "" if where == _directory(None) else f" --dir {shlex.quote(str(where))}"
    console.print("\nNext, in this shell:")
    for command in (
        f'eval "$({_this_batchpilot()} sandbox env{dir_option})"',
        "kubectl get pods",
        "kubectl apply -f examples/policy-sandbox.yaml",
        "kubectl get infpol -w",
        f"batchpilot explain {state.namespace}/summarizer",
        f"batchpilot sandbox status{dir_option}",
        f"batchpilot sandbox down{dir_option}",
    ):
        console.print(f"  {command}", markup=False, highlight=False)


def _this_batchpilot() -> str:
    """How to run this batchpilot from any directory: `batchpilot` when PATH
    finds this one, else its full path (`env` then puts it on PATH)."""
    here = Path(sys.executable).parent / "batchpilot"
    found = shutil.which("batchpilot")
    return "batchpilot" if found is not None and Path(found) == here else shlex.quote(str(here))


@app.command()
def env(directory: DirectoryOption = None) -> None:
    """Print shell exports for the running sandbox: KUBECONFIG, kubectl and batchpilot on PATH, its Prometheus URL.

    Use as: eval "$(batchpilot sandbox env)"
    """
    state = SandboxState.read(_directory(directory))
    if state is None or not state.supervisor_alive():
        fail("no sandbox is running: start one with `batchpilot sandbox up`", code=1)
    # kubectl as the sandbox installed it, and this virtualenv's batchpilot.
    path = ":".join(
        shlex.quote(str(p)) for p in (Path(state.kubectl).parent, Path(sys.executable).parent)
    )
    typer.echo(f"export KUBECONFIG={shlex.quote(state.kubeconfig)}")
    typer.echo(f'export PATH={path}:"$PATH"')
    typer.echo(f"export BATCHPILOT_SANDBOX_PROMETHEUS={shlex.quote(state.prometheus_url)}")


@app.command()
def status(directory: DirectoryOption = None) -> None:
    """Show each part of the sandbox, its policies and the load's last round.

    Exit code 0 when every part answers, 1 when one does not, 3 when no sandbox runs.
    """
    console = Console()
    state = SandboxState.read(_directory(directory))
    if state is None or not state.supervisor_alive():
        console.print("no sandbox is running: start one with `batchpilot sandbox up`")
        raise typer.Exit(STATUS_NOT_RUNNING)
    parts = Table(title=f"sandbox, up {_duration(time.time() - state.started_at)}")
    for column in ("part", "where", "state"):
        parts.add_column(column)
    checks = state.checks()
    for part, where, answering in checks:
        parts.add_row(part, where, "up" if answering else "[red]not answering[/red]")
    console.print(parts)
    console.print(_policies(state))
    console.print(_last_round(state))
    if not all(answering for _, _, answering in checks):
        raise typer.Exit(STATUS_DOWN_PART)


def _policies(state: SandboxState) -> Table:
    """The columns of `kubectl get infpol` (the CRD's printer columns) that matter here."""
    table = Table(title=f"InferencePolicies in {state.namespace}")
    for column in ("name", "mode", "pods", "batch cap", "SLO met", "applied"):
        table.add_column(column)
    try:
        with state.api_client() as api:
            # The client types custom objects as `object`; they are JSON documents.
            listed = cast(
                dict[str, Any],
                client.CustomObjectsApi(api).list_namespaced_custom_object(
                    GROUP, VERSION, state.namespace, PLURAL, _request_timeout=5
                ),
            )
    except (ApiException, OSError) as error:
        table.add_row("-", "-", "-", "-", "-", f"cannot list: {error}")
        return table
    for policy in listed["items"]:
        status = policy.get("status", {})
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        table.add_row(
            policy["metadata"]["name"],
            policy["spec"].get("mode", "Recommend"),
            str(status.get("pods", {}).get("summary", "-")),
            str(status.get("recommendation", {}).get("knobs", {}).get("maxConcurrency", "-")),
            conditions.get("SLOMet", "-"),
            str(status.get("applied", {}).get("summary", "-")),
        )
    if not listed["items"]:
        table.add_row(
            "-", "-", "-", "-", "-", "none yet: kubectl apply -f examples/policy-sandbox.yaml"
        )
    return table


def _last_round(state: SandboxState) -> Table:
    table = Table(title=f"load: last full round of {Path(state.scenario).name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    summary = state.last_round()
    if summary is None:
        table.add_row("first round", "still running")
        return table
    for key in (
        "requests",
        "ok",
        "shed",
        "slo_attainment",
        "goodput_rps",
        "ttft_p99_ms",
        "tpot_p99_ms",
    ):
        value = summary.get(key)
        table.add_row(
            key,
            "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value),
        )
    return table


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


@app.command()
def down(directory: DirectoryOption = None) -> None:
    """Stop every part of the sandbox and delete its directory (safe to repeat)."""
    where = _directory(directory)
    if session.down(where):
        typer.echo(f"stopped the sandbox and removed {where}")
    else:
        typer.echo(f"no sandbox was running in {where}; nothing left there")


@app.command(hidden=True)
def supervise(
    directory: Annotated[Path, typer.Option("--dir")],
    scenario: Annotated[Path, typer.Option()],
) -> None:
    """The process that holds the sandbox; started by `up`, stopped by `down`."""
    run_supervisor(directory, scenario)
