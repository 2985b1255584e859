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
from typing import Protocol

from batchpilot.controller.knobs import Knobs
from batchpilot.controller.loop import PolicyController
from batchpilot.controller.observe import SnapshotSource
from batchpilot.controller.policy import (
    Behavior,
    EngineKind,
    EngineSpec,
    MetricsSpec,
    Mode,
    Policy,
    Slo,
)


class BenchContext(Protocol):
    """The fields of sim.controllers.ControllerContext this adapter reads."""

    slo_ttft_ms: float
    slo_tpot_ms: float
    control_interval_s: float
    replica_names: tuple[str, ...]
    max_num_seqs: int
    max_num_batched_tokens: int
    runtime_tunable: bool
    engine_kind: str
    kv_cache_tokens: int | None


class AdaptiveBenchController:
    def __init__(self, policy: Policy, replicas: tuple[str, ...]) -> None:
        self._source = SnapshotSource(policy)
        self._loop = PolicyController(policy, self._source)
        self._replicas = replicas

    @property
    def controller(self) -> PolicyController:
        return self._loop

    def decide(self, now_s: float, snapshots: Mapping[str, Mapping[str, float]]) -> Mapping[str, Knobs]:
        self._source.ingest(now_s, snapshots)
        decision = self._loop.run_once(now_s, self._replicas)
        return decision.per_pod


def policy_for(context: BenchContext) -> Policy:
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
        behavior=Behavior(interval_s=interval, stabilization_window_s=2 * interval, canary=False),
        mode=Mode.AUTO,
        metrics=MetricsSpec(window_s=2 * interval, staleness_s=3 * interval),
        name="bench",
    )


def make(context: BenchContext) -> AdaptiveBenchController:
    return AdaptiveBenchController(policy_for(context), tuple(context.replica_names))
