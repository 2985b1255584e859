"""One iteration end to end: named, timed steps, a Decision the operator's status takes, and the bench plug-in."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.bench_adapter import make, policy_for
from batchpilot.controller.explain import Decision, parse_reason_text, reason_text
from batchpilot.controller.loop import STEPS, PolicyController, _applied_setting
from batchpilot.controller.observe import (
    MetricsUnavailable,
    Observation,
    PodObservation,
    RawWindow,
)
from batchpilot.controller.policy import EngineSpec, MetricsSpec, Mode, Policy, Slo
from batchpilot.controller.sources import SnapshotSource
from batchpilot.operator.status import CycleReport, PodCounts, build_status

SHARED = Path(__file__).resolve().parents[2] / "shared"
CALIBRATION = SHARED / "data/calibration/llama3.1-8b_vllm_step_latency.csv"


@pytest.fixture(scope="module")
def scenario() -> Any:
    if not CALIBRATION.exists():
        pytest.skip(f"shared calibration data not found at {CALIBRATION}")
    from batchpilot.sim.scenario import parse_scenario

    lengths = {"dist": "lognormal", "max": 8000}
    return parse_scenario(
        {
            "name": "loop-test",
            "seed": 1,
            "engine": {
                "calibration": str(CALIBRATION),
                "model": "meta-llama/Meta-Llama-3.1-8B",
                "system": "h100_sxm",
                "kv_cache_tokens": 200_000,
                "max_num_seqs": 256,
                "max_num_batched_tokens": 8192,
            },
            "replicas": 2,
            "slo": {"ttft_ms": 2000, "tpot_ms": 50},
            "control_interval_s": 30,
            "workload": [
                {
                    "duration_s": 300,
                    "synthetic": {
                        "arrival": {"process": "poisson", "rate_rps": 30},
                        "prompt_tokens": {**lengths, "p50": 1500, "p90": 4000},
                        "output_tokens": {**lengths, "p50": 20, "p90": 60},
                    },
                }
            ],
        },
        base_dir=SHARED,
    )


def test_bench_plug_in_runs_a_scenario(scenario: Any) -> None:
    from batchpilot.sim.bench import Simulation, controller_context, count_good
    from batchpilot.sim.workload import build_workload

    context = controller_context(scenario)
    adaptive = make(context)
    decisions = []
    decide = adaptive.decide

    def recording(now_s: float, snapshots: Any) -> Any:
        answer = decide(now_s, snapshots)
        decisions.append((answer, adaptive.controller.last_decision))
        return answer

    adaptive.decide = recording  # type: ignore[method-assign]
    simulation = Simulation(scenario, build_workload(scenario), adaptive)
    simulation.run_to_completion()
    policy = policy_for(context)
    assert len(decisions) >= 10
    for answer, decision in decisions:
        assert set(answer) == set(scenario.replica_names)
        for knobs in answer.values():
            assert isinstance(knobs, Knobs)
            assert policy.clamp(knobs) == knobs
        assert decision is not None and set(decision.step_seconds) == set(STEPS)
        assert decision.reasons
        json.dumps(status_of(decision, Mode.AUTO))
    first, last = decisions[0][1], decisions[-1][1]
    assert not first.conditions.metrics_available
    assert last.conditions.metrics_available
    # 30 rps of 1,500-token prompts overload one H100: the controller must have set a limit
    assert any(answer["replica-0"].max_inflight_tokens is not None for answer, _ in decisions)
    assert count_good(simulation.requests, 2000, 50) > 0.5 * len(simulation.requests)


class ScriptedSource:
    """Raises MetricsUnavailable on the listed calls, else reads from snapshots."""

    def __init__(self, inner: SnapshotSource, failing_calls: set[int]) -> None:
        self.inner = inner
        self.failing = failing_calls
        self.calls = 0

    def read(self, now_s: float, pods: Any) -> RawWindow:
        self.calls += 1
        if self.calls in self.failing:
            raise MetricsUnavailable("Prometheus query for running failed: connection refused")
        return self.inner.read(now_s, pods)


def _policy(mode: Mode) -> Policy:
    return Policy.default_for(
        Slo(2000, 50),
        EngineSpec(max_num_seqs=256),
        mode=mode,
        metrics=MetricsSpec(window_s=60.0, staleness_s=90.0),
    )


def _snapshot(t: float) -> dict[str, float]:
    n = t / 30.0
    return {
        "batchpilot_gate_admitted_total": 300.0 * n,
        "vllm:num_requests_running": 12.0,
        'batchpilot_gate_knob{knob="max_concurrency"}': 64.0,
        'batchpilot_gate_knob{knob="max_inflight_tokens"}': float("inf"),
        'batchpilot_gate_knob{knob="queue_deadline_ms"}': 1800.0,
        'batchpilot_gate_knob{knob="aging_ms"}': 2000.0,
        'batchpilot_gate_knob{knob="max_num_batched_tokens"}': 8192.0,
        'batchpilot_gate_discipline{discipline="fcfs"}': 1.0,
    }


@pytest.mark.parametrize("mode", [Mode.OFF, Mode.RECOMMEND, Mode.AUTO])
def test_outage_holds_the_last_known_good_and_the_mode_decides_actuation(mode: Mode) -> None:
    policy = _policy(mode)
    snapshots = SnapshotSource(policy)
    source = ScriptedSource(snapshots, failing_calls={3})
    controller = PolicyController(policy, source)
    decisions = []
    for step in range(1, 5):
        snapshots.ingest(step * 30.0, {"p0": _snapshot(step * 30.0)})
        decisions.append(controller.run_once(step * 30.0, ["p0"]))
    outage = decisions[2]
    assert not outage.conditions.metrics_available
    assert [r.step for r in outage.reasons][:2] == ["observe", "guard:hold"]
    assert "connection refused" in outage.reasons[0].message
    assert outage.per_pod["p0"] == outage.target
    assert all(d.actuate == (mode is Mode.AUTO) for d in decisions)
    # Recommendations are published whatever the mode
    assert all(status_of(d, mode)["recommendation"]["knobs"] for d in decisions)
    # What the pods run is what their gates report, unless this controller actuates
    if mode is not Mode.AUTO:
        assert controller.current.max_concurrency == 64


def test_every_reason_reads_back_as_its_step() -> None:
    """What `batchpilot explain` does with a status' reasons: (step, text) from each line."""
    policy = _policy(Mode.AUTO)
    snapshots = SnapshotSource(policy)
    controller = PolicyController(policy, snapshots)
    snapshots.ingest(30.0, {"p0": _snapshot(30.0)})
    decision = controller.run_once(30.0, ["p0"])
    lines = status_of(decision, Mode.AUTO)["recommendation"]["reasons"]
    assert lines == [reason_text(reason) for reason in decision.reasons]
    steps = [parse_reason_text(line)[0] for line in lines]
    assert steps == [reason.step for reason in decision.reasons]
    assert steps[0] == "observe"


