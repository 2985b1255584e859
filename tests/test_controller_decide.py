"""The decision: limits from the model, the feedback rule, and a length-mix shift acted on at once."""

from __future__ import annotations

import dataclasses
import math

import pytest
from policyspec import controller_spec
from test_controller_synthetic import TRUE, synthetic_samples

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.decide import KV_SHARE, DecideMemory, initial_knobs, recommend
from batchpilot.controller.explain import Reason, Recommendation
from batchpilot.controller.model import WorkloadModel
from batchpilot.controller.observe import Observation, PodObservation, WindowHistogram
from batchpilot.controller.physics import StepModel, engine_running_capacity, running_limit
from batchpilot.controller.policy import EngineKind, EngineSpec, Policy, Slo
from batchpilot.controller.samples import LengthMix

INF = math.inf
POLICY = Policy.default_for(Slo(2000, 50), EngineSpec(max_num_seqs=512))
ENGINE = StepModel(**TRUE)


def around(value: float, rate: float) -> WindowHistogram:
    """All observations within +-5% of `value`."""
    return WindowHistogram(((value * 0.95, 0.0), (value * 1.05, rate), (INF, rate)), value * rate)


def window(
    prompt: float,
    output: float,
    *,
    applied: Knobs,
    arrival: float = 20.0,
    queue: float = 0.0,
    tpot_s: float | None = None,
    engine_ttft_s: float = 0.2,
) -> Observation:
    mix = LengthMix.from_histograms(around(prompt, arrival), around(output, arrival))
    assert mix is not None
    physics = ENGINE.predict(running_limit(POLICY, applied, mix), arrival, mix)
    pod = PodObservation(
        arrival_rps=arrival,
        admitted_rps=arrival,
        completed_rps=physics.throughput_rps,
        prompt_tps=physics.throughput_rps * prompt,
        generation_tps=physics.running / physics.step_s,
        running=physics.running,
        gate_queue=queue,
        kv_usage=0.3,
        prompt_tokens=around(prompt, arrival),
        output_tokens=around(output, arrival),
        itl=around(physics.step_s, arrival * output),
        tpot=None if tpot_s is None else around(tpot_s, arrival),
        ttft=around(engine_ttft_s, arrival),
        applied=applied,
    )
    return Observation(time_s=600.0, window_s=60.0, pods={"p0": pod}, pooled=pod)


def trained_model() -> WorkloadModel:
    model = WorkloadModel(POLICY)
    chat = LengthMix(1000, 1.5e6, 2000, 200, 6e4, 400)
    samples = synthetic_samples(40, seed=11, mixes=[chat, LengthMix(1200, 2.2e6, 2400, 150, 3.4e4, 300)])
    for start in range(0, 40, 2):
        model.add(samples[start : start + 2])
    assert model.quality.trusted
    return model


def budget_seqs(knobs: Knobs, prompt: float, output: float) -> float:
    mix = LengthMix.from_histograms(around(prompt, 1.0), around(output, 1.0))
    assert mix is not None and knobs.max_inflight_tokens is not None
    return knobs.max_inflight_tokens / mix.budget_per_seq


def test_reacts_to_a_length_mix_shift_in_one_interval() -> None:
    model = trained_model()
    memory = DecideMemory()
    applied = Knobs(max_inflight_tokens=120_000, queue_deadline_ms=1800, discipline="shortest-prompt-first")
    chat = recommend(POLICY, window(1000, 200, applied=applied), model, applied, memory, tpot_q_s=0.03)
    assert not chat.urgent
    # Next interval: code completion, long prompts and 20-token answers.
    code = recommend(POLICY, window(1500, 20, applied=chat.target), model, chat.target, memory, tpot_q_s=0.03)
    assert code.urgent
    assert any("length mix shifted" in r.message for r in code.reasons)
    # Each running request now brings 75 prefill tokens per generated token
    # instead of 5: a binding limit must admit far fewer sequences.
    assert budget_seqs(code.target, 1500, 20) < 0.5 * budget_seqs(chat.target, 1000, 200)
    # ... and the limit it picks keeps the predicted TPOT quantile within the objective
    prediction = model.predict([code.target], 1e4, LengthMix.from_histograms(around(1500, 1), around(20, 1)))  # type: ignore[arg-type]
    assert prediction is not None
    assert math.exp(prediction.log_tpot[0]) <= POLICY.slo.tpot_ms / 1000.0


