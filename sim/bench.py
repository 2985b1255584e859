"""The benchmark harness: replay a scenario against replicas under a controller.

Why one module: the run (`Simulation`) and the result fields it is scored
by (../shared/contracts/bench.md) are one contract; the summary reads the
run's requests and replicas directly.

`Simulation` owns one run: the replicas (sim/engine.py), the request stream,
and the control loop. Events are processed in time order; at equal times a
control tick goes before an arrival. Request i goes to replica i mod N.
After the last arrival the control loop keeps ticking until every request has
finished or been shed.

Results follow ../shared/contracts/bench.md: a request is good when it
finished with TTFT (arrival at the pod to first token, gate queueing
included) <= slo.ttft_ms and mean time per output token after the first
<= slo.tpot_ms. goodput_rps = good / workload duration; slo_attainment =
good / arrived; output_tok_s = tokens of finished requests / workload
duration. Latency percentiles are over finished requests (TPOT over those
with two or more tokens). Each result also carries a per-control-interval
timeline (by arrival time: arrived, good, goodput, p99 TTFT/TPOT, shed, and
the knobs in effect at the interval start).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.bench_adapter import ControllerContext
from batchpilot.sim.bound import upper_bound
from batchpilot.sim.controllers import (
    BOUND,
    Controller,
    build_controller,
    hindsight_runner,
    is_hindsight,
)
from batchpilot.sim.engine import Replica, SimRequest
from batchpilot.sim.scenario import Scenario
from batchpilot.sim.workload import Workload, build_workload

Progress = Callable[[float], None]
"""Called with the fraction of one controller run just completed (sums to 1)."""


def controller_context(scenario: Scenario) -> ControllerContext:
    engine = scenario.engine
    config = engine.config()
    budget = engine.max_num_batched_tokens
    prefill_s = config.cost.prefill_ms(budget, budget * budget) * config.slowdown / 1000.0
    return ControllerContext(
        slo_ttft_ms=scenario.slo.ttft_ms,
        slo_tpot_ms=scenario.slo.tpot_ms,
        control_interval_s=scenario.control_interval_s,
        replica_names=scenario.replica_names,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        runtime_tunable=engine.runtime_tunable,
        prefill_tokens_per_s=budget / prefill_s,
    )


class Simulation:
    """One run of a scenario; resumable (`run_until`) and deep-copyable for hindsight search."""

    def __init__(
        self,
        scenario: Scenario,
        workload: Workload,
        controller: Controller | None = None,
        *,
        knobs: Knobs | None = None,
    ) -> None:
        self.scenario = scenario
        self.duration_s = workload.duration_s
        config = scenario.engine.config()
        peer_admission = getattr(controller, "peer_admission", None)
        self.replicas = [
            Replica(config, knobs, name=name, peer_admission=peer_admission)
            for name in scenario.replica_names
        ]
        self.controller = controller
        # Peer limiters that sit in the request path decide far more often
        # than a control interval (see sim/controllers.py).
        self.tick_s = getattr(controller, "tick_s", None) or scenario.control_interval_s
        self._arrival = workload.arrival_s.tolist()
        self._prompt = workload.prompt_tokens.tolist()
        self._output = workload.output_tokens.tolist()
        # Requests submitted by this run, from arrival index `first_index` on.
        self.requests: list[SimRequest] = []
        self.first_index = 0
        self._index = 0
        self.knob_log: list[tuple[float, str, Knobs]] = [
            (0.0, replica.name, replica.knobs) for replica in self.replicas
        ]
        self.config_changes = 0
        self._next_tick = 0.0
        self.now = 0.0

    @property
    def arrived(self) -> int:
        """Requests submitted so far (since the start of the scenario)."""
        return self._index

    @property
    def finished(self) -> bool:
        return self._index == len(self._arrival) and all(r.idle for r in self.replicas)

    def fork(self) -> Simulation:
        """An independent copy that continues from now, without the requests already submitted.

        Requests in flight are copied with the replicas; `requests` of the
        fork starts empty, so copying stays cheap however long the run is.
        """
        clone = copy.copy(self)
        clone.replicas = copy.deepcopy(self.replicas)
        clone.controller = copy.deepcopy(self.controller)
        clone.requests = []
        clone.first_index = self._index
        clone.knob_log = list(self.knob_log)
        return clone

    def run_until(self, stop_s: float) -> None:
        """Process every tick and arrival before `stop_s`, then advance the replicas to it."""
        arrivals = self._arrival
        replicas = self.replicas
        count = len(replicas)
        interval = self.tick_s
        index = self._index
        total = len(arrivals)
        while True:
            next_arrival = arrivals[index] if index < total else math.inf
            if self._next_tick <= next_arrival and self._next_tick < stop_s:
                self._control(self._next_tick)
                self._next_tick += interval
                continue
            if next_arrival >= stop_s:
                break
            replica = replicas[index % count]
            self.requests.append(
                replica.submit(next_arrival, self._prompt[index], self._output[index])
            )
            index += 1
            self._index = index
        for replica in replicas:
            replica.advance(stop_s)
        self.now = stop_s

    def run_to_completion(self) -> None:
        self.run_until(max(self.duration_s, self.now))
        interval = self.scenario.control_interval_s
        while not self.finished:
            self.run_until(self.now + interval)

    def apply(self, t: float, knobs: Knobs, names: Sequence[str] | None = None) -> None:
        """Switch replicas (all by default) to `knobs` at time t, as a controller would."""
        for replica in self.replicas:
            if names is None or replica.name in names:
                self._set(t, replica, knobs)

    def _control(self, t: float) -> None:
        if self.controller is None:
            return
        snapshots = {replica.name: replica.snapshot(t) for replica in self.replicas}
        decisions = self.controller.decide(t, snapshots)
        by_name = {replica.name: replica for replica in self.replicas}
        for name, knobs in decisions.items():
            if name not in by_name:
                raise KeyError(f"controller returned knobs for unknown replica {name!r}")
            self._set(t, by_name[name], knobs)

    def _set(self, t: float, replica: Replica, knobs: Knobs) -> None:
        before = replica.knobs
        applied = replica.set_knobs(t, knobs)
        if applied != before:
            if t > 0:
                self.config_changes += 1
            self.knob_log.append((t, replica.name, applied))


@dataclass(frozen=True)
class RequestTable:
    """Per-request outcome arrays of a finished Simulation, in arrival order."""

    arrival_s: np.ndarray
    ttft_s: np.ndarray  # NaN when no first token
    tpot_s: np.ndarray  # NaN when unfinished; 0 for one-token answers
    output_tokens: np.ndarray
    finished: np.ndarray
    shed: np.ndarray

    @classmethod
    def of(cls, requests: Sequence[SimRequest]) -> RequestTable:
        nan = math.nan
        return cls(
            arrival_s=np.array([r.arrival_s for r in requests]),
            ttft_s=np.array([nan if r.ttft_s is None else r.ttft_s for r in requests]),
            tpot_s=np.array([nan if r.tpot_s is None else r.tpot_s for r in requests]),
            output_tokens=np.array([r.output_tokens for r in requests]),
            finished=np.array([r.status == "finished" for r in requests], dtype=bool),
            shed=np.array([r.status == "shed" for r in requests], dtype=bool),
        )

    def good(self, ttft_ms: float, tpot_ms: float) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return (
                self.finished
                & (self.ttft_s * 1000.0 <= ttft_ms)
                & (self.tpot_s * 1000.0 <= tpot_ms)
            )

    def outcome(self, good: np.ndarray, duration_s: float) -> dict[str, Any]:
        """The result fields a benchmark row and a load run over HTTP share, in that order."""
        finished = self.finished
        multi_token = finished & (self.output_tokens > 1)
        return {
            "good": int(good.sum()),
            "goodput_rps": float(good.sum() / duration_s),
            "slo_attainment": float(good.sum() / len(good)) if len(good) else 0.0,
            "ttft_p50_ms": percentile_ms(self.ttft_s[finished], 50),
            "ttft_p99_ms": percentile_ms(self.ttft_s[finished], 99),
            "tpot_p50_ms": percentile_ms(self.tpot_s[multi_token], 50),
            "tpot_p99_ms": percentile_ms(self.tpot_s[multi_token], 99),
            "output_tok_s": float(self.output_tokens[finished].sum() / duration_s),
            "shed": int(self.shed.sum()),
        }


def count_good(requests: Sequence[SimRequest], ttft_ms: float, tpot_ms: float) -> int:
    """Good requests among `requests` (cheap; used to score hindsight candidates)."""
    ttft_s, tpot_s = ttft_ms / 1000.0, tpot_ms / 1000.0
    good = 0
    for r in requests:
        if r.finish_s is not None and r.first_token_s is not None:
            tpot = r.tpot_s
            if r.first_token_s - r.arrival_s <= ttft_s and tpot is not None and tpot <= tpot_s:
                good += 1
    return good


def summarize(sim: Simulation, controller: str, wall_s: float) -> dict[str, Any]:
    """The contract's result fields plus the timeline."""
    slo = sim.scenario.slo
    table = RequestTable.of(sim.requests)
    good = table.good(slo.ttft_ms, slo.tpot_ms)
    return {
        "controller": controller,
        **table.outcome(good, sim.duration_s),
        "preemptions": int(sum(replica.preemptions for replica in sim.replicas)),
        "config_changes": sim.config_changes,
        "wall_s": round(wall_s, 3),
        "finished": int(table.finished.sum()),
        "makespan_s": round(sim.now, 3),
        "timeline": timeline(sim, table, good),
    }


