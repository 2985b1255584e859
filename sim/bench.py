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

SLO classes (a scenario with `classes`, docs/benchmark.md "Classes"): each
request is submitted in its class and judged against its own class's SLO;
the row's contract fields cover every request, and `classes` gives them per
class (arrived, good, goodput_rps, slo_attainment, ttft_p99_ms, tpot_p99_ms,
shed, served_tokens: prompt + output tokens of the finished requests), with
`jain_index`, Jain's fairness index between classes of equal priority
(`jain_index`). `oracle-full` is not run on class scenarios: its search does
not cover the class knobs, so it would bound nothing there (the scenario's
`skipped` says so).
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

from batchpilot.contract.knobs import DEFAULT_CLASS, Knobs
from batchpilot.controller.bench_adapter import ControllerContext
from batchpilot.controller.spec import ClassSpec, Slo
from batchpilot.sim.bound import upper_bound
from batchpilot.sim.controllers import (
    BOUND,
    Controller,
    build_controller,
    hindsight_runner,
    is_hindsight,
)
from batchpilot.sim.engine import Replica, SimRequest
from batchpilot.sim.scenario import Scenario, ScenarioClass, ScenarioSlo
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
        classes=tuple(class_spec(c, scenario) for c in scenario.classes),
    )


def class_spec(service_class: ScenarioClass, scenario: Scenario) -> ClassSpec:
    """A scenario class as a policy's spec.classes declares it (its own slo only when tighter)."""
    slo = service_class.slo
    own = None
    if slo != scenario.slo:
        own = Slo(max(1, round(slo.ttft_ms)), max(1, round(slo.tpot_ms)))
    return ClassSpec(
        name=service_class.name,
        slo=own,
        priority=service_class.priority,
        weight=service_class.weight,
        max_concurrency=service_class.max_concurrency,
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
        names = workload.class_names
        self._class: list[str] | None = (
            [names[i] for i in workload.class_of().tolist()] if scenario.classes else None
        )
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
                replica.submit(
                    next_arrival,
                    self._prompt[index],
                    self._output[index],
                    service_class=DEFAULT_CLASS if self._class is None else self._class[index],
                )
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
    # The class each request names (None: all in the default class).
    service_class: np.ndarray | None = None
    prompt_tokens: np.ndarray | None = None

    @classmethod
    def of(cls, requests: Sequence[SimRequest], *, classes: bool = False) -> RequestTable:
        nan = math.nan
        return cls(
            arrival_s=np.array([r.arrival_s for r in requests]),
            ttft_s=np.array([nan if r.ttft_s is None else r.ttft_s for r in requests]),
            tpot_s=np.array([nan if r.tpot_s is None else r.tpot_s for r in requests]),
            output_tokens=np.array([r.output_tokens for r in requests]),
            finished=np.array([r.status == "finished" for r in requests], dtype=bool),
            shed=np.array([r.status == "shed" for r in requests], dtype=bool),
            service_class=(
                np.array([r.service_class for r in requests], dtype=object) if classes else None
            ),
            prompt_tokens=np.array([r.prompt_tokens for r in requests]) if classes else None,
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


def count_good_by_class(requests: Sequence[SimRequest], scenario: Scenario) -> dict[str, int]:
    """Good requests per class, each judged against its own class's SLO."""
    good: dict[str, int] = {}
    for service_class in scenario.traffic_classes:
        mine = [r for r in requests if r.service_class == service_class.name]
        slo = service_class.slo
        good[service_class.name] = count_good(mine, slo.ttft_ms, slo.tpot_ms)
    return good


def scenario_good(requests: Sequence[SimRequest], scenario: Scenario) -> int:
    """Good requests, each against its class's SLO (the scenario's slo without classes)."""
    if not scenario.classes:
        return count_good(requests, scenario.slo.ttft_ms, scenario.slo.tpot_ms)
    return sum(count_good_by_class(requests, scenario).values())


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
    scenario = sim.scenario
    table = RequestTable.of(sim.requests, classes=bool(scenario.classes))
    good = scenario_good_mask(table, scenario)
    result = {
        "controller": controller,
        **table.outcome(good, sim.duration_s),
        "preemptions": int(sum(replica.preemptions for replica in sim.replicas)),
        "config_changes": sim.config_changes,
        "wall_s": round(wall_s, 3),
        "finished": int(table.finished.sum()),
        "makespan_s": round(sim.now, 3),
    }
    if scenario.classes:
        result["classes"] = class_outcomes(
            table, good, [c.name for c in scenario.traffic_classes], sim.duration_s
        )
        result["jain_index"] = jain_index(table, scenario)
    result["timeline"] = timeline(sim, table, good)
    return result


def scenario_good_mask(table: RequestTable, scenario: Scenario) -> np.ndarray:
    """Per request: good against its own class's SLO."""
    return class_good_mask(table, scenario.slo, {c.name: c.slo for c in scenario.classes})


def class_good_mask(
    table: RequestTable, slo: ScenarioSlo, class_slos: Mapping[str, ScenarioSlo]
) -> np.ndarray:
    """Per request: good against its class's objectives in `class_slos`, else against `slo`
    (the default class's)."""
    good = table.good(slo.ttft_ms, slo.tpot_ms)
    if table.service_class is None:
        return good
    for name, own in class_slos.items():
        good = np.where(table.service_class == name, table.good(own.ttft_ms, own.tpot_ms), good)
    return good


def class_outcomes(
    table: RequestTable, good: np.ndarray, names: Sequence[str], duration_s: float
) -> dict[str, dict[str, Any]]:
    """The per-class fields of a class scenario's result, for classes `names` in that order
    (the benchmark's and the load generator's alike)."""
    assert table.service_class is not None and table.prompt_tokens is not None
    served = (table.prompt_tokens + table.output_tokens) * table.finished
    outcomes = {}
    for name in names:
        mine = table.service_class == name
        arrived = int(mine.sum())
        good_count = int(good[mine].sum())
        finished = mine & table.finished
        outcomes[name] = {
            "arrived": arrived,
            "good": good_count,
            "goodput_rps": good_count / duration_s,
            "slo_attainment": good_count / arrived if arrived else 0.0,
            "ttft_p99_ms": percentile_ms(table.ttft_s[finished], 99),
            "tpot_p99_ms": percentile_ms(table.tpot_s[finished & (table.output_tokens > 1)], 99),
            "shed": int(table.shed[mine].sum()),
            "served_tokens": int(served[mine].sum()),
        }
    return outcomes


def jain_index(table: RequestTable, scenario: Scenario) -> float | None:
    """Jain's fairness index between classes of equal priority; None where no two share one.

    Per priority band with two or more classes that had traffic, over its
    contention period [t0, t1], from the latest of their first arrivals to
    the earliest of their last arrivals (every class of the band sending).
    Tokens are prompt + output tokens, what the gate's token counter charges.

    - served a_c: tokens of class c's requests whose first token came in
      [t0, t1] (their prompt was served then: queueing in the engine counts
      as much as at the gate);
    - demand d_c: tokens of class c's requests that arrived by t1 and had
      no first token before t0 (waiting at t0 or arriving in the period);
    - fair share f_c: the weighted max-min fair split of sum(a) over the
      demands (water-filling: a class that asks for less than its
      weight's share gets what it asks, the rest is split by weight);
    - x_c = a_c / f_c, J = (sum x)^2 / (n sum x^2) (Jain, Chiu and Hawe's
      index of throughputs normalised by their fair allocation).

    J is 1 when every class got its fair share, down to 1/n when one got
    everything. The result is the lowest band's J.
    """
    assert table.service_class is not None and table.prompt_tokens is not None
    bands: dict[int, list[ScenarioClass]] = {}
    for service_class in scenario.traffic_classes:
        bands.setdefault(service_class.priority, []).append(service_class)
    tokens = table.prompt_tokens + table.output_tokens
    worst: float | None = None
    for members in bands.values():
        masks = [table.service_class == c.name for c in members]
        active = [(c, m) for c, m in zip(members, masks, strict=True) if m.any()]
        if len(active) < 2:
            continue
        start = max(float(table.arrival_s[m].min()) for _, m in active)
        end = min(float(table.arrival_s[m].max()) for _, m in active)
        first_token = table.arrival_s + table.ttft_s
        with np.errstate(invalid="ignore"):
            served_now = (first_token >= start) & (first_token <= end)
            waiting = (table.arrival_s <= end) & ~(first_token < start)
        served = [float(tokens[m & served_now].sum()) for _, m in active]
        demand = [float(tokens[m & waiting].sum()) for _, m in active]
        fair = fair_shares(sum(served), demand, [c.weight for c, _ in active])
        shares = np.array([a / f for a, f in zip(served, fair, strict=True) if f > 0], dtype=float)
        if len(shares) < 2:
            continue
        total = float((shares**2).sum())
        index = 1.0 if total == 0 else float(shares.sum() ** 2 / (len(shares) * total))
        worst = index if worst is None else min(worst, index)
    return None if worst is None else round(worst, 4)


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
        skipped = {}
        for name in controllers:
            progress = (
                None
                if on_progress is None
                else functools.partial(on_progress, f"{scenario.name} / {name}")
            )
            reason = not_run_reason(scenario, name)
            if reason is not None:
                skipped[name] = reason
                if progress is not None:
                    progress(1.0)
                continue
            results.append(
                run_controller(scenario, workload, name, executor=executor, progress=progress)
            )
        document = {
            **scenario_header(scenario, len(workload)),
            "upper_bound": upper_bound(scenario, workload),
            "results": results,
        }
        if skipped:
            document["skipped"] = skipped
        warnings = bound_violations(results)
        if warnings:
            document["warnings"] = warnings
        documents.append(document)
    return {"scenarios": documents}


def fair_shares(capacity: float, demands: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted max-min fair split of `capacity` over `demands` (water-filling)."""
    shares = [0.0] * len(demands)
    left = capacity
    pending = sorted(range(len(demands)), key=lambda i: demands[i] / weights[i])
    while pending:
        weight = sum(weights[i] for i in pending)
        first = pending[0]
        if demands[first] <= left * weights[first] / weight:
            shares[first] = demands[first]
            left -= demands[first]
            pending.pop(0)
            continue
        for i in pending:
            shares[i] = left * weights[i] / weight
        break
    return shares


def not_run_reason(scenario: Scenario, name: str) -> str | None:
    """Why `name` is left out on `scenario` (None: it runs)."""
    if name == BOUND and scenario.classes:
        return (
            f"{BOUND} searches one class's knobs (cap, budget, deadline, order), not the class "
            "priorities, weights and per-class deadlines, so on a class scenario it is no upper "
            "bound (strict-priority can beat it); static-best's per-class sweep is the yardstick"
        )
    return None


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
    header: dict[str, Any] = {
        "name": scenario.name,
        "duration_s": scenario.duration_s,
        "arrived": arrived,
        "seed": scenario.seed,
        # More than one phase makes a shift scenario (the report's targets differ);
        # with classes, the most phases of one class.
        "phases": max(len(c.workload) for c in scenario.traffic_classes),
        "slo": {"ttft_ms": scenario.slo.ttft_ms, "tpot_ms": scenario.slo.tpot_ms},
        "control_interval_s": scenario.control_interval_s,
    }
    if scenario.classes:
        header["classes"] = [
            {
                "name": c.name,
                "priority": c.priority,
                "weight": c.weight,
                "slo": {"ttft_ms": c.slo.ttft_ms, "tpot_ms": c.slo.tpot_ms},
                "max_concurrency": c.max_concurrency,
            }
            for c in scenario.traffic_classes
        ]
    return header


def result_rows(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten a benchmark document to one row per scenario x controller (for tables)."""
    rows = []
    for scenario in document["scenarios"]:
        for result in scenario["results"]:
            rows.append({"scenario": scenario["name"], **result})
    return rows
