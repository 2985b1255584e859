"""docs/operator-config.md: every setting, its true default, and the
out-of-cluster run as written (against the real API server)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchpilot.operator.config import OperatorConfig, load_config
from batchpilot.sim.sandbox.process import ManagedProcess, free_loopback_port, http_ok
from batchpilot.sim.sandbox.tools import BATCHPILOT_CLI

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "operator-config.md"
START_TIMEOUT_S = 60.0


def _table() -> dict[str, str]:
    """setting -> the default the page states."""
    rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", PAGE.read_text(), re.MULTILINE)
    return dict(rows)


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def test_every_setting_is_documented_with_its_default() -> None:
    documented = _table()
    fields = dataclasses.fields(OperatorConfig)
    assert sorted(documented) == sorted(f.name for f in fields)
    for field in fields:
        stated = yaml.safe_load(documented[field.name])
        actual = _default(field)
        expected = list(actual) if isinstance(actual, tuple) else actual
        assert stated == expected, field.name


def test_the_defaults_listen_on_loopback_only() -> None:
    config = load_config(None, {})
    assert (config.health_host, config.metrics_host) == ("127.0.0.1", "127.0.0.1")


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port`, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            octets = bytes.fromhex(address)[::-1]
            found.add(".".join(str(octet) for octet in octets))
    return found


@pytest.mark.stack
def test_the_out_of_cluster_run_works_as_written(
    kube_api: Any, kubectl: Path, tmp_path: Path
) -> None:
    config_block, commands = re.findall(
        r"^```(?:yaml|bash)\n(.*?)^```", PAGE.read_text(), re.MULTILINE | re.DOTALL
    )
    (tmp_path / "operator.yaml").write_text(config_block)
    assert load_config(tmp_path / "operator.yaml", {}).namespaces == ("serving",)
    apply_crds, run_operator = commands.strip().splitlines()
    env = {**os.environ, "KUBECONFIG": str(kube_api.kubeconfig)}
    applied = subprocess.run(
        [str(kubectl), *apply_crds.split()[1:]], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    # The page's command; only the ports move (by the documented variables),
    # so that this test never meets another operator on 8080/8081.
    health_port, metrics_port = free_loopback_port(), free_loopback_port()
    argv = run_operator.split()
    assert argv[0] == "batchpilot"
    operator = ManagedProcess(
        "operator",
        [*BATCHPILOT_CLI, *argv[1:]],
        tmp_path / "operator.log",
        {
            **env,
            "BATCHPILOT_OPERATOR_HEALTH_PORT": str(health_port),
            "BATCHPILOT_OPERATOR_METRICS_PORT": str(metrics_port),
        },
        cwd=tmp_path,
    )
    try:
        operator.wait_until(
            lambda: http_ok(f"http://127.0.0.1:{health_port}/healthz"),
            START_TIMEOUT_S,
            "answering /healthz",
        )
        assert http_ok(f"http://127.0.0.1:{metrics_port}/metrics")
        assert _listening_addresses(health_port) == {"127.0.0.1"}
        assert _listening_addresses(metrics_port) == {"127.0.0.1"}
    finally:
        operator.stop()
