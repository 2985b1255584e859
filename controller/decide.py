"""Decide: the knob setting that serves the most requests within the SLOs.

Why one module: one decision, `recommend()`, and the rules it runs in
order (prefill chunk, admission limit, queue settings) on the same
`Estimates` and `DecideMemory`; apart, the rules would lose the ordering
and the shared numbers this docstring explains.

The decision, every interval, from the pooled observation (one average
replica) and the fitted model:

- **Admission limit** (the in-flight token budget, and the batch cap as its
  backstop; the cap alone when the budget is not steered). Under overload
  every finishing request admits the next, so the step time grows with the
  limit (physics.StepModel) and so does throughput. The limit is therefore the
  largest one whose predicted per-request TPOT quantile still meets the TPOT
  objective with a margin: mean + `CONFIDENCE_Z` EPISTEMIC standard
  deviations of the quantile model must stay below the objective (the
  model's uncertainty grows with the distance from the limits it has seen
  binding, so an unexplored limit needs more evidence). Below capacity the
  limit does not bind; it is what protects TPOT when a burst arrives.
  A token budget rather than a count: a 5,000-token prompt costs the steps
  it shares ~100x what a 50-token one does, and a budget charges it so.
- **Queue deadline**: the TTFT objective minus the time a p90-long prompt
  needs once admitted (the engine's p90 TTFT, or the step model's prefill
  time where that is smaller: the engine's TTFT also counts queueing inside
  the engine, which the limit, not the deadline, must fix). A request that
  has waited longer is unlikely to meet its TTFT, and shedding it frees the
  capacity it would waste. 0.5-0.95 of the objective, so neither a noisy
  estimate nor a tiny one makes it extreme.
- **Discipline**: shortest-prompt-first where allowed: with a queue it
  serves more requests per second of prefill, which is what goodput counts;
  its aging keeps long prompts from starving. Without a queue it changes
  nothing.
- **Prefill budget per step** (runtime-tunable engines only): the largest
  chunk with which a step still meets the TPOT objective (with the limit's
  margin) on top of the decodes it carries. Under prompt-heavy load nearly
  every step carries a full chunk, so a short answer's mean time per token
  is that step time; a larger chunk only buys prefill throughput the SLO
  cannot pay for. Never so small that the engine falls behind the prompt
  tokens arriving (a prefill backlog inside the engine fails every request
  in it), nor that a p90 prompt needs more than `CHUNK_TTFT_SHARE` of the
  TTFT objective to prefill. Decided first: the chunk caps the sequences
  the engine can run (physics.engine_running_capacity), and an admission
  limit above that would only move the queue from the gate, with its
  deadline and discipline, into the engine.

Before there is a step model, a feedback rule sets the limit: scaled by the
TPOT headroom (objective / measured quantile), at most 30% down and x2 up
per interval. While the model is fitted but not yet trusted (held-out
error), its limit uses the prior tail and may exceed the current limit, or
the largest seen binding, only as far as the measured TPOT headroom allows
the feedback rule to grow (`PROBE_FACTOR` when TPOT cannot be read): a
bounded probe rather than a leap, and none at all while the measured
quantile is near the objective. A TPOT quantile above the objective by more than
one window's scatter cuts the limit 30% whatever the model says. A TTFT
quantile that far above its objective makes a recommended cut urgent: the
requests served waited inside the engine, so the cut is a correction, and
waiting out the stabilization window costs an interval of misses. A shift in
the length mix (mean prompt or output length off by `MIX_SHIFT` from the
recent reference) is acted on in the same interval and marked urgent, so
the stabilization window does not delay it.

**SLO classes** (a policy with `spec.classes`; without, none of this runs and
the knobs carry no classes), lexicographic: the higher classes' objectives
first, goodput for the rest within what they leave.

- The shared knobs (admission limit, chunk, the knobs' own deadline and
  discipline) are decided as above, but against the tightest TPOT objective
  among the classes with traffic: every request rides the same engine
  steps, so one class's TPOT is every class's.
- Each class's queue deadline: the rule above with its own TTFT objective.
- Aging: at least each class pair's longer queue deadline over their
  priority gap: a lower head goes first once it has waited (gap x aging)
  longer than the higher head, and in a backlog it waits up to its own
  deadline, so it is shed first (lexicographic: shed, not starved; never
  lowered by this rule).
- Reserve caps: when a class misses its TTFT objective while lower classes
  hold engine slots, each lower class gets a max_concurrency of the shared
  limit less a reserve for every class above it (Little's law: arrival x
  time in flight, x RESERVE_HEADROOM), by weight among its priority;
  lifted again as the classes above stay healthy (`_reserve_caps`).
- Standing caps: before any miss, while a class above has had traffic
  recently, each lower class is capped to the engine's room (token budget,
  or the KV cache's share) less a reserve of the classes above's
  remembered peak in flight, counted in the lower class's own request size
  (`_standing_caps`): a running request is never taken back, so the room
  for a burst must be kept before it. The KV cache is read from the gate's
  in-flight token counter (`_update_class_kv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from batchpilot.contract.knobs import (
    DEFAULT_CLASS,
    MAX_AGING_MS,
    MAX_CONCURRENCY_LIMIT,
    Knobs,
    ServiceClass,
)
from batchpilot.controller.explain import Reason, Recommendation
from batchpilot.controller.model import Prediction, WorkloadModel
from batchpilot.controller.observe import ClassObservation, Observation, PodObservation
from batchpilot.controller.physics import StepModel, engine_running_capacity, running_limit
from batchpilot.controller.policy import ClassSpec, Policy, Slo
from batchpilot.controller.samples import LengthMix

# The TPOT quantile is aimed 5% under the objective: histograms resolve
# latencies to a bucket, and a setting sitting exactly on the objective
# misses it half the time.
TPOT_MARGIN = 0.05
# Where the engine exports only per-token ITL, the per-request quantile is
# estimated (samples.estimate_tpot_quantile) as if a request's gaps were
# independent; bursts correlate them, and on the simulator the estimate read
# ~10% under the true p99 (median over 30 s windows of two traces). Aim that
# much lower too.
ITL_ESTIMATE_MARGIN = 0.10
# One standard deviation of the quantile model: ~84% confidence that the
# chosen limit meets the objective, the rest is what the feedback catches.
CONFIDENCE_Z = 1.0
# Candidate limits are a geometric grid, 32 points per decade of range.
GRID_POINTS = 48
# A mean length 2x off the reference is a new mix, not noise: bursty
# traffic (the Azure code trace) moves a 30 s window's mean prompt by up to
# ~1.7x between windows, while real mix changes move the mean output length
# 5-20x (chat -> code completion, summaries -> reports).
MIX_SHIFT = math.log(2.0)
# Weight of the newest window in the reference mix.
MIX_EMA = 0.3
# A probe may go this far past the current limit, or past the largest limit
# seen binding if that is higher: where the model has no data, about one
# interval per 1.5x.
PROBE_FACTOR = 1.5
# Feedback rule: scale the limit by the TPOT headroom, at most 30% down and
# x2 up per interval (x1.3 when TPOT cannot be read); a breach always cuts 30%.
FEEDBACK_DOWN = 0.7
FEEDBACK_UP = 1.3
FEEDBACK_MAX_UP = 2.0
# A TPOT quantile below this share of the objective leaves room to grow.
FEEDBACK_ROOM = 0.8
# A window's TPOT quantile 10% over the objective is noise, not a breach,
# even where the model has not measured the scatter yet.
MIN_BREACH_SCATTER = 0.1
# Deadline bounds as shares of the TTFT objective.
DEADLINE_MIN_SHARE = 0.5
DEADLINE_MAX_SHARE = 0.95
# Share of the KV cache the token budget may promise: the gate charges
# prompt + full output up front, so this never preempts.
KV_SHARE = 0.95
# The batch cap behind a token budget: twice the sequences the budget
# admits at the current mix, so it only stops a flood of tiny requests.
CAP_OVER_BUDGET = 2.0
# Share of the TTFT objective a p90 prompt may spend prefilling chunk by
# chunk; the rest is for queueing.
CHUNK_TTFT_SHARE = 0.25


# SLO classes (see "SLO classes" above).
# The reserve for the classes above a capped one: their Little's-law
# sequences in flight (arrival x time in flight) x 1.5, room for a burst
# of the size a 30-60 s window's mean hides.
RESERVE_HEADROOM = 1.5
# A class misses its objective when its TTFT quantile is above it by more
# than MIN_BREACH_SCATTER, or when more than its (1 - quantile) share is
# shed; a lower class's in-flight average of half a request or more holds
# engine slots.
HOLDS_SLOTS = 0.5
# A capped class whose in-flight average is 80% of its cap or more still
# presses on it: the cap grows only 25% per healthy interval, and to at most
# 80% of a cap (or of what it held) under which a class above it missed (a release x2 at once
# let the flood straight back in on the simulator's classes-batch-flood).
RESERVE_FILLED = 0.8
# A capped class holding 10% more than its cap is still draining requests
# admitted before it: a miss then is no evidence against the cap.
CAP_DRAINING = 0.1
RESERVE_PROBE = 1.25
RESERVE_PROBE_CEILING = 0.8
# The standing reserve remembers a class's peak sequences in flight, decayed
# by 10% per interval: about 20 intervals (5 min at 15 s) to fall to 1/8, so a
# class with a steady trickle keeps room for the burst it had minutes ago.
PEAK_DECAY = 0.9
# With classes, the KV gauge is read from 5% usage (one-class: 10%): a lower
# class's long requests must be counted before they fill the cache, and the
# in-flight token counter gives the context per sequence directly.
CLASS_KV_USAGE_MIN = 0.05


@dataclass(slots=True)
class DecideMemory:
    """What the decision keeps between intervals (owned by the loop)."""

    reference_mix: LengthMix | None = None
    kv_capacity_tokens: float | None = None
    # Per lower SLO class, the reserve-derived cap in force (sequences),
    # until the classes above it are healthy again.
    class_caps: dict[str, float] = field(default_factory=dict)
    # Per such class, the last cap in force while a class above still
    # missed: the probe back up stays below it while the class presses.
    class_caps_failed: dict[str, float] = field(default_factory=dict)
    # Per SLO class, its recent peak of Little's-law sequences in flight
    # (arrival x time in flight), decayed by PEAK_DECAY per interval: what
    # the standing reserve keeps for it below the classes under it.
    class_peaks: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClassInfo:
    """One SLO class as the decision sees it: declared, or the implicit default."""

    name: str
    priority: int
    weight: float
    slo: Slo
    spec: ClassSpec | None  # None: the implicit default class


def policy_classes(policy: Policy) -> tuple[ClassInfo, ...]:
    """The policy's classes plus the default class (when not declared), highest
    priority first, declaration order among equals (the default last)."""
    infos = [
        ClassInfo(c.name, c.priority, c.weight, c.slo or policy.slo, c) for c in policy.classes
    ]
    if policy.classes and all(c.name != DEFAULT_CLASS for c in policy.classes):
        infos.append(ClassInfo(DEFAULT_CLASS, 0, 1.0, policy.slo, None))
    return tuple(sorted(infos, key=lambda info: -info.priority))


@dataclass(frozen=True, slots=True)
class Estimates:
    """The pooled window, reduced to the numbers the decision uses."""

    arrival_rps: float
    mix: LengthMix
    tpot_q_s: float | None
    # True when tpot_q_s comes from the ITL histogram, not a per-request one.
    tpot_estimated: bool
    step_s: float | None
    engine_ttft_p90_s: float | None
    queueing: bool
    preempting: bool
    inflight_tokens: float | None
    running: float | None


def initial_knobs(policy: Policy) -> Knobs:
    """Before any observation: no limits, the SLO-derived deadline, and the discipline choice
    (and, with SLO classes, each class's deadline from its own TTFT objective)."""
    knobs = Knobs()
    if policy.steers("discipline"):
        knobs = knobs.with_changes(discipline=_preferred_discipline(policy))
    if policy.steers("queue_deadline_ms"):
        knobs = knobs.with_changes(queue_deadline_ms=round(policy.slo.ttft_ms * 0.9))
    knobs = policy.clamp(knobs)
    if not policy.classes:
        return knobs
    deadlines = {
        info.name: _clamp_deadline(policy, info.slo.ttft_ms * 0.9)
        for info in policy_classes(policy)
        if policy.steers("queue_deadline_ms")
    }
    return _with_classes(policy, knobs, deadlines, {})[0]


def recommend(
    policy: Policy,
    observation: Observation,
    model: WorkloadModel,
    current: Knobs,
    memory: DecideMemory,
    tpot_q_s: float | None,
) -> Recommendation:
    """The raw recommendation for this interval (before the guards)."""
    pooled = observation.pooled
    mix = LengthMix.from_histograms(pooled.prompt_tokens, pooled.output_tokens)
    if mix is None or pooled.arrival_rps is None:
        return Recommendation(current).because(
            Reason(
                "decide",
                "no completed requests with lengths in the window: keeping the current setting",
            )
        )
    # With SLO classes the shared knobs are decided as for one class, against
    # the tightest TPOT objective among the classes with traffic; without,
    # `classes_policy` is None and everything below is the one-class decision.
    classes_policy = policy if policy.classes else None
    if classes_policy is not None:
        policy = _shared_policy(classes_policy, pooled)
    est = _estimates(pooled, mix, tpot_q_s)
    reasons: list[Reason] = []
    urgent = False
    reference = memory.reference_mix
    if reference is not None and mix.shift(reference) > MIX_SHIFT:
        urgent = True
        reasons.append(
            Reason(
                "decide",
                "length mix shifted: re-deciding now",
                data={
                    "promptMean": mix.prompt_mean,
                    "promptMeanBefore": reference.prompt_mean,
                    "outputMean": mix.output_mean,
                    "outputMeanBefore": reference.output_mean,
                },
            )
        )
        memory.reference_mix = mix
    else:
        memory.reference_mix = mix if reference is None else mix.blend(reference, MIX_EMA)
    if classes_policy is None:
        _update_memory(memory, policy, pooled, mix)
    else:
        _update_class_kv(memory, policy, pooled, mix)

    # A breach is a TPOT quantile above the objective by more than one
    # window's scatter around the model's expectation: aiming the expected
    # quantile at the objective means half the windows land a little above.
    # An estimate from the ITL histogram reads low (ITL_ESTIMATE_MARGIN):
    # corrected, or a miss hides inside the scatter allowance.
    scatter = max(model.noise_std("tpot") or 0.0, MIN_BREACH_SCATTER)
    breach = est.tpot_q_s is not None and est.tpot_q_s * _estimate_bias(
        est
    ) > policy.slo.tpot_ms / 1000.0 * math.exp(scatter)
    if breach:
        urgent = True
    # The chunk first: it bounds how many sequences the engine can run,
    # which the admission limit must not exceed.
    if policy.steers("max_num_batched_tokens") and model.step is not None:
        chunk_reason = _prefill_chunk(policy, current, est, model.step)
        if chunk_reason is not None:
            current = current.with_changes(max_num_batched_tokens=chunk_reason.data["chunkTokens"])
            reasons.append(chunk_reason)
    target, limit_reasons = _admission_limit(policy, model, current, est, memory, breach)
    reasons.extend(limit_reasons)
    target, other_reasons = _queue_settings(policy, target, est, model)
    reasons.extend(other_reasons)
    if classes_policy is not None:
        target, class_reasons, class_urgent = _class_settings(
            classes_policy, policy, target, est, model, memory, pooled
        )
        reasons.extend(class_reasons)
        urgent = urgent or class_urgent
    if not urgent and running_limit(policy, target, mix) < running_limit(policy, current, mix):
        ttft_q_s = _ttft_missed(policy, pooled)
        if ttft_q_s is not None:
            urgent = True
            reasons.append(
                Reason(
                    "decide",
                    "TTFT objective missed this window and the limit comes down: cutting now",
                    data={"ttftQuantileMs": ttft_q_s * 1e3, "objectiveMs": policy.slo.ttft_ms},
                )
            )
    return Recommendation(policy.clamp(target), urgent=urgent, reasons=tuple(reasons))


def _ttft_missed(policy: Policy, pooled: PodObservation) -> float | None:
    """The window's TTFT quantile at the SLO percentile when it is above the
    objective by more than MIN_BREACH_SCATTER, else None.

    The gate sheds what waited past the deadline, so a miss among the
    requests served means they waited inside the engine: admitted faster
    than it prefills. A lower limit is the fix, and a correction, not a
    reaction to noise, so the stabilization window must not hold it back
    (as with a TPOT breach).
    """
    if pooled.ttft is None:
        return None
    quantile = pooled.ttft.quantile(policy.slo.percentile / 100.0)
    if quantile is None or quantile <= policy.slo.ttft_ms / 1000.0 * math.exp(MIN_BREACH_SCATTER):
        return None
    return quantile


def _estimates(pooled: PodObservation, mix: LengthMix, tpot_q_s: float | None) -> Estimates:
    step_s = None
    for hist in (pooled.itl, pooled.tpot):
        if hist is not None and hist.mean:
            step_s = hist.mean
            break
    queue = (pooled.gate_queue or 0.0) + (pooled.waiting or 0.0)
    return Estimates(
        arrival_rps=pooled.arrival_rps or 0.0,
        mix=mix,
        tpot_q_s=tpot_q_s,
        tpot_estimated=pooled.tpot is None,
        step_s=step_s,
        engine_ttft_p90_s=_engine_ttft_p90(pooled),
        # Half a request waiting on average, or any shed: demand exceeds the limit.
        queueing=queue >= 0.5 or (pooled.shed_rps or 0.0) > 0.0,
        preempting=(pooled.preemptions_rps or 0.0) > 0.0,
        inflight_tokens=pooled.gate_inflight_tokens,
        running=_running(pooled, step_s),
    )


def _running(pooled: PodObservation, step_s: float | None) -> float | None:
    """Sequences that ran: the larger of the window average (Little's law on
    the token counter: tokens/s x s/step) and the sampled gauge. A cut from
    "no limit" must start below the concurrency that caused the breach, and
    a window's average understates a burst inside it."""
    averaged = pooled.generation_tps * step_s if pooled.generation_tps and step_s else None
    values = [v for v in (averaged, pooled.running) if v is not None]
    return max(values) if values else None


def _engine_ttft_p90(pooled: PodObservation) -> float | None:
    # The gate's TTFT includes its queue; the engine's own TTFT is the prefill
    # a request still needs once admitted. With only the gate's, subtract its
    # queue wait at the same quantile.
    if pooled.ttft is None:
        return None
    if not pooled.ttft_from_gate:
        return pooled.ttft.quantile(0.9)
    if pooled.queue_wait is None:
        return None
    ttft, wait = pooled.ttft.quantile(0.9), pooled.queue_wait.quantile(0.9)
    if ttft is None or wait is None:
        return None
    return max(ttft - wait, 0.0)


def _update_memory(
    memory: DecideMemory, policy: Policy, pooled: PodObservation, mix: LengthMix
) -> None:
    # KV capacity: the declared size (spec.engine.kvCacheTokens) where there
    # is one, the only source for an engine without a KV-usage gauge.
    if memory.kv_capacity_tokens is None and policy.engine.kv_cache_tokens is not None:
        memory.kv_capacity_tokens = float(policy.engine.kv_cache_tokens)
    # A gauge refines it: the cache holds the running sequences' contexts;
    # usage below 10% is too coarse a gauge to divide by.
    if pooled.kv_usage is not None and pooled.kv_usage > 0.1 and pooled.running:
        capacity = pooled.running * mix.context_per_seq / pooled.kv_usage
        previous = memory.kv_capacity_tokens
        memory.kv_capacity_tokens = (
            capacity if previous is None else 0.7 * previous + 0.3 * capacity
        )


def _update_class_kv(
    memory: DecideMemory, policy: Policy, pooled: PodObservation, mix: LengthMix
) -> None:
    """With SLO classes, `_update_memory` with the context per sequence read
    from the gate's in-flight token counter.

    The one-class estimate divides by the completions' mean context, which
    weights requests by arrival: a lower class's few long requests hold most
    of the cache but little of that mean, so the cache read ~40% small on the
    simulator's classes-priority-inversion (171k of 300k tokens), and the
    budget clamped to it starved the classes it should serve. The gate's
    counter weights by time in flight: it charges prompt + full output, of
    which a running sequence holds its prompt and about half its output
    (time-weighted). Read from CLASS_KV_USAGE_MIN, while the engine runs
    what the gate admitted (under HOLDS_SLOTS waiting)."""
    if memory.kv_capacity_tokens is None and policy.engine.kv_cache_tokens is not None:
        memory.kv_capacity_tokens = float(policy.engine.kv_cache_tokens)
    usage, running = pooled.kv_usage, pooled.running
    inflight, tokens = pooled.gate_inflight, pooled.gate_inflight_tokens
    if not (usage and running and inflight and tokens) or usage < CLASS_KV_USAGE_MIN:
        return
    if (pooled.waiting or 0.0) >= HOLDS_SLOTS:
        return
    held_output = mix.output_sq_mean / mix.output_mean / 2.0
    context = max(mix.context_per_seq, tokens / inflight - held_output)
    capacity = running * context / usage
    previous = memory.kv_capacity_tokens
    memory.kv_capacity_tokens = capacity if previous is None else 0.7 * previous + 0.3 * capacity


def _admission_limit(
    policy: Policy,
    model: WorkloadModel,
    current: Knobs,
    est: Estimates,
    memory: DecideMemory,
    breach: bool,
) -> tuple[Knobs, list[Reason]]:
    knob = _limit_knob(policy)
    if knob is None:
        return current, []
    margin = TPOT_MARGIN + (ITL_ESTIMATE_MARGIN if est.tpot_estimated else 0.0)
    objective_s = policy.slo.tpot_ms / 1000.0 * (1.0 - margin)
    mix = est.mix
    quality = model.quality
    limit_now = running_limit(policy, current, mix)
    # A cut starts from the limit, or from what ran where no limit was set.
    unlimited = limit_now >= policy.engine.max_num_seqs
    cut_base = max(est.running or limit_now, 1.0) if unlimited else limit_now
    reasons: list[Reason] = []
    if model.step is not None:
        limit, why = _model_limit(policy, model, current, est, objective_s, trusted=quality.trusted)
        reasons.append(why)
        probe = max(model.largest_limit_seen(mix), limit_now) * _probe_factor(est, objective_s)
        if not quality.trusted and limit > probe:
            reasons.append(
                Reason(
                    "decide",
                    "model not trusted yet and its limit lies beyond the current one and any seen "
                    "binding: probing a step bounded by the measured TPOT headroom",
                    data={"modelLimit": limit, "probe": probe},
                )
            )
            limit = probe
    else:
        limit, why = _feedback_limit(
            limit_now, cut_base, policy.engine.max_num_seqs, est, objective_s
        )
        reasons.append(why)
    if breach and limit >= cut_base:
        limit = cut_base * FEEDBACK_DOWN
        reasons.append(
            Reason(
                "decide",
                "TPOT objective missed this window: cutting the admission limit",
                data={
                    "tpotQuantileMs": (est.tpot_q_s or 0) * 1e3,
                    "objectiveMs": policy.slo.tpot_ms,
                },
            )
        )
    if est.preempting and est.inflight_tokens:
        limit = min(limit, est.inflight_tokens * 0.9 / mix.budget_per_seq)
        reasons.append(Reason("decide", "engine preempting: budget below the tokens in flight"))
    engine_room = engine_running_capacity(policy, current, mix)
    if limit > engine_room:
        limit = engine_room
        reasons.append(
            Reason(
                "decide",
                "admission limit at what the engine's tokens per step can run: more would only queue "
                "inside the engine, past the gate's deadline and discipline",
                data={"engineRoomSeqs": engine_room},
            )
        )
    return _apply_limit(policy, current, knob, limit, mix, memory), reasons


def _estimate_bias(est: Estimates) -> float:
    return 1.0 + ITL_ESTIMATE_MARGIN if est.tpot_estimated else 1.0


def _probe_factor(est: Estimates, objective_s: float) -> float:
    """How far past the limits seen an untrusted model may go this interval.

    An untrusted model is what says the larger limit is safe, so the measured
    TPOT quantile must agree: the probe grows as the feedback rule would, not
    at all without FEEDBACK_ROOM and never more than the headroom (objective
    / measured, at most FEEDBACK_MAX_UP). Step time grows about linearly with
    the running sequences, so that growth reaches the objective at most.
    Without a TPOT reading, PROBE_FACTOR.
    """
    if est.tpot_q_s is None:
        return PROBE_FACTOR
    if est.tpot_q_s >= FEEDBACK_ROOM * objective_s:
        return 1.0
    return min(FEEDBACK_MAX_UP, objective_s / est.tpot_q_s)


def _limit_knob(policy: Policy) -> str | None:
    if policy.steers("max_inflight_tokens"):
        return "max_inflight_tokens"
    if policy.steers("max_concurrency"):
        return "max_concurrency"
    return None


def _model_limit(
    policy: Policy,
    model: WorkloadModel,
    current: Knobs,
    est: Estimates,
    objective_s: float,
    *,
    trusted: bool,
) -> tuple[float, Reason]:
    mix = est.mix
    top = float(policy.engine.max_num_seqs)
    limits = np.geomspace(1.0, top, GRID_POINTS)
    candidates = [_with_limit(policy, current, float(n), mix) for n in limits]
    prediction = model.predict(candidates, est.arrival_rps, mix, learned=trusted)
    assert prediction is not None  # called with a fitted step model
    upper = prediction.log_tpot + (CONFIDENCE_Z * prediction.log_tpot_std if trusted else 0.0)
    feasible = upper <= math.log(objective_s)
    index = int(np.flatnonzero(feasible)[-1]) if feasible.any() else 0
    chosen = float(limits[index])
    return chosen, _prediction_reason(prediction, index, chosen, bool(feasible.any()), trusted)


def _prediction_reason(
    prediction: Prediction, index: int, chosen: float, any_feasible: bool, trusted: bool
) -> Reason:
    physics = prediction.physics[index]
    message = (
        "largest admission limit whose predicted TPOT quantile (at that limit, under overload) meets the objective"
        if any_feasible
        else "no limit meets the TPOT objective by prediction: smallest limit"
    )
    return Reason(
        "decide",
        message,
        data={
            "limitSeqs": chosen,
            "predTpotMs": math.exp(prediction.log_tpot[index]) * 1e3,
            "predTpotStd": float(prediction.log_tpot_std[index]),
            "predTtftMs": math.exp(prediction.log_ttft[index]) * 1e3
            if np.isfinite(prediction.log_ttft[index])
            else None,
            "predThroughputRps": float(prediction.throughput[index])
            if np.isfinite(prediction.throughput[index])
            else None,
            "physicsStepMs": physics.step_s * 1e3,
            "modelTrusted": trusted,
        },
    )


def _feedback_limit(
    limit_now: float, cut_base: float, ceiling: int, est: Estimates, objective_s: float
) -> tuple[float, Reason]:
    # Step time grows about linearly with the running sequences (a fixed
    # ~6 ms on a 40-50 ms objective), so the limit is scaled by the TPOT
    # headroom, within [FEEDBACK_DOWN, FEEDBACK_MAX_UP] per interval.
    if est.tpot_q_s is not None and est.tpot_q_s > objective_s:
        return cut_base * max(FEEDBACK_DOWN, objective_s / est.tpot_q_s), Reason(
            "decide",
            "no model yet: TPOT above the objective, shrinking the limit",
            data={"tpotQuantileMs": est.tpot_q_s * 1e3},
        )
    if (
        limit_now < ceiling
        and est.queueing
        and (est.tpot_q_s is None or est.tpot_q_s < FEEDBACK_ROOM * objective_s)
    ):
        room = (
            FEEDBACK_UP
            if est.tpot_q_s is None
            else min(FEEDBACK_MAX_UP, objective_s / est.tpot_q_s)
        )
        return limit_now * max(room, 1.0), Reason(
            "decide",
            "no model yet: requests queue and TPOT has room, growing the limit",
            data={"tpotQuantileMs": None if est.tpot_q_s is None else est.tpot_q_s * 1e3},
        )
    return limit_now, Reason("decide", "no model yet: holding the limit")


def _with_limit(policy: Policy, knobs: Knobs, sequences: float, mix: LengthMix) -> Knobs:
    if policy.steers("max_inflight_tokens"):
        budget = max(1, round(sequences * mix.budget_per_seq))
        cap = knobs.max_concurrency
        if policy.steers("max_concurrency"):
            cap = max(1, math.ceil(sequences * CAP_OVER_BUDGET))
        return policy.clamp(knobs.with_changes(max_inflight_tokens=budget, max_concurrency=cap))
    return policy.clamp(knobs.with_changes(max_concurrency=max(1, round(sequences))))


def _apply_limit(
    policy: Policy,
    current: Knobs,
    knob: str,
    sequences: float,
    mix: LengthMix,
    memory: DecideMemory,
) -> Knobs:
    target = _with_limit(policy, current, max(sequences, 1.0), mix)
    if knob == "max_inflight_tokens" and memory.kv_capacity_tokens and target.max_inflight_tokens:
        kv_budget = int(memory.kv_capacity_tokens * KV_SHARE)
        if target.max_inflight_tokens > kv_budget:
            target = policy.clamp(target.with_changes(max_inflight_tokens=kv_budget))
    return target


def _queue_settings(
    policy: Policy, target: Knobs, est: Estimates, model: WorkloadModel
) -> tuple[Knobs, list[Reason]]:
    reasons: list[Reason] = []
    changes: dict[str, Any] = {}
    slo_ttft_ms = policy.slo.ttft_ms
    if policy.steers("queue_deadline_ms"):
        engine_ms = _prefill_ms(est, model, slo_ttft_ms)
        deadline = min(
            max(slo_ttft_ms - engine_ms, DEADLINE_MIN_SHARE * slo_ttft_ms),
            DEADLINE_MAX_SHARE * slo_ttft_ms,
        )
        changes["queue_deadline_ms"] = max(1, round(deadline))
        reasons.append(
            Reason(
                "decide",
                "deadline: TTFT objective minus the p90 prompt's time to first token once admitted",
                data={"prefillP90Ms": engine_ms, "deadlineMs": round(deadline)},
            )
        )
    if policy.steers("discipline"):
        changes["discipline"] = _preferred_discipline(policy)
    return target.with_changes(**changes), reasons


def _prefill_chunk(
    policy: Policy, current: Knobs, est: Estimates, step: StepModel
) -> Reason | None:
    """The prefill budget per step (see the module docstring), as a reason carrying it.

    The engine's budget counts the running decodes' tokens too, so each
    bound is those plus the prefill tokens it allows per step.
    """
    per_token = step.prefill_cost(est.mix)
    if per_token <= 0:
        return None
    margin = TPOT_MARGIN + (ITL_ESTIMATE_MARGIN if est.tpot_estimated else 0.0)
    objective_s = policy.slo.tpot_ms / 1000.0 * (1.0 - margin)
    # The decodes a step carries: what runs now, within the current limit.
    running = running_limit(policy, current, est.mix)
    if est.running is not None:
        running = min(running, est.running)
    decode_s = step.decode_step(running, est.mix)
    fits_tpot = running + max(objective_s - decode_s, 0.0) / per_token
    # Prefill throughput x tokens per step must match the prompt tokens
    # arriving: x / (decode_s + per_token * x) >= rate.
    prefill_rate = est.arrival_rps * est.mix.prompt_mean
    prefill_load = prefill_rate * per_token
    # Past the engine's prefill capacity no chunk keeps up: the largest
    # allowed wastes the least on per-step costs.
    largest = policy.bounds["max_num_batched_tokens"].high or policy.engine.max_num_batched_tokens
    keeps_up = (
        running + prefill_rate * decode_s / (1.0 - prefill_load)
        if prefill_load < 1.0
        else float(largest)
    )
    ttft_floor = running + est.mix.prompt_p90 * objective_s / (
        CHUNK_TTFT_SHARE * policy.slo.ttft_ms / 1000.0
    )
    chunk = max(fits_tpot, keeps_up, ttft_floor, 16.0)
    if chunk == fits_tpot:
        message = "prefill chunk: the largest whose step, with the decodes it carries, meets the TPOT objective"
    elif chunk == keeps_up:
        message = "prefill chunk: the smallest that keeps up with the prompt tokens arriving (TPOT objective out of reach)"
    else:
        message = "prefill chunk: the smallest that prefills a p90 prompt within its share of the TTFT objective"
    return Reason(
        "decide",
        message,
        data={
            "prefillUsPerToken": per_token * 1e6,
            "decodeStepMs": decode_s * 1e3,
            "fitsTpotTokens": round(fits_tpot),
            "keepsUpTokens": round(keeps_up),
            "ttftFloorTokens": round(ttft_floor),
            "chunkTokens": round(chunk),
        },
    )


def _prefill_ms(est: Estimates, model: WorkloadModel, slo_ttft_ms: int) -> float:
    """Time to first token of a p90-long prompt once admitted.

    The engine's TTFT histogram measures it, but also any queue inside the
    engine, which is the admission limit's business, not the deadline's; the
    step model gives the prefill alone (the prompt plus one decode step). The
    smaller of the two; 10% of the objective when neither is known.
    """
    candidates = []
    if est.engine_ttft_p90_s is not None:
        candidates.append(est.engine_ttft_p90_s * 1e3)
    if model.step is not None:
        step = model.step
        prefill_s = (
            step.d0 + step.prefill_cost(est.mix) * est.mix.prompt_p90 + (est.step_s or step.d0)
        )
        candidates.append(prefill_s * 1e3)
    return min(candidates) if candidates else 0.1 * slo_ttft_ms


def _preferred_discipline(policy: Policy) -> str:
    if "shortest-prompt-first" in policy.disciplines:
        return "shortest-prompt-first"
    return policy.disciplines[0]


# -- SLO classes -----------------------------------------------------------------


def _shared_policy(policy: Policy, pooled: PodObservation) -> Policy:
    """The policy the shared knobs are decided for: its objectives, with the
    tightest TPOT objective among the classes with traffic in the window
    (every request rides the same engine steps, so the step time that meets
    the tightest one is what the admission limit and the chunk must keep).
    Every class when the window shows no per-class traffic (the gate's
    per-class series missing): the safe side."""
    infos = policy_classes(policy)
    busy = [info for info in infos if _class_traffic(pooled.classes.get(info.name)) > 0.0]
    tightest = min(info.slo.tpot_ms for info in (busy or infos))
    slo = policy.slo if tightest == policy.slo.tpot_ms else replace(policy.slo, tpot_ms=tightest)
    return replace(policy, slo=slo, classes=())


def _class_traffic(obs: ClassObservation | None) -> float:
    if obs is None:
        return 0.0
    return obs.arrival_rps or 0.0


def _class_deadline_ms(ttft_ms: int, engine_ms: float) -> float:
    """Today's queue-deadline rule for one TTFT objective."""
    return min(max(ttft_ms - engine_ms, DEADLINE_MIN_SHARE * ttft_ms), DEADLINE_MAX_SHARE * ttft_ms)


def _clamp_deadline(policy: Policy, deadline_ms: float) -> int:
    bound = policy.bounds.get("queue_deadline_ms")
    value = max(1, round(deadline_ms))
    clamped = value if bound is None else bound.clamp(value)
    return value if clamped is None else clamped


def class_missed(info: ClassInfo, obs: ClassObservation | None, *, scatter: float) -> bool | None:
    """Whether a class missed its TTFT objective this window, beyond `scatter`
    (a log ratio) above it, or shed more than its (1 - quantile) share.
    None when the class had no traffic or its series are missing."""
    if obs is None or not obs.arrival_rps:
        return None
    shed_share = (obs.shed_rps or 0.0) / obs.arrival_rps
    if shed_share > 1.0 - info.slo.quantile:
        return True
    if obs.ttft is None:
        return None
    quantile = obs.ttft.quantile(info.slo.quantile)
    if quantile is None:
        return None
    return quantile > info.slo.ttft_ms / 1000.0 * math.exp(scatter)


def _class_settings(
    policy: Policy,
    shared: Policy,
    target: Knobs,
    est: Estimates,
    model: WorkloadModel,
    memory: DecideMemory,
    pooled: PodObservation,
) -> tuple[Knobs, list[Reason], bool]:
    """Per class: a queue deadline from its own TTFT objective, the aging that
    keeps the classes lexicographic, and the reserve caps on lower classes."""
    reasons: list[Reason] = []
    infos = policy_classes(policy)
    deadlines: dict[str, int] = {}
    if policy.steers("queue_deadline_ms"):
        for info in infos:
            engine_ms = _prefill_ms(est, model, info.slo.ttft_ms)
            deadlines[info.name] = _clamp_deadline(
                policy, _class_deadline_ms(info.slo.ttft_ms, engine_ms)
            )
        reasons.append(
            Reason(
                "decide",
                "class deadlines: each class's TTFT objective minus the p90 prompt's time to first "
                "token once admitted",
                data={f"deadlineMs.{name}": value for name, value in deadlines.items()},
            )
        )
    limit = running_limit(shared, target, est.mix)
    caps, urgent, cap_reasons = _reserve_caps(infos, est, model, memory, pooled, limit)
    reasons.extend(cap_reasons)
    room = min(
        shared.effective("max_inflight_tokens", target.max_inflight_tokens),
        limit * est.mix.budget_per_seq,
        (memory.kv_capacity_tokens or math.inf) * KV_SHARE,
    )
    standing, standing_urgent, standing_reasons = _standing_caps(
        infos, est, model, memory, pooled, room, _caps_of(target)
    )
    for name, cap in standing.items():
        caps[name] = min(cap, caps.get(name, cap))
    reasons.extend(standing_reasons)
    urgent = urgent or standing_urgent
    knobs, aging_reason = _with_classes(policy, target, deadlines, caps)
    if aging_reason is not None:
        reasons.append(aging_reason)
    return knobs, reasons, urgent


def _reserve_caps(
    infos: tuple[ClassInfo, ...],
    est: Estimates,
    model: WorkloadModel,
    memory: DecideMemory,
    pooled: PodObservation,
    limit: float,
) -> tuple[dict[str, int], bool, list[Reason]]:
    """Caps on lower classes that keep engine slots for the higher ones.

    A class `l` is capped when a class above it missed its TTFT objective
    while the classes below that one held engine slots: its cap is the
    shared limit less the reserve for every class above it (Little's law:
    arrival x time in flight, each class's own, x RESERVE_HEADROOM), shared
    by weight among `l`'s priority, and never above the cap already in force
    (still missing with `l` within its cap: 30% lower, and that cap is
    remembered as one that failed; `l` still draining more than the cap
    from before: held, the cap has not bitten yet). While every class above it meets its objective the cap grows:
    x2 per interval while `l` does not press on it (its flood is over: the
    cap costs it nothing and protects nothing), else only x RESERVE_PROBE, and
    then never past RESERVE_PROBE_CEILING of a cap that failed; it goes
    once it reaches the shared limit. Between the objective and a breach it
    holds.
    """
    reasons: list[Reason] = []
    urgent = False
    obs = {info.name: pooled.classes.get(info.name) for info in infos}
    missed = {
        info.name: class_missed(info, obs[info.name], scatter=MIN_BREACH_SCATTER) for info in infos
    }
    healthy = {
        info.name: class_missed(info, obs[info.name], scatter=0.0) is not True for info in infos
    }
    flight_s = _time_in_flight(est, model, infos[0].slo.ttft_ms)
    for info in infos:
        above = [h for h in infos if h.priority > info.priority]
        if not above:
            continue
        peers = [c for c in infos if c.priority == info.priority]
        share = info.weight / sum(c.weight for c in peers)
        missing = [h for h in above if missed[h.name]]
        # Slots held by the classes below the highest one that missed.
        holding = 0.0
        if missing:
            top = max(h.priority for h in missing)
            holding = sum(_holding(obs[c.name]) for c in infos if c.priority < top)
        in_force = memory.class_caps.get(info.name)
        if missing and holding >= HOLDS_SLOTS:
            reserve = RESERVE_HEADROOM * sum(
                _class_traffic(obs[h.name]) * _class_flight_s(h, obs[h.name], flight_s)
                for h in above
            )
            cap = max(1.0, (limit - reserve) * share)
            held = _holding(obs[info.name])
            if in_force is None:
                # The level that failed: what the class held at the first miss.
                if held >= 1.0:
                    memory.class_caps_failed[info.name] = held
            elif held > in_force * (1.0 + CAP_DRAINING):
                # Still draining what it admitted before the cap: the cap has
                # not bitten yet, so the miss says nothing against it.
                cap = in_force
            else:
                memory.class_caps_failed[info.name] = in_force
                cap = max(1.0, min(cap, in_force * FEEDBACK_DOWN))
            memory.class_caps[info.name] = cap
            urgent = True
            reasons.append(
                Reason(
                    "decide",
                    f"a class above {info.name} missed its TTFT objective while lower classes held "
                    "engine slots: capping it to reserve room for the classes above",
                    data={
                        "class": info.name,
                        "missed": ",".join(h.name for h in missing),
                        "reserveSeqs": reserve,
                        "limitSeqs": limit,
                        "capSeqs": cap,
                    },
                )
            )
        elif in_force is not None and all(healthy[h.name] for h in above):
            filled = _presses(obs[info.name], in_force)
            grown = in_force * (RESERVE_PROBE if filled else FEEDBACK_MAX_UP)
            failed_at = memory.class_caps_failed.get(info.name)
            if filled and failed_at is not None:
                grown = max(in_force, min(grown, failed_at * RESERVE_PROBE_CEILING))
            if not filled:
                memory.class_caps_failed.pop(info.name, None)
            if grown >= limit:
                del memory.class_caps[info.name]
                memory.class_caps_failed.pop(info.name, None)
                reasons.append(
                    Reason(
                        "decide",
                        f"classes above {info.name} healthy: its reserve cap released",
                        data={"class": info.name},
                    )
                )
            else:
                memory.class_caps[info.name] = grown
                reasons.append(
                    Reason(
                        "decide",
                        f"classes above {info.name} healthy: its reserve cap grows",
                        data={"class": info.name, "capSeqs": grown},
                    )
                )
    return (
        {name: max(1, math.floor(cap)) for name, cap in memory.class_caps.items()},
        urgent,
        reasons,
    )


def _caps_of(knobs: Knobs) -> dict[str, int]:
    """The class caps `knobs` carry (None: uncapped, left out)."""
    return {c.name: c.max_concurrency for c in knobs.classes if c.max_concurrency is not None}


def _standing_caps(
    infos: tuple[ClassInfo, ...],
    est: Estimates,
    model: WorkloadModel,
    memory: DecideMemory,
    pooled: PodObservation,
    room_tokens: float,
    in_force: dict[str, int],
) -> tuple[dict[str, int], bool, list[Reason]]:
    """Caps that keep room for the higher classes before they burst.

    The reserve caps react to a miss, but requests a lower class already has
    in flight run to their end: a burst onto an engine full of minutes-long
    lower requests is missed until they finish. So while a class above has
    had traffic recently, each lower class `l` is capped at all times to the
    engine's room (the token budget, or the KV cache's KV_SHARE where that is
    smaller) less a reserve for the classes above, in `l`'s own request size:
    reserve = RESERVE_HEADROOM x the classes above's remembered peak of
    sequences in flight (arrival x time in flight, decayed PEAK_DECAY per
    interval) x the mean request; `l`'s size is the in-flight tokens over the
    in-flight requests of `l` and the classes below it, every in-flight token
    counted as theirs (the safe side: the higher classes' requests are the
    short ones this protects). Split by weight among the classes of `l`'s
    priority with recent traffic. A cut that bites (the class holds more
    than the new cap) is urgent: the stabilization window would let the
    flood in meanwhile. The tighter of this and a reserve cap applies.
    """
    reasons: list[Reason] = []
    urgent = False
    caps: dict[str, int] = {}
    obs = {info.name: pooled.classes.get(info.name) for info in infos}
    flight_s = _time_in_flight(est, model, infos[0].slo.ttft_ms)
    for info in infos:
        seqs = _class_traffic(obs[info.name]) * _class_flight_s(info, obs[info.name], flight_s)
        memory.class_peaks[info.name] = max(
            seqs, memory.class_peaks.get(info.name, 0.0) * PEAK_DECAY
        )
    if math.isinf(room_tokens):
        return caps, urgent, reasons
    tokens = est.inflight_tokens
    for info in infos:
        above = [h for h in infos if h.priority > info.priority]
        peak = sum(memory.class_peaks.get(h.name, 0.0) for h in above)
        if not above or peak <= 0.0:
            continue
        lower_held = sum(_holding(obs[c.name]) for c in infos if c.priority <= info.priority)
        size = est.mix.budget_per_seq
        if tokens and lower_held >= HOLDS_SLOTS:
            size = max(size, tokens / lower_held)
        reserve_tokens = RESERVE_HEADROOM * peak * est.mix.budget_per_seq
        # By weight among the peers with recent traffic: an idle peer's
        # share would be room no one uses (the reactive caps split among
        # every peer: there, the room is what a miss showed to be short).
        peers = [
            c
            for c in infos
            if c.priority == info.priority
            and (c is info or memory.class_peaks.get(c.name, 0.0) > 0.0)
        ]
        share = info.weight / sum(c.weight for c in peers)
        cap = max(1.0, (room_tokens - reserve_tokens) / size * share)
        caps[info.name] = max(1, math.floor(cap))
        before = in_force.get(info.name)
        if (before is None or cap < before) and _holding(obs[info.name]) > cap:
            urgent = True
        reasons.append(
            Reason(
                "decide",
                f"standing reserve: classes above {info.name} had traffic recently, so it is "
                "capped below the engine's room less their remembered peak in flight",
                data={
                    "class": info.name,
                    "roomTokens": room_tokens,
                    "reserveTokens": reserve_tokens,
                    "seqTokens": size,
                    "capSeqs": cap,
                },
            )
        )
    return caps, urgent, reasons


def _presses(obs: ClassObservation | None, cap: float) -> bool:
    """Whether a capped class still presses on its cap: sheds (its queue ran
    to the deadline), or held RESERVE_FILLED of the cap on average."""
    if obs is None:
        return False
    return (obs.shed_rps or 0.0) > 0.0 or _holding(obs) >= RESERVE_FILLED * cap


def _holding(obs: ClassObservation | None) -> float:
    """Engine slots a class held over the window: its in-flight average, or,
    without the gauge, HOLDS_SLOTS when it had traffic."""
    if obs is None:
        return 0.0
    if obs.inflight is not None:
        return obs.inflight
    return HOLDS_SLOTS if _class_traffic(obs) > 0.0 else 0.0


def _class_flight_s(info: ClassInfo, obs: ClassObservation | None, pooled_s: float) -> float:
    """A class's time in flight: Little's law on its own series (in flight /
    admitted per second), where it has both; never more than the pooled
    estimate, which counts every class's outputs and is long where a lower
    class's are (and a starved class's own reading is inflated by waits)."""
    if obs is not None and obs.inflight and obs.admitted_rps:
        return min(obs.inflight / obs.admitted_rps, pooled_s)
    return pooled_s


def _time_in_flight(est: Estimates, model: WorkloadModel, ttft_ms: int) -> float:
    """A request's time in flight: its prefill (p90, the safe side, at most
    the TTFT objective: an engine backed up past it measures its queue, not
    a prefill) plus its mean output length at the window's mean step."""
    step_s = est.step_s or (model.step.d0 if model.step is not None else 0.0)
    prefill_ms = min(_prefill_ms(est, model, ttft_ms), float(ttft_ms))
    return prefill_ms / 1000.0 + est.mix.output_mean * step_s


def _with_classes(
    policy: Policy, knobs: Knobs, deadlines: dict[str, int], caps: dict[str, int]
) -> tuple[Knobs, Reason | None]:
    """`knobs` carrying the policy's classes with these deadlines and caps
    (the user's max_concurrency an upper bound on any cap), and aging that
    keeps a lower class from overtaking a higher one within its deadline.

    The default class is carried only when declared or capped: undeclared
    and uncapped, the gate's implicit one (the knobs' own deadline) is it.
    """
    classes: list[ServiceClass] = []
    for info in policy_classes(policy):
        user_cap = info.spec.max_concurrency if info.spec is not None else None
        reserve_cap = caps.get(info.name)
        cap = (
            user_cap if reserve_cap is None else min(reserve_cap, user_cap or MAX_CONCURRENCY_LIMIT)
        )
        if info.spec is None:
            if cap is None:
                continue
            classes.append(ServiceClass(DEFAULT_CLASS, max_concurrency=cap))
            continue
        classes.append(
            ServiceClass(
                info.name,
                priority=info.priority,
                weight=info.weight,
                queue_deadline_ms=deadlines.get(info.name),
                max_concurrency=cap,
                match=info.spec.match.gate_match(),
            )
        )
    knobs = knobs.with_changes(classes=tuple(classes))
    aging = _lexicographic_aging_ms(policy, knobs)
    if aging is None or aging <= knobs.aging_ms:
        return knobs, None
    bound = policy.bounds.get("aging_ms")
    allowed = min(aging, MAX_AGING_MS) if bound is None else bound.clamp(min(aging, MAX_AGING_MS))
    if allowed is None or allowed <= knobs.aging_ms:
        return knobs, None
    return knobs.with_changes(aging_ms=allowed), Reason(
        "decide",
        "aging: a lower class overtakes a higher one only after waiting the higher one's "
        "deadline longer (priority difference x aging)",
        data={"agingMs": allowed},
    )


def _lexicographic_aging_ms(policy: Policy, knobs: Knobs) -> int | None:
    """The smallest aging with which (priority difference x aging) covers
    the lower class's queue deadline for every pair of classes: the gate
    lets a lower head go first once it has waited that much longer than
    the higher head, and under a backlog a lower head waits up to its own
    deadline, so anything less lets a lower class overtake fresh higher
    requests all through a flood. So covered, a lower request is shed at
    its deadline before it could overtake (the higher class's deadline is
    covered too, where it is the longer)."""

    def deadline_of(info: ClassInfo) -> int:
        deadline = knobs.service_class(info.name).queue_deadline_ms
        if deadline is None:
            deadline = knobs.queue_deadline_ms or info.slo.ttft_ms
        return deadline

    infos = policy_classes(policy)
    needed = 0.0
    for high in infos:
        for low in infos:
            if low.priority < high.priority:
                longest = max(deadline_of(high), deadline_of(low))
                needed = max(needed, longest / (high.priority - low.priority))
    return math.ceil(needed) if needed > 0 else None
