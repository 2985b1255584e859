"""SLO classes in the simulator and the benchmark (issue #20): scenario format,
workload merge, per-class results, Jain's index and the class baselines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from stack.workloads import CALIBRATION

from batchpilot.contract.gate_metrics import GateMetric
from batchpilot.contract.knobs import MAX_AGING_MS, Knobs, ServiceClass
from batchpilot.sim.bench import (
    RequestTable,
    Simulation,
    controller_context,
    fair_shares,
    jain_index,
    run_benchmark,
    run_controller,
)
from batchpilot.sim.controllers import build_controller
from batchpilot.sim.engine import Replica
from batchpilot.sim.metrics import class_histogram_buckets, class_key
from batchpilot.sim.scenario import ScenarioError, load_scenario, parse_scenario
from batchpilot.sim.workload import build_workload

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not CALIBRATION.exists(), reason="../shared data not present")

LENGTHS = {
    "prompt_tokens": {"dist": "lognormal", "p50": 400, "p90": 1200, "max": 4000},
    "output_tokens": {"dist": "lognormal", "p50": 60, "p90": 150, "max": 400},
}


def synthetic(duration_s: float, rate_rps: float, **lengths: Any) -> dict[str, Any]:
    return {
        "duration_s": duration_s,
        "synthetic": {
            "arrival": {"process": "poisson", "rate_rps": rate_rps},
            **LENGTHS,
            **lengths,
        },
    }


def class_data(**overrides: Any) -> dict[str, Any]:
    """A small engine (32 sequences) that an interactive class shares with a batch flood."""
    data: dict[str, Any] = {
        "name": "classes-small",
        "seed": 5,
        "engine": {
            "calibration": str(CALIBRATION),
            "model": "meta-llama/Meta-Llama-3.1-8B",
            "system": "h100_sxm",
            "kv_cache_tokens": 400_000,
            "max_num_seqs": 32,
            "max_num_batched_tokens": 8192,
        },
        "slo": {"ttft_ms": 20_000, "tpot_ms": 100},
        "control_interval_s": 10,
        "classes": [
            {
                "name": "interactive",
                "priority": 1,
                "slo": {"ttft_ms": 1000, "tpot_ms": 60},
                "workload": [synthetic(60, 3)],
            },
            {
                "name": "batch",
                "workload": [
                    synthetic(20, 1),
                    synthetic(
                        20,
                        25,
                        prompt_tokens={
                            "dist": "lognormal",
                            "p50": 2000,
                            "p90": 4000,
                            "max": 8000,
                        },
                    ),
                    synthetic(20, 1),
                ],
            },
        ],
    }
    data.update(overrides)
    return data


def parse(data: dict[str, Any]) -> Any:
    return parse_scenario(data, base_dir=REPO)


# ------------------------------------------------------------------ scenario format


def test_classes_parse_with_defaults_and_their_own_workloads():
    scenario = parse(class_data())
    interactive, batch = scenario.classes
    assert (interactive.name, interactive.priority, interactive.weight) == ("interactive", 1, 1.0)
    assert (interactive.slo.ttft_ms, interactive.slo.tpot_ms) == (1000, 60)
    # No slo of its own: the top-level one, the default class's.
    assert batch.slo == scenario.slo
    assert batch.max_concurrency is None
    assert scenario.workload == ()
    assert [c.name for c in scenario.traffic_classes] == ["interactive", "batch"]
    assert scenario.duration_s == 60


def test_a_top_level_workload_beside_classes_is_the_default_class():
    data = class_data(workload=[synthetic(30, 2)])
    scenario = parse(data)
    assert [c.name for c in scenario.traffic_classes] == ["default", "interactive", "batch"]
    assert scenario.slo_of("default") == scenario.slo
    assert scenario.slo_of("interactive").ttft_ms == 1000


def mutate(path: str, value: Any) -> dict[str, Any]:
    data = class_data()
    target: Any = data
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    last = keys[-1]
    if isinstance(target, list):
        target[int(last)] = value
    elif value is KeyError:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [
        ("classes.1.name", "interactive", "classes[1].name", "declared twice"),
        (
            "classes.0.slo",
            {"ttft_ms": 30_000},
            "classes[0].slo.ttft_ms",
            "must be <= the top-level",
        ),
        ("classes.0.slo", {"tpot_ms": 101}, "classes[0].slo.tpot_ms", "must be <= the top-level"),
        ("classes.0.colour", "red", "classes[0].colour", "unknown key"),
        ("classes.0.slo", {"ttft_ms": 10, "p99": 1}, "classes[0].slo.p99", "unknown key"),
        ("classes.0.name", "Interactive", "classes[0].name", "lower-case"),
        ("classes.0.name", "default", "classes[0].name", "top-level"),
        ("classes.0.weight", 0, "classes[0].weight", "must be > 0"),
        ("classes.0.priority", 1001, "classes[0].priority", "must be <="),
        ("classes.0.max_concurrency", 0, "classes[0].max_concurrency", "must be >= 1"),
        ("classes.0.workload", [], "classes[0].workload", "non-empty list"),
        ("classes.0.workload", KeyError, "classes[0].workload", "is required"),
        ("classes", [], "classes", "non-empty list"),
    ],
)
def test_bad_classes_name_the_field(path, value, field, message):
    with pytest.raises(ScenarioError) as caught:
        parse(mutate(path, value))
    assert caught.value.field == field
    assert message in str(caught.value)


def test_without_classes_the_top_level_workload_stays_required():
    data = class_data()
    del data["classes"]
    with pytest.raises(ScenarioError) as caught:
        parse(data)
    assert caught.value.field == "workload"


@pytest.mark.parametrize(
    "path",
    sorted((REPO.parent / "shared" / "scenarios").glob("*.yaml"))
    + sorted((REPO / "bench" / "scenarios").glob("*.yaml")),
    ids=lambda p: p.stem,
)
def test_every_shipped_scenario_still_loads(path):
    scenario = load_scenario(path)
    assert scenario.duration_s > 0
    assert bool(scenario.classes) == path.stem.startswith("classes-")


# ------------------------------------------------------------------ workload


def test_classes_merge_in_time_order_with_a_class_per_request():
    scenario = parse(class_data())
    workload = build_workload(scenario)
    assert np.all(np.diff(workload.arrival_s) >= 0)
    assert workload.class_names == ("interactive", "batch")
    counts = np.bincount(workload.class_of(), minlength=2)
    assert counts[0] == pytest.approx(180, rel=0.3)  # 3 rps x 60 s
    assert counts[1] == pytest.approx(540, rel=0.3)  # 20 + 500 + 20
    # The batch class's second phase lands in [20, 40) s.
    flood = (workload.class_of() == 1) & (workload.phase == 1)
    assert workload.arrival_s[flood].min() >= 20 and workload.arrival_s[flood].max() < 40


def class_requests(scenario: Any, name: str) -> np.ndarray:
    workload = build_workload(scenario)
    mine = workload.class_of() == workload.class_names.index(name)
    return np.stack([workload.arrival_s[mine], workload.prompt_tokens[mine]])


def test_editing_one_class_leaves_the_others_requests_alone():
    before = parse(class_data())
    data = class_data()
    data["classes"][1]["workload"][1]["synthetic"]["arrival"]["rate_rps"] = 5
    data["classes"].append({"name": "extra", "workload": [synthetic(10, 1)]})
    data["classes"].reverse()
    after = parse(data)
    np.testing.assert_array_equal(
        class_requests(before, "interactive"), class_requests(after, "interactive")
    )
    assert class_requests(before, "batch").shape != class_requests(after, "batch").shape


def test_a_scenario_without_classes_has_one_class_and_the_same_requests():
    data = class_data()
    del data["classes"]
    data["workload"] = [synthetic(30, 2)]
    workload = build_workload(parse(data))
    assert workload.service_class is None
    assert workload.class_names == ("default",)
    # The default class of a class scenario draws exactly these requests too.
    beside = build_workload(parse(class_data(workload=[synthetic(30, 2)])))
    mine = beside.class_of() == 0
    np.testing.assert_array_equal(beside.arrival_s[mine], workload.arrival_s)


# ------------------------------------------------------------------ engine metrics


def test_the_gate_model_exports_per_class_series():
    scenario = parse(class_data())
    knobs = Knobs(
        max_concurrency=1,
        classes=(ServiceClass("interactive", priority=1), ServiceClass("batch")),
    )
    replica = Replica(scenario.engine.config(), knobs)
    replica.submit(0.0, 500, 4, service_class="batch")
    replica.submit(0.0, 500, 4, service_class="batch")
    replica.submit(0.001, 300, 4, service_class="interactive")
    replica.submit(0.002, 300, 4, service_class="nobody")  # served in the default class
    snapshot = replica.snapshot(0.003)
    assert snapshot[class_key(GateMetric.CLASS_INFLIGHT_REQUESTS, "batch")] == 1
    assert snapshot[class_key(GateMetric.CLASS_QUEUE_LENGTH, "batch")] == 1
    assert snapshot[class_key(GateMetric.CLASS_QUEUE_LENGTH, "interactive")] == 1
    assert snapshot[class_key(GateMetric.CLASS_QUEUE_LENGTH, "default")] == 1
    assert not any('class="nobody"' in key for key in snapshot)
    final = replica.snapshot(60.0)
    assert final[class_key(GateMetric.CLASS_ADMITTED_TOTAL, "batch")] == 2
    assert final[class_key(GateMetric.CLASS_ADMITTED_TOKENS_TOTAL, "batch")] == 1008
    # Interactive (priority 1) went before the second batch request.
    ttft = class_histogram_buckets(
        final, GateMetric.CLASS_TIME_TO_FIRST_TOKEN_SECONDS, "interactive"
    )
    assert ttft[-1] == (math.inf, 1.0)
    assert final[class_key(GateMetric.CLASS_TIME_PER_OUTPUT_TOKEN_SECONDS, "batch", "_count")] == 2
    text = replica.render_text(60.0)
    assert f"# TYPE {GateMetric.CLASS_SHED_TOTAL} counter" in text
    assert f'{GateMetric.CLASS_ADMITTED_TOTAL}{{class="interactive"}} 1.0' in text


def test_a_class_queue_deadline_counts_its_sheds():
    scenario = parse(class_data())
    knobs = Knobs(
        max_concurrency=1,
        classes=(ServiceClass("batch", queue_deadline_ms=10),),
    )
    replica = Replica(scenario.engine.config(), knobs)
    replica.submit(0.0, 4000, 50, service_class="batch")
    replica.submit(0.0, 4000, 50, service_class="batch")
    snapshot = replica.snapshot(5.0)
    assert snapshot[class_key(GateMetric.CLASS_SHED_TOTAL, "batch")] == 1


# ------------------------------------------------------------------ results


def table(classes: list[str], arrival: list[float], ttft: list[float], prompt: list[int]) -> Any:
    n = len(classes)
    return RequestTable(
        arrival_s=np.array(arrival),
        ttft_s=np.array(ttft),
        tpot_s=np.zeros(n),
        output_tokens=np.ones(n, dtype=int),
        finished=~np.isnan(np.array(ttft)),
        shed=np.zeros(n, dtype=bool),
        service_class=np.array(classes, dtype=object),
        prompt_tokens=np.array(prompt),
    )


def two_tenants(weight_b: float = 1.0) -> Any:
    data = class_data()
    data["classes"] = [
        {"name": "a", "workload": [synthetic(10, 1)]},
        {"name": "b", "weight": weight_b, "workload": [synthetic(10, 1)]},
    ]
    return parse(data)


def test_fair_shares_water_fill_by_weight():
    assert fair_shares(100, [10, 200], [1, 1]) == [10, 90]
    assert fair_shares(100, [200, 200], [1, 3]) == [25, 75]
    assert fair_shares(100, [20, 30], [1, 1]) == [20, 30]


def test_jain_index_on_a_hand_made_case():
    scenario = two_tenants()
    # Both send 10 requests of 99 + 1 tokens in [0, 10] s; a gets 8 first tokens in
    # the period, b 2: fair would be 5 each, so x = (1.6, 0.4), J = 4 / (2 * 2.72).
    arrival = [float(i) for i in range(10)] * 2
    ttft = [0.1] * 8 + [math.nan] * 2 + [0.1] * 2 + [math.nan] * 8
    result = jain_index(table(["a"] * 10 + ["b"] * 10, arrival, ttft, [99] * 20), scenario)
    assert result == pytest.approx(4 / (2 * (1.6**2 + 0.4**2)), abs=1e-4)
    # Equal service: 1.
    ttft = [0.1] * 5 + [math.nan] * 5 + [0.1] * 5 + [math.nan] * 5
    assert jain_index(table(["a"] * 10 + ["b"] * 10, arrival, ttft, [99] * 20), scenario) == 1.0
    # Weight 3 for b: b's fair share of 10 first tokens is 7.5, so 5 / 5 is unfair to b.
    weighted = two_tenants(weight_b=3.0)
    result = jain_index(table(["a"] * 10 + ["b"] * 10, arrival, ttft, [99] * 20), weighted)
    assert result == pytest.approx((2 + 2 / 3) ** 2 / (2 * (2**2 + (2 / 3) ** 2)), abs=1e-4)


def test_jain_index_is_none_without_two_classes_of_one_priority():
    scenario = parse(class_data())  # priorities 1 and 0
    arrival = [0.0, 1.0]
    assert (
        jain_index(table(["interactive", "batch"], arrival, [0.1, 0.1], [10, 10]), scenario) is None
    )


@pytest.fixture(scope="module")
def small_classes() -> Any:
    return parse(class_data())


def test_results_carry_per_class_fields_judged_by_each_class_slo(small_classes):
    scenario = small_classes
    workload = build_workload(scenario)
    result = run_controller(scenario, workload, "static-default")
    classes = result["classes"]
    assert list(classes) == ["interactive", "batch"]
    assert sum(c["arrived"] for c in classes.values()) == len(workload)
    assert sum(c["good"] for c in classes.values()) == result["good"]
    assert set(classes["batch"]) == {
        "arrived", "good", "goodput_rps", "slo_attainment", "ttft_p99_ms", "tpot_p99_ms",
        "shed", "served_tokens",
    }  # fmt: skip
    assert "jain_index" in result and result["jain_index"] is None
    # The same run judged by the loose top-level SLO alone would count more good.
    sim = Simulation(
        scenario, workload, build_controller("static-default", controller_context(scenario))
    )
    sim.run_to_completion()
    loose = RequestTable.of(sim.requests).good(scenario.slo.ttft_ms, scenario.slo.tpot_ms).sum()
    assert loose >= result["good"]
    assert all(r.service_class in ("interactive", "batch") for r in sim.requests)


def test_strict_priority_serves_the_interactive_class_better_than_fcfs(small_classes):
    workload = build_workload(small_classes)
    fcfs = run_controller(small_classes, workload, "static-default")["classes"]["interactive"]
    strict = run_controller(small_classes, workload, "strict-priority")["classes"]["interactive"]
    assert strict["slo_attainment"] > fcfs["slo_attainment"] + 0.1
    assert strict["ttft_p99_ms"] < fcfs["ttft_p99_ms"]


def test_baselines_build_the_expected_knobs(small_classes):
    context = controller_context(small_classes)
    assert [c.name for c in context.classes] == ["interactive", "batch"]
    assert context.classes[0].slo is not None and context.classes[0].slo.ttft_ms == 1000
    assert context.classes[1].slo is None  # the top-level slo
    names = context.replica_names

    def knobs_of(name: str) -> Knobs:
        return build_controller(name, context).decide(0.0, {})[names[0]]

    default = knobs_of("static-default")
    assert default.classes == () and default.max_concurrency == 32
    strict = knobs_of("strict-priority")
    assert strict.aging_ms == MAX_AGING_MS and strict.max_concurrency == 32
    assert [(c.name, c.priority, c.weight) for c in strict.classes] == [
        ("interactive", 1, 1.0),
        ("batch", 0, 1.0),
    ]
    epp = knobs_of("epp-flow-control")
    assert epp.aging_ms == MAX_AGING_MS
    assert {c.weight for c in epp.classes} == {1.0}
    assert build_controller("epp-flow-control", context).peer_admission.holds  # type: ignore[attr-defined]


def test_epp_flow_control_without_classes_is_unchanged(small_classes):
    data = class_data()
    del data["classes"]
    data["workload"] = [synthetic(10, 1)]
    context = controller_context(parse(data))
    knobs = build_controller("epp-flow-control", context).decide(0.0, {})
    assert knobs[context.replica_names[0]] == Knobs()


def test_static_best_sweeps_per_class_deadlines_and_oracle_full_is_left_out(small_classes):
    from batchpilot.sim.baselines import class_grid

    grid = class_grid(small_classes)
    deadlines = {tuple(c.queue_deadline_ms for c in k.classes) for k in grid}
    assert deadlines == {(None, None), (1000, None), (None, 20000), (1000, 20000)}
    document = run_benchmark([small_classes], ["static-default", "oracle-full"])
    entry = document["scenarios"][0]
    assert [r["controller"] for r in entry["results"]] == ["static-default"]
    assert "oracle-full" in entry["skipped"]
    assert [c["name"] for c in entry["classes"]] == ["interactive", "batch"]
    assert entry["upper_bound"]["good"] >= entry["results"][0]["good"]


def test_the_shipped_class_scenarios_load_and_describe_themselves():
    for name in ("classes-batch-flood", "classes-two-tenants", "classes-priority-inversion"):
        scenario = load_scenario(REPO / "bench" / "scenarios" / f"{name}.yaml")
        assert len(scenario.classes) == 2
        assert yaml.safe_load((REPO / "bench" / "scenarios" / f"{name}.yaml").read_text())
