"""The settings every batchpilot typer app shares: `batchpilot` and `batchpilot-gate`.

Its own module, importing typer alone, so that the gate's lean entry point
(cli/gate.py) gets the same help and errors as `batchpilot gate` without
importing cli/main.py.
"""

from __future__ import annotations

from typing import Any

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
