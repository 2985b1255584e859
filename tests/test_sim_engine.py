"""The simulated replica: exact step timing, KV paging, gate interplay, live API."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Callable

import numpy as np
import pytest

from batchpilot.contract.knobs import Knobs
from batchpilot.sim.calibration import StepCostModel
from batchpilot.sim.engine import EngineConfig, EngineConfigError, Replica
from batchpilot.sim.serve import LiveEngine

# Round numbers so expected times can be written out by hand.
COST = StepCostModel(
    decode_base_ms=5.0,
    decode_per_seq_ms=0.01,
    decode_per_context_token_ms=1e-5,
    prefill_floor_ms=0.0,
    prefill_base_ms=3.0,
    prefill_per_token_ms=0.02,
    prefill_attention_ms=1e-6,
    mixed_base_ms=0.5,
    mixed_decode_scale=1.0,
)


def config(**overrides: object) -> EngineConfig:
    settings: dict[str, object] = {
        "cost": COST,
        "kv_cache_tokens": 1_000_000,
        "max_num_seqs": 256,
        "max_num_batched_tokens": 8192,
    }
    settings.update(overrides)
    return EngineConfig(**settings)  # type: ignore[arg-type]


def drain(replica: Replica, start: float, step: float = 1.0, limit: float = 1e6) -> float:
    t = start
    while not replica.idle:
        t += step
        replica.advance(t)
        assert t < limit, "replica never drained"
    return t


@pytest.mark.parametrize(
    ("batch", "prompt", "output", "slowdown"),
    [
        (1, 100, 2, 1.0),
        (8, 500, 50, 1.0),
        (16, 256, 300, 1.5),
        (32, 64, 1000, 2.0),
        (4, 40, 2, 1.0),
    ],
)
def test_closed_batch_times_match_the_cost_model(
    batch: int, prompt: int, output: int, slowdown: float
) -> None:
    # `batch` requests arrive at t = 0. The first one starts a step alone (the
    # engine was idle); the rest prefill together in the next step, which also
    # carries the first one's decode. From then on every step's cost is known.
    replica = Replica(config(slowdown=slowdown))
    requests = [replica.submit(0.0, prompt, output) for _ in range(batch)]
    drain(replica, 0.0)
    scale = slowdown / 1000.0
    rest = batch - 1
    first_token = COST.step_ms(0, 0, prompt, prompt**2) * scale
    t = first_token
    if rest:
        t += COST.step_ms(1, prompt + 1, rest * prompt, rest * prompt**2) * scale
    others_first_token = t
    # the first request is one token ahead: it needs output - 2 more steps, the others output - 1
    leader_steps = output - 1 if not rest else output - 2
    for k in range(leader_steps):
        leader_context = prompt + (2 if rest else 1) + k
        t += COST.decode_ms(batch, leader_context + rest * (prompt + 1 + k)) * scale
    leader_finish = t
    if rest:
        t += COST.decode_ms(rest, rest * (prompt + output - 1)) * scale
    assert requests[0].first_token_s == pytest.approx(first_token, rel=1e-12)
    assert requests[0].finish_s == pytest.approx(leader_finish, rel=1e-9)
    for request in requests[1:]:
        assert request.first_token_s == pytest.approx(others_first_token, rel=1e-12)
        assert request.finish_s == pytest.approx(t, rel=1e-9)
    assert all(r.generated == output for r in requests)
    snapshot = replica.snapshot()
    assert snapshot["vllm:generation_tokens_total"] == batch * output
    # throughput as the cost model implies it
    makespan = max(r.finish_s for r in requests)  # type: ignore[type-var]
    assert batch * output / makespan == pytest.approx(batch * output / t, rel=1e-9)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fine_grained_advancing_gives_the_same_result_as_jumps(seed: int) -> None:
    # Advancing in 0.5 ms slices forbids multi-step jumps; outcomes must not change.
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(0.05, 200))
    prompts = rng.integers(10, 3000, 200)
    outputs = rng.integers(1, 400, 200)

    def run(slice_s: float | None) -> list[tuple[float, float]]:
        replica = Replica(
            config(kv_cache_tokens=60_000, max_num_batched_tokens=2048), Knobs(max_concurrency=48)
        )
        handles = []
        for t, p, o in zip(arrivals.tolist(), prompts.tolist(), outputs.tolist(), strict=True):
            if slice_s is not None:
                now = replica.now
                while now + slice_s < t:
                    now += slice_s
                    replica.advance(now)
            handles.append(replica.submit(t, p, o))
        drain(replica, float(arrivals[-1]), step=slice_s or 1.0)
        assert replica.preemptions > 0  # the KV cache is small on purpose
        return [(h.first_token_s, h.finish_s) for h in handles]  # type: ignore[misc]

    coarse = run(None)
    fine = run(0.0005)
    assert np.allclose(np.array(coarse), np.array(fine), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("kv_tokens", "expect_preemption"), [(4096, True), (200_000, False)])
def test_preemption_only_when_kv_is_short(kv_tokens: int, expect_preemption: bool) -> None:
    # 12 requests would hold 12 * (200 + 399) tokens at their longest: > 4096, << 200k.
    replica = Replica(config(kv_cache_tokens=kv_tokens))
    requests = [replica.submit(0.0, 200, 400) for _ in range(12)]
    drain(replica, 0.0)
    assert (replica.preemptions > 0) is expect_preemption
    assert replica.snapshot()["vllm:num_preemptions_total"] == replica.preemptions
    for request in requests:
        assert request.status == "finished"
        assert request.generated == 400
    assert replica.snapshot()["vllm:kv_cache_usage_perc"] == 0.0


def test_kv_usage_never_exceeds_capacity_and_is_fully_returned() -> None:
    replica = Replica(config(kv_cache_tokens=8192))
    rng = random.Random(7)
    t = 0.0
    for _ in range(60):
        t += rng.expovariate(20.0)
        replica.submit(t, rng.randint(16, 1500), rng.randint(1, 300))
        usage = replica.snapshot(t)["vllm:kv_cache_usage_perc"]
        assert 0.0 <= usage <= 1.0
    drain(replica, t)
    assert replica.snapshot()["vllm:kv_cache_usage_perc"] == 0.0


def test_histogram_counts_equal_completed_requests() -> None:
    replica = Replica(config(), Knobs(max_concurrency=4, queue_deadline_ms=400))
    rng = random.Random(3)
    handles = []
    t = 0.0
    for _ in range(300):
        t += rng.expovariate(30.0)
        handles.append(replica.submit(t, rng.randint(50, 2000), rng.randint(1, 200)))
    drain(replica, t)
    snapshot = replica.snapshot()
    finished = [h for h in handles if h.status == "finished"]
    shed = [h for h in handles if h.status == "shed"]
    assert len(finished) + len(shed) == len(handles)
    assert shed, "a 400 ms deadline with 4 slots must shed at 30 req/s"
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "batchpilot_gate_time_to_first_token_seconds",
    ):
        assert snapshot[f"{name}_count"] == len(finished), name
        assert snapshot[f'{name}_bucket{{le="+Inf"}}'] == len(finished), name
    assert snapshot["batchpilot_gate_admitted_total"] == len(finished)
    assert snapshot["batchpilot_gate_queue_wait_seconds_count"] == len(finished)
    assert snapshot['batchpilot_gate_shed_total{reason="queue_deadline"}'] == len(shed)
    generated = sum(h.generated for h in finished)
    assert snapshot["vllm:inter_token_latency_seconds_count"] == generated - len(finished)
    assert snapshot["vllm:request_generation_tokens_sum"] == generated
    assert snapshot["vllm:prompt_tokens_total"] == sum(h.prompt_tokens for h in finished)


def test_littles_law_on_the_gate_queue() -> None:
    # A cap of 6 and ~80% utilisation keeps a queue that comes and goes.
    replica = Replica(config(), Knobs(max_concurrency=6))
    rng = np.random.default_rng(11)
    rate = 14.0
    arrivals = np.cumsum(rng.exponential(1 / rate, 3000))
    handles = []
    samples = []
    probe = 0.0
    for t in arrivals.tolist():
        while probe < t:
            samples.append(replica.snapshot(probe)["batchpilot_gate_queue_length"])
            probe += 0.05
        handles.append(replica.submit(t, 300, 60))
    horizon = float(arrivals[-1])
    # waits up to the horizon (a request still queued then has waited horizon - arrival so far)
    waits = np.array(
        [
            min(h.admitted_s if h.admitted_s is not None else horizon, horizon) - h.arrival_s
            for h in handles
        ]
    )
    mean_queue = float(np.mean(samples))
    assert mean_queue > 0.5, "the test needs a real queue"
    # L = lambda * W over the same horizon
    assert mean_queue == pytest.approx(len(handles) / horizon * waits.mean(), rel=0.08)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_knob_changes_never_drop_admitted_requests(seed: int) -> None:
    rng = random.Random(seed)
    replica = Replica(config(runtime_tunable=True, kv_cache_tokens=50_000))
    handles = []
    t = 0.0
    for i in range(400):
        t += rng.expovariate(25.0)
        if i % 20 == 0:
            replica.set_knobs(
                t,
                Knobs(
                    max_concurrency=rng.choice([None, 1, 4, 32, 1000]),
                    max_inflight_tokens=rng.choice([None, 3000, 20_000]),
                    discipline=rng.choice(["fcfs", "shortest-prompt-first", "priority"]),
                    queue_deadline_ms=rng.choice([None, 50, 5000]),
                    max_num_batched_tokens=rng.choice([None, 512, 4096]),
                ),
            )
        handles.append(
            replica.submit(
                t, rng.randint(10, 2000), rng.randint(1, 300), priority=rng.randint(0, 2)
            )
        )
    drain(replica, t)
    for handle in handles:
        if handle.admitted_s is not None:
            assert handle.status == "finished", handle
            assert handle.generated == handle.output_tokens
        else:
            assert handle.status == "shed"


@pytest.mark.parametrize(
    ("tunable", "requested", "expected_budget"),
    [(False, 1024, 8192), (True, 1024, 1024), (True, None, 8192), (True, 16, 256)],
)
def test_prefill_budget_applies_only_when_runtime_tunable(
    tunable: bool, requested: int | None, expected_budget: int
) -> None:
    replica = Replica(config(runtime_tunable=tunable))
    applied = replica.set_knobs(0.0, Knobs(max_num_batched_tokens=requested))
    assert applied.max_num_batched_tokens == expected_budget
    assert (
        replica.snapshot()['batchpilot_gate_knob{knob="max_num_batched_tokens"}'] == expected_budget
    )
    # one 4,000-token prompt needs ceil(4000 / budget) prefill steps before its first token
    request = replica.submit(0.0, 4000, 1)
    drain(replica, 0.0)
    chunks = [min(expected_budget, 4000 - done) for done in range(0, 4000, expected_budget)]
    expected = 0.0
    done = 0
    for chunk in chunks:
        expected += COST.step_ms(0, 0, chunk, (done + chunk) ** 2 - done**2) / 1000.0
        done += chunk
    assert request.first_token_s == pytest.approx(expected, rel=1e-12)


def test_max_concurrency_is_clamped_to_the_engine_ceiling() -> None:
    replica = Replica(config(max_num_seqs=64))
    applied = replica.set_knobs(0.0, Knobs(max_concurrency=1000))
    assert applied.max_concurrency == 64
    snapshot = replica.snapshot()
    assert snapshot['batchpilot_gate_knob{knob="max_concurrency"}'] == 64
    assert snapshot["batchpilot_gate_config_version"] == 2
    for _ in range(100):
        replica.submit(0.0, 100, 50)
    replica.advance(0.001)
    assert replica.snapshot()["vllm:num_requests_running"] <= 64


def test_unchanged_knobs_do_not_bump_the_config_version() -> None:
    replica = Replica(config(), Knobs(max_concurrency=8))
    replica.set_knobs(1.0, Knobs(max_concurrency=8))
    assert replica.config_version == 1


def test_deadline_sheds_queued_requests_only() -> None:
    replica = Replica(config(), Knobs(max_concurrency=1, queue_deadline_ms=100))
    long = replica.submit(0.0, 100, 2000)  # holds the only slot for ~10 s
    queued = [replica.submit(0.01 * i, 100, 10) for i in range(1, 5)]
    events_until_shed = replica.advance(0.2)
    assert all(q.status == "shed" for q in queued)
    assert long.status == "decode"
    assert events_until_shed == []  # events are recorded only with record_tokens=True
    drain(replica, 0.2)
    assert long.status == "finished"


def test_request_that_can_never_fit_is_rejected() -> None:
    replica = Replica(config(kv_cache_tokens=1024), record_tokens=True)
    too_long = replica.submit(0.0, 1000, 100)
    assert too_long.status == "rejected"
    assert replica.snapshot()['batchpilot_gate_failed_total{reason="too_long"}'] == 1
    assert [e.kind for e in replica.advance(0.0)] == ["rejected"]
    fits = replica.submit(0.0, 1000, 1 + 1024 - 1000)  # exactly 1024 KV tokens at its longest
    drain(replica, 0.0)
    assert fits.status == "finished"


def test_live_mode_reports_every_token_time() -> None:
    replica = Replica(config(kv_cache_tokens=3000), Knobs(max_concurrency=8), record_tokens=True)
    rng = random.Random(5)
    handles = []
    events = []
    t = 0.0
    for _ in range(40):
        t += rng.expovariate(40.0)
        events += replica.advance(t)
        handles.append(replica.submit(t, rng.randint(10, 900), rng.randint(1, 120)))
    while not replica.idle:
        t += 0.003
        events += replica.advance(t)
    assert replica.preemptions > 0
    reported: dict[int, list[float]] = {}
    for event in events:
        if event.kind == "tokens":
            reported.setdefault(event.request.request_id, []).extend(event.token_times)
            assert event.time_s == event.token_times[-1]
    for handle in handles:
        times = handle.token_times
        assert times is not None
        assert len(times) == handle.output_tokens
        assert times == reported[handle.request_id]
        assert times[0] == handle.first_token_s
        assert times[-1] == handle.finish_s
        assert all(b > a for a, b in itertools.pairwise(times))
    kinds = [e.kind for e in events]
    assert kinds.count("finished") == len(handles)
    assert kinds.count("admitted") == len(handles)
    assert [e.time_s for e in events] == sorted(e.time_s for e in events)


def test_next_event_and_time_order() -> None:
    replica = Replica(config())
    assert replica.next_event_s() is None
    replica.submit(1.0, 1000, 5)
    step_end = replica.next_event_s()
    assert step_end is not None and step_end > 1.0
    with pytest.raises(ValueError, match="time went backwards"):
        replica.advance(0.5)


def test_render_text_is_valid_exposition() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    replica = Replica(config(), Knobs(max_concurrency=2, queue_deadline_ms=10))
    for i in range(10):
        replica.submit(i * 0.001, 500, 20)
    drain(replica, 0.01)
    families = {f.name: f for f in text_string_to_metric_families(replica.render_text())}
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"
    assert families["vllm:num_preemptions"].type == "counter"
    assert families["batchpilot_gate_knob"].type == "gauge"
    knob = {s.labels["knob"]: s.value for s in families["batchpilot_gate_knob"].samples}
    assert knob["max_concurrency"] == 2
    assert math.isinf(knob["max_inflight_tokens"])
    text_samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert len(text_samples) == len(replica.snapshot())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"kv_cache_tokens": 8}, "kv_cache_tokens"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 100, "max_num_seqs": 256}, "max_num_batched_tokens"),
        ({"slowdown": 0.0}, "slowdown"),
    ],
)
def test_engine_config_errors_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(EngineConfigError, match=f"^{field}:"):
        config(**overrides)


# -- cancel: the client left (vLLM's abort) ------------------------------------

CLIENT_DISCONNECT = 'batchpilot_gate_failed_total{reason="client_disconnect"}'


def test_cancel_at_the_gate_lets_the_requests_behind_it_in() -> None:
    # A 1,000-token gate budget: `big` does not fit beside `first` and,
    # head of the line, holds `small` back too.
    replica = Replica(config(), Knobs(max_inflight_tokens=1000))
    first = replica.submit(0.0, 500, 100)
    big = replica.submit(0.0, 800, 100)
    small = replica.submit(0.0, 100, 50)
    assert (big.status, small.status) == ("queued", "queued")
    assert replica.cancel(0.01, big.request_id)
    assert (big.status, big.cancelled_s) == ("cancelled", 0.01)
    assert small.admitted_s == 0.01
    snapshot = replica.snapshot()
    assert snapshot["batchpilot_gate_queue_length"] == 0
    assert snapshot["batchpilot_gate_inflight_tokens"] == (500 + 100) + (100 + 50)
    # The real gate counts a client that leaves its queue nowhere.
    assert CLIENT_DISCONNECT not in snapshot
    drain(replica, 0.01)
    assert first.status == small.status == "finished"
    assert replica.snapshot()["batchpilot_gate_admitted_total"] == 2


def test_cancel_in_the_engine_waiting_queue_leaves_the_batch_untouched() -> None:
    # max_num_seqs=2 behind an unlimited gate: the third request waits inside the engine.
    def run(with_third: bool) -> tuple[Replica, list[float | None]]:
        replica = Replica(config(max_num_seqs=2))
        batch = [replica.submit(0.0, 300, 200) for _ in range(2)]
        if with_third:
            third = replica.submit(0.0, 300, 200)
            assert third.status == "waiting"
            assert replica.cancel(0.05, third.request_id)
            assert third.status == "cancelled"
        else:
            replica.advance(0.05)  # the same time slices, hence the same float sums
        snapshot = replica.snapshot()
        assert snapshot["vllm:num_requests_waiting"] == 0
        assert snapshot["vllm:num_requests_running"] == 2
        drain(replica, 0.05)
        return replica, [r.finish_s for r in batch]

    cancelled, times = run(with_third=True)
    _, expected = run(with_third=False)
    assert times == expected
    assert cancelled.snapshot()[CLIENT_DISCONNECT] == 1
    assert cancelled.snapshot()["vllm:e2e_request_latency_seconds_count"] == 2
    assert cancelled.cancelled_count == 1


def test_cancel_while_decoding_frees_its_blocks_and_keeps_only_the_tokens_made() -> None:
    replica = Replica(config(), record_tokens=True)
    idle = replica.snapshot(0.0)
    request = replica.submit(0.0, 1000, 500)
    events = replica.advance(0.2)  # a ~23 ms prefill, then ~5 ms decode steps
    assert request.status == "decode"
    step_end = replica.next_event_s()
    assert replica.cancel(0.2, request.request_id)
    events += replica.advance(0.2)
    snapshot = replica.snapshot()
    for gauge in (
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "batchpilot_gate_inflight_requests",
        "batchpilot_gate_inflight_tokens",
    ):
        assert snapshot[gauge] == idle[gauge], gauge
    assert snapshot[CLIENT_DISCONNECT] == 1
    assert replica.idle
    # Per-request series never see it, as vLLM V1 records a client abort.
    assert snapshot["vllm:e2e_request_latency_seconds_count"] == 0
    assert snapshot["vllm:request_generation_tokens_count"] == 0
    made = request.generated
    assert 30 < made < 500
    assert request.token_times is not None and len(request.token_times) == made
    assert max(request.token_times) <= 0.2
    assert sum(len(e.token_times) for e in events if e.kind == "tokens") == made
    assert events[-1].kind == "cancelled"
    # The step in progress still ends when planned, and yields nothing for it.
    assert replica.next_event_s() == step_end
    replica.advance(1.0)
    assert replica.next_event_s() is None
    snapshot = replica.snapshot()
    assert snapshot["vllm:generation_tokens_total"] == made
    assert snapshot["vllm:inter_token_latency_seconds_count"] == made - 1
    assert snapshot["vllm:prompt_tokens_total"] == 1000


def test_cancel_mid_prefill_frees_its_chunks_and_the_step_keeps_its_length() -> None:
    # A 512-token budget prefills a 4,000-token prompt in 8 chunks.
    replica = Replica(config(max_num_seqs=8, max_num_batched_tokens=512))
    request = replica.submit(0.0, 4000, 10)
    chunk_s = [COST.step_ms(0, 0, 512, (d + 512) ** 2 - d**2) / 1000 for d in range(0, 2048, 512)]
    t = sum(chunk_s[:3]) + chunk_s[3] / 2  # half way through the fourth chunk
    snapshot = replica.snapshot(t)
    assert request.status == "prefill"
    blocks = 4 * 512 // 16  # the chunk in progress got its blocks when its step began
    assert snapshot["vllm:kv_cache_usage_perc"] == blocks / replica.config.num_blocks
    step_end = replica.next_event_s()
    assert step_end == pytest.approx(sum(chunk_s), rel=1e-12)
    assert replica.cancel(t, request.request_id)
    snapshot = replica.snapshot()
    assert snapshot["vllm:kv_cache_usage_perc"] == 0.0
    assert snapshot["vllm:num_requests_running"] == 0
    # A newcomer starts when the GPU is done with the step the cancelled chunk was in.
    follower = replica.submit(t, 100, 1)
    drain(replica, t, step=0.01)
    assert follower.first_token_s == pytest.approx(
        step_end + COST.step_ms(0, 0, 100, 100**2) / 1000, rel=1e-12
    )
    assert request.generated == 0
    assert request.first_token_s is None
    snapshot = replica.snapshot()
    # Its prompt is counted at its first token, which never came (as in vLLM V1).
    assert snapshot["vllm:prompt_tokens_total"] == 100
    assert snapshot["vllm:generation_tokens_total"] == 1


def test_cancel_of_an_unknown_ended_or_cancelled_request_changes_nothing() -> None:
    replica = Replica(config(kv_cache_tokens=2048), Knobs(max_concurrency=1, queue_deadline_ms=50))
    finished = replica.submit(0.0, 100, 2)
    long = replica.submit(0.05, 100, 1000)
    shed = replica.submit(0.06, 100, 10)  # waits > 50 ms behind `long`
    rejected = replica.submit(0.06, 2000, 100)
    assert replica.cancel(0.2, long.request_id)
    t = drain(replica, 0.2)
    assert (finished.status, long.status, shed.status, rejected.status) == (
        "finished",
        "cancelled",
        "shed",
        "rejected",
    )
    before = replica.snapshot()
    for request_id in (
        finished.request_id,
        long.request_id,
        shed.request_id,
        rejected.request_id,
        10_000,
    ):
        assert not replica.cancel(t, request_id), request_id
    assert replica.snapshot() == before
    assert long.cancelled_s == 0.2
    assert replica.cancelled_count == 1
    assert before[CLIENT_DISCONNECT] == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_cancels_keep_kv_and_token_accounting_exact(seed: int) -> None:
    # A small KV cache and a small prefill budget put requests in every phase,
    # preempted ones included; a third of arrivals also cancel someone.
    rng = random.Random(seed)
    replica = Replica(
        config(kv_cache_tokens=6000, max_num_seqs=32, max_num_batched_tokens=1024),
        Knobs(max_concurrency=24),
        record_tokens=True,
    )
    handles = []
    events = []
    hit = set()
    t = 0.0
    for _ in range(300):
        t += rng.expovariate(40.0)
        events += replica.advance(t)
        handles.append(replica.submit(t, rng.randint(10, 1500), rng.randint(1, 200)))
        if rng.random() < 0.3:
            victim = rng.choice(handles)
            hit.add(victim.status)
            replica.cancel(t, victim.request_id)
            assert 0.0 <= replica.snapshot()["vllm:kv_cache_usage_perc"] <= 1.0
    while not replica.idle:
        t += 0.01
        events += replica.advance(t)
    assert {"queued", "waiting", "prefill", "decode"} <= hit, hit
    assert replica.preemptions > 0
    snapshot = replica.snapshot()
    for gauge in (
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "batchpilot_gate_inflight_requests",
        "batchpilot_gate_inflight_tokens",
    ):
        assert snapshot[gauge] == 0, gauge
    finished = [h for h in handles if h.status == "finished"]
    cancelled = [h for h in handles if h.status == "cancelled"]
    assert len(finished) + len(cancelled) == len(handles)
    assert all(h.generated == h.output_tokens for h in finished)
    reported: dict[int, list[float]] = {}
    for event in events:
        if event.kind == "tokens":
            reported.setdefault(event.request.request_id, []).extend(event.token_times)
    for h in cancelled:
        assert h.generated < h.output_tokens
        assert h.token_times == reported.get(h.request_id, [])
        assert len(h.token_times) == h.generated
        assert all(time_s <= h.cancelled_s for time_s in h.token_times)  # type: ignore[operator]
    assert snapshot["vllm:generation_tokens_total"] == sum(h.generated for h in handles)
    assert snapshot["vllm:inter_token_latency_seconds_count"] == sum(
        max(h.generated - 1, 0) for h in handles
    )
    assert snapshot["vllm:prompt_tokens_total"] == sum(
        h.prompt_tokens for h in handles if h.first_token_s is not None
    )
    assert snapshot["vllm:e2e_request_latency_seconds_count"] == len(finished)
    assert snapshot[CLIENT_DISCONNECT] == sum(h.admitted_s is not None for h in cancelled)


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still false after {timeout_s} s"
        await asyncio.sleep(0.01)


def test_live_engine_cancels_the_request_of_an_abandoned_stream() -> None:
    async def scenario() -> None:
        engine = LiveEngine(config(), time_scale=1.0)
        driver = asyncio.create_task(engine.run())
        try:
            stream = await engine.submit(100, 10_000, 0)  # ~50 s of decoding
            assert (await stream.events.get())[0] == "tokens"
            engine.abandon(stream)
            await _until(lambda: stream.request.status == "cancelled")
            assert engine.replica.idle
            engine.abandon(stream)  # the handler's `finally` may repeat it
        finally:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
        assert engine.replica.cancelled_count == 1

    asyncio.run(scenario())


def test_live_engine_cancels_a_request_whose_client_left_before_the_driver_took_it() -> None:
    async def scenario() -> None:
        engine = LiveEngine(config(), time_scale=1.0)
        submit = asyncio.create_task(engine.submit(100, 10_000, 0))
        await asyncio.sleep(0)  # queued for the driver, which is not running yet
        submit.cancel()
        driver = asyncio.create_task(engine.run())
        try:
            await _until(lambda: engine.replica.cancelled_count == 1)
            assert engine.replica.idle
        finally:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
        assert submit.cancelled()

    asyncio.run(scenario())


# llama.cpp's unified cache: masked (token, cell) pairs cost this much each.
SHARED_COST = StepCostModel(**{**COST.to_dict(), "masked_pair_ms": 2e-4})


def test_shared_cache_charges_idle_slots_cells_until_a_new_request_takes_the_slot() -> None:
    # Two slots. A and B run one after the other and keep their cells; C's
    # prefill is masked against both; D then takes A's slot (least recently
    # used), so E, the next, is masked against B's and D's cells but no
    # longer A's.
    replica = Replica(config(cost=SHARED_COST, max_num_seqs=2, shared_kv_cache=True))
    t = 0.0
    lengths = {"A": 300, "B": 100, "C": 40, "D": 60, "E": 20}
    done: dict[str, float] = {}
    for name, prompt in lengths.items():
        request = replica.submit(t, prompt, 1)
        t = drain(replica, t)
        done[name] = request.first_token_s - request.arrival_s  # type: ignore[operator]

    def prefill_s(prompt: int, idle_cells: int) -> float:
        return SHARED_COST.step_ms(0, 0, prompt, prompt**2, prompt * idle_cells) / 1000.0

    # Each request's cells are its prompt and its one token.
    assert done["A"] == pytest.approx(prefill_s(300, 0), rel=1e-12)
    assert done["B"] == pytest.approx(prefill_s(100, 301), rel=1e-12)
    # C takes a slot from A or B: neither is empty, A was used least recently.
    assert done["C"] == pytest.approx(prefill_s(40, 101), rel=1e-12)
    assert done["D"] == pytest.approx(prefill_s(60, 41), rel=1e-12)
    assert done["E"] == pytest.approx(prefill_s(20, 61), rel=1e-12)
    # The unshared engine charges none of it.
    plain = Replica(config(max_num_seqs=2))
    plain.submit(0.0, 300, 1)
    t = drain(plain, 0.0)
    late = plain.submit(t, 100, 1)
    drain(plain, t)
    assert late.first_token_s - late.arrival_s == pytest.approx(  # type: ignore[operator]
        COST.step_ms(0, 0, 100, 100**2) / 1000.0, rel=1e-12
    )


def test_shared_cache_decodes_are_masked_against_each_other_and_idle_cells() -> None:
    # A finished request leaves 201 idle cells; then P and Q (100-token
    # prompts, 50 tokens each) arrive together. P starts alone (the engine
    # was idle), Q prefills beside P's first decode, then both decode; every
    # step pays for the cells each token is masked against. The decode run
    # is applied in closed form, which must match this step-by-step sum.
    replica = Replica(config(cost=SHARED_COST, max_num_seqs=4, shared_kv_cache=True))
    replica.submit(0.0, 200, 1)
    t = drain(replica, 0.0)
    p, q = (replica.submit(t, 100, 50) for _ in range(2))
    drain(replica, t)
    idle = 201
    expected = t + SHARED_COST.step_ms(0, 0, 100, 100**2, 100 * idle) / 1000.0
    assert p.first_token_s == pytest.approx(expected, rel=1e-12)
    cells = 101 + idle + 100
    expected += (
        SHARED_COST.step_ms(1, 101, 100, 100**2, (cells - 101) + 100 * (cells - 100)) / 1000.0
    )
    assert q.first_token_s == pytest.approx(expected, rel=1e-12)
    for k in range(48):  # P has 48 tokens to go, Q 49
        context = (102 + k) + (101 + k)
        expected += SHARED_COST.decode_ms(2, context, 2 * (context + idle) - context) / 1000.0
    assert p.finish_s == pytest.approx(expected, rel=1e-9)
    # Q's last step: P's 150 cells are idle now.
    expected += SHARED_COST.decode_ms(1, 149, idle + 150) / 1000.0
    assert q.finish_s == pytest.approx(expected, rel=1e-9)
