"""Model: a workload model fitted online, pooled across the pods of one policy.

Two layers, because the controller sees only tens of windows per traffic
phase and must still extrapolate to knob settings it has not tried:

1. `StepModel` (physics.py), physics with five fitted constants: the step
   time of a continuous-batching engine from the sequences it runs, their
   context and the prompt tokens it prefills, and through Little's law the
   step time, running sequences and throughput of any setting.

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

Samples (samples.py) live in a ring buffer (bounded memory); every new
window is first predicted by the models fitted without it, and that
held-out error is what `quality` reports and what decides whether
decisions may rely on the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import BayesianRidge

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.explain import ModelQuality
from batchpilot.controller.physics import Physics, StepModel, engine_chunk, running_limit
from batchpilot.controller.policy import Policy
from batchpilot.controller.samples import LengthMix, Sample

# Samples kept: 512 pod-windows is 4+ hours of one pod at 30 s, or eight
# intervals of a 64-pod policy; 17 floats (136 bytes) each.
RING_CAPACITY = 512
MIN_TRUSTED_SAMPLES = 12
# The residual regressors have five features plus an intercept: twice that
# many windows before their noise estimate means anything.
MIN_RESIDUAL_SAMPLES = 12
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