def status_of(decision: Decision, mode: Mode) -> dict[str, Any]:
    """The status the operator writes after a step that decided `decision`."""
    report = CycleReport(mode, PodCounts(1, 1, 1), decision=decision)
    return build_status(report, {}, generation=1, now=datetime(2026, 5, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("applied", "fallback", "expected"),
    [
        # Two pods mid-canary: 1:1, and the fleet's own setting is one of them.
        ((Knobs(max_concurrency=48), Knobs(max_concurrency=32)), Knobs(max_concurrency=32), Knobs(max_concurrency=32)),
        ((Knobs(max_concurrency=32), Knobs(max_concurrency=48)), Knobs(max_concurrency=32), Knobs(max_concurrency=32)),
        # A real majority wins over the controller's idea.
        ((Knobs(max_concurrency=48),) * 2 + (Knobs(max_concurrency=32),), Knobs(max_concurrency=32), Knobs(max_concurrency=48)),
        # No pod reports a setting: the controller's idea stands.
        ((None, None), Knobs(max_concurrency=32), Knobs(max_concurrency=32)),
    ],
)
def test_the_applied_setting_is_the_majoritys_and_a_tie_keeps_the_fleets(
    applied: tuple[Knobs | None, ...], fallback: Knobs, expected: Knobs
) -> None:
    pods = {f"p{index}": PodObservation(applied=knobs) for index, knobs in enumerate(applied)}
    observation = Observation(600.0, 60.0, pods, PodObservation())
    assert _applied_setting(observation, fallback) == expected
