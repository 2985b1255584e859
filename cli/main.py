"""The `batchpilot` command: one typer app, each subsystem adds its commands.

Subsystem CLI modules import their heavy dependencies (numpy, scikit-learn,
kopf) inside the command functions, so `batchpilot gate` starts fast and
`--help` never pays for libraries it does not use.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="batchpilot",
    help="Keep LLM inference servers at their best batching and scheduling settings, live.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Subcommands, one line per subsystem.
from batchpilot.gate.cli import gate  # noqa: E402

app.command()(gate)

from batchpilot.sim.bench_cli import bench  # noqa: E402
from batchpilot.sim.cli import app as sim_app  # noqa: E402

app.add_typer(sim_app, name="sim")
app.command()(bench)

from batchpilot.sim.live_cli import register as register_sim_live  # noqa: E402

register_sim_live(sim_app)  # sim serve, sim load

from batchpilot.operator.cli import operator  # noqa: E402

app.command()(operator)

from batchpilot.cli.demo import demo  # noqa: E402
from batchpilot.cli.explain import explain  # noqa: E402
from batchpilot.cli.recommend import recommend  # noqa: E402
from batchpilot.cli.report import report  # noqa: E402

for everyday_command in (demo, recommend, explain, report):
    app.command()(everyday_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
