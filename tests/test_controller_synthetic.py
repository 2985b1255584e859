"""Synthetic windows of a known engine, shared by the controller's model and decision tests."""

from __future__ import annotations

import numpy as np

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.physics import StepModel, running_limit
from batchpilot.controller.policy import EngineSpec, Policy, Slo
from batchpilot.controller.samples import LengthMix, Sample

# An engine like an 8B model on one H100 (seconds): 6 ms per step, 13 us
# per running sequence, 41 ns per context token, 17 us per prefilled token
# plus 1 ns per token of attention span.
TRUE = {"d0": 6e-3, "d1": 13e-6, "d2": 41e-9, "c1": 17e-6, "c2": 1e-9}
POLICY = Policy.default_for(Slo(2000, 50), EngineSpec(max_num_seqs=512))
TAIL = 1.5  # per-request TPOT quantile / mean step at a binding limit


def mix(prompt: float, output: float) -> LengthMix:
    # lognormal-like spread: E[x^2] = 1.5 E[x]^2
    return LengthMix(prompt, 1.5 * prompt**2, 2 * prompt, output, 1.5 * output**2, 2 * output)


def true_step(running: float, prompt_tps: float, m: LengthMix) -> float:
    fixed = TRUE["d0"] + TRUE["d1"] * running + TRUE["d2"] * running * m.context_per_seq
    return fixed / (1.0 - (TRUE["c1"] + TRUE["c2"] * m.attention_per_token) * prompt_tps)


def synthetic_samples(count: int, seed: int, mixes: list[LengthMix], noise: float = 0.02) -> list[Sample]:
    """Windows of the true engine at random limits and loads (some beyond
    capacity: the limit binds), observed with `noise` relative error."""
    rng = np.random.default_rng(seed)
    engine = StepModel(**TRUE)
    samples = []
    for i in range(count):
        m = mixes[i % len(mixes)]
        knobs = Knobs(max_inflight_tokens=int(rng.uniform(10, 120) * m.budget_per_seq))
        limit = running_limit(POLICY, knobs, m)
        capacity = limit / (m.output_mean * (TRUE["d0"] + limit * engine.per_sequence_cost(m)))
        arrival = rng.uniform(0.3, 2.0) * capacity
        truth = engine.predict(limit, arrival, m)
        step = truth.step_s * (1 + noise * rng.standard_normal())
        samples.append(
            Sample(
                knobs=knobs,
                arrival_rps=arrival,
                mix=m,
                step_s=step,
                running=truth.running,
                prompt_tps=truth.throughput_rps * m.prompt_mean,
                binding=truth.saturated,
                tpot_q_s=step * TAIL * (1 + noise * rng.standard_normal()),
                ttft_q_s=0.5,
                throughput_rps=truth.throughput_rps,
            )
        )
    return samples


def random_mixes(count: int, seed: int) -> list[LengthMix]:
    rng = np.random.default_rng(seed)
    return [mix(rng.uniform(300, 3000), rng.uniform(20, 1500)) for _ in range(count)]



