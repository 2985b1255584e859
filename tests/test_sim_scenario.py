"""Scenario files: the shared suite loads; every kind of bad file names its field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchpilot.sim.scenario import ScenarioError, SyntheticPhase, TracePhase, load_scenario

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SCENARIOS = sorted((SHARED / "scenarios").glob("*.yaml"))
CALIBRATION = SHARED / "data" / "calibration" / "llama3.1-8b_vllm_step_latency.csv"
pytestmark = pytest.mark.skipif(not CALIBRATION.exists(), reason="../shared data not present")


def test_the_shared_suite_has_five_scenarios() -> None:
    assert [p.stem for p in SCENARIOS] == [
        "code-bursty",
        "conv-steady",
        "conv-to-code-shift",
        "flash-crowd",
        "summaries-to-reports",
    ]


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_shared_scenarios_load(path: Path) -> None:
    scenario = load_scenario(path)
    raw = yaml.safe_load(path.read_text())
    assert scenario.name == raw["name"]
    assert scenario.seed == raw["seed"]
    assert scenario.duration_s == sum(phase["duration_s"] for phase in raw["workload"])
    assert scenario.replicas == raw["replicas"]
    assert scenario.engine.runtime_tunable == raw["engine"]["runtime_tunable"]
    for phase, spec in zip(scenario.workload, raw["workload"], strict=True):
        assert isinstance(phase, TracePhase if "trace" in spec else SyntheticPhase)
        if isinstance(phase, TracePhase):
            assert phase.trace.is_file() and phase.trace.is_absolute()


def base_scenario() -> dict[str, Any]:
    return {
        "name": "t",
        "seed": 1,
        "engine": {
            "calibration": str(CALIBRATION),
            "model": "meta-llama/Meta-Llama-3.1-8B",
            "system": "h100_sxm",
            "tp": 1,
            "slowdown": 1.0,
            "kv_cache_tokens": 400_000,
            "max_num_seqs": 512,
            "max_num_batched_tokens": 8192,
            "runtime_tunable": False,
        },
        "replicas": 1,
        "slo": {"ttft_ms": 2000, "tpot_ms": 50},
        "control_interval_s": 30,
        "workload": [
            {
                "duration_s": 60,
                "trace": str(SHARED / "data" / "traces" / "azure_llm_conv_2023.csv"),
                "start_s": 0,
                "rate_scale": 2.0,
            },
            {
                "duration_s": 60,
                "synthetic": {
                    "arrival": {"process": "gamma", "rate_rps": 5, "cv": 2.0},
                    "prompt_tokens": {"dist": "lognormal", "p50": 100, "p90": 300, "max": 1000},
                    "output_tokens": {"dist": "lognormal", "p50": 50, "p90": 90, "max": 200},
                },
            },
        ],
    }


def edit(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(base_scenario())
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field", "fragment"),
    [
        (("colour",), "blue", "colour", "unknown key"),
        (("engine", "max_num_seq"), 5, "engine.max_num_seq", "unknown key"),
        (
            ("workload", 1, "synthetic", "arrival", "rate_rps"),
            -3,
            "workload[1].synthetic.arrival.rate_rps",
            "must be > 0, got -3",
        ),
        (
            ("workload", 1, "synthetic", "prompt_tokens", "p90"),
            50,
            "workload[1].synthetic.prompt_tokens.p90",
            "must be >= p50",
        ),
        (("workload", 0, "duration_s"), 0, "workload[0].duration_s", "must be > 0"),
        (("workload", 0, "trace"), "missing.csv", "workload[0].trace", "file not found"),
        (
            ("workload", 0, "rate_scale"),
            "fast",
            "workload[0].rate_scale",
            "must be a finite number",
        ),
        (("workload", 0, "start_s"), 1e9, "workload[0].start_s", "span"),
        (("workload", 0, "synthetic"), {}, "workload[0]", "exactly one of"),
        (
            ("workload", 1, "synthetic", "arrival", "process"),
            "uniform",
            "workload[1].synthetic.arrival.process",
            "one of poisson, gamma",
        ),
        (
            ("workload", 1, "synthetic", "output_tokens", "dist"),
            "normal",
            "workload[1].synthetic.output_tokens.dist",
            "lognormal",
        ),
        (
            ("workload", 1, "synthetic", "output_tokens", "max"),
            10,
            "workload[1].synthetic.output_tokens.max",
            "must be >= p50",
        ),
        (("workload",), [], "workload", "non-empty list"),
        (("engine", "calibration"), "nope.csv", "engine.calibration", "file not found"),
        (("engine", "model"), "acme/none", "engine.model", "has no rows"),
        (("engine", "system"), "tpu", "engine.system", "has no rows"),
        (("engine", "tp"), 4, "engine.tp", "tp 4 has no rows"),
        (("engine", "kv_cache_tokens"), True, "engine.kv_cache_tokens", "must be an integer"),
        (
            ("engine", "max_num_batched_tokens"),
            256,
            "engine.max_num_batched_tokens",
            ">= engine.max_num_seqs",
        ),
        (("engine", "runtime_tunable"), "yes", "engine.runtime_tunable", "true or false"),
        (("engine", "shared_kv_cache"), 1, "engine.shared_kv_cache", "true or false"),
        (("slo", "tpot_ms"), 0, "slo.tpot_ms", "must be > 0"),
        (("slo", "ttft_ms"), DELETE, "slo.ttft_ms", "is required"),
        (("replicas",), 0, "replicas", "must be >= 1"),
        (("seed",), 1.5, "seed", "must be an integer"),
        (("name",), "", "name", "non-empty string"),
        (("control_interval_s",), -1, "control_interval_s", "must be > 0"),
    ],
)
def test_bad_values_name_the_field(
    tmp_path: Path, path: tuple[Any, ...], value: Any, field: str, fragment: str
) -> None:
    file = tmp_path / "s.yaml"
    file.write_text(yaml.safe_dump(edit(path, value)))
    with pytest.raises(ScenarioError) as info:
        load_scenario(file)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"{field}: ")
    assert "\n" not in str(info.value)


def test_poisson_takes_no_cv(tmp_path: Path) -> None:
    data = edit(("workload", 1, "synthetic", "arrival", "process"), "poisson")
    file = tmp_path / "s.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioError, match=r"^workload\[1\]\.synthetic\.arrival\.cv: unknown key"):
        load_scenario(file)


def test_paths_are_relative_to_the_scenario_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00.0,10,5\n2023-11-16 18:00:01.5,20,6\n"
    )
    (tmp_path / "scenarios").mkdir()
    data = base_scenario()
    data["workload"] = [{"duration_s": 10, "trace": "../data/t.csv"}]
    file = tmp_path / "scenarios" / "s.yaml"
    file.write_text(yaml.safe_dump(data))
    scenario = load_scenario(file)
    phase = scenario.workload[0]
    assert isinstance(phase, TracePhase)
    assert phase.trace == (tmp_path / "data" / "t.csv").resolve()
    assert (phase.start_s, phase.rate_scale) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: [unclosed", "invalid YAML at line 1"),
        ("- a\n- b\n", "must be a mapping, got a list"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, fragment: str) -> None:
    file = tmp_path / "s.yaml"
    file.write_text(text)
    with pytest.raises(ScenarioError, match=fragment):
        load_scenario(file)


def test_the_live_scenario_simulates_llama_cpps_shared_cache() -> None:
    # The live benchmark's scenario models llama.cpp: one cache for every slot.
    path = Path(__file__).resolve().parents[1] / "bench/scenarios/live-chat-to-long-prompts.yaml"
    engine = load_scenario(path).engine
    assert engine.shared_kv_cache and engine.config().shared_kv_cache
    assert engine.cost.masked_pair_ms > 0
    # The shared scenarios model vLLM's paged cache: nothing masked to pay for.
    for shared in SCENARIOS:
        assert not load_scenario(shared).engine.shared_kv_cache
