"""Model: a workload model fitted online, pooled across the pods of one policy.

Two layers, because the controller sees only tens of windows per traffic
phase and must still extrapolate to knob settings it has not tried:

1. `StepModel`, physics with five fitted constants. A continuous-batching
   engine's iteration costs a fixed part (reading the weights), a part per
   running sequence, a part per KV token those sequences attend to, and a
   part per prompt token prefilled in that step. Per window, with T the mean
   inter-token latency, B the running sequences, s the mean context per
   running sequence and P the prompt tokens prefilled per second (so P*T per
   step):

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

2. Residual regressors, scikit-learn `BayesianRidge`, of what physics leaves
   out, in log space (see `WorkloadModel`): the per-request TPOT quantile
   over the step time at a binding limit (short answers that meet a long
   prefill chunk), the TTFT quantile, and throughput over physics, on the
   limit, the lengths, the discipline and the deadline. Why BayesianRidge:
   with 10-50 windows per phase a GP's hyperparameters or a quantile
   forest are unstable, and trees cannot extrapolate; a Bayesian linear
   model on physically scaled features extrapolates linearly, is
   regularised by its evidence maximisation, and gives in closed form, in
   well under a millisecond, a predictive standard deviation whose
   parameter (epistemic) part grows with the distance from the settings
   seen: the uncertainty the decision keeps a margin for.

Samples live in a ring buffer (bounded memory); every new window is first
predicted by the models fitted without it, and that held-out error is what
`quality` reports and what decides whether decisions may rely on the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import BayesianRidge, LinearRegression

from batchpilot.controller.explain import ModelQuality
from batchpilot.controller.knobs import Knobs
from batchpilot.controller.observe import Histogram, PodObservation
from batchpilot.controller.policy import Policy

# Samples kept: 512 pod-windows is 4+ hours of one pod at 30 s, or eight
# intervals of a 64-pod policy; 17 floats (136 bytes) each.
RING_CAPACITY = 512
# The step model needs more windows than it has constants (5) to be fitted
# at all.
MIN_STEP_SAMPLES = 5
MIN_TRUSTED_SAMPLES = 12
# The residual regressors have five features plus an intercept: twice that
# many windows before their noise estimate means anything.
MIN_RESIDUAL_SAMPLES = 12
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
# The residual models weigh a window by 0.5^(age / half-life): the tail a
# limit produces drifts with the traffic's burstiness, which the features
# do not capture; 20 intervals (10 minutes at 30 s) keeps a phase's worth.
# The step model is not weighted: engine constants do not drift.
RESIDUAL_HALF_LIFE = 20.0
# Held-out error (mean |log error|) up to which decisions rely on the model:
# 0.25 ~ predictions within ~28%, which the decision's margin absorbs.
TRUSTED_HELDOUT_ERROR = 0.25
# Weight of the newest window in the held-out error's moving average.
HELDOUT_EMA = 0.3
# Simulated requests per window for the TPOT quantile estimate; 32 draws per
# request, enough for the mean of a short answer, longer ones use the CLT.
_TPOT_REQUESTS = 2000
_TPOT_DRAWS = 32


@dataclass(frozen=True, slots=True)
class LengthMix:
    """Moments of the prompt and output lengths of the requests that completed."""

    prompt_mean: float
    prompt_sq_mean: float
    prompt_p90: float
    output_mean: float
    output_sq_mean: float
    output_p90: float

    @classmethod
    def from_histograms(cls, prompt: Histogram | None, output: Histogram | None) -> LengthMix | None:
        if prompt is None or output is None:
            return None
        prompt_mean, output_mean = prompt.mean, output.mean
        prompt_p90, output_p90 = prompt.quantile(0.9), output.quantile(0.9)
        if not prompt_mean or not output_mean or prompt_p90 is None or output_p90 is None:
            return None
        return cls(
            prompt_mean,
            max(_second_moment(prompt), prompt_mean**2),
            prompt_p90,
            output_mean,
            max(_second_moment(output), output_mean**2),
            output_p90,
        )

    @property
    def context_per_seq(self) -> float:
        """Mean KV tokens of a running sequence: each runs ~o steps, growing from p to p+o."""
        return self.prompt_mean + self.output_sq_mean / (2.0 * self.output_mean)

    @property
    def budget_per_seq(self) -> float:
        """Mean prompt + output tokens the gate charges per running sequence (time-weighted)."""
        return self.prompt_mean + self.output_sq_mean / self.output_mean

    @property
    def attention_per_token(self) -> float:
        """E[p^2]/E[p]: quadratic attention work per prefilled token."""
        return self.prompt_sq_mean / self.prompt_mean

    def shift(self, other: LengthMix) -> float:
        """Largest |log ratio| of the mean prompt or output length (0.41 = 1.5x)."""
        return max(
            abs(math.log(self.prompt_mean / other.prompt_mean)),
            abs(math.log(self.output_mean / other.output_mean)),
        )

    def blend(self, other: LengthMix, weight: float) -> LengthMix:
        """`weight` of self, the rest of other (a moving reference)."""
        def mix(a: float, b: float) -> float:
            return weight * a + (1.0 - weight) * b

        return LengthMix(
            mix(self.prompt_mean, other.prompt_mean),
            mix(self.prompt_sq_mean, other.prompt_sq_mean),
            mix(self.prompt_p90, other.prompt_p90),
            mix(self.output_mean, other.output_mean),
            mix(self.output_sq_mean, other.output_sq_mean),
            mix(self.output_p90, other.output_p90),
        )


def _second_moment(hist: Histogram) -> float:
    """E[x^2] with observations uniform inside each bucket (the +Inf bucket at its lower bound)."""
    total = hist.count_rate
    acc = 0.0
    lower, below = 0.0, 0.0
    for upper, cumulative in hist.buckets:
        count = cumulative - below
        if count > 0:
            top = lower if math.isinf(upper) else upper
            acc += count * (lower * lower + lower * top + top * top) / 3.0
        lower, below = (lower if math.isinf(upper) else upper), cumulative
    return acc / total if total > 0 else 0.0


def estimate_tpot_quantile(itl: Histogram, output: Histogram, q: float, seed: int = 0) -> float | None:
    """Per-request TPOT quantile from the per-token ITL and output-length histograms.

    For engines that export inter-token latency per token but no per-request
    TPOT histogram (vLLM before V1's request_time_per_output_token_seconds).
    A request's TPOT is the mean of its (o - 1) inter-token gaps: simulate
    requests with o drawn from the output histogram and gaps drawn from the
    ITL histogram (independently: the within-window correlation that bursts
    add is left to the quantile model's residual). Seeded: deterministic.
    """
    rng = np.random.default_rng(seed)
    outputs = _draw(output, rng, _TPOT_REQUESTS)
    gaps = _draw(itl, rng, _TPOT_REQUESTS * _TPOT_DRAWS)
    if outputs is None or gaps is None:
        return None
    counts = np.maximum(np.rint(outputs).astype(np.int64) - 1, 1)
    gaps = gaps.reshape(_TPOT_REQUESTS, _TPOT_DRAWS)
    used = np.minimum(counts, _TPOT_DRAWS)
    mask = np.arange(_TPOT_DRAWS)[None, :] < used[:, None]
    means = (gaps * mask).sum(axis=1) / used
    # Beyond 32 gaps, the mean's deviation shrinks as 1/sqrt(n) (CLT).
    overall = float(gaps.mean())
    long = counts > _TPOT_DRAWS
    means[long] = overall + (means[long] - overall) * np.sqrt(_TPOT_DRAWS / counts[long])
    return float(np.quantile(means, q))


def _draw(hist: Histogram, rng: np.random.Generator, size: int) -> np.ndarray | None:
    bounds = np.array([le for le, _ in hist.buckets])
    cumulative = np.array([count for _, count in hist.buckets])
    counts = np.diff(np.concatenate([[0.0], cumulative]))
    if cumulative[-1] <= 0 or np.any(counts < 0):
        return None
    lower = np.concatenate([[0.0], bounds[:-1]])
    upper = bounds.copy()
    # +Inf bucket: its observations lie beyond the last bound; half a bound
    # more is a guess, and errs high (the safe side for a latency).
    upper[-1] = lower[-1] * 1.5
    # Inverse-CDF sampling of the bucket (what rng.choice(p=...) does, ~10x faster).
    index = np.minimum(np.searchsorted(cumulative, rng.random(size) * cumulative[-1], side="right"), len(bounds) - 1)
    drawn: np.ndarray = lower[index] + (upper[index] - lower[index]) * rng.random(size)
    return drawn


@dataclass(frozen=True, slots=True)
class Sample:
    """One pod over one window: what the pod ran, its load, and what came of it."""

    knobs: Knobs
    arrival_rps: float
    mix: LengthMix
    step_s: float  # mean inter-token latency
    running: float  # decoding sequences, time-averaged over the window
    prompt_tps: float
    # Requests queued at the gate or were shed: the admission limit bound,
    # so the window shows how the engine runs AT the limit.
    binding: bool
    tpot_q_s: float | None
    ttft_q_s: float | None
    throughput_rps: float | None


def sample_from(pod: PodObservation, mix: LengthMix, tpot_q_s: float | None, quantile: float) -> Sample | None:
    """A training sample from one pod's window; None without the physics inputs."""
    step_s = _step_seconds(pod)
    if step_s is None or pod.applied is None or pod.arrival_rps is None or pod.prompt_tps is None:
        return None
    # Little's law on the token counter (tokens/s x s/step = sequences per
    # step) averages over the whole window; the running gauge is only
    # sampled at scrape instants, which bursty traffic makes noisy.
    running = pod.generation_tps * step_s if pod.generation_tps is not None else pod.running
    if running is None:
        return None
    return Sample(
        knobs=pod.applied,
        arrival_rps=pod.arrival_rps,
        mix=mix,
        step_s=step_s,
        running=running,
        prompt_tps=pod.prompt_tps,
        binding=(pod.gate_queue or 0.0) >= 0.5 or (pod.shed_rps or 0.0) > 0.0,
        tpot_q_s=tpot_q_s,
        ttft_q_s=None if pod.ttft is None else pod.ttft.quantile(quantile),
        throughput_rps=pod.completed_rps,
    )


def _step_seconds(pod: PodObservation) -> float | None:
    """Mean time per decode step: the ITL mean, else the per-request TPOT mean."""
    for hist in (pod.itl, pod.tpot):
        if hist is not None and hist.mean is not None and hist.mean > 0:
            return hist.mean
    return None


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
                (s.running, s.mix.context_per_seq, s.prompt_tps, s.step_s, s.mix.attention_per_token)
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
        penalty[_C1_COLUMN, 1 + _C1_COLUMN] = -math.sqrt(KNEE_PRIOR_WEIGHT) * KNEE_TOKENS / scale[_C1_COLUMN]
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
        return float(self._per_sequence(mix.prompt_mean, mix.output_mean, mix.context_per_seq, mix.attention_per_token))

    def concurrency_for(self, step_s: float, mix: LengthMix) -> float:
        """Running sequences at which a saturated engine's step time reaches `step_s`."""
        return max(0.0, (step_s - self.d0) / self.per_sequence_cost(mix))

    def predict(
        self, limit: float, arrival_rps: float, mix: LengthMix, *, chunk: float = math.inf, overload: bool = False
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
        return self.d0 + running * (self.d1 + self.d2 * context) + (self.c1 + self.c2 * attention) * prefill

    def _per_sequence(
        self, prompt: np.ndarray | float, output: np.ndarray | float, context: np.ndarray | float, attention: np.ndarray | float
    ) -> np.ndarray | float:
        return self.d1 + self.d2 * context + (self.c1 + self.c2 * attention) * prompt / output

    def as_dict(self) -> dict[str, float]:
        return {"d0_ms": self.d0 * 1e3, "d1_ms": self.d1 * 1e3, "d2_ms": self.d2 * 1e3,
                "c1_ms": self.c1 * 1e3, "c2_ms": self.c2 * 1e3}


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


@dataclass(frozen=True, slots=True)
class Prediction:
    """Predictions per candidate: log-space means with standard deviations."""

    log_tpot: np.ndarray
    log_tpot_std: np.ndarray
    log_ttft: np.ndarray
    log_ttft_std: np.ndarray
    throughput: np.ndarray
    physics: tuple[Physics, ...]


# Per-request TPOT quantile over the mean step at a binding limit, assumed
# until windows at a binding limit have been seen: per-request means over
# ~100 steps, some of which carry a long prefill chunk.
PRIOR_TAIL_LOG = math.log(1.6)
# Its uncertainty: a factor of ~1.4 either way.
PRIOR_TAIL_LOG_STD = 0.35


# Columns of the ring buffer, one row per pod-window.
_COLUMNS = (
    "limit",  # running sequences the window's setting allowed, at its mix
    "arrival",
    "prompt",  # mean prompt tokens
    "output",  # mean output tokens
    "context",  # LengthMix.context_per_seq
    "attention",  # LengthMix.attention_per_token
    "step",
    "running",
    "prompt_tps",
    "binding",
    "tpot",  # TPOT quantile, s (NaN: unknown)
    "ttft",  # TTFT quantile, s
    "throughput",  # completed requests/s
    "spf",  # shortest-prompt-first in effect
    "deadline",  # queue deadline as a share of the TTFT objective (1.5: none)
    "chunk",  # engine tokens per step (max_num_batched_tokens) in effect
    "window",  # number of the window it came from
)
_COL = {name: index for index, name in enumerate(_COLUMNS)}


class WorkloadModel:
    """Ring buffer of samples, the fitted step model and the residual regressors.

    Every regressor learns a residual over physics in log space, so physics
    gives the shape (how a prediction moves with the limit, the load and the
    mix) and the data give the level and its uncertainty:

    - tpot: log TPOT quantile - log step time at the sample's limit under
      overload, trained on windows where the limit bound (queueing or
      shedding): the per-request tail a binding limit produces. Calm windows
      say nothing about a limit that did not bind.
    - throughput: log completed requests/s - log physics throughput.
    - ttft: log TTFT quantile itself (queueing has no physics here; the
      decision sets the deadline from the engine's TTFT directly).

    The ring buffer is one float array (RING_CAPACITY x 17 columns, 68 KiB),
    so a refit is a handful of vectorised numpy operations however many pods
    report.
    """

    def __init__(self, policy: Policy, capacity: int = RING_CAPACITY) -> None:
        self._policy = policy
        self._ring = np.full((capacity, len(_COLUMNS)), np.nan)
        self._count = 0  # rows written so far (the ring holds the last `capacity`)
        self._window = 0
        self.step: StepModel | None = None
        self._regressors: dict[str, BayesianRidge] = {}
        self._heldout: dict[str, float] = {}

    @property
    def samples(self) -> int:
        return min(self._count, len(self._ring))

    @property
    def quality(self) -> ModelQuality:
        error = self._heldout.get("tpot")
        trusted = (
            self.step is not None
            and "tpot" in self._regressors
            and self.samples >= MIN_TRUSTED_SAMPLES
            and error is not None
            and error <= TRUSTED_HELDOUT_ERROR
        )
        return ModelQuality(self.samples, error, trusted)

    @property
    def heldout_errors(self) -> dict[str, float]:
        return dict(self._heldout)

    def largest_limit_seen(self, mix: LengthMix) -> float:
        """The most running sequences a binding window's setting allowed, at the current mix.

        A window's limit in sequences was computed at its own mix; in tokens
        (what a budget caps) it converts to the current mix.
        """
        rows = self._rows()
        binding = rows[rows[:, _COL["binding"]] > 0]
        if len(binding) == 0:
            return 0.0
        budget_per_seq = binding[:, _COL["prompt"]] + 2.0 * (binding[:, _COL["context"]] - binding[:, _COL["prompt"]])
        tokens = binding[:, _COL["limit"]] * budget_per_seq
        return float(np.max(tokens)) / mix.budget_per_seq

    def add(self, samples: Iterable[Sample]) -> None:
        """Score the new windows with the current fit (held out), then refit with them."""
        self._window += 1
        new = np.array([self._row(s) for s in samples]).reshape(-1, len(_COLUMNS))
        if len(new) == 0:
            return
        if self.step is not None and self._regressors:
            self._score(new)
        capacity = len(self._ring)
        for row in new[-capacity:]:
            self._ring[self._count % capacity] = row
            self._count += 1
        self._refit()

    def predict(
        self, candidates: Sequence[Knobs], arrival_rps: float, mix: LengthMix, *, learned: bool = True
    ) -> Prediction | None:
        """Per candidate: TPOT quantile at its limit under overload, TTFT quantile, throughput.

        The TPOT quantile is judged under overload: below capacity a limit
        does not bind, so what matters is what it lets through when a burst
        comes. `learned=False` uses the prior tail instead of the learned one.
        """
        if self.step is None:
            return None
        limits = np.array([running_limit(self._policy, k, mix) for k in candidates])
        arrival = np.full(len(candidates), arrival_rps)
        shape = (mix.prompt_mean, mix.output_mean, mix.context_per_seq, mix.attention_per_token)
        chunks = np.array([engine_chunk(self._policy, k) for k in candidates])
        step_over, running_over, throughput_over, _ = self.step.steady(
            limits, arrival, *shape, chunk=chunks, overload=True
        )
        _, _, throughput_offered, _ = self.step.steady(limits, arrival, *shape, chunk=chunks)
        longest = self.step.longest_step(running_over, chunks, mix.context_per_seq, mix.attention_per_token)
        rows = self._features(
            limits,
            np.full(len(candidates), mix.output_mean),
            np.full(len(candidates), mix.prompt_mean),
            np.array([1.0 if k.discipline == "shortest-prompt-first" else 0.0 for k in candidates]),
            np.array([self._deadline_share(k) for k in candidates]),
        )
        if learned:
            tail, tail_std = self._predict("tpot", rows, PRIOR_TAIL_LOG, PRIOR_TAIL_LOG_STD)
        else:
            tail, tail_std = np.full(len(rows), PRIOR_TAIL_LOG), np.full(len(rows), PRIOR_TAIL_LOG_STD)
        ttft, ttft_std = self._predict("ttft", rows, math.nan, math.inf)
        gain, _ = self._predict("throughput", rows, 0.0, math.inf)
        return Prediction(
            log_tpot=np.minimum(np.log(step_over) + tail, np.log(longest)),
            log_tpot_std=tail_std,
            log_ttft=ttft,
            log_ttft_std=ttft_std,
            throughput=throughput_offered * np.exp(gain),
            physics=tuple(
                Physics(float(st), float(ru), float(th), True)
                for st, ru, th in zip(step_over, running_over, throughput_over, strict=True)
            ),
        )

    def _predict(self, name: str, rows: np.ndarray, prior: float, prior_std: float) -> tuple[np.ndarray, np.ndarray]:
        """Mean and EPISTEMIC standard deviation (what more data would remove).

        BayesianRidge's predictive variance adds the noise variance 1/alpha_
        (how much one window's quantile scatters around its expectation) to
        the parameter uncertainty; only the latter is a reason to stay away
        from a setting, the scatter is there at every setting alike.
        """
        regressor = self._regressors.get(name)
        if regressor is None:
            return np.full(len(rows), prior), np.full(len(rows), prior_std)
        mean, std = regressor.predict(rows, return_std=True)
        epistemic = np.sqrt(np.maximum(std**2 - 1.0 / regressor.alpha_, 0.0))
        return mean, epistemic

    def noise_std(self, name: str) -> float | None:
        """How much one window's log value scatters around the model's expectation."""
        regressor = self._regressors.get(name)
        return None if regressor is None else float(1.0 / math.sqrt(regressor.alpha_))

    def _deadline_share(self, knobs: Knobs) -> float:
        # 1.5: "no deadline" sits above any deadline worth setting.
        if knobs.queue_deadline_ms is None:
            return 1.5
        return min(knobs.queue_deadline_ms / self._policy.slo.ttft_ms, 1.5)

    @staticmethod
    def _features(
        limit: np.ndarray, output: np.ndarray, prompt: np.ndarray, spf: np.ndarray, deadline: np.ndarray
    ) -> np.ndarray:
        return np.column_stack(
            [
                # The limit itself: what physics leaves out may still vary
                # with it, and the further a candidate lies from the limits
                # seen, the larger the model's (epistemic) uncertainty there,
                # which is what keeps a decision from leaping into the unknown.
                np.log(np.maximum(limit, 1.0)),
                # Short answers average fewer steps: a wider per-request tail.
                np.log(output),
                np.log(prompt),
                spf,
                deadline,
            ]
        )

    def _row(self, s: Sample) -> list[float]:
        m = s.mix
        return [
            running_limit(self._policy, s.knobs, m),
            s.arrival_rps,
            m.prompt_mean,
            m.output_mean,
            m.context_per_seq,
            m.attention_per_token,
            s.step_s,
            s.running,
            s.prompt_tps,
            1.0 if s.binding else 0.0,
            math.nan if s.tpot_q_s is None else s.tpot_q_s,
            math.nan if s.ttft_q_s is None else s.ttft_q_s,
            math.nan if s.throughput_rps is None else s.throughput_rps,
            1.0 if s.knobs.discipline == "shortest-prompt-first" else 0.0,
            self._deadline_share(s.knobs),
            engine_chunk(self._policy, s.knobs),
            float(self._window),
        ]

    def _rows(self) -> np.ndarray:
        return self._ring[: self.samples]

    def _targets(self, rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        assert self.step is not None
        c = _COL
        shape = (rows[:, c["prompt"]], rows[:, c["output"]], rows[:, c["context"]], rows[:, c["attention"]])
        limit, arrival, chunk = rows[:, c["limit"]], rows[:, c["arrival"]], rows[:, c["chunk"]]
        at_limit, _, _, _ = self.step.steady(limit, arrival, *shape, chunk=chunk, overload=True)
        _, _, offered, _ = self.step.steady(limit, arrival, *shape, chunk=chunk)
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(rows[:, c["binding"]] > 0, np.log(rows[:, c["tpot"]]) - np.log(at_limit), np.nan)
            ttft = np.log(rows[:, c["ttft"]])
            throughput = np.log(rows[:, c["throughput"]]) - np.log(np.maximum(offered, 1e-6))
        features = self._features(
            limit, rows[:, c["output"]], rows[:, c["prompt"]], rows[:, c["spf"]], rows[:, c["deadline"]]
        )
        return features, {"tpot": tpot, "ttft": ttft, "throughput": throughput}

    def _refit(self) -> None:
        rows = self._rows()
        c = _COL
        self.step = StepModel.fit_arrays(
            rows[:, c["running"]], rows[:, c["context"]], rows[:, c["prompt_tps"]], rows[:, c["step"]], rows[:, c["attention"]]
        )
        self._regressors = {}
        if self.step is None:
            return
        features, targets = self._targets(rows)
        weights = 0.5 ** ((self._window - rows[:, c["window"]]) / RESIDUAL_HALF_LIFE)
        for name, y in targets.items():
            present = np.isfinite(y)
            if present.sum() < MIN_RESIDUAL_SAMPLES:
                continue
            regressor = BayesianRidge().fit(features[present], y[present], sample_weight=weights[present])
            # A noise precision that is not positive and finite means the
            # evidence maximisation did not settle: no regressor rather than
            # one whose uncertainty is meaningless.
            if math.isfinite(regressor.alpha_) and regressor.alpha_ > 0:
                self._regressors[name] = regressor

    def _score(self, new: np.ndarray) -> None:
        features, targets = self._targets(new)
        for name, y in targets.items():
            regressor = self._regressors.get(name)
            present = np.isfinite(y)
            if regressor is None or not present.any():
                continue
            error = float(np.mean(np.abs(regressor.predict(features[present]) - y[present])))
            previous = self._heldout.get(name)
            self._heldout[name] = error if previous is None else HELDOUT_EMA * error + (1 - HELDOUT_EMA) * previous


def _log_or_nan(value: float | None) -> float:
    return math.log(value) if value is not None and value > 0 else math.nan
