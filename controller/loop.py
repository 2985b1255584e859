"""One iteration = named, timed steps: observe -> fit -> recommend -> guard -> report.

`PolicyController.run_once(now_s, pods)` is the whole control loop for one
policy, as the VPA recommender's RunOnce is: each step's duration is
recorded in the returned `Decision` (the operator exports them as metrics).
It is CPU work (scikit-learn fits): callers on an asyncio loop run it with
`asyncio.to_thread`, never on the loop itself.

State kept between iterations (all bounded): the model's ring buffer, the
recent raw recommendations for the stabilization window, the setting the
pods run, the last-known-good setting, a canary in progress, and the
decision's memory (reference length mix, KV capacity, reserve caps).

With SLO classes the Decision carries one ClassReport per class (`_class
reports`): its attainment is the share of the class's requests within both
objectives, estimated as (share admitted) x (TTFT histogram's share below
the TTFT objective) x (TPOT histogram's share below the TPOT objective).
The gate's histograms are separate, so the product treats the two as
independent; a request late on both counts once in each, so the product
errs low (at most by the smaller miss share), never high.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.decide import (
    ClassInfo,
    DecideMemory,
    initial_knobs,
    policy_classes,
    recommend,
)
from batchpilot.controller.explain import (
    ClassReport,
    Conditions,
    Decision,
    Reason,
    Recommendation,
)
from batchpilot.controller.guards import GuardState, run_chain
from batchpilot.controller.model import WorkloadModel
from batchpilot.controller.observe import (
    ClassObservation,
    MetricsSource,
    MetricsUnavailable,
    Observation,
    PodObservation,
    WindowHistogram,
    observe,
)
from batchpilot.controller.policy import Mode, Policy
from batchpilot.controller.samples import LengthMix, Sample, estimate_tpot_quantile, sample_from

STEPS = ("observe", "fit", "recommend", "guard", "report")
# Half the pods silent means the pooled view describes the other half only:
# not enough to act on.
MIN_REPORTING_SHARE = 0.5


class PolicyController:
    """The controller of one policy; one instance per InferencePolicy."""

    def __init__(self, policy: Policy, source: MetricsSource) -> None:
        self.policy = policy
        self.source = source
        self.model = WorkloadModel(policy)
        self.memory = DecideMemory()
        self.current = initial_knobs(policy)
        self.last_known_good = self.current
        self._history: deque[tuple[float, Knobs]] = deque()
        # Since when `_history` holds every recommendation made for these
        # pods (see resume); -inf: no controller steered them before this one.
        self._history_from_s = -math.inf
        self._canary: Any = None
        self._last_decision: Decision | None = None

    @property
    def last_decision(self) -> Decision | None:
        return self._last_decision

    def resume(self, fleet_setting: Knobs, *, steered_until_s: float | None = None) -> None:
        """Start from the setting the pods were left on, before the first step.

        A controller built by a restarted operator (or for a changed spec)
        knows nothing of the pods otherwise: it would hold at its initial
        knobs when metrics are missing, and take a canary it finds half-judged
        on one of two pods for the fleet's setting. Nothing has shown this
        setting meets the SLOs, but it is what the fleet ran when the last
        controller stopped, so it is what a hold keeps.

        `steered_until_s`: when an earlier controller steered these pods up
        to now (their records say so), the time this one takes over. That
        controller's recommendations died with it, so until a whole
        stabilization window has passed the window is incomplete, and the
        stabilization guard takes no unagreed move (guards.stabilize).
        """
        self.current = fleet_setting
        self.last_known_good = fleet_setting
        if steered_until_s is not None:
            self._history_from_s = steered_until_s

    def run_once(self, now_s: float, pods: Sequence[str]) -> Decision:
        pods = tuple(pods)
        timings: dict[str, float] = {}
        clock = time.perf_counter

        started = clock()
        observation, unavailable = self._observe(now_s, pods)
        timings["observe"] = clock() - started

        started = clock()
        tpot_q_s = self._fit(observation)
        timings["fit"] = clock() - started

        started = clock()
        metrics_available = self._metrics_available(observation, pods)
        if observation is not None and metrics_available:
            self.current = _applied_setting(observation, self.current)
            raw = recommend(
                self.policy, observation, self.model, self.current, self.memory, tpot_q_s
            )
        else:
            why = unavailable or (
                "metrics missing: fewer than half the pods report, or no arrival rate "
                "(batchpilot_gate_admitted_total) for them"
            )
            raw = Recommendation(self.current).because(Reason("observe", why))
        timings["recommend"] = clock() - started

        started = clock()
        state = GuardState(
            now_s=now_s,
            pods=pods,
            current=self.current,
            last_known_good=self.last_known_good,
            metrics_available=metrics_available,
            history=tuple(self._history),
            history_from_s=self._history_from_s,
            canary=self._canary,
            pod_scores=self._pod_scores(observation, tpot_q_s),
        )
        guarded = run_chain(self.policy, state, raw)
        timings["guard"] = clock() - started

        return self._report(now_s, observation, raw, guarded, metrics_available, tpot_q_s, timings)

    # -- steps ---------------------------------------------------------------

    def _observe(
        self, now_s: float, pods: tuple[str, ...]
    ) -> tuple[Observation | None, str | None]:
        try:
            return observe(self.source, self.policy, now_s, pods), None
        except MetricsUnavailable as err:
            return None, f"metrics unavailable: {err}"

    def _fit(self, observation: Observation | None) -> float | None:
        """Add this window's pods to the model; return the pooled TPOT quantile."""
        if observation is None:
            return None
        quantile = self.policy.slo.quantile
        pooled = observation.pooled
        pooled_tpot = _tpot_quantile(pooled, quantile)
        pooled_mix = LengthMix.from_histograms(pooled.prompt_tokens, pooled.output_tokens)
        samples: list[Sample] = []
        for pod in observation.pods.values():
            mix = LengthMix.from_histograms(pod.prompt_tokens, pod.output_tokens) or pooled_mix
            if mix is None:
                continue
            sample = sample_from(pod, mix, _pod_tpot(pod, pooled, pooled_tpot, quantile), quantile)
            if sample is not None:
                samples.append(sample)
        self.model.add(samples)
        return pooled_tpot

    def _metrics_available(self, observation: Observation | None, pods: tuple[str, ...]) -> bool:
        if observation is None or not pods or observation.reporting == 0:
            return False
        if observation.reporting < MIN_REPORTING_SHARE * len(pods):
            return False
        return observation.pooled.arrival_rps is not None

    def _pod_scores(
        self, observation: Observation | None, pooled_tpot: float | None
    ) -> dict[str, float]:
        """Estimated share of requests served within the SLOs, per pod (for the canary)."""
        if observation is None or not self.policy.behavior.canary.enabled:
            return {}
        scores = {}
        for name, pod in observation.pods.items():
            score = _attainment(
                self.policy,
                pod,
                _pod_tpot(pod, observation.pooled, pooled_tpot, self.policy.slo.quantile),
            )
            if score is not None:
                scores[name] = score
        return scores

    def _report(
        self,
        now_s: float,
        observation: Observation | None,
        raw: Recommendation,
        guarded: Recommendation,
        metrics_available: bool,
        tpot_q_s: float | None,
        timings: dict[str, float],
    ) -> Decision:
        started = time.perf_counter()
        policy = self.policy
        window = policy.behavior.stabilization_window_s
        if metrics_available:
            # A hold is not a recommendation: it must not stall the next move.
            self._history.append((now_s, raw.target))
        while self._history and self._history[0][0] <= now_s - window:
            self._history.popleft()
        self._canary = guarded.canary
        slo_met = None
        if observation is not None and metrics_available:
            slo_met = _slo_met(policy, observation.pooled, tpot_q_s)
            if slo_met:
                self.last_known_good = self.current
        actuate = policy.mode is Mode.AUTO
        if actuate:
            # What the pods will run from now on; the gates' gauges confirm it
            # at the next observation.
            self.current = guarded.target
        quality = self.model.quality
        signals: dict[str, Any] = {}
        predictions: dict[str, Any] = {}
        if observation is not None:
            signals = observation.pooled.summary(policy.slo.quantile)
            signals["tpot_q_est_s"] = tpot_q_s
            signals["reporting_pods"] = observation.reporting
            predictions = self._predictions(observation, guarded.target)
        timings["report"] = time.perf_counter() - started
        decision = Decision(
            time_s=now_s,
            target=guarded.target,
            per_pod=dict(guarded.per_pod),
            actuate=actuate,
            reasons=guarded.reasons,
            quality=quality,
            conditions=Conditions(metrics_available, quality.trusted, slo_met),
            step_seconds=dict(timings),
            signals=signals,
            predictions=predictions,
            canary_pod=None if guarded.canary is None else guarded.canary.pod,
            classes=_class_reports(policy, observation, guarded.target),
        )
        self._last_decision = decision
        return decision

    def _predictions(self, observation: Observation, target: Knobs) -> dict[str, Any]:
        pooled = observation.pooled
        mix = LengthMix.from_histograms(pooled.prompt_tokens, pooled.output_tokens)
        if mix is None or pooled.arrival_rps is None:
            return {}
        prediction = self.model.predict([target], pooled.arrival_rps, mix)
        if prediction is None:
            return {}

        def seconds(log_value: float) -> float | None:
            return math.exp(log_value) if math.isfinite(log_value) else None

        return {
            "tpot_q_s": seconds(float(prediction.log_tpot[0])),
            "ttft_q_s": seconds(float(prediction.log_ttft[0])),
            "throughput_rps": float(prediction.throughput[0])
            if math.isfinite(prediction.throughput[0])
            else None,
            "physics_step_s": prediction.physics[0].step_s,
            **self.model.heldout_errors,
        }


