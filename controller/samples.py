"""Samples: what one pod's window gives the workload model (model.py).

`LengthMix`, the moments of the prompt and output lengths of the requests
that completed; `estimate_tpot_quantile`, the per-request TPOT quantile of
engines that export only per-token inter-token latency; `Sample` and
`sample_from`, one pod over one window as a training sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.observe import PodObservation, WindowHistogram

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
    def from_histograms(
        cls, prompt: WindowHistogram | None, output: WindowHistogram | None
    ) -> LengthMix | None:
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


def _second_moment(hist: WindowHistogram) -> float:
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


def estimate_tpot_quantile(
    itl: WindowHistogram, output: WindowHistogram, q: float, seed: int = 0
) -> float | None:
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


def _draw(hist: WindowHistogram, rng: np.random.Generator, size: int) -> np.ndarray | None:
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
    index = np.minimum(
        np.searchsorted(cumulative, rng.random(size) * cumulative[-1], side="right"),
        len(bounds) - 1,
    )
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


def sample_from(
    pod: PodObservation, mix: LengthMix, tpot_q_s: float | None, quantile: float
) -> Sample | None:
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