def timeline(sim: Simulation, table: RequestTable, good: np.ndarray) -> list[dict[str, Any]]:
    interval = sim.scenario.control_interval_s
    count = max(1, math.ceil(sim.duration_s / interval - 1e-9))
    slot = np.minimum((table.arrival_s // interval).astype(np.int64), count - 1)
    finished = table.finished
    multi = finished & (table.output_tokens > 1)
    entries = []
    for k in range(count):
        start = k * interval
        mine = slot == k
        entries.append(
            {
                "t_s": start,
                "arrived": int(mine.sum()),
                "good": int(good[mine].sum()),
                "goodput_rps": float(good[mine].sum() / interval),
                "ttft_p99_ms": percentile_ms(table.ttft_s[mine & finished], 99),
                "tpot_p99_ms": percentile_ms(table.tpot_s[mine & multi], 99),
                "shed": int(table.shed[mine].sum()),
                "knobs": {
                    name: knobs.to_mapping()
                    for name, knobs in _knobs_at(sim.knob_log, start).items()
                },
            }
        )
    return entries


def _knobs_at(log: Sequence[tuple[float, str, Knobs]], t: float) -> dict[str, Knobs]:
    state: dict[str, Knobs] = {}
    for when, name, knobs in log:
        if when > t:
            break
        state[name] = knobs
    return state


def percentile_ms(values: np.ndarray, q: float) -> float | None:
    if len(values) == 0:
        return None
    return round(float(np.percentile(values, q)) * 1000.0, 3)


def run_online(
    scenario: Scenario, workload: Workload, controller: Controller, progress: Progress | None = None
) -> Simulation:
    sim = Simulation(scenario, workload, controller)
    chunk = scenario.control_interval_s * 10
    reported = 0.0
    while sim.now < sim.duration_s:
        sim.run_until(min(sim.now + chunk, sim.duration_s))
        if progress is not None:
            done = sim.now / sim.duration_s
            progress(done - reported)
            reported = done
    sim.run_to_completion()
    return sim


def check_supported(scenario: Scenario, names: Sequence[str]) -> None:
    """Build each online controller for `scenario`; raises the ControllerError of one that cannot run it."""
    context = controller_context(scenario)
    for name in names:
        if not is_hindsight(name):
            build_controller(name, context)


def run_controller(
    scenario: Scenario,
    workload: Workload,
    name: str,
    *,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    if is_hindsight(name):
        sim = hindsight_runner(name)(scenario, workload, executor=executor, progress=progress)
    else:
        controller = build_controller(name, controller_context(scenario))
        sim = run_online(scenario, workload, controller, progress)
    return summarize(sim, name, time.perf_counter() - started)


def run_benchmark(
    scenarios: Sequence[Scenario],
    controllers: Sequence[str],
    *,
    executor: Executor | None = None,
    on_progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """The contract's JSON document for every scenario x controller."""
    documents = []
    for scenario in scenarios:
        workload = build_workload(scenario)
        results = []
        for name in controllers:
            progress = (
                None
                if on_progress is None
                else functools.partial(on_progress, f"{scenario.name} / {name}")
            )
            results.append(
                run_controller(scenario, workload, name, executor=executor, progress=progress)
            )
        document = {
            **scenario_header(scenario, len(workload)),
            "upper_bound": upper_bound(scenario, workload),
            "results": results,
        }
        warnings = bound_violations(results)
        if warnings:
            document["warnings"] = warnings
        documents.append(document)
    return {"scenarios": documents}


def beats_bound(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The results with more good requests than `oracle-full`'s (none without it)."""
    bound = _bound_result(results)
    return [] if bound is None else [r for r in results if r["good"] > bound["good"]]


def bound_violations(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per controller with more good requests than `oracle-full` (a search too weak)."""
    beaten = beats_bound(results)
    if not beaten:
        return []
    bound_good = _bound_result(results)["good"]  # type: ignore[index]
    return [
        f"{r['controller']} ({r['good']} good) beats {BOUND} ({bound_good}): "
        "its search is too weak to bound this scenario"
        for r in beaten
    ]


def _bound_result(results: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((r for r in results if r["controller"] == BOUND), None)


def scenario_header(scenario: Scenario, arrived: int) -> dict[str, Any]:
    """The fields of a scenario's entry in the benchmark document, before its results."""
    return {
        "name": scenario.name,
        "duration_s": scenario.duration_s,
        "arrived": arrived,
        "seed": scenario.seed,
        # More than one phase makes a shift scenario (the report's targets differ).
        "phases": len(scenario.workload),
        "slo": {"ttft_ms": scenario.slo.ttft_ms, "tpot_ms": scenario.slo.tpot_ms},
        "control_interval_s": scenario.control_interval_s,
    }


def result_rows(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten a benchmark document to one row per scenario x controller (for tables)."""
    rows = []
    for scenario in document["scenarios"]:
        for result in scenario["results"]:
            rows.append({"scenario": scenario["name"], **result})
    return rows
