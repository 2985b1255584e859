"""Every command's --help shows every option whole at 80 columns (a pipe, a
narrow terminal), as users copy them from there."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from batchpilot.cli import gate
from batchpilot.cli.main import app


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, group
    # typer carries its own copy of click: a group is whatever has commands.
    for name, command in getattr(group, "commands", {}).items():
        if not command.hidden:
            yield from _commands(command, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def test_every_command_is_walked() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"gate", "operator", "sim serve", "sandbox up", "recommend"} <= names


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(p) or "batchpilot" for p, _ in COMMANDS]
)
def test_help_shows_every_option_whole_at_80_columns(path: tuple[str, ...], command: Any) -> None:
    shown = CliRunner().invoke(app, [*path, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.output
    for parameter in command.params:
        for option in getattr(parameter, "opts", []):
            if option.startswith("--"):
                assert option in shown.output, (path, option)
    assert all(len(line) <= 80 for line in shown.output.splitlines()), shown.output


def test_batchpilot_gate_shows_the_same_command_as_batchpilot_gate() -> None:
    """The gate image's entry point (`batchpilot-gate`) is `batchpilot gate`, help and all."""
    runner = CliRunner()
    env = {"COLUMNS": "80"}
    alone = runner.invoke(
        gate.app, ["--help"], prog_name="batchpilot-gate", terminal_width=80, env=env
    )
    within = runner.invoke(
        app, ["gate", "--help"], prog_name="batchpilot", terminal_width=80, env=env
    )
    assert alone.exit_code == within.exit_code == 0, alone.output + within.output
    assert alone.output.replace("batchpilot-gate", "batchpilot gate") == within.output