def _applied_setting(observation: Observation, fallback: Knobs) -> Knobs:
    """The setting most pods report running (their gates' gauges).

    On a tie `fallback` (the setting this controller put on the fleet) wins
    when it is among the most common: with two pods mid-canary, the canary's
    candidate must not pass for the fleet's setting.
    """
    # The gates' gauges carry the scalar knobs only: the classes are what
    # this controller put on the fleet.
    counted = Counter(
        pod.applied
        if pod.applied.classes or not fallback.classes
        else pod.applied.with_changes(classes=fallback.classes)
        for pod in observation.pods.values()
        if pod.applied is not None
    )
    if not counted:
        return fallback
    if counted.get(fallback) == max(counted.values()):
        return fallback
    return counted.most_common(1)[0][0]


def _tpot_quantile(pod: PodObservation, quantile: float) -> float | None:
    if pod.tpot is not None:
        return pod.tpot.quantile(quantile)
    if pod.itl is not None and pod.output_tokens is not None:
        return estimate_tpot_quantile(pod.itl, pod.output_tokens, quantile)
    return None


def _pod_tpot(
    pod: PodObservation, pooled: PodObservation, pooled_tpot: float | None, quantile: float
) -> float | None:
    """A pod's own TPOT quantile where it has the histogram; else the pooled one,
    scaled by the pod's mean step over the pool's (the ITL-based estimate is
    too costly to repeat for every pod of a large policy)."""
    if pod.tpot is not None:
        return pod.tpot.quantile(quantile)
    if pooled_tpot is None or pod.itl is None or pooled.itl is None:
        return pooled_tpot
    pod_mean, pool_mean = pod.itl.mean, pooled.itl.mean
    if not pod_mean or not pool_mean:
        return pooled_tpot
    return pooled_tpot * pod_mean / pool_mean


