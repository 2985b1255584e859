"""The `batchpilot` command: one typer app, each subsystem adds its commands.

Subsystem CLI modules import their heavy dependencies (numpy, scikit-learn,
kopf) inside the command functions, so `batchpilot gate` starts fast and
`--help` never pays for libraries it does not use.
"""

from __future__ import annotations

import typer

from batchpilot.cli.demo import demo
from batchpilot.cli.explain import explain
from batchpilot.cli.recommend import recommend
from batchpilot.cli.report import report
from batchpilot.cli.sandbox import app as sandbox_app
from batchpilot.gate.cli import gate
from batchpilot.operator.cli import operator
from batchpilot.sim.bench_cli import bench
from batchpilot.sim.cli import app as sim_app
from batchpilot.sim.live_cli import register as register_sim_live

app = typer.Typer(
    name="batchpilot",
    help="Keep LLM inference servers at their best batching and scheduling settings, live.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain (click) help: rich's help table cuts option names with an ellipsis
    # when the terminal or a pipe is 80 columns wide (`--max-num-batche…`);
    # click's wraps the text and keeps every name whole.
    rich_markup_mode=None,
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