def test_no_shift_no_urgency_on_noise() -> None:
    model = trained_model()
    memory = DecideMemory()
    applied = Knobs(max_inflight_tokens=120_000)
    recommend(POLICY, window(1000, 200, applied=applied), model, applied, memory, tpot_q_s=0.03)
    again = recommend(POLICY, window(1200, 170, applied=applied), model, applied, memory, tpot_q_s=0.03)
    assert not again.urgent


@pytest.mark.parametrize(
    ("engine_ttft_s", "expected_ms"),
    [
        (0.2, 2000 - 0.2 * 1.04 * 1000),  # objective - p90 engine TTFT (+4% inside its bucket)
        (0.02, 1900),  # capped at 95% of the objective
        (1.5, 1000),  # at least half the objective
    ],
)
def test_deadline_leaves_room_for_the_prefill(engine_ttft_s: float, expected_ms: int) -> None:
    applied = Knobs(max_inflight_tokens=50_000)
    rec = recommend(POLICY, window(1000, 200, applied=applied, engine_ttft_s=engine_ttft_s), WorkloadModel(POLICY), applied, DecideMemory(), None)
    assert rec.target.queue_deadline_ms == pytest.approx(expected_ms, abs=1)
    assert rec.target.discipline == "shortest-prompt-first"


# The objective aimed at: 50 ms less 5% (histogram resolution) and 10%
# (the TPOT quantile is estimated from per-token ITL here).
AIM_S = 0.050 * 0.85


@pytest.mark.parametrize(
    ("tpot_q_s", "queue", "expected_factor"),
    [
        (0.080, 0.0, 0.7),  # far over: cut 30%, the most per interval
        (0.046, 0.0, AIM_S / 0.046),  # slightly over: in proportion
        (0.015, 5.0, 2.0),  # queueing with lots of TPOT room: grow, at most x2
        (0.030, 5.0, AIM_S / 0.030),  # queueing, some room: in proportion
        (0.040, 5.0, 1.0),  # queueing but TPOT near the aim: hold
        (0.015, 0.0, 1.0),  # no queue: nothing to grow for
    ],
)
def test_feedback_rule_before_the_model_exists(tpot_q_s: float, queue: float, expected_factor: float) -> None:
    applied = Knobs(max_inflight_tokens=60_000)
    observation = window(1000, 200, applied=applied, queue=queue)
    rec = recommend(POLICY, observation, WorkloadModel(POLICY), applied, DecideMemory(), tpot_q_s)
    mix = LengthMix.from_histograms(around(1000, 1), around(200, 1))
    assert mix is not None
    before = running_limit(POLICY, applied, mix)
    after = running_limit(POLICY, rec.target, mix)
    assert after == pytest.approx(before * expected_factor, rel=0.01)


def test_a_breach_cuts_even_a_trusted_models_limit() -> None:
    model = trained_model()
    applied = Knobs(max_inflight_tokens=60_000)
    rec = recommend(POLICY, window(1000, 200, applied=applied), model, applied, DecideMemory(), tpot_q_s=0.1)
    assert rec.urgent
    assert rec.target.max_inflight_tokens is not None and rec.target.max_inflight_tokens <= 0.7 * 60_000 + 1



@pytest.mark.parametrize(("ttft_s", "urgent"), [(3.0, True), (2.1, False), (0.2, False)])
def test_a_ttft_miss_makes_a_cut_urgent(ttft_s: float, urgent: bool) -> None:
    # 2.1 s is inside the scatter allowance over 2 s (x e^0.1 = 2.21 s).
    model = trained_model()
    applied = Knobs(max_inflight_tokens=400_000)
    observation = window(1000, 200, applied=applied, engine_ttft_s=ttft_s)
    rec = recommend(POLICY, observation, model, applied, DecideMemory(), tpot_q_s=None)
    assert rec.target.max_inflight_tokens is not None and rec.target.max_inflight_tokens < 400_000
    assert rec.urgent is urgent
    assert any(r.message.startswith("TTFT objective missed") for r in rec.reasons) is urgent


