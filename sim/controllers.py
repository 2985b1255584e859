"""What a benchmark controller is, and the registry that builds one by name.

An *online* controller sees exactly what the Prometheus path would show it:
every `control_interval_s` of simulated time the harness calls

    controller.decide(now_s, snapshots) -> {replica_name: Knobs}

where `snapshots` maps "replica-0", "replica-1", ... to that replica's
metrics snapshot (`Replica.snapshot()`: cumulative counters and histograms,
current gauges, keyed by exposition-format sample name). Replicas left out of
the answer keep their knobs. The first call comes at t = 0, before any
request, and sets the startup knobs (not counted as a configuration change).

Two optional attributes let a controller be something other than a
batchpilot policy (sim/peers.py): `tick_s`, a shorter decision period for
limiters that live in the request path, and `peer_admission`, a
`sim.engine.PeerAdmission` with admission rules of another system (a
gateway's saturation hold, an engine's queue cap) that the harness gives
every replica. A factory raises `ControllerError` when the context lacks a
signal the controller needs; the benchmark builds every controller for
every scenario before it simulates anything.

A *hindsight* baseline (static-best, oracle) is not a controller: it replays
the scenario many times to find the best fixed settings, so it is a function
`run(scenario, workload, *, executor, progress) -> Simulation` instead.

Both kinds are registered as "module:attribute" strings and imported only
when used, so `adaptive` (batchpilot.controller.bench_adapter:make, written
elsewhere) needs no change here when it lands, and importing this module costs
nothing. To plug in another controller: `register_online("mine", "pkg.mod:make")`
where `make(context: ControllerContext) -> Controller`.

This module must not import the harness: controller code imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.bench_adapter import ControllerContext

Snapshot = Mapping[str, float]


class Controller(Protocol):
    def decide(self, now_s: float, snapshots: Mapping[str, Snapshot]) -> Mapping[str, Knobs]: ...


ControllerFactory = Callable[[ControllerContext], Controller]


class ControllerError(ValueError):
    """A controller name is unknown or its implementation cannot be loaded."""


_ONLINE: dict[str, str] = {
    "static-default": "batchpilot.sim.baselines:make_static_default",
    "strict-priority": "batchpilot.sim.baselines:make_strict_priority",
    "aimd": "batchpilot.sim.baselines:make_aimd",
    "gradient2": "batchpilot.sim.peers:make_gradient2",
    "vegas": "batchpilot.sim.peers:make_vegas",
    "envoy-gradient": "batchpilot.sim.peers:make_envoy_gradient",
    "epp-flow-control": "batchpilot.sim.peers:make_epp_flow_control",
    "vllm-queue-caps": "batchpilot.sim.peers:make_vllm_queue_caps",
    "adaptive": "batchpilot.controller.bench_adapter:make",
}
# The hindsight yardstick: no other controller may have more good requests.
BOUND = "oracle-full"

_HINDSIGHT: dict[str, str] = {
    "static-best": "batchpilot.sim.baselines:run_static_best",
    "oracle": "batchpilot.sim.baselines:run_oracle",
    BOUND: "batchpilot.sim.oracle_full:run_oracle_full",
}


def register_online(name: str, target: str) -> None:
    """Register an online controller factory as "module:attribute"."""
    _check_target(target)
    _ONLINE[name] = target


def known_controllers() -> tuple[str, ...]:
    return tuple(sorted({*_ONLINE, *_HINDSIGHT}))


def is_hindsight(name: str) -> bool:
    return name in _HINDSIGHT


def ensure_available(names: list[str]) -> None:
    """Fail before any simulation on a name that is unknown or whose code cannot be imported."""
    for name in names:
        _load(name, _HINDSIGHT if name in _HINDSIGHT else _ONLINE)


def build_controller(name: str, context: ControllerContext) -> Controller:
    factory: ControllerFactory = _load(name, _ONLINE)
    return factory(context)


def hindsight_runner(name: str) -> Callable[..., Any]:
    runner: Callable[..., Any] = _load(name, _HINDSIGHT)
    return runner


def _load(name: str, table: Mapping[str, str]) -> Any:
    if name not in table:
        raise ControllerError(
            f"unknown controller {name!r}; known: {', '.join(known_controllers())}"
        )
    module_name, _, attribute = table[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ControllerError(
            f"controller {name!r} is not available: cannot import {module_name} ({err})"
        ) from err
    try:
        return getattr(module, attribute)
    except AttributeError as err:
        raise ControllerError(
            f"controller {name!r} is not available: {module_name} has no {attribute!r}"
        ) from err


def _check_target(target: str) -> None:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ControllerError(f"controller target must be 'module:attribute', got {target!r}")
