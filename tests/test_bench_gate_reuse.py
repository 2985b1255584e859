"""bench/gate_reuse.py end to end, small: its checks and its accounting must hold up.

A benchmark that miscounted tokens or lost requests in its own bookkeeping
would still print numbers; a tiny run against the real engine must see every
request complete and the gate's counters add up to what was sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gate_reuse.py"

# It starts its own llama-server.
pytestmark = pytest.mark.engine


def test_small_run_accounts_for_every_request(tmp_path: Path) -> None:
    out = tmp_path / "gate_reuse.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--requests", "64", "--clients", "8", "--max-tokens", "4",
         "--config-every", "8", "--parallel", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())["result"]
    assert (result["sent"], result["ok"], result["status_502"]) == (64, 64, 0)
    assert result["other_failures"] == {}
    assert result["admitted_shed_failed"] == 64 and result["admitted_shed_failed_equals_sent"]
    assert result["config_changes"] == 8 and result["config_failures"] == 0
    assert set(result["retries"]) == {"server_disconnected", "socket_error"}
    assert result["gate_tpot_mean_ms"] > 0
