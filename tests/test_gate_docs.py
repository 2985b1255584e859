"""docs/gate.md, followed literally: its start commands run, the gate they start
sits in front of a real `batchpilot sim serve`, and every `$ curl ...` in its
console blocks runs in order with its output compared to the page's.

The page's fixed ports (engine 8000, data 8080, admin 9090) become free ones,
and `batchpilot` this interpreter's CLI; nothing else is rewritten. JSON
output is compared as JSON (the page pretty-prints it), all of it but
`applied_unix_s`, a timestamp.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_faults_gate import CALIBRATION, GateProcess, _wait_for_log, start_sim, wait_ready

from batchpilot.sim.sandbox.process import ManagedProcess, free_loopback_port
from batchpilot.sim.sandbox.tools import BATCHPILOT_CLI

PAGE = Path(__file__).resolve().parents[1] / "docs" / "gate.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)

pytestmark = pytest.mark.skipif(
    not CALIBRATION.exists(), reason=f"needs the shared calibration data at {CALIBRATION}"
)


def blocks(kind: str) -> list[str]:
    return [body for found_kind, body in BLOCK.findall(PAGE.read_text()) if found_kind == kind]


def console_steps(block: str) -> list[tuple[str, str]]:
    """(command, expected output) pairs of a console block; `\\` continues a command."""
    steps: list[tuple[str, list[str]]] = []
    continued = False
    for line in block.splitlines():
        if continued:
            steps[-1] = (steps[-1][0] + "\n" + line, steps[-1][1])
        elif line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
        continued = line.endswith("\\") and not steps[-1][1]
    return [(command, "\n".join(output)) for command, output in steps]


def same_output(actual: str, expected: str) -> bool:
    try:
        documented = json.loads(expected)
    except json.JSONDecodeError:
        return actual.strip() == expected.strip()
    return _without_timestamp(json.loads(actual)) == _without_timestamp(documented)


def _without_timestamp(document: Any) -> Any:
    if isinstance(document, dict):
        return {key: value for key, value in document.items() if key != "applied_unix_s"}
    return document


@pytest.fixture
def ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The page's start block run in `tmp_path`, in front of sim serve: {page port: real port}."""
    # The page's relative paths (the token file) are the reader's working directory.
    monkeypatch.chdir(tmp_path)
    sim = start_sim(tmp_path)
    proxy_port, admin_port = free_loopback_port(), free_loopback_port()
    mapping = {"8000": str(sim.port), "8080": str(proxy_port), "9090": str(admin_port)}
    gate: ManagedProcess | None = None
    try:
        (start,) = blocks("sh")
        for line in start.splitlines():
            line = _with_ports(line, mapping)
            if line.startswith("batchpilot gate "):
                argv = [*BATCHPILOT_CLI, *shlex.split(line)[1:]]
                gate = ManagedProcess("gate", argv, tmp_path / "gate.log")
                _wait_for_log(gate, r"listening on port")
            else:
                subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True, timeout=30)
        assert gate is not None, "the page's start block does not start the gate"
        wait_ready(GateProcess(gate, proxy_port, admin_port), True)
        yield mapping
    finally:
        if gate is not None:
            gate.stop()
        sim.process.stop()


def _with_ports(text: str, mapping: dict[str, str]) -> str:
    return re.sub(r"127\.0\.0\.1:(8000|8080|9090)\b", lambda m: f"127.0.0.1:{mapping[m[1]]}", text)


def test_every_command_on_the_gate_page_does_what_it_shows(
    ports: dict[str, str], tmp_path: Path
) -> None:
    steps = [step for block in blocks("console") for step in console_steps(block)]
    # The routes, GET /config, the PUTs (whole document, `{}`), the refusals, readiness.
    assert len(steps) >= 10
    for command, expected in steps:
        done = subprocess.run(
            ["bash", "-c", _with_ports(command, ports)],
            cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stderr)
        assert same_output(done.stdout, expected), (command, done.stdout)