def _attainment(policy: Policy, pod: PodObservation, tpot_q_s: float | None) -> float | None:
    if pod.ttft is None or not pod.arrival_rps:
        return None
    within_ttft = pod.ttft.fraction_below(policy.slo.ttft_ms / 1000.0)
    if within_ttft is None:
        return None
    admitted_share = (pod.admitted_rps or 0.0) / pod.arrival_rps
    tpot_share = 1.0
    if pod.tpot is not None:
        tpot_share = pod.tpot.fraction_below(policy.slo.tpot_ms / 1000.0) or 0.0
    elif tpot_q_s is not None and tpot_q_s > policy.slo.tpot_ms / 1000.0:
        # Quantile over the objective: at most the quantile's share is within.
        tpot_share = policy.slo.quantile
    return within_ttft * min(admitted_share, 1.0) * tpot_share


def _class_reports(
    policy: Policy, observation: Observation | None, target: Knobs
) -> tuple[ClassReport, ...]:
    """One report per class, highest priority first; empty without classes."""
    if not policy.classes:
        return ()
    pooled = {} if observation is None else observation.pooled.classes
    return tuple(
        _class_report(info, pooled.get(info.name), target) for info in policy_classes(policy)
    )


def _class_report(info: ClassInfo, obs: ClassObservation | None, target: Knobs) -> ClassReport:
    gate_class = target.service_class(info.name)
    deadline = gate_class.queue_deadline_ms
    report = ClassReport(
        name=info.name,
        priority=info.priority,
        slo_ttft_ms=info.slo.ttft_ms,
        slo_tpot_ms=info.slo.tpot_ms,
        queue_deadline_ms=target.queue_deadline_ms if deadline is None else deadline,
        max_concurrency=gate_class.max_concurrency,
    )
    if obs is None:
        return report

    def q_ms(hist: WindowHistogram | None) -> float | None:
        value = None if hist is None else hist.quantile(info.slo.quantile)
        return None if value is None else value * 1e3

    return replace(
        report,
        attainment=_class_attainment(info, obs),
        ttft_q_ms=q_ms(obs.ttft),
        tpot_q_ms=q_ms(obs.tpot),
        arrival_rps=obs.arrival_rps,
        shed_rps=obs.shed_rps,
    )


