"""What every batchpilot command shares: the typer app settings (`batchpilot`
and `batchpilot-gate`), the one-line error exit, and how a latency is shown.

Its own module, importing typer alone, so that the gate's lean entry point
(cli/gate.py) gets the same help and errors as `batchpilot gate` without
importing cli/main.py.
"""

from __future__ import annotations

from typing import Any, NoReturn

import typer


def new_app(**settings: Any) -> typer.Typer:
    """A typer app with batchpilot's shared settings; `settings` adds or overrides any."""
    shared: dict[str, Any] = {
        "add_completion": False,
        "pretty_exceptions_enable": False,
        # Plain (click) help: rich's help table cuts option names with an ellipsis
        # when the terminal or a pipe is 80 columns wide (`--max-num-batche…`);
        # click's wraps the text and keeps every name whole.
        "rich_markup_mode": None,
    }
    return typer.Typer(**{**shared, **settings})


def fail(message: str, code: int = 2) -> NoReturn:
    """A clear one-line error on stderr and the exit code (2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def ms_text(value: float | None) -> str:
    """Milliseconds in a table cell; `-` where there is nothing to show."""
    return "-" if value is None else f"{value:.0f}"
