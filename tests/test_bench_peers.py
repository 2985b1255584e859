"""The peers' overload controls (sim/peers.py) and the simulator mechanisms they act through."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from test_bench_harness import CALIBRATION, small_scenario_data, write_scenario
from test_sim_engine import config
from typer.testing import CliRunner

from batchpilot.cli.main import app
from batchpilot.contract.knobs import Knobs
from batchpilot.controller.bench_adapter import ControllerContext
from batchpilot.sim.bench import Simulation, controller_context, run_controller
from batchpilot.sim.controllers import (
    ControllerError,
    build_controller,
    register_online,
)
from batchpilot.sim.engine import SHED_ENGINE_QUEUE_FULL, PeerAdmission, Replica
from batchpilot.sim.metrics import build_1_2_5_buckets, format_le
from batchpilot.sim.peers import (
    EPP_KV_CACHE_UTIL_THRESHOLD,
    EnvoyGradientLimiter,
    Gradient2Limiter,
    UnsupportedScenario,
    VegasLimiter,
)
from batchpilot.sim.scenario import Scenario, load_scenario
from batchpilot.sim.workload import build_workload

PEERS = ("gradient2", "vegas", "envoy-gradient", "epp-flow-control", "vllm-queue-caps")


def context(**changes: object) -> ControllerContext:
    base = ControllerContext(
        slo_ttft_ms=2000,
        slo_tpot_ms=50,
        control_interval_s=30,
        replica_names=("replica-0",),
        max_num_seqs=512,
        max_num_batched_tokens=8192,
        runtime_tunable=False,
        prefill_tokens_per_s=40_000.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


class Snapshots:
    """Cumulative histograms for one replica, fed observation by observation."""

    BOUNDS = build_1_2_5_buckets(100)

    def __init__(self) -> None:
        self.values: dict[str, float] = {"batchpilot_gate_inflight_requests": 0.0}

    def observe(self, histogram: str, value: float, times: int = 1) -> None:
        for bound in self.BOUNDS:
            key = f'{histogram}_bucket{{le="{format_le(bound)}"}}'
            self.values[key] = self.values.get(key, 0.0) + (times if value <= bound else 0)
        self.values[f"{histogram}_count"] = self.values.get(f"{histogram}_count", 0.0) + times
        self.values[f"{histogram}_sum"] = self.values.get(f"{histogram}_sum", 0.0) + value * times

    def tick(self, requests: int, token_latency_s: float, in_flight: float) -> dict[str, float]:
        """`requests` first tokens and decode steps of `token_latency_s` since the last tick."""
        self.observe("vllm:time_to_first_token_seconds", 0.1, requests)
        self.observe("vllm:inter_token_latency_seconds", token_latency_s, 10 * requests)
        self.values["batchpilot_gate_inflight_requests"] = in_flight
        return dict(self.values)


def caps(controller: object, ticks: list[tuple[int, float, float]]) -> list[int | None]:
    feed = Snapshots()
    out = []
    for t, (requests, latency, in_flight) in enumerate(ticks):
        (knobs,) = controller.decide(
            float(t), {"replica-0": feed.tick(requests, latency, in_flight)}
        ).values()  # type: ignore[attr-defined]
        out.append(knobs.max_concurrency)
    return out


def test_gradient2_grows_while_latency_holds_and_backs_off_when_it_rises() -> None:
    steady = [(20, 0.010, 500)] * 10
    grown = caps(Gradient2Limiter(context()), steady)
    # Gradient 1 (short = long): each sample adds SMOOTHING x QUEUE_SIZE = 0.8.
    assert grown[0] == 20 and grown[-1] > 100
    limiter = Gradient2Limiter(context())
    after = caps(limiter, [*steady, (20, 0.040, 500)])
    # Short RTT four times the long one: gradient 0.5, the limit falls.
    assert after[-1] < grown[-1] * 0.8


def test_gradient2_holds_while_the_app_keeps_few_requests_in_flight() -> None:
    idle = caps(Gradient2Limiter(context()), [(20, 0.010, 5)] * 5)
    assert idle == [20] * 5


def test_vegas_grows_at_no_load_and_shrinks_when_the_queue_estimate_passes_beta() -> None:
    limiter = VegasLimiter(context())
    low = caps(limiter, [(10, 0.010, 500)] * 5)
    assert low[-1] > low[0] == 20
    high = caps(limiter, [(10, 0.030, 500)] * 5)
    assert high[-1] < high[0]


def test_envoy_pins_min_concurrency_until_fifty_requests_then_follows_the_gradient() -> None:
    limiter = EnvoyGradientLimiter(context())
    feed = Snapshots()
    e2e = "vllm:e2e_request_latency_seconds"

    def tick(t: float, finished: int, latency: float) -> int | None:
        feed.observe(e2e, latency, finished)
        (knobs,) = limiter.decide(t, {"replica-0": dict(feed.values)}).values()
        assert knobs.queue_deadline_ms == 1  # over the limit: 503 at once
        return knobs.max_concurrency

    # The measurement starts at t = 0 and counts what finishes after it.
    pinned = [tick(t, 10, 2.0) for t in range(5)]
    assert pinned == [3, 3, 3, 3, 3]  # 40 samples at t = 4: still measuring minRTT
    grown = [tick(5 + t, 10, 2.0) for t in range(5)]
    # The 50th sample ends it (the limit from before, 3, comes back); then
    # gradient 1.25 plus sqrt headroom grows it every tick.
    assert grown[0] == 3 and grown[1] > 3 and grown[-1] > grown[1]
    shrunk = [tick(10 + t, 10, 20.0) for t in range(3)]
    assert shrunk[-1] < grown[-1]
    # Sixty seconds after the measurement ended it measures again, at 3.
    assert tick(65, 10, 2.0) == 3


def test_peer_that_lacks_a_signal_is_refused_with_the_signal_named() -> None:
    llama = context(engine_kind="llamacpp")
    with pytest.raises(ControllerError, match=r"envoy-gradient.*end-to-end request latency"):
        build_controller("envoy-gradient", llama)
    with pytest.raises(ControllerError, match=r"epp-flow-control.*KV-cache usage"):
        build_controller("epp-flow-control", llama)
    with pytest.raises(ControllerError, match=r"vllm-queue-caps.*max-num-queued-tokens"):
        build_controller("vllm-queue-caps", llama)
    with pytest.raises(ControllerError, match="prefill throughput"):
        build_controller("vllm-queue-caps", context(prefill_tokens_per_s=None))
    # The per-token limiters read the gate's histograms on llama.cpp.
    assert build_controller("gradient2", llama) is not None


def test_saturation_hold_keeps_the_engine_queue_short_and_loses_nothing() -> None:
    replica = Replica(
        config(max_num_seqs=4), peer_admission=PeerAdmission(hold_waiting=2, hold_kv_usage=0.8)
    )
    requests = [replica.submit(0.0, 500, 20) for _ in range(12)]
    gauges = replica.snapshot(0.0)
    assert gauges["vllm:num_requests_waiting"] <= 2
    assert gauges["batchpilot_gate_queue_length"] >= 6  # held at the gateway, not dropped
    t = 0.0
    while not replica.idle:
        t += 0.05
        snapshot = replica.snapshot(t)
        assert snapshot["vllm:num_requests_waiting"] <= 2
    assert all(r.status == "finished" for r in requests)


def test_saturation_hold_on_kv_usage() -> None:
    # 1,600 tokens of KV: two running 700-token prompts pass 80%, so later
    # arrivals wait at the gateway instead of crowding the engine.
    replica = Replica(
        config(kv_cache_tokens=1600),
        peer_admission=PeerAdmission(hold_kv_usage=EPP_KV_CACHE_UTIL_THRESHOLD),
    )
    requests = [replica.submit(0.0, 700, 50) for _ in range(2)]
    requests += [replica.submit(0.1, 700, 50) for _ in range(2)]
    snapshot = replica.snapshot(0.1)
    assert snapshot["vllm:kv_cache_usage_perc"] >= 0.8
    assert snapshot["batchpilot_gate_queue_length"] == 2
    assert snapshot["vllm:num_requests_waiting"] == 0
    t = 0.1
    while not replica.idle:
        t += 0.1
        replica.advance(t)
    assert all(r.status == "finished" for r in requests)
    assert replica.preemptions == 0


def test_engine_queue_cap_refuses_what_would_overflow_it() -> None:
    replica = Replica(
        config(max_num_seqs=1), peer_admission=PeerAdmission(max_queued_prompt_tokens=1000)
    )
    statuses = []
    for _ in range(5):
        statuses.append(replica.submit(0.0, 400, 10))
    # The first runs; two wait (800 tokens); the fourth and fifth would make 1,200.
    assert [r.status for r in statuses] == ["prefill", "waiting", "waiting", "shed", "shed"]
    assert (
        replica.snapshot(0.0)[f'batchpilot_gate_shed_total{{reason="{SHED_ENGINE_QUEUE_FULL}"}}']
        == 2
    )
    assert replica.config.max_num_seqs == 1


def test_peer_engine_starts_with_the_peers_max_num_seqs() -> None:
    replica = Replica(config(max_num_seqs=512), peer_admission=PeerAdmission(max_num_seqs=256))
    assert replica.config.max_num_seqs == 256


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    if not CALIBRATION.exists():
        pytest.skip("../shared data not present")
    return load_scenario(write_scenario(tmp_path_factory.mktemp("s"), small_scenario_data()))


@pytest.mark.parametrize("name", PEERS)
def test_every_peer_runs_a_scenario_and_accounts_for_every_request(
    small: Scenario, name: str
) -> None:
    workload = build_workload(small)
    result = run_controller(small, workload, name)
    assert result["finished"] + result["shed"] == len(workload)
    assert 0 < result["good"] <= len(workload)
    if name in ("gradient2", "vegas", "envoy-gradient"):
        # Decided every second, not every control interval.
        assert result["config_changes"] > len(result["timeline"])


def test_the_harness_ticks_a_request_path_limiter_every_tick_s(small: Scenario) -> None:
    calls = []

    class Recorder:
        tick_s = 0.5

        def decide(self, now_s: float, snapshots: object) -> dict[str, Knobs]:
            calls.append(now_s)
            return {}

    sim = Simulation(small, build_workload(small), Recorder())
    sim.run_until(10.0)
    assert calls == [0.5 * k for k in range(20)]


def test_vllm_queue_cap_is_the_ttft_objective_times_prefill_throughput(small: Scenario) -> None:
    policy = build_controller("vllm-queue-caps", controller_context(small))
    ctx = controller_context(small)
    expected = round(ctx.slo_ttft_ms / 1000 * ctx.prefill_tokens_per_s)
    assert policy.peer_admission.max_queued_prompt_tokens == expected  # type: ignore[attr-defined]
    assert math.isclose(
        ctx.prefill_tokens_per_s,
        8192 / (small.engine.config().cost.prefill_ms(8192, 8192**2) / 1000),
    )


def bad_factory(context: ControllerContext) -> object:
    raise UnsupportedScenario("controller 'needs-more' cannot run on this scenario: it needs X")


def test_bench_refuses_a_controller_that_cannot_run_a_scenario_before_simulating(
    small: Scenario, tmp_path: Path
) -> None:
    register_online("needs-more", f"{__name__}:bad_factory")
    path = write_scenario(tmp_path, small_scenario_data())
    out = tmp_path / "out.json"
    result = CliRunner().invoke(
        app, ["bench", str(path), "--controllers", "static-default,needs-more", "--json", str(out)]
    )
    assert result.exit_code == 2
    assert "needs-more" in result.output and "it needs X" in result.output
    assert not out.exists()
