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
        [sys.executable, str(SCRIPT), "--streams", "6", "--tokens", str(TOKENS), "--tokens-per-s", "200",
         "--duration-s", "1.5", "--warmup-s", "0.5", "--rounds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    for side in ("direct", "gate"):
        phase = report["rounds"][0][side]
        assert phase["errors"] == 0, side
        assert phase["requests"] > 0, side
        assert phase["chunks"] == phase["requests"] * TOKENS, side
        # At 200 tokens/s the engine waits 5 ms before the first token.
        assert phase["ttft_p50_ms"] >= 5.0, side
    assert set(report["result"]) >= {"added_chunk_p99_ms", "added_ttft_p99_ms", "gate_cpu_cores"}
