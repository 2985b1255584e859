"""scripts/audit, and what scripts/test makes of its result, run as CI runs them.

No vulnerability database is reachable from the machines this suite runs on,
so the services pip-audit talks to here are local: a closed port (a service
that cannot be reached), a socket that never answers (the time limit), and a
small OSV-API server that knows one vulnerability (a finding). pip-audit is
the real one scripts/audit installs; only the database is a stand-in.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from batchpilot.sim.sandbox.process import serve_in_thread

REPO = Path(__file__).resolve().parents[1]
AUDIT = REPO / "scripts" / "audit"
TEST = REPO / "scripts" / "test"
# The install check, venv creation and one pip failure fit well inside this.
RUN_TIMEOUT_S = 180


def run_audit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(AUDIT), *args],
        env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", **(env or {})},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def audit_with_osv(url: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    result = run_audit(
        *("--vulnerability-service", "osv", "--osv-url", url, "--cache-dir", str(tmp_path)),
        env=env,
    )
    if "pip-audit could not be installed" in output(result):
        pytest.skip(f"pip-audit cannot be installed on this machine:\n{output(result)[-2000:]}")
    return result


def test_pip_audit_that_cannot_be_installed_is_not_audited(tmp_path: Path) -> None:
    # A fresh cache, a package index on a closed port and nothing local to
    # install from: pip fails at once.
    no_wheels = tmp_path / "no-wheels"
    no_wheels.mkdir()
    env = {
        "BATCHPILOT_CACHE_DIR": str(tmp_path / "cache"),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": f"http://127.0.0.1:{closed_port()}/simple",
        "PIP_FIND_LINKS": str(no_wheels),
        "PIP_RETRIES": "0",
    }
    result = run_audit(env=env)
    assert result.returncode == 2, output(result)
    assert "audit: NOT AUDITED: pip-audit could not be installed" in result.stdout


def test_unreachable_vulnerability_service_is_not_audited(tmp_path: Path) -> None:
    result = audit_with_osv(f"http://127.0.0.1:{closed_port()}/v1/query", tmp_path)
    assert result.returncode == 2, output(result)
    assert "audit: NOT AUDITED: the vulnerability service could not be reached" in result.stdout
    assert "clean" not in result.stdout


@pytest.fixture
def silent_service() -> Iterator[str]:
    """A port that takes connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/query"


def test_an_audit_that_hangs_stops_at_its_time_limit(silent_service: str, tmp_path: Path) -> None:
    # pip-audit itself would wait 15 s and then report a timeout, which reads as
    # "could not be reached"; the 3 s limit must end it first.
    result = audit_with_osv(silent_service, tmp_path, BATCHPILOT_AUDIT_TIMEOUT_S="3")
    assert result.returncode == 2, output(result)
    assert "audit: NOT AUDITED: pip-audit did not finish within the 3 s limit" in result.stdout


VULNERABILITY = {
    "id": "TEST-2026-0001",
    "summary": "a stand-in vulnerability for this test",
    "affected": [
        {
            "package": {"name": "requests", "ecosystem": "PyPI"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "99.0"}]}],
        }
    ],
}


class _OneVulnerability(BaseHTTPRequestHandler):
    """OSV's POST /v1/query, knowing one vulnerability: in every version of requests."""

    def do_POST(self) -> None:
        query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        found = query["package"]["name"] == "requests"
        body = json.dumps({"vulns": [VULNERABILITY]} if found else {}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def osv_with_one_vulnerability() -> Iterator[str]:
    with serve_in_thread(_OneVulnerability) as port:
        yield f"http://127.0.0.1:{port}/v1/query"


def test_a_known_vulnerability_fails_the_audit(
    osv_with_one_vulnerability: str, tmp_path: Path
) -> None:
    result = audit_with_osv(osv_with_one_vulnerability, tmp_path)
    assert result.returncode == 1, output(result)
    assert "TEST-2026-0001" in result.stdout
    assert "Found 1 known vulnerability in 1 package" in result.stdout
    assert "audit: VULNERABILITIES FOUND" in result.stdout


def test_a_time_limit_that_is_not_a_number_is_refused() -> None:
    result = run_audit(env={"BATCHPILOT_AUDIT_TIMEOUT_S": "2m"})
    assert result.returncode == 3
    assert "BATCHPILOT_AUDIT_TIMEOUT_S must be a whole number of seconds" in result.stderr
    assert "'2m'" in result.stderr


@pytest.mark.parametrize(
    ("audit_status", "mode", "fails_the_run", "says"),
    [
        (0, "on", False, "audit: CLEAN"),
        (1, "on", True, "AUDIT FAILED"),
        (2, "on", False, "The run goes on; BATCHPILOT_AUDIT=required would fail it."),
        (0, "required", False, "audit: CLEAN"),
        (1, "required", True, "AUDIT FAILED"),
        (2, "required", True, "BATCHPILOT_AUDIT=required: failing the run."),
        (3, "on", True, "AUDIT BROKEN: scripts/audit exited 3"),
    ],
)
def test_scripts_test_fails_the_run_on_findings_and_not_on_not_audited(
    audit_status: int, mode: str, fails_the_run: bool, says: str
) -> None:
    # Sourcing scripts/test defines its verdict function and runs nothing else.
    result = subprocess.run(
        ["bash", "-c", 'source "$1" && audit_verdict "$2"', "bash", str(TEST), str(audit_status)],
        env={**os.environ, "BATCHPILOT_AUDIT": mode},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == (1 if fails_the_run else 0), output(result)
    assert says in result.stdout
    if audit_status == 2:
        assert "NOT AUDITED" in result.stdout


def test_scripts_test_refuses_an_unknown_audit_mode_before_doing_anything() -> None:
    result = subprocess.run(
        ["bash", str(TEST), "tests/test_audit_script.py"],
        env={**os.environ, "BATCHPILOT_AUDIT": "maybe"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "BATCHPILOT_AUDIT must be on, required or off, got 'maybe'" in result.stderr
    assert result.stdout == ""  # neither dev-setup, nor the audit, nor pytest ran
