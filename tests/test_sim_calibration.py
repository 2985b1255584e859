"""Step-cost calibration: accuracy on the shared CSV, genericity, errors, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from stack.workloads import CALIBRATION
from typer.testing import CliRunner

from batchpilot.cli.main import app
from batchpilot.sim.calibration import (
    CalibrationError,
    CalibrationRow,
    StepCostModel,
    fit,
    predict_ms,
    read_rows,
)

MODEL = "meta-llama/Meta-Llama-3.1-8B"
needs_shared = pytest.mark.skipif(
    not CALIBRATION.exists(), reason="../shared calibration data not present"
)


@needs_shared
@pytest.mark.parametrize("system", ["h100_sxm", "a100_sxm"])
def test_error_within_target_per_kind(system: str) -> None:
    calibration = fit(read_rows(CALIBRATION), MODEL, system)
    kinds = {e.kind for e in calibration.errors}
    assert {"decode_step", "prefill_bs1"} <= kinds and any(k.startswith("mixed_") for k in kinds)
    for error in calibration.errors:
        assert error.mean_ape_pct <= 5.0, error
        assert error.max_ape_pct <= 15.0, error


def write_rows(
    path: Path, cost: StepCostModel, noise: float, seed: int, *, shared_kv_cache: bool = False
) -> None:
    """Rows of a made-up model in the shared CSV's format, from a known cost model."""
    rng = np.random.default_rng(seed)
    rows = []
    for batch in (1, 4, 16, 64, 256):
        for context in (256, 1024, 4096):
            rows.append(("decode_step", batch, context))
    for tokens in (128, 512, 1024, 2048, 4096, 8192):
        rows.append(("prefill_bs1", 1, tokens))
    for chunk in (512, 2048):
        for decodes in (0, 32, 128):
            rows.append((f"mixed_chunk{chunk}_isl4096", decodes, 4096))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "model",
                "system",
                "backend",
                "tp",
                "kind",
                "batch_or_chunk",
                "context_len",
                "latency_ms",
            ]
        )
        for kind, b, c in rows:
            row = CalibrationRow("acme/7b", "gpu_x", "vllm", 2, kind, b, c, 1.0)
            latency = predict_ms(cost, row, shared_kv_cache=shared_kv_cache) * (
                1 + noise * rng.standard_normal()
            )
            writer.writerow(["acme/7b", "gpu_x", "vllm", 2, kind, b, c, latency])


TRUE_COST = StepCostModel(
    decode_base_ms=9.0,
    decode_per_seq_ms=0.03,
    decode_per_context_token_ms=6e-5,
    prefill_floor_ms=0.0,
    prefill_base_ms=6.0,
    prefill_per_token_ms=0.04,
    prefill_attention_ms=2e-6,
    mixed_base_ms=1.0,
    mixed_decode_scale=1.1,
)


@pytest.mark.parametrize(("noise", "tolerance_pct"), [(0.0, 0.5), (0.02, 8.0)])
def test_recovers_a_known_model_from_its_rows(
    tmp_path: Path, noise: float, tolerance_pct: float
) -> None:
    path = tmp_path / "rows.csv"
    write_rows(path, TRUE_COST, noise, seed=3)
    calibration = fit(read_rows(path), "acme/7b", "gpu_x")
    assert calibration.tp == 2
    assert calibration.mixed_fitted
    for error in calibration.errors:
        assert error.max_ape_pct <= tolerance_pct, error
    if noise == 0.0:
        assert calibration.cost.decode_per_context_token_ms == pytest.approx(6e-5, rel=1e-6)
        assert calibration.cost.mixed_decode_scale == pytest.approx(1.1, rel=1e-6)


