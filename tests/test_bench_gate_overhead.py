"""bench/gate_overhead.py's harness: its lean engine and client must decode every token.

The benchmark's numbers are only as good as its parsing: a client that lost
or double-counted chunks (a chunked frame split across reads, an SSE event
split across frames) would still print latencies. A tiny run, both sides,
must see exactly `tokens` chunks for every request and no errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gate_overhead.py"
TOKENS = 12


def test_every_token_arrives_direct_and_through_the_gate(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--loads", "6x200,3x100", "--tokens", str(TOKENS),
         "--duration-s", "1.5", "--warmup-s", "0.5", "--rounds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(load["streams"], load["tokens_per_s"]) for load in report["loads"]] == [
        (6, 200),
        (3, 100),
    ]
    for load in report["loads"]:
        for side in ("direct", "gate"):
            phase = load["rounds"][0][side]
            assert phase["errors"] == 0, side
            assert phase["requests"] > 0, side
            assert phase["chunks"] == phase["requests"] * TOKENS, side
            # The engine waits one token interval (5 ms at 200 tokens/s) before the first token.
            assert phase["ttft_p50_ms"] >= 1000.0 / load["tokens_per_s"], side
            assert 0.0 <= phase["steal_share"] < 1.0
        for summary in ("median", "worst"):
            assert set(load[summary]) >= {
                "added_chunk_p99_ms",
                "added_ttft_p99_ms",
                "gate_cpu_cores_per_1k_chunks_s",
            }
        # One round: its median is its worst, and a target holds only if both do.
        assert load["median"] == load["worst"]
        assert set(load["met"]) == set(report["targets"])


def test_a_load_point_that_does_not_parse_is_named() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--loads", "200x40,1000"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "--loads: '1000' is not STREAMSxTOKENS_PER_S such as 200x40" in done.stderr
