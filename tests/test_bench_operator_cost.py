"""bench/operator_cost.py end to end, small and sharded: its accounting must hold up.

A tiny fleet (4 policies of 2 pods over 2 namespaces, two shard processes)
against the real API server and Prometheus: every policy must step and read
its metrics, the two shards must split the work (each steps some policies,
none steps all), and the Prometheus load must be what a control step sends
(one query per signal, 22 for a vLLM policy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchpilot.controller.policy import EngineKind
from batchpilot.controller.signals import signal_specs

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "operator_cost.py"

# It starts its own kube-apiserver and Prometheus.
pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_small_sharded_run_accounts_for_every_policy(tmp_path: Path) -> None:
    out = tmp_path / "operator_cost.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--policies", "4", "--pods-per-policy", "2",
         "--namespaces", "2", "--shards", "2", "--measure", "40", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["policies_with_metrics_available"] == 4
    assert result["setup"]["shards"] == 2 and len(result["per_process"]) == 2
    # 40 s of a 30 s interval: every policy steps once or twice, each in one shard only.
    assert 4 <= result["control_step_s"]["count"] <= 8
    assert all(p["cpu_share_of_one_core"] > 0 for p in result["per_process"])
    # The shards split the policies: both step, neither steps them all.
    steps = [p["control_steps"] for p in result["per_process"]]
    assert all(count > 0 for count in steps) and sum(steps) == result["control_step_s"]["count"]
    per_step = result["prometheus_load"]["queries_per_control_step"]
    assert per_step == len(signal_specs(EngineKind.VLLM, {}))
    assert result["prometheus_load"]["series_returned_per_s"] > 0
