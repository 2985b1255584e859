"""Physics: the step time of a continuous-batching engine, five fitted constants.

`StepModel`, the first layer of the workload model (model.py). A
continuous-batching engine's iteration costs a fixed part (reading the
weights), a part per running sequence, a part per KV token those sequences
attend to, and a part per prompt token prefilled in that step. Per window,
with T the mean inter-token latency, B the running sequences, s the mean
context per running sequence and P the prompt tokens prefilled per second
(so P*T per step):

    T = d0 + d1*B + d2*B*s + (c1 + c2*a) * P*T        (a = E[p^2]/E[p])

fitted by non-negative ridge regression (sklearn's NNLS `LinearRegression
(positive=True)` on a ridge-augmented system: a negative cost is never
physical, and the small penalty splits weight over terms that one
traffic mix cannot tell apart, e.g. per-sequence and per-context-token
costs at a constant context length). The fixed cost and the prefill
cost are such a pair within one phase; a roofline prior (d0/c1 near the
GPU's FLOPs per byte, `KNEE_TOKENS`) splits them. Little's law then predicts any
setting: below capacity B = lambda*E[o]*T, so
T = d0 / (1 - lambda*((c1+c2a)*E[p] + (d1+d2*s)*E[o])); at a concurrency
limit B every finishing request admits another, so
T = d0 + B*(d1 + d2*s + (c1+c2a)*E[p]/E[o]) and throughput B/(E[o]*T).
The constants belong to the engine, not to the traffic, so they stay
valid across a shift in the length mix: only the length moments change,
and they are measured every window. The engine's tokens per step (its
prefill chunk) caps the sequences that decode at once, and bounds the
TPOT quantile by the longest step it allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LinearRegression

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.policy import Policy
from batchpilot.controller.samples import LengthMix, Sample

# The step model needs more windows than it has constants (5) to be fitted
# at all.
MIN_STEP_SAMPLES = 5
# On unit-scaled columns against step times of 0.005-0.5 s: large enough to
# split exactly collinear terms, small enough not to bias a fit the data do
# determine (the synthetic engine of the tests is recovered within 0.1%).
STEP_RIDGE_ALPHA = 1e-6
# The roofline prior on the prefill cost per token, c1: a step reads the
# weights once (d0) and a prefilled token costs two FLOPs per weight, so
# d0 / c1 is the GPU's FLOPs per byte of memory traffic, the roofline knee:
# 295 for an H100 in bf16, 206 for an H200, 156 for an A100 (the
# calibration data measure 378 and 209 on the H100 and A100). Within one
# traffic phase the prompt tokens per step barely move, so d0 and c1 cannot
# be told apart from the windows alone; without the prior the ridge gave the
# whole step to d0 and priced a prompt token 5-20x too low.
KNEE_TOKENS = 300.0
# The prior weighs as much as one window: the data overrule it wherever
# the prompt load varies between windows.
KNEE_PRIOR_WEIGHT = 1.0


# Position of c1 among the load columns (d1, d2, c1, c2) of the step fit.
_C1_COLUMN = 2


@dataclass(frozen=True, slots=True)
class Physics:
    """What the step model predicts for one setting under one load."""

    step_s: float
    running: float
    throughput_rps: float
    saturated: bool


class StepModel:
    """The engine constants of the module docstring, fitted by non-negative ridge.

    The arithmetic takes numpy arrays or floats alike: a refit evaluates every
    sample of the ring buffer at once, a decision every candidate at once.
    """

    def __init__(self, d0: float, d1: float, d2: float, c1: float, c2: float) -> None:
        self.d0, self.d1, self.d2, self.c1, self.c2 = d0, d1, d2, c1, c2

    @classmethod
    def fit(cls, samples: Sequence[Sample]) -> StepModel | None:
        columns = np.array(
            [
                (
                    s.running,
                    s.mix.context_per_seq,
                    s.prompt_tps,
                    s.step_s,
                    s.mix.attention_per_token,
                )
                for s in samples
            ]
        ).reshape(-1, 5)
        return cls.fit_arrays(*columns.T)

    @classmethod
    def fit_arrays(
        cls,
        running: np.ndarray,
        context: np.ndarray,
        prompt_tps: np.ndarray,
        step: np.ndarray,
        attention: np.ndarray,
    ) -> StepModel | None:
        if len(step) < MIN_STEP_SAMPLES:
            return None
        design = np.column_stack(
            [running, running * context, prompt_tps * step, prompt_tps * step * attention]
        )
        # Column scales differ by 10^6 (sequences vs token-squares); NNLS is
        # scale-sensitive in its stopping rule, so fit on unit columns.
        scale = np.maximum(np.abs(design).max(axis=0), 1e-12)
        # Ridge as non-negative least squares on an augmented system: a
        # column of ones for d0 (not penalised), sqrt(alpha) * identity rows
        # that pull d1, d2 and c2 towards zero, and one row that pulls c1
        # towards d0 / KNEE_TOKENS (the roofline prior). (sklearn's
        # Ridge(positive=True) solves this with L-BFGS, which stops ~10% off
        # the optimum at this conditioning; the NNLS solver is exact.)
        width = design.shape[1]
        unit = np.column_stack([np.ones(len(step)), design / scale])
        penalty = np.column_stack([np.zeros(width), math.sqrt(STEP_RIDGE_ALPHA) * np.eye(width)])
        penalty[_C1_COLUMN] = 0.0
        penalty[_C1_COLUMN, 0] = math.sqrt(KNEE_PRIOR_WEIGHT)
        penalty[_C1_COLUMN, 1 + _C1_COLUMN] = (
            -math.sqrt(KNEE_PRIOR_WEIGHT) * KNEE_TOKENS / scale[_C1_COLUMN]
        )
        regression = LinearRegression(positive=True, fit_intercept=False).fit(
            np.vstack([unit, penalty]), np.concatenate([step, np.zeros(width)])
        )
        d0 = float(regression.coef_[0])
        d1, d2, c1, c2 = (float(v) for v in regression.coef_[1:] / scale)
        if not d0 > 0:
            # All of the step time explained by load leaves no fixed cost,
            # which no engine has; the fit is not usable yet.
            return None
        return cls(d0, d1, d2, c1, c2)

    def prefill_cost(self, mix: LengthMix) -> float:
        """Seconds of step time per prompt token prefilled."""
        return self.c1 + self.c2 * mix.attention_per_token

    def decode_step(self, running: float, mix: LengthMix) -> float:
        """Step time of `running` decodes alone, without prefill."""
        return self.d0 + running * (self.d1 + self.d2 * mix.context_per_seq)

    def per_sequence_cost(self, mix: LengthMix) -> float:
        """Marginal step time of one more running sequence when every finish admits a new one."""
        return float(
            self._per_sequence(
                mix.prompt_mean, mix.output_mean, mix.context_per_seq, mix.attention_per_token
            )
        )

    def concurrency_for(self, step_s: float, mix: LengthMix) -> float:
        """Running sequences at which a saturated engine's step time reaches `step_s`."""
        return max(0.0, (step_s - self.d0) / self.per_sequence_cost(mix))

    def predict(
        self,
        limit: float,
        arrival_rps: float,
        mix: LengthMix,
        *,
        chunk: float = math.inf,
        overload: bool = False,
    ) -> Physics:
        """Steady state under `limit` running sequences at most, with `arrival_rps` offered.

        `chunk`: the engine's tokens per step (see `steady`). `overload`: as
        if demand exceeded what the limit admits (a burst), the case a limit
        exists for.
        """
        step, running, throughput, saturated = self.steady(
            np.array([limit]),
            np.array([arrival_rps]),
            mix.prompt_mean,
            mix.output_mean,
            mix.context_per_seq,
            mix.attention_per_token,
            chunk=chunk,
            overload=overload,
        )
        return Physics(float(step[0]), float(running[0]), float(throughput[0]), bool(saturated[0]))

    def steady(
        self,
        limit: np.ndarray,
        arrival: np.ndarray,
        prompt: np.ndarray | float,
        output: np.ndarray | float,
        context: np.ndarray | float,
        attention: np.ndarray | float,
        *,
        chunk: np.ndarray | float = math.inf,
        overload: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(step, running, throughput, saturated) per element; see `predict`.

        `chunk`: the engine's tokens per step (decode tokens included, as
        vLLM counts them). In steady state a step's budget splits o:p between
        decodes and the prefill that replaces finished requests, so at most
        chunk*o/(p+o) sequences decode at once: the chunk limits the running
        sequences as an admission limit would, and what it admits beyond
        that waits inside the engine.
        """
        limit = np.minimum(limit, chunk * output / (prompt + output))
        decode = self.d1 + self.d2 * context
        load = arrival * ((self.c1 + self.c2 * attention) * prompt + decode * output)
        with np.errstate(divide="ignore", invalid="ignore"):
            step_free = np.where(load < 1.0, self.d0 / (1.0 - load), np.inf)
        running_free = arrival * output * step_free
        free = (load < 1.0) & (running_free <= limit) & (not overload)
        running_cap = np.maximum(limit, 1.0)
        step_cap = self.d0 + running_cap * self._per_sequence(prompt, output, context, attention)
        step = np.where(free, step_free, step_cap)
        running = np.where(free, running_free, running_cap)
        throughput = np.where(free, arrival, running_cap / (output * step_cap))
        return step, running, throughput, ~free

    def longest_step(
        self,
        running: np.ndarray | float,
        chunk: np.ndarray | float,
        context: np.ndarray | float,
        attention: np.ndarray | float,
    ) -> np.ndarray | float:
        """A step of `running` decodes that also fills the rest of the chunk with prefill.

        No request's mean time per token can exceed it: where the chunk is
        small, this and not the tail over the mean step bounds the TPOT
        quantile (every step then costs about the same).
        """
        prefill = np.maximum(chunk - running, 0.0)
        return (
            self.d0
            + running * (self.d1 + self.d2 * context)
            + (self.c1 + self.c2 * attention) * prefill
        )

    def _per_sequence(
        self,
        prompt: np.ndarray | float,
        output: np.ndarray | float,
        context: np.ndarray | float,
        attention: np.ndarray | float,
    ) -> np.ndarray | float:
        return self.d1 + self.d2 * context + (self.c1 + self.c2 * attention) * prompt / output

    def as_dict(self) -> dict[str, float]:
        return {
            "d0_ms": self.d0 * 1e3,
            "d1_ms": self.d1 * 1e3,
            "d2_ms": self.d2 * 1e3,
            "c1_ms": self.c1 * 1e3,
            "c2_ms": self.c2 * 1e3,
        }


def running_limit(policy: Policy, knobs: Knobs, mix: LengthMix) -> float:
    """Most sequences a setting lets run at once: the cap, or the token budget over tokens per sequence."""
    cap = policy.effective("max_concurrency", knobs.max_concurrency)
    budget = policy.effective("max_inflight_tokens", knobs.max_inflight_tokens)
    return min(cap, budget / mix.budget_per_seq)


def engine_chunk(policy: Policy, knobs: Knobs) -> float:
    """The engine's tokens per step in effect: max_num_batched_tokens, else the engine's own."""
    return policy.effective("max_num_batched_tokens", knobs.max_num_batched_tokens)


def engine_running_capacity(policy: Policy, knobs: Knobs, mix: LengthMix) -> float:
    """Sequences the engine runs at once under its tokens per step (see `StepModel.steady`).

    chunk*o/(p+o) decode in steady state; add those prefilling (the chunk's
    prefill share over a prompt's length) and one being admitted.
    """
    chunk = engine_chunk(policy, knobs)
    return chunk * (mix.output_mean + 1.0) / (mix.prompt_mean + mix.output_mean) + 1.0
