"""What users deploy instead of batchpilot: the peers' overload controls as benchmark controllers.

Why one module: the five peers behind one registry (sim/controllers.py
names their `make_*` here), sharing the limiter base, the per-tick replay
and the engine check; a module per peer would be five small files on one base.

Each is the published algorithm at its published defaults, placed where its
users put it, and adapted to the simulator only where the simulator forces it:

- ``gradient2``: Netflix concurrency-limits' ``Gradient2Limit``
  (github.com/Netflix/concurrency-limits, ``limit/Gradient2Limit.java``).
- ``vegas``: Netflix concurrency-limits' ``VegasLimit`` (``limit/VegasLimit.java``).
- ``envoy-gradient``: Envoy's adaptive concurrency filter
  (envoyproxy.io docs, "Adaptive Concurrency"; ``GradientController``).
- ``epp-flow-control``: llm-d's endpoint picker (Gateway API Inference
  Extension) flow control behind its saturation detector
  (``pkg/epp/saturationdetector``, ``pkg/epp/flowcontrol``).
- ``vllm-queue-caps``: vLLM's static overload control, a cap on the tokens
  queued in the engine (``--max-num-queued-tokens``), 503 on overflow.

The three limiters (gradient2, vegas, envoy-gradient) run inside the request
path in their homes and update on every completed request (Netflix) or every
100 ms (Envoy). A benchmark controller here is called every `PEER_TICK_S` of
simulated time (its `tick_s`; the harness honours it) with the replicas'
snapshots, and replays the per-sample update once per request that got its
first token during the tick, all with the tick's measurement: as fast as the
snapshots allow, and far faster than batchpilot's once per control interval.
They steer the gate's batch cap, which starts each replica at the limiter's
initial limit. The two gateway/engine policies set no cap at all: they sit
in front of an engine started with vLLM's default ``--max-num-seqs`` 256
(never above the scenario's ceiling), like ``static-default``, and act
through `PeerAdmission` (sim/engine.py), the simulator's model of the
saturation detector and of the engine's queue limit.

RTT. The limiters need one latency per sample that grows with the load they
admit and does not depend on how long the answer is:

- gradient2 and vegas: the per-token latency, the interval mean of the
  engine's inter-token latency histogram: the decode step time, which grows
  with the batch the cap admits. Not end-to-end time, which is mostly the
  answer's length.
- envoy-gradient: Envoy records the time from request to the end of the
  response, so it gets the engine's end-to-end request latency, whatever
  that does to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from batchpilot.contract.knobs import MAX_AGING_MS, Knobs
from batchpilot.controller.bench_adapter import ControllerContext
from batchpilot.sim.baselines import (
    VLLM_DEFAULT_MAX_NUM_SEQS,
    FixedController,
    gate_classes,
    interval_mean,
)
from batchpilot.sim.controllers import ControllerError, Snapshot
from batchpilot.sim.engine import PeerAdmission
from batchpilot.sim.metrics import histogram_buckets, histogram_quantile

# The request-path limiters decide this often (simulated seconds).
PEER_TICK_S = 1.0

# Per engine kind: the histogram whose count is the number of requests that
# got a first token (one limiter sample each), and the per-token latency.
_SAMPLES_AND_TOKEN_LATENCY: Mapping[str, tuple[str, str]] = {
    "vllm": ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"),
    "llamacpp": (
        "batchpilot_gate_time_to_first_token_seconds",
        "batchpilot_gate_time_per_output_token_seconds",
    ),
}
_END_TO_END = {"vllm": "vllm:e2e_request_latency_seconds"}
_IN_FLIGHT = "batchpilot_gate_inflight_requests"


class UnsupportedScenario(ControllerError):
    """A controller needs a signal or a mechanism the run does not have."""


def _require_simulated_vllm(name: str, context: ControllerContext, needs: str) -> None:
    if context.engine_kind != "vllm":
        raise UnsupportedScenario(
            f"controller {name!r} cannot run on engine kind {context.engine_kind!r}: it needs "
            f"{needs}; run it on a simulated scenario (batchpilot bench), or drop it from "
            "--controllers"
        )


class _Limiter:
    """Per-replica limits, the last snapshot of each replica, and the limit as gate knobs."""

    tick_s = PEER_TICK_S

    def __init__(
        self, context: ControllerContext, initial_limit: float, queue_deadline_ms: int
    ) -> None:
        self._ceiling = context.max_num_seqs
        self._queue_deadline_ms = queue_deadline_ms
        self._previous: dict[str, Snapshot] = {}
        self._limits = dict.fromkeys(context.replica_names, float(initial_limit))

    def _knobs(self, limit: float) -> Knobs:
        return Knobs(
            max_concurrency=max(1, min(self._ceiling, int(limit))),
            queue_deadline_ms=self._queue_deadline_ms,
        )


class _PerSampleLimiter(_Limiter):
    """A Netflix limit: `update` runs once per sample (a request's first token) of the tick.

    Over the limit, Netflix's BlockingLimiter makes a request wait, up to a
    timeout, for a place; the gate's queue does that, with the TTFT
    objective as the timeout (a request that waited longer cannot be good).
    """

    def __init__(self, context: ControllerContext, initial_limit: float) -> None:
        super().__init__(context, initial_limit, max(1, round(context.slo_ttft_ms)))
        self._samples, self._token_latency = _SAMPLES_AND_TOKEN_LATENCY[context.engine_kind]

    def decide(self, now_s: float, snapshots: Mapping[str, Snapshot]) -> Mapping[str, Knobs]:
        decisions = {}
        for name, snapshot in snapshots.items():
            previous = self._previous.get(name)
            self._previous[name] = dict(snapshot)
            limit = self._limits[name]
            if previous is not None:
                samples = int(
                    snapshot[f"{self._samples}_count"] - previous[f"{self._samples}_count"]
                )
                rtt = interval_mean(snapshot, previous, self._token_latency)
                if samples > 0 and rtt > 0:
                    limit = self.update(name, limit, samples, rtt, snapshot[_IN_FLIGHT])
            self._limits[name] = limit
            decisions[name] = self._knobs(limit)
        return decisions

    def update(self, name: str, limit: float, samples: int, rtt: float, in_flight: float) -> float:
        """The limit after `samples` samples of latency `rtt` with `in_flight` requests admitted."""
        raise NotImplementedError


class Gradient2Limiter(_PerSampleLimiter):
    """Netflix Gradient2Limit at its defaults, per replica, on the gate's batch cap.

    Per sample: long RTT is an exponential average over `LONG_WINDOW` samples
    (a plain mean for the first `WARMUP`), pulled down 5% whenever it is more
    than twice the short RTT; while fewer than limit / 2 requests are in
    flight the limit holds (the app, not the server, is the bottleneck);
    otherwise gradient = clamp(TOLERANCE x long / short, 0.5, 1) and
    limit <- (1 - SMOOTHING) x limit + SMOOTHING x (limit x gradient + QUEUE_SIZE),
    within [MIN_LIMIT, engine ceiling] (the library's max of 200 would be an
    arbitrary ceiling below the engines' own).
    """

    INITIAL_LIMIT = 20
    MIN_LIMIT = 20
    SMOOTHING = 0.2
    TOLERANCE = 1.5
    LONG_WINDOW = 600
    WARMUP = 10
    QUEUE_SIZE = 4

    def __init__(self, context: ControllerContext) -> None:
        super().__init__(context, min(self.INITIAL_LIMIT, context.max_num_seqs))
        self._min_limit = min(self.MIN_LIMIT, context.max_num_seqs)
        self._long: dict[str, float] = {}
        self._long_count: dict[str, int] = {}

    def update(self, name: str, limit: float, samples: int, rtt: float, in_flight: float) -> float:
        short = rtt
        long = self._long.get(name, 0.0)
        count = self._long_count.get(name, 0)
        factor = 2.0 / (self.LONG_WINDOW + 1)
        for _ in range(samples):
            if count < self.WARMUP:
                count += 1
                long += (short - long) / count
            else:
                long += (short - long) * factor
            ratio = long / short
            if ratio > 2.0:
                long *= 0.95
            if in_flight < limit / 2:
                continue
            gradient = max(0.5, min(1.0, self.TOLERANCE * ratio))
            target = limit * gradient + self.QUEUE_SIZE
            limit = (1 - self.SMOOTHING) * limit + self.SMOOTHING * target
            limit = max(self._min_limit, min(self._ceiling, limit))
        self._long[name] = long
        self._long_count[name] = count
        return limit


class VegasLimiter(_PerSampleLimiter):
    """Netflix VegasLimit at its defaults, per replica, on the gate's batch cap.

    Per sample: the no-load RTT is the smallest seen (a new smallest only
    updates it), reset to the current sample every PROBE_MULTIPLIER x limit
    samples (the library jitters this by a random factor in [0.5, 1); here
    it is 1, so a run stays deterministic); the estimated queue is
    ceil(limit x (1 - no-load / sample)); with f = max(1, int(log10(limit))):
    queue <= f -> limit + 6f (beta); queue < 3f (alpha) -> limit + f;
    queue > 6f (beta) -> limit - f; else hold. While fewer than limit / 2
    requests are in flight the limit holds. Smoothing 1.0; the library's
    max of 1,000 becomes the engine ceiling.
    """

    INITIAL_LIMIT = 20
    PROBE_MULTIPLIER = 30

    def __init__(self, context: ControllerContext) -> None:
        super().__init__(context, min(self.INITIAL_LIMIT, context.max_num_seqs))
        self._no_load: dict[str, float] = {}
        self._since_probe: dict[str, int] = {}

    def update(self, name: str, limit: float, samples: int, rtt: float, in_flight: float) -> float:
        no_load = self._no_load.get(name, math.inf)
        since_probe = self._since_probe.get(name, 0)
        for _ in range(samples):
            since_probe += 1
            if since_probe >= self.PROBE_MULTIPLIER * limit:
                since_probe = 0
                no_load = rtt
                continue
            if rtt < no_load:
                no_load = rtt
                continue
            if in_flight * 2 < limit:
                continue
            step = max(1, int(math.log10(limit)))
            queue = math.ceil(limit * (1 - no_load / rtt))
            if queue <= step:
                limit += 6 * step
            elif queue < 3 * step:
                limit += step
            elif queue > 6 * step:
                limit -= step
            limit = max(1.0, min(self._ceiling, limit))
        self._no_load[name] = no_load
        self._since_probe[name] = since_probe
        return limit


class EnvoyGradientLimiter(_Limiter):
    """Envoy's adaptive concurrency filter (GradientController) at its defaults, per replica.

    - minRTT: at start and every MIN_RTT_INTERVAL_S after the last
      measurement ended, the limit is pinned to MIN_CONCURRENCY until
      MIN_RTT_REQUESTS requests have completed; minRTT is their p50. The
      limit from before comes back afterwards. (Envoy jitters the interval
      by 10%; this one does not, so a run stays deterministic.)
    - Every update: sampleRTT = p50 of the requests completed since the
      last one; gradient = clamp((minRTT x (1 + BUFFER)) / sampleRTT, 0.5, 2);
      limit <- limit x gradient + sqrt(limit x gradient), within
      [MIN_CONCURRENCY, engine ceiling] (Envoy's max of 1,000 becomes the
      ceiling). Envoy updates every 100 ms; here every tick.
    - Over the limit a request gets a 503 at once: the gate sheds what
      would queue (queue deadline 1 ms).

    Samples are whole requests (Envoy times request to end of response), so
    this one counts finished requests and reads the end-to-end latency.
    """

    MIN_CONCURRENCY = 3
    MIN_RTT_INTERVAL_S = 60.0
    MIN_RTT_REQUESTS = 50
    BUFFER = 0.25
    REJECT_DEADLINE_MS = 1

    def __init__(self, context: ControllerContext) -> None:
        if context.engine_kind not in _END_TO_END:
            raise UnsupportedScenario(
                f"controller 'envoy-gradient' cannot run on engine kind {context.engine_kind!r}: "
                "it needs an end-to-end request latency histogram, which that engine's metrics "
                "and the gate's do not have; drop it from --controllers"
            )
        super().__init__(context, self.MIN_CONCURRENCY, self.REJECT_DEADLINE_MS)
        self._e2e = _END_TO_END[context.engine_kind]
        self._min_rtt: dict[str, float] = {}
        # Per replica: the snapshot where the running minRTT measurement
        # began and the limit to restore, or the time the next one starts.
        self._measuring: dict[str, tuple[Snapshot, float]] = {}
        self._next_measurement: dict[str, float] = dict.fromkeys(context.replica_names, 0.0)

    def decide(self, now_s: float, snapshots: Mapping[str, Snapshot]) -> Mapping[str, Knobs]:
        decisions = {}
        for name, snapshot in snapshots.items():
            previous = self._previous.get(name)
            self._previous[name] = dict(snapshot)
            measuring = self._measuring.get(name)
            if measuring is None and now_s >= self._next_measurement[name]:
                measuring = (dict(snapshot), self._limits[name])
                self._measuring[name] = measuring
            if measuring is not None:
                begun, restore = measuring
                if self._completed(snapshot, begun) >= self.MIN_RTT_REQUESTS:
                    self._min_rtt[name] = histogram_quantile(
                        0.5, histogram_buckets(snapshot, self._e2e, begun)
                    )
                    del self._measuring[name]
                    self._next_measurement[name] = now_s + self.MIN_RTT_INTERVAL_S
                    self._limits[name] = restore
                    measuring = None
            elif previous is not None and self._completed(snapshot, previous) > 0:
                self._limits[name] = self._gradient_update(name, snapshot, previous)
            limit = self.MIN_CONCURRENCY if measuring is not None else self._limits[name]
            decisions[name] = self._knobs(limit)
        return decisions

    def _completed(self, snapshot: Snapshot, since: Snapshot) -> float:
        return snapshot[f"{self._e2e}_count"] - since[f"{self._e2e}_count"]

    def _gradient_update(self, name: str, snapshot: Snapshot, previous: Snapshot) -> float:
        limit = self._limits[name]
        min_rtt = self._min_rtt[name]
        sample = histogram_quantile(0.5, histogram_buckets(snapshot, self._e2e, previous))
        if not sample > 0:
            return limit
        gradient = max(0.5, min(2.0, min_rtt * (1 + self.BUFFER) / sample))
        scaled = limit * gradient
        return max(self.MIN_CONCURRENCY, min(self._ceiling, scaled + math.sqrt(scaled)))


class GatewayPolicy(FixedController):
    """A fixed gate setting plus the peer's own admission rules (`PeerAdmission`)."""

    def __init__(
        self, context: ControllerContext, knobs: Knobs, peer_admission: PeerAdmission
    ) -> None:
        super().__init__(context, knobs)
        self.peer_admission = peer_admission


# llm-d's saturation detector defaults (DefaultQueueDepthThreshold,
# DefaultKVCacheUtilThreshold).
EPP_QUEUE_DEPTH_THRESHOLD = 5
EPP_KV_CACHE_UTIL_THRESHOLD = 0.8


def make_epp_flow_control(context: ControllerContext) -> GatewayPolicy:
    """llm-d endpoint-picker flow control at its defaults, in front of a default vLLM.

    The saturation detector calls an engine saturated when its waiting queue
    holds EPP_QUEUE_DEPTH_THRESHOLD requests or more, or its KV cache usage
    is at EPP_KV_CACHE_UTIL_THRESHOLD or above; flow control then holds
    requests at the gateway, FCFS in one priority band, and dispatches again
    when it is not. Its request TTL defaults to none (DefaultRequestTTL 0:
    only the client's own cancellation ends the wait, and the benchmark's
    clients never cancel), so the gate here has no queue deadline and no cap.

    With SLO classes, flow control has a priority band per class priority,
    strict between bands (a higher band is always dispatched first), and
    inside a band round-robin fairness between flows, each flow FCFS. On the
    gate that is the scenario's classes with equal weights and aging off
    (`gate_classes`); the gate's token counter stands in for llm-d's
    round-robin between a band's flows.
    """
    _require_simulated_vllm(
        "epp-flow-control",
        context,
        "the engine's waiting-queue and KV-cache usage gauges and a gateway that holds "
        "requests on them (the simulator's model of llm-d's saturation detector)",
    )
    knobs = Knobs()
    if context.classes:
        knobs = Knobs(
            classes=gate_classes(context.classes, equal_weights=True), aging_ms=MAX_AGING_MS
        )
    return GatewayPolicy(
        context,
        knobs,
        PeerAdmission(
            max_num_seqs=min(VLLM_DEFAULT_MAX_NUM_SEQS, context.max_num_seqs),
            hold_waiting=EPP_QUEUE_DEPTH_THRESHOLD,
            hold_kv_usage=EPP_KV_CACHE_UTIL_THRESHOLD,
        ),
    )


def make_vllm_queue_caps(context: ControllerContext) -> GatewayPolicy:
    """vLLM's own overload control: a queued-token cap sized to the TTFT objective, 503 above it.

    The cap is what a careful operator would set: the prompt tokens the
    engine can prefill within the TTFT objective, TTFT SLO x prefill
    throughput, the throughput measured as one prompt filling the engine's
    prefill budget (`ControllerContext.prefill_tokens_per_s`). No gate: the
    engine runs at vLLM's default max_num_seqs and every request goes
    straight to its waiting queue, or is refused when that queue's prompt
    tokens plus its own would pass the cap.
    """
    _require_simulated_vllm(
        "vllm-queue-caps",
        context,
        "vLLM's --max-num-queued-tokens and its prefill throughput (the simulator's model)",
    )
    if context.prefill_tokens_per_s is None:
        raise UnsupportedScenario(
            "controller 'vllm-queue-caps' needs the engine's prefill throughput "
            "(ControllerContext.prefill_tokens_per_s) to size its queue cap"
        )
    cap = max(1, round(context.slo_ttft_ms / 1000.0 * context.prefill_tokens_per_s))
    return GatewayPolicy(
        context,
        Knobs(),
        PeerAdmission(
            max_num_seqs=min(VLLM_DEFAULT_MAX_NUM_SEQS, context.max_num_seqs),
            max_queued_prompt_tokens=cap,
        ),
    )


def make_gradient2(context: ControllerContext) -> Gradient2Limiter:
    return Gradient2Limiter(context)


def make_vegas(context: ControllerContext) -> VegasLimiter:
    return VegasLimiter(context)


def make_envoy_gradient(context: ControllerContext) -> EnvoyGradientLimiter:
    return EnvoyGradientLimiter(context)