def test_a_ttft_miss_does_not_hurry_a_raise() -> None:
    model = trained_model()
    applied = Knobs(max_inflight_tokens=20_000)
    observation = window(1000, 200, applied=applied, queue=5.0, engine_ttft_s=3.0)
    rec = recommend(POLICY, observation, model, applied, DecideMemory(), tpot_q_s=None)
    assert rec.target.max_inflight_tokens is not None and rec.target.max_inflight_tokens > 20_000
    assert not rec.urgent

def test_without_lengths_the_setting_is_kept() -> None:
    applied = Knobs(max_inflight_tokens=60_000)
    pod = PodObservation(arrival_rps=5.0, applied=applied)
    observation = Observation(600.0, 60.0, {"p0": pod}, pod)
    rec = recommend(POLICY, observation, WorkloadModel(POLICY), applied, DecideMemory(), None)
    assert rec.target == applied


def test_initial_knobs_follow_the_policy() -> None:
    knobs = initial_knobs(POLICY)
    assert knobs.queue_deadline_ms == 1800
    assert knobs.discipline == "shortest-prompt-first"
    assert knobs.max_inflight_tokens is None
    fcfs_only = Policy.from_spec(controller_spec(slo={"ttftMs": 1000, "tpotMs": 40}, knobs={"discipline": {"allowed": ["fcfs"]}}))
    assert initial_knobs(fcfs_only).discipline == "fcfs"


def _untrusted_model() -> WorkloadModel:
    """A step model fitted on three windows: usable, not yet trusted."""
    model = WorkloadModel(POLICY)
    samples = synthetic_samples(6, seed=11, mixes=[LengthMix(1000, 1.5e6, 2000, 200, 6e4, 400)])
    for start in range(0, 6, 2):
        model.add(samples[start : start + 2])
    assert model.step is not None and not model.quality.trusted
    return model


@pytest.mark.parametrize(
    ("tpot_q_s", "probes_past_seen"),
    [
        (0.020, True),  # TPOT at under half the aim: the probe may go past what was seen
        (0.036, False),  # above 80% of the aim (42.5 ms): no room to probe
        (0.040, False),
    ],
)
def test_an_untrusted_models_probe_needs_measured_headroom(tpot_q_s: float, probes_past_seen: bool) -> None:
    model = _untrusted_model()
    applied = Knobs(max_inflight_tokens=60_000)
    rec = recommend(POLICY, window(1000, 200, applied=applied, queue=5.0), model, applied, DecideMemory(), tpot_q_s)
    mix = LengthMix.from_histograms(around(1000, 1), around(200, 1))
    assert mix is not None
    seen = model.largest_limit_seen(mix)
    assert seen > running_limit(POLICY, applied, mix)  # growing up to `seen` is no probe
    after = running_limit(POLICY, rec.target, mix)
    if probes_past_seen:
        assert after > 1.05 * seen
    else:
        assert after == pytest.approx(seen, rel=0.01)


@pytest.mark.parametrize(
    ("per_request_tpot", "urgent"),
    [
        # 52 ms estimated from ITL reads ~57 ms per request: over 50 ms plus a window's scatter.
        (False, True),
        # 52 ms measured per request is within the scatter allowance (50 ms x e^0.1).
        (True, False),
    ],
)
def test_a_breach_judges_an_itl_estimate_with_its_bias(per_request_tpot: bool, urgent: bool) -> None:
    applied = Knobs(max_inflight_tokens=60_000)
    observation = window(1000, 200, applied=applied, tpot_s=0.052 if per_request_tpot else None)
    rec = recommend(POLICY, observation, WorkloadModel(POLICY), applied, DecideMemory(), 0.052)
    assert rec.urgent is urgent


TUNABLE = Policy.default_for(
    Slo(2000, 40), EngineSpec(max_num_seqs=512, max_num_batched_tokens=8192, runtime_tunable=True)
)


def engine_model(policy: Policy) -> WorkloadModel:
    model = WorkloadModel(policy)
    model.step = ENGINE
    return model


def chunk_reason(rec: Recommendation) -> Reason:
    return next(r for r in rec.reasons if r.message.startswith("prefill chunk"))