def _class_attainment(info: ClassInfo, obs: ClassObservation) -> float | None:
    """(share admitted) x (share within the TTFT objective) x (share within the
    TPOT objective); the TPOT factor is 1 without a TPOT histogram (no
    streamed responses in the window)."""
    if not obs.arrival_rps or obs.ttft is None:
        return None
    within_ttft = obs.ttft.fraction_below(info.slo.ttft_ms / 1000.0)
    if within_ttft is None:
        return None
    admitted = min((obs.admitted_rps or 0.0) / obs.arrival_rps, 1.0)
    within_tpot = 1.0
    if obs.tpot is not None:
        within_tpot = obs.tpot.fraction_below(info.slo.tpot_ms / 1000.0) or 0.0
    return admitted * within_ttft * within_tpot


def _slo_met(policy: Policy, pooled: PodObservation, tpot_q_s: float | None) -> bool | None:
    if policy.classes and pooled.classes:
        # Every class with traffic: its attainment at least its percentile.
        met = [
            attained >= info.slo.quantile
            for info in policy_classes(policy)
            if (obs := pooled.classes.get(info.name)) is not None
            and (attained := _class_attainment(info, obs)) is not None
        ]
        if met:
            return all(met)
    if pooled.ttft is None:
        return None
    within = pooled.ttft.fraction_below(policy.slo.ttft_ms / 1000.0)
    if within is None:
        return None
    ttft_ok = within >= policy.slo.quantile
    tpot_ok = tpot_q_s is None or tpot_q_s <= policy.slo.tpot_ms / 1000.0
    return ttft_ok and tpot_ok
