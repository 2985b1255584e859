"""The adaptive controller as a benchmark plug-in (`--controllers adaptive`).

The harness (sim/bench.py) calls `make(context)` once per run and then
`decide(now_s, snapshots)` every control interval with each replica's
cumulative metrics snapshot. The adapter feeds the snapshots to a
`SnapshotSource` (Prometheus arithmetic on them) and runs exactly the loop
the operator runs (loop.PolicyController), in Auto mode. It sees only the
context below and the snapshots: never the scenario, its phases or its
future arrivals.

Policy built from the context (what a user would write in the CR):
- the default knob set for the engine (batch cap up to the engine ceiling,
  token budget, queue deadline, fcfs / shortest-prompt-first, and the
  prefill budget where the engine takes it live);
- metrics window = 2 control intervals: the harness samples once per
  interval, and rate() needs two samples inside the window;
- stabilization window = the metrics window: a move is taken as far as two
  consecutive recommendations agree;
- canary off: with one or two replicas a canary pod is half the fleet or
  more, and judging it needs intervals the phase change does not leave;
- the other behaviour settings at their documented defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.loop import PolicyController
from batchpilot.controller.policy import (
    Behavior,
    Canary,
    ClassSpec,
    EngineKind,
    EngineSpec,
    MetricsSpec,
    Mode,
    Policy,
    Slo,
)
from batchpilot.controller.sources import SnapshotSource


@dataclass(frozen=True)
class ControllerContext:
    """Everything a controller may know beyond the snapshots."""

    slo_ttft_ms: float
    slo_tpot_ms: float
    control_interval_s: float
    replica_names: tuple[str, ...]
    # Engine startup ceilings: the gate can only lower max_num_seqs, and the
    # prefill budget is changeable live only when runtime_tunable.
    max_num_seqs: int
    max_num_batched_tokens: int
    runtime_tunable: bool
    # Which metric names the snapshots carry: "vllm" (the simulator's engine)
    # or "llamacpp" (the live benchmark's real engine, whose latencies come
    # from the gate's histograms); a controller.policy.EngineKind value.
    engine_kind: str = "vllm"
    # The engine's KV cache in tokens, where it is known from its startup flags.
    kv_cache_tokens: int | None = None
    # Prompt tokens per second the engine prefills when one prompt fills its
    # prefill budget, where a cost model is known (the simulator's).
    prefill_tokens_per_s: float | None = None
    # The SLO classes sharing the replicas, as a policy's spec.classes
    # declares them (empty: one class with the objectives above).
    classes: tuple[ClassSpec, ...] = ()


class AdaptiveBenchController:
    def __init__(self, policy: Policy, replicas: tuple[str, ...]) -> None:
        self._source = SnapshotSource(policy)
        self._loop = PolicyController(policy, self._source)
        self._replicas = replicas

    @property
    def controller(self) -> PolicyController:
        return self._loop

    def decide(
        self, now_s: float, snapshots: Mapping[str, Mapping[str, float]]
    ) -> Mapping[str, Knobs]:
        self._source.ingest(now_s, snapshots)
        decision = self._loop.run_once(now_s, self._replicas)
        return decision.per_pod


def policy_for(context: ControllerContext) -> Policy:
    interval = float(context.control_interval_s)
    return Policy.default_for(
        Slo(round(context.slo_ttft_ms), round(context.slo_tpot_ms)),
        EngineSpec(
            kind=EngineKind(context.engine_kind),
            max_num_seqs=context.max_num_seqs,
            max_num_batched_tokens=context.max_num_batched_tokens,
            runtime_tunable=context.runtime_tunable,
            kv_cache_tokens=context.kv_cache_tokens,
        ),
        behavior=Behavior(
            interval_s=interval, stabilization_window_s=2 * interval, canary=Canary(enabled=False)
        ),
        mode=Mode.AUTO,
        metrics=MetricsSpec(window_s=2 * interval, staleness_s=3 * interval),
        name="bench",
        classes=context.classes,
    )


def make(context: ControllerContext) -> AdaptiveBenchController:
    return AdaptiveBenchController(policy_for(context), tuple(context.replica_names))