def test_prompt_heavy_traffic_gets_the_largest_chunk_that_meets_tpot() -> None:
    # Summaries: 1,900-token prompts, 55-token answers, 18 per second. A
    # step that prefills a whole p90 prompt costs more than the objective.
    applied = Knobs(max_concurrency=40, max_num_batched_tokens=8192)
    observation = window(1900, 55, applied=applied, arrival=18.0, queue=2.0)
    rec = recommend(TUNABLE, observation, engine_model(TUNABLE), applied, DecideMemory(), tpot_q_s=0.03)
    chunk = rec.target.max_num_batched_tokens
    assert chunk is not None
    why = chunk_reason(rec)
    assert "meets the TPOT objective" in why.message
    assert chunk == why.data["fitsTpotTokens"] < 1900
    # Saturated at that chunk, a step that carries a full chunk stays within
    # the objective (a whole p90 prompt's step would cost ~46 ms) ...
    m = mix_of(1900, 55)
    running = ENGINE.predict(512, 1e6, m, chunk=chunk, overload=True).running
    assert ENGINE.longest_step(running, chunk, m.context_per_seq, m.attention_per_token) <= 0.040
    # ... and the admission limit admits no more than that chunk can run.
    assert running_limit(TUNABLE, rec.target, m) <= engine_running_capacity(TUNABLE, rec.target, m) * 1.001


def test_a_chunk_keeps_up_with_the_prompts_even_past_the_tpot_objective() -> None:
    # 400 long answers decoding: their steps alone use the TPOT objective,
    # yet the prompts arriving must still be prefilled.
    applied = Knobs(max_concurrency=400, max_num_batched_tokens=8192)
    observation = window(1000, 600, applied=applied, arrival=40.0, queue=5.0)
    rec = recommend(TUNABLE, observation, engine_model(TUNABLE), applied, DecideMemory(), tpot_q_s=0.03)
    why = chunk_reason(rec)
    assert "keeps up" in why.message
    assert why.data["keepsUpTokens"] > why.data["fitsTpotTokens"]
    assert rec.target.max_num_batched_tokens == why.data["keepsUpTokens"]


def mix_of(prompt: float, output: float) -> LengthMix:
    mix = LengthMix.from_histograms(around(prompt, 1.0), around(output, 1.0))
    assert mix is not None
    return mix


LLAMACPP_SPEC = EngineSpec(kind=EngineKind.LLAMACPP, max_num_seqs=16, max_num_batched_tokens=2048)


def without_kv_gauge(observation: Observation) -> Observation:
    """The window as llama-server reports it: no KV-usage gauge."""
    pod = dataclasses.replace(observation.pooled, kv_usage=None)
    return dataclasses.replace(observation, pods={"p0": pod}, pooled=pod)


@pytest.mark.parametrize(("kv_cache_tokens", "bounded"), [(16_384, True), (None, False)])
def test_a_declared_kv_cache_bounds_the_token_budget_without_a_kv_gauge(
    kv_cache_tokens: int | None, bounded: bool
) -> None:
    policy = Policy.default_for(Slo(2000, 50), dataclasses.replace(LLAMACPP_SPEC, kv_cache_tokens=kv_cache_tokens))
    applied = Knobs(max_inflight_tokens=60_000)
    # 1,200-token requests: 16 slots' worth (~19k tokens) would not fit a 16k cache.
    observation = without_kv_gauge(window(1000, 200, applied=applied))
    memory = DecideMemory()
    rec = recommend(policy, observation, WorkloadModel(policy), applied, memory, tpot_q_s=0.03)
    assert rec.target.max_inflight_tokens is not None
    if bounded:
        assert memory.kv_capacity_tokens == 16_384
        assert rec.target.max_inflight_tokens == int(KV_SHARE * 16_384)
    else:
        assert memory.kv_capacity_tokens is None
        assert rec.target.max_inflight_tokens > 16_384


def test_a_kv_gauge_refines_the_declared_kv_cache() -> None:
    policy = Policy.default_for(Slo(2000, 50), dataclasses.replace(LLAMACPP_SPEC, kv_cache_tokens=16_384))
    applied = Knobs(max_inflight_tokens=60_000)
    observation = window(1000, 200, applied=applied)  # kv_usage 0.3 of a far larger cache
    memory = DecideMemory()
    recommend(policy, observation, WorkloadModel(policy), applied, memory, tpot_q_s=0.03)
    mix = mix_of(1000, 200)
    assert observation.pooled.running is not None
    measured = observation.pooled.running * mix.context_per_seq / 0.3
    assert measured > 16_384
    assert memory.kv_capacity_tokens == pytest.approx(0.7 * 16_384 + 0.3 * measured)
