"""The real CPU engine: the generated model, llama-server serving it, and the
bench scripts that measure it (bench/engine_steps.py, bench/live_engine.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import urllib.request
from pathlib import Path

import pytest

from batchpilot.sim.llamacpp import (
    SERVED_MODEL,
    EngineSetupError,
    ModelShape,
    check_model,
    write_model,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import engine_steps  # noqa: E402
import live_engine  # noqa: E402

# Two layers instead of eight: the same writer and tokenizer in a quarter of the time.
SMALL = ModelShape(layers=2)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_model_is_the_same_for_a_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    first = write_model(tmp_path / "a.gguf", seed=7, shape=SMALL)
    again = write_model(tmp_path / "b.gguf", seed=7, shape=SMALL)
    other = write_model(tmp_path / "c.gguf", seed=8, shape=SMALL)
    assert _digest(first) == _digest(again)
    assert _digest(first) != _digest(other)
    assert check_model(first) == first
    assert not (tmp_path / "a.gguf.partial").exists()


def test_a_missing_model_names_the_file_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(EngineSetupError, match=r"nowhere\.gguf is missing: run scripts/dev-setup"):
        check_model(missing)


def test_a_corrupt_model_names_the_file_and_the_fix(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(
        EngineSetupError, match=r"corrupt\.gguf is corrupt .*delete it and run scripts/dev-setup"
    ):
        check_model(corrupt)


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_llama_server_serves_exactly_the_tokens_asked_for(llama_server) -> None:
    server = llama_server()
    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as response:
        assert SERVED_MODEL in {model["id"] for model in json.load(response)["data"]}
    answer = _post(
        f"{server.url}/v1/completions",
        {"model": SERVED_MODEL, "prompt": [5, 6, 7, 8, 9], "max_tokens": 23, "ignore_eos": True},
    )
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (5, 23)
    chat = _post(
        f"{server.url}/v1/chat/completions",
        {
            "model": SERVED_MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 5,
            "ignore_eos": True,
        },
    )
    assert chat["usage"]["completion_tokens"] == 5


def test_engine_steps_writes_a_calibration_the_simulator_reads(
    llama_server, tmp_path: Path
) -> None:
    from batchpilot.sim.calibration import PREFILL_KIND, read_rows

    server = llama_server()
    out = tmp_path / "steps.csv"
    assert engine_steps.main(["--url", server.url, "--quick", "--csv", str(out)]) == 0
    rows = read_rows(out)
    kinds = {row.kind for row in rows}
    assert kinds == {"prefill_bs1", "decode_step", "mixed_chunk256_isl256"}
    assert all(row.latency_ms > 0 and row.model == SERVED_MODEL for row in rows)
    prefill = {row.context_len: row.latency_ms for row in rows if row.kind == PREFILL_KIND}
    # 64x the tokens costs far more than 4x the time, however loaded the machine.
    assert prefill[2048] > 4 * prefill[32]
    # 256 prompt tokens beside 4 decoding streams: more than 128 alone.
    (mixed,) = (row for row in rows if row.kind.startswith("mixed_"))
    assert mixed.batch_or_chunk == 4 and mixed.context_len > 128
    assert mixed.latency_ms > prefill[128]
    with out.open() as handle:
        assert next(csv.reader(handle)) == list(engine_steps.COLUMNS)


TINY_LIVE_SCENARIO = f"""
name: tiny-live
seed: 3
engine:
  calibration: {REPO / "bench/calibration/llamacpp-cpu-2core.csv"}
  model: batchpilot-tiny-llama
  system: cpu-2core
  kv_cache_tokens: 4096
  max_num_seqs: 4
  max_num_batched_tokens: 512
  shared_kv_cache: true
replicas: 1
slo: {{ttft_ms: 5000, tpot_ms: 200}}
control_interval_s: 3
workload:
  - duration_s: 9
    synthetic:
      arrival: {{process: gamma, rate_rps: 1.5, cv: 1.0}}
      prompt_tokens: {{dist: lognormal, p50: 32, p90: 64, max: 128}}
      output_tokens: {{dist: lognormal, p50: 8, p90: 16, max: 32}}
"""


@pytest.mark.engine
def test_the_live_benchmark_runs_controllers_on_real_replicas(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(TINY_LIVE_SCENARIO)
    out = tmp_path / "live.json"
    assert (
        live_engine.main(
            [
                str(scenario),
                "--controllers",
                "static-default,adaptive",
                "--json",
                str(out),
                "--compare-sim",
            ]
        )
        == 0
    )
    document = json.loads(out.read_text())["scenarios"][0]
    assert [r["controller"] for r in document["results"]] == ["static-default", "adaptive"]
    for result in document["results"]:
        # Every request is accounted for, none failed, and at this light load most are good.
        assert result["arrived"] == document["arrived"] > 0
        assert result["ok"] + result["shed"] + result["errors"] == result["arrived"]
        assert result["errors"] == 0
        assert result["good"] >= result["arrived"] // 2
        assert result["machine"]["cpu_s"]["engines"] > 0
    assert [r["controller"] for r in document["sim_vs_real"]] == ["static-default", "adaptive"]

    # --real: the simulator against this stored run again, without a live run.
    again = tmp_path / "again.json"
    assert live_engine.main([str(scenario), "--real", str(out), "--json", str(again)]) == 0
    redone = json.loads(again.read_text())["scenarios"][0]
    assert redone["results"] == document["results"]
    assert redone["sim_vs_real"] == document["sim_vs_real"]
    # A run of another scenario (other requests) is refused, naming the field.
    other = tmp_path / "other.yaml"
    other.write_text(scenario.read_text().replace("seed: 3", "seed: 4"))
    with pytest.raises(SystemExit, match="seed is 3, the scenario's is 4"):
        live_engine.main([str(other), "--real", str(out)])


@pytest.mark.engine
def test_direct_mode_runs_static_default_straight_to_the_engines(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(TINY_LIVE_SCENARIO)
    out = tmp_path / "direct.json"
    args = [str(scenario), "--controllers", "static-default", "--direct", "--compare-sim"]
    assert live_engine.main([*args, "--json", str(out)]) == 0
    document = json.loads(out.read_text())["scenarios"][0]
    assert document["mode"] == "direct"
    (result,) = document["results"]
    # A fresh connection per request: llama-server's closed keep-alives cost nothing.
    assert result["ok"] == result["arrived"] == document["arrived"] > 0
    assert result["machine"]["cpu_s"]["engines"] > 0
    assert [row["controller"] for row in document["sim_vs_real"]] == ["static-default"]
    # Nothing but static-default can run without a gate to apply its knobs.
    with pytest.raises(SystemExit) as refused:
        live_engine.main([str(scenario), "--controllers", "adaptive", "--direct"])
    assert refused.value.code == 2
