"""The `batchpilot` command: one typer app, each subsystem adds its commands.

Every command lives in this package (cli/); nothing outside it imports it.
The gate also has an entry point of its own, `batchpilot-gate` (cli/gate.py),
which imports none of the other commands: the gate image runs that one.
"""

from __future__ import annotations

from batchpilot.cli.app import new_app
from batchpilot.cli.bench import bench
from batchpilot.cli.demo import demo
from batchpilot.cli.explain import explain
from batchpilot.cli.gate import gate
from batchpilot.cli.operator_command import operator
from batchpilot.cli.recommend import recommend
from batchpilot.cli.report import report
from batchpilot.cli.sandbox import app as sandbox_app
from batchpilot.cli.sim import app as sim_app
from batchpilot.cli.sim_live import register as register_sim_live

app = new_app(
    name="batchpilot",
    help="Keep LLM inference servers at their best batching and scheduling settings, live.",
    no_args_is_help=True,
)

register_sim_live(sim_app)  # sim serve, sim load
app.add_typer(sim_app, name="sim")
app.add_typer(sandbox_app, name="sandbox")
for command in (demo, bench, recommend, explain, report, operator, gate):
    app.command()(command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
