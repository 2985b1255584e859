"""`batchpilot bench`: the contract's exit codes, JSON fields and determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from batchpilot.cli.main import app
from batchpilot.sim.controllers import register_online

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CALIBRATION = SHARED / "data" / "calibration" / "llama3.1-8b_vllm_step_latency.csv"
pytestmark = pytest.mark.skipif(not CALIBRATION.exists(), reason="../shared data not present")

REQUIRED = {
    "controller", "good", "goodput_rps", "slo_attainment", "ttft_p50_ms", "ttft_p99_ms",
    "tpot_p50_ms", "tpot_p99_ms", "output_tok_s", "shed", "preemptions", "config_changes", "wall_s",
}  # fmt: skip


def scenario(tmp_path: Path, name: str = "mini", **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": name,
        "seed": 5,
        "engine": {
            "calibration": str(CALIBRATION),
            "model": "meta-llama/Meta-Llama-3.1-8B",
            "system": "a100_sxm",
            "kv_cache_tokens": 100_000,
            "max_num_seqs": 128,
            "max_num_batched_tokens": 4096,
        },
        "slo": {"ttft_ms": 1000, "tpot_ms": 60},
        "control_interval_s": 5,
        "workload": [
            {
                "duration_s": 60,
                "synthetic": {
                    "arrival": {"process": "gamma", "rate_rps": 6, "cv": 3},
                    "prompt_tokens": {"dist": "lognormal", "p50": 800, "p90": 2500, "max": 6000},
                    "output_tokens": {"dist": "lognormal", "p50": 80, "p90": 250, "max": 500},
                },
            }
        ],
    }
    data.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["bench", *args])


def test_bench_writes_every_required_field(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    paths = [scenario(tmp_path, "a"), scenario(tmp_path, "b", replicas=2)]
    result = run(
        *map(str, paths),
        "--controllers",
        "static-default,static-best,aimd,oracle",
        "--json",
        str(out),
        "--workers",
        "1",
    )
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert [s["name"] for s in document["scenarios"]] == ["a", "b"]
    for entry in document["scenarios"]:
        assert entry["duration_s"] == 60
        assert entry["arrived"] > 100
        assert [r["controller"] for r in entry["results"]] == [
            "static-default",
            "static-best",
            "aimd",
            "oracle",
        ]
        for row in entry["results"]:
            assert set(row) >= REQUIRED
            assert row["good"] <= entry["arrived"]
            assert row["slo_attainment"] == pytest.approx(row["good"] / entry["arrived"])
            assert row["goodput_rps"] == pytest.approx(row["good"] / 60)
            assert len(row["timeline"]) == 12  # 60 s / 5 s control interval
    assert "static-best" in result.output  # the table


def test_bench_is_deterministic(tmp_path: Path) -> None:
    path = scenario(tmp_path)
    documents = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}.json"
        assert (
            run(
                str(path),
                "--controllers",
                "static-default,aimd,oracle",
                "--json",
                str(out),
                "--workers",
                "1",
            ).exit_code
            == 0
        )
        document = json.loads(out.read_text())
        assert document.pop("command").endswith(f"--json {out}")
        assert document.pop("wall_s") > 0
        for row in document["scenarios"][0]["results"]:
            row.pop("wall_s")
        documents.append(document)
    assert documents[0] == documents[1]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"control_interval_s": -5}, "control_interval_s: must be > 0, got -5"),
        (
            {"workload": [{"duration_s": 10, "trace": "nowhere.csv"}]},
            "workload[0].trace: file not found",
        ),
        ({"surprise": 1}, "surprise: unknown key"),
    ],
)
def test_bad_scenario_exits_2_with_one_line(
    tmp_path: Path, changes: dict[str, Any], fragment: str
) -> None:
    good = scenario(tmp_path, "good")
    bad = scenario(tmp_path, "bad", **changes)
    result = run(str(good), str(bad), "--controllers", "static-default")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "bad.yaml" in lines[0] and fragment in lines[0]


def test_missing_scenario_file_exits_2(tmp_path: Path) -> None:
    result = run(str(tmp_path / "absent.yaml"))
    assert result.exit_code == 2
    assert "cannot read scenario file" in result.output


def test_unknown_controller_exits_2(tmp_path: Path) -> None:
    result = run(str(scenario(tmp_path)), "--controllers", "static-default,magic")
    assert result.exit_code == 2
    assert "unknown controller 'magic'" in result.output


def test_unavailable_controller_is_a_clear_error(tmp_path: Path) -> None:
    # How `adaptive` fails while batchpilot.controller.bench_adapter cannot be imported.
    register_online("not-yet", "batchpilot.controller.not_written_yet:make")
    result = run(str(scenario(tmp_path)), "--controllers", "static-default,not-yet")
    assert result.exit_code == 2
    assert "controller 'not-yet' is not available" in result.output
    assert "batchpilot.controller.not_written_yet" in result.output


def test_the_readme_benchmark_command_runs_every_controller_and_writes_the_report(
    tmp_path: Path,
) -> None:
    # The README's command, on a one-minute scenario instead of both suites.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split(".venv/bin/batchpilot bench ../shared/scenarios/*.yaml", 1)[1]
    words = block.split("```", 1)[0].replace("\\\n", " ").split()
    controllers = words[words.index("--controllers") + 1]
    assert words[words.index("--report") + 1] == "docs/"
    out = tmp_path / "bench.json"
    result = run(
        str(scenario(tmp_path)), "--controllers", controllers, "--json", str(out),
        "--report", str(tmp_path / "docs"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    (entry,) = document["scenarios"]
    assert [r["controller"] for r in entry["results"]] == controllers.split(",")
    assert "warnings" not in entry, entry.get("warnings")
    assert entry["upper_bound"]["good"] >= max(r["good"] for r in entry["results"])
    markdown = (tmp_path / "docs" / "benchmark.md").read_text()
    assert all(
        f"| {name} |" in markdown or f"| **{name}** |" in markdown
        for name in controllers.split(",")
    )