def test_shared_cache_fit_recovers_the_masked_pair_cost(tmp_path: Path) -> None:
    # llama.cpp's unified cache: a prompt beside decodes is masked against their cells.
    truth = StepCostModel(**{**TRUE_COST.to_dict(), "masked_pair_ms": 3e-7})
    path = tmp_path / "rows.csv"
    write_rows(path, truth, 0.0, seed=3, shared_kv_cache=True)
    shared = fit(read_rows(path), "acme/7b", "gpu_x", shared_kv_cache=True)
    assert shared.cost.masked_pair_ms == pytest.approx(3e-7, rel=1e-6)
    assert shared.cost.mixed_decode_scale == pytest.approx(1.1, rel=1e-6)
    assert max(e.max_ape_pct for e in shared.errors) < 1e-6
    # Read as a paged cache, the same rows leave a large error on the mixed steps.
    paged = fit(read_rows(path), "acme/7b", "gpu_x")
    assert paged.cost.masked_pair_ms == 0.0
    assert max(e.max_ape_pct for e in paged.errors if e.kind.startswith("mixed_")) > 20.0


@needs_shared
@pytest.mark.parametrize(
    ("model", "system", "tp", "field", "fragment"),
    [
        ("nope/1b", "h100_sxm", None, "model", "'nope/1b' has no rows"),
        (MODEL, "tpu_v5", None, "system", "'tpu_v5' has no rows"),
        (MODEL, "h100_sxm", 8, "tp", "tp 8 has no rows"),
    ],
)
def test_missing_rows_name_the_selector(
    model: str, system: str, tp: int | None, field: str, fragment: str
) -> None:
    with pytest.raises(CalibrationError, match=fragment) as info:
        fit(read_rows(CALIBRATION), model, system, tp)
    assert info.value.field == field


def test_bad_csv_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "model,system,backend,tp,kind,batch_or_chunk,context_len,latency_ms\nm,s,vllm,1,decode_step,x,1,2\n"
    )
    with pytest.raises(CalibrationError, match=r"bad\.csv:2: bad number"):
        read_rows(path)
    path.write_text("model,system\nm,s\n")
    with pytest.raises(CalibrationError, match="missing column"):
        read_rows(path)


@pytest.mark.parametrize("field", ["decode_base_ms", "prefill_attention_ms"])
def test_cost_model_rejects_impossible_coefficients(field: str) -> None:
    values = {**TRUE_COST.to_dict(), field: -1.0}
    with pytest.raises(CalibrationError, match=field):
        StepCostModel(**values)


@needs_shared
def test_calibrate_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "cal.json"
    result = CliRunner().invoke(
        app,
        [
            "sim",
            "calibrate",
            str(CALIBRATION),
            "--model",
            MODEL,
            "--system",
            "a100_sxm",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "decode_step" in result.output
    document = json.loads(out.read_text())
    assert document["system"] == "a100_sxm"
    assert set(document["coefficients"]) == set(TRUE_COST.to_dict())
    assert document["errors"]["prefill_bs1"]["rows"] == 7


@needs_shared
def test_calibrate_cli_missing_system_exits_2() -> None:
    result = CliRunner().invoke(
        app, ["sim", "calibrate", str(CALIBRATION), "--model", MODEL, "--system", "mi300x"]
    )
    assert result.exit_code == 2
    assert "'mi300x' has no rows" in result.output


def test_calibrate_cli_fits_the_committed_llama_cpp_rows_as_a_shared_cache(tmp_path: Path) -> None:
    # The command bench/calibration/README.md documents, on the committed CSV.
    csv_path = Path(__file__).resolve().parents[1] / "bench/calibration/llamacpp-cpu-2core.csv"
    out = tmp_path / "cal.json"
    args = ["sim", "calibrate", str(csv_path), "--model", "batchpilot-tiny-llama"]
    args += ["--system", "cpu-2core", "--shared-kv-cache", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["coefficients"]["masked_pair_ms"] > 0
    mixed = {kind: e for kind, e in document["errors"].items() if kind.startswith("mixed_")}
    assert mixed and all(e["mean_ape_pct"] < 15 for e in mixed.values())
    # Read as a paged cache, the mixed rows fit worse.
    paged = fit(read_rows(csv_path), "batchpilot-tiny-llama", "cpu-2core")
    paged_mixed = [e.mean_ape_pct for e in paged.errors if e.kind.startswith("mixed_")]
    assert max(paged_mixed) > max(e["mean_ape_pct"] for e in mixed.values())
