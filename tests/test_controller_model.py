"""The workload model on synthetic data with a known answer."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from test_controller_synthetic import (
    POLICY,
    TAIL,
    TRUE,
    mix,
    random_mixes,
    synthetic_samples,
    true_step,
)

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.model import WorkloadModel
from batchpilot.controller.observe import WindowHistogram
from batchpilot.controller.physics import KNEE_TOKENS, StepModel
from batchpilot.controller.policy import EngineSpec, Policy, Slo
from batchpilot.controller.samples import LengthMix, Sample, estimate_tpot_quantile

INF = math.inf
MIXES = [mix(1000, 200), mix(1500, 30), mix(800, 1000)]


def test_step_model_recovers_the_engine() -> None:
    fitted = StepModel.fit(synthetic_samples(120, seed=1, mixes=random_mixes(12, seed=7)))
    assert fitted is not None
    rng = np.random.default_rng(2)
    errors = []
    for m in random_mixes(50, seed=8):  # mixes it was not fitted on
        running, prompt_tps = rng.uniform(5, 200), rng.uniform(1000, 20_000)
        fixed = fitted.d0 + fitted.d1 * running + fitted.d2 * running * m.context_per_seq
        predicted = fixed / (1.0 - fitted.prefill_cost(m) * prompt_tps)
        errors.append(abs(predicted / true_step(running, prompt_tps, m) - 1.0))
    # 2% noise on every window: a few percent off on unseen mixes and loads
    assert np.mean(errors) < 0.03
    assert np.max(errors) < 0.10


def test_step_model_needs_enough_windows() -> None:
    assert StepModel.fit(synthetic_samples(4, seed=3, mixes=MIXES)) is None


@pytest.mark.parametrize("m", MIXES)
def test_saturated_step_time_and_inverse(m: LengthMix) -> None:
    step = StepModel(**TRUE)
    physics = step.predict(limit=40, arrival_rps=1e6, mix=m)
    assert physics.saturated
    expected = TRUE["d0"] + 40 * step.per_sequence_cost(m)
    assert physics.step_s == pytest.approx(expected)
    assert physics.throughput_rps == pytest.approx(40 / (m.output_mean * expected))
    assert step.concurrency_for(expected, m) == pytest.approx(40)


def test_below_capacity_the_limit_does_not_bind() -> None:
    step = StepModel(**TRUE)
    m = mix(1000, 200)
    physics = step.predict(limit=500, arrival_rps=2.0, mix=m)
    assert not physics.saturated
    assert physics.throughput_rps == 2.0
    # Little's law: running = arrivals x output tokens x step time
    assert physics.running == pytest.approx(2.0 * 200 * physics.step_s)


def test_length_mix_from_histograms() -> None:
    # 50 prompts uniform in (0, 100], 50 in (100, 200]: mean 100, E[x^2] = 40000/3
    prompt = WindowHistogram(((100.0, 50.0), (200.0, 100.0), (INF, 100.0)), 100.0 * 100.0)
    output = WindowHistogram(((10.0, 100.0), (INF, 100.0)), 5.0 * 100.0)
    m = LengthMix.from_histograms(prompt, output)
    assert m is not None
    assert m.prompt_mean == pytest.approx(100.0)
    assert m.prompt_sq_mean == pytest.approx(40000.0 / 3.0)
    assert m.prompt_p90 == pytest.approx(180.0)
    assert m.output_mean == pytest.approx(5.0)
    assert m.context_per_seq == pytest.approx(100.0 + (100.0 / 3.0) / 10.0)
    assert LengthMix.from_histograms(None, output) is None


def test_tpot_quantile_of_a_constant_gap_is_that_gap() -> None:
    itl = WindowHistogram(((0.019, 0.0), (0.021, 1000.0), (INF, 1000.0)), 20.0)
    output = WindowHistogram(((10.0, 0.0), (100.0, 50.0), (INF, 50.0)), 2750.0)
    assert estimate_tpot_quantile(itl, output, 0.99) == pytest.approx(0.02, abs=0.001)


@pytest.mark.parametrize(
    ("output_bounds", "low", "high"),
    [
        # one- or two-token answers: a request's TPOT is a single gap, and 10%
        # of gaps are ~200 ms prefill-carrying steps: p99 is one of those
        ((2.0, 3.0), 0.15, 0.25),
        # 1,000-token answers average the gaps: p99 near the mean of ~29 ms
        ((1000.0, 1001.0), 0.025, 0.035),
    ],
)
def test_tpot_quantile_tail_shrinks_with_answer_length(output_bounds: tuple[float, float], low: float, high: float) -> None:
    itl = WindowHistogram(((0.009, 0.0), (0.011, 900.0), (0.19, 900.0), (0.21, 1000.0), (INF, 1000.0)), 29.0)
    lower, upper = output_bounds
    output = WindowHistogram(((lower, 0.0), (upper, 10.0), (INF, 10.0)), 10.0 * (lower + upper) / 2)
    estimate = estimate_tpot_quantile(itl, output, 0.99)
    assert estimate is not None and low <= estimate <= high
    # seeded: the same answer every time
    assert estimate_tpot_quantile(itl, output, 0.99) == estimate


def test_workload_model_learns_the_tail_and_is_trusted() -> None:
    model = WorkloadModel(POLICY)
    history = synthetic_samples(60, seed=4, mixes=MIXES)
    for start in range(0, 60, 3):
        model.add(history[start : start + 3])
    quality = model.quality
    assert quality.trusted
    assert quality.heldout_error is not None and quality.heldout_error < 0.1
    m = MIXES[0]
    candidates = [Knobs(max_inflight_tokens=int(n * m.budget_per_seq)) for n in (10, 40, 160)]
    prediction = model.predict(candidates, arrival_rps=1e4, mix=m)
    assert prediction is not None
    for index, n in enumerate((10, 40, 160)):
        saturated = TRUE["d0"] + n * StepModel(**TRUE).per_sequence_cost(m)
        assert math.exp(prediction.log_tpot[index]) == pytest.approx(TAIL * saturated, rel=0.15)
    # more admitted sequences never predict a lower TPOT
    assert np.all(np.diff(prediction.log_tpot) > 0)


def test_ring_buffer_is_bounded() -> None:
    model = WorkloadModel(POLICY, capacity=16)
    for start in range(0, 60, 3):
        model.add(synthetic_samples(3, seed=start, mixes=MIXES))
    assert model.samples == 16


def test_untrusted_when_predictions_miss() -> None:
    model = WorkloadModel(POLICY)
    rng = np.random.default_rng(5)
    for start in range(0, 60, 3):
        batch = synthetic_samples(3, seed=start, mixes=MIXES)
        # TPOT quantiles unrelated to anything the model can see
        model.add([replace(s, tpot_q_s=float(rng.uniform(0.005, 0.5))) for s in batch])
    assert not model.quality.trusted


def one_phase_samples(count: int, seed: int, noise: float = 0.02) -> list[Sample]:
    """Windows of one prompt-heavy traffic phase at a binding limit: the same
    mix, the running sequences +-10% as the limit moves. Prompt tokens per
    step then stay in proportion to the running sequences, and the windows
    alone cannot tell the fixed cost from the prefill cost."""
    rng = np.random.default_rng(seed)
    engine = StepModel(**TRUE)
    m = mix(1900, 55)
    samples = []
    for _ in range(count):
        limit = 40.0 * (1 + 0.1 * rng.standard_normal())
        truth = engine.predict(limit, 1e6, m)
        samples.append(
            Sample(
                knobs=Knobs(max_concurrency=round(limit)),
                arrival_rps=truth.throughput_rps * 1.2,
                mix=m,
                step_s=truth.step_s * (1 + noise * rng.standard_normal()),
                running=truth.running,
                prompt_tps=truth.throughput_rps * m.prompt_mean * (1 + noise * rng.standard_normal()),
                binding=True,
                tpot_q_s=None,
                ttft_q_s=None,
                throughput_rps=truth.throughput_rps,
            )
        )
    return samples


def test_one_phase_splits_the_step_by_the_roofline_prior() -> None:
    # Without the prior this data gave the prefill half its true cost and
    # the fixed part 1.6x its own (d0 / c1 = 1,136 tokens).
    fitted = StepModel.fit(one_phase_samples(20, seed=4))
    assert fitted is not None
    assert fitted.d0 / fitted.c1 == pytest.approx(KNEE_TOKENS, rel=0.15)
    assert fitted.c1 == pytest.approx(TRUE["c1"], rel=0.25)


def test_the_chunk_limits_the_running_sequences() -> None:
    step = StepModel(**TRUE)
    m = mix(1900, 55)
    free = step.predict(limit=100, arrival_rps=1e6, mix=m)
    chunked = step.predict(limit=100, arrival_rps=1e6, mix=m, chunk=1300)
    # The budget splits o:p between decodes and the prefill replacing finishes.
    room = 1300 * 55 / (1900 + 55)
    assert chunked.running == pytest.approx(room)
    assert chunked.step_s == pytest.approx(TRUE["d0"] + room * step.per_sequence_cost(m))
    assert chunked.throughput_rps == pytest.approx(room / (55 * chunked.step_s))
    assert chunked.step_s < free.step_s
    # A chunk that leaves room for the limit changes nothing.
    assert step.predict(limit=100, arrival_rps=1e6, mix=m, chunk=100_000) == free


def test_a_small_chunk_bounds_the_predicted_tpot() -> None:
    policy = Policy.default_for(
        Slo(2000, 40), EngineSpec(max_num_seqs=512, max_num_batched_tokens=8192, runtime_tunable=True)
    )
    model = WorkloadModel(policy)
    model.add(synthetic_samples(20, seed=3, mixes=MIXES))
    assert model.step is not None
    m = mix(1900, 55)
    wide = Knobs(max_concurrency=200, max_num_batched_tokens=8192)
    narrow = Knobs(max_concurrency=200, max_num_batched_tokens=1300)
    prediction = model.predict([wide, narrow], 1e4, m, learned=False)
    assert prediction is not None
    running = prediction.physics[1].running
    longest = model.step.longest_step(running, 1300, m.context_per_seq, m.attention_per_token)
    # Every step of the narrow setting costs about the same: no request's
    # mean time per token exceeds the longest step.
    assert math.exp(prediction.log_tpot[1]) == pytest.approx(longest)
    assert prediction.log_tpot[1] < prediction.log_tpot[0]
