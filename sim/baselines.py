"""The four reference baselines of the benchmark contract, and strict priority for SLO classes.

- ``static-default``: what an engine runs with when nobody tunes it: vLLM's
  default ``max_num_seqs`` of 256 as the batch cap (never above the scenario's
  ceiling), the engine's configured prefill budget, FCFS, no queue deadline.
  The cap is applied by the gate; an FCFS gate in front of an FCFS engine
  admits in the same order as the engine's own waiting queue would.
- ``static-best``: the one fixed grid setting with the most good requests over
  the whole scenario (a careful load test with hindsight).
- ``aimd``: Clipper-style additive-increase / multiplicative-decrease of the
  batch cap, per replica, from the snapshots alone.
- ``oracle``: for each window of ``control_interval_s x 10``, the grid setting
  that is best with hindsight, switched for free at the window start.

SLO classes (scenarios with ``classes``):

- ``static-default`` stays FCFS in one class (knobs without classes): what
  a server without classes does.
- ``strict-priority``: static-default's knobs plus the scenario's classes
  (priority, weight, class cap) with aging at its maximum, so a higher class
  always goes first (a lower one waits behind it up to an hour's aging).
- ``static-best`` on a class scenario sweeps the grid's batch caps x a queue
  deadline per class in {none, the class's own TTFT SLO} (every
  combination), with the scenario's classes at aging off, and picks by
  (attainment of the top-priority classes capped at `TOP_CLASS_TARGET`,
  then good requests): the best static per-class setting that keeps the
  top class at its target where any can, and otherwise the one that comes
  closest. Capping the attainment keeps a setting that buys the last 0.01%
  of it by starving every other class from winning.
- Every good count here judges a request against its own class's SLO.

``oracle-full`` (sim/oracle_full.py), the benchmark's yardstick, searches the
adaptive controller's whole action space every control interval instead.

The grid (`knob_grid`): batch cap in {16, 32, 64, 128, 256, max_num_seqs}
(values above the ceiling dropped) plus max_num_seqs / 2, / 4 and / 8,
each without and with a queue deadline equal to the TTFT SLO (a request that has waited that long can no longer be
good, so shedding it only frees capacity), and, only when the engine is
``runtime_tunable``, the prefill budget in {2048, 8192, 16384} plus the
configured value. FCFS throughout; aging is irrelevant to FCFS.

Hindsight searches run their candidates on an `Executor` when given one
(processes: the simulator is pure Python); candidates are scored
independently and the winner is chosen by (score, then grid order), so the
result is identical to a serial run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

from batchpilot.contract.knobs import MAX_AGING_MS, Knobs, ServiceClass
from batchpilot.controller.bench_adapter import ControllerContext
from batchpilot.controller.spec import ClassSpec
from batchpilot.sim.bench import Progress, Simulation, count_good_by_class, scenario_good
from batchpilot.sim.controllers import Snapshot
from batchpilot.sim.metrics import histogram_buckets, histogram_quantile
from batchpilot.sim.scenario import Scenario
from batchpilot.sim.workload import Workload

# vLLM's default --max-num-seqs.
VLLM_DEFAULT_MAX_NUM_SEQS = 256
GRID_BATCH_CAPS = (16, 32, 64, 128, 256)
GRID_CEILING_HALVINGS = 3
GRID_PREFILL_BUDGETS = (2048, 8192, 16384)
# Oracle windows are this many control intervals long (the contract's x 10).
ORACLE_WINDOW_INTERVALS = 10
# An oracle candidate is followed at most one more window past its own, so a
# setting that leaves a backlog pays for it without simulating to the end.
ORACLE_TAIL_WINDOWS = 1

# Clipper (NSDI'17) grows the batch by a fixed step while the latency
# objective holds and backs off by 10% when it is missed.
AIMD_START_CAP = 64
# Per engine kind: (TTFT histogram, queue wait to subtract from it or None,
# per-token latency histogram whose mean is compared with the TPOT SLO).
AIMD_SIGNALS: Mapping[str, tuple[str, str | None, str]] = {
    "vllm": ("vllm:time_to_first_token_seconds", None, "vllm:inter_token_latency_seconds"),
    "llamacpp": (
        "batchpilot_gate_time_to_first_token_seconds",
        "batchpilot_gate_queue_wait_seconds",
        "batchpilot_gate_time_per_output_token_seconds",
    ),
}
AIMD_INCREASE = 16
AIMD_DECREASE = 0.9

# static-best on class scenarios: the top-priority classes' attainment counts
# up to this (the interactive target); past it, good requests decide.
TOP_CLASS_TARGET = 0.99


class FixedController:
    """Applies one setting at t = 0 and never changes it."""

    def __init__(self, context: ControllerContext, knobs: Knobs) -> None:
        self._names = context.replica_names
        self._knobs = knobs
        self._started = False

    def decide(self, now_s: float, snapshots: Mapping[str, Snapshot]) -> Mapping[str, Knobs]:
        if self._started:
            return {}
        self._started = True
        return {name: self._knobs for name in self._names}


def make_static_default(context: ControllerContext) -> FixedController:
    return FixedController(context, static_default_knobs(context))


def static_default_knobs(context: ControllerContext) -> Knobs:
    return Knobs(max_concurrency=min(VLLM_DEFAULT_MAX_NUM_SEQS, context.max_num_seqs))


def make_strict_priority(context: ControllerContext) -> FixedController:
    """static-default plus the scenario's classes, aging off: a higher class always goes first."""
    knobs = static_default_knobs(context).with_changes(
        classes=gate_classes(context.classes), aging_ms=MAX_AGING_MS
    )
    return FixedController(context, knobs)


def gate_classes(
    classes: Sequence[ClassSpec], *, equal_weights: bool = False
) -> tuple[ServiceClass, ...]:
    """The gate's classes for spec classes (priority, weight, class cap; no deadline)."""
    return tuple(
        ServiceClass(
            name=c.name,
            priority=c.priority,
            weight=1.0 if equal_weights else c.weight,
            max_concurrency=c.max_concurrency,
        )
        for c in classes
    )


class AimdController:
    """Per replica: +AIMD_INCREASE to the cap while the SLO holds, x AIMD_DECREASE when missed.

    The signal, over the last interval: the engine-side p99 TTFT
    (vllm:time_to_first_token_seconds, gate queueing excluded) against the
    TTFT SLO, and the mean inter-token latency (vllm:inter_token_latency_seconds
    sum / count) against the TPOT SLO. llama.cpp exports no latency
    histograms: there the gate's are read (`AIMD_SIGNALS`), its TTFT with the
    gate queue wait's p99 taken off, to stay engine-side.

    - Engine-side TTFT on purpose: it is Clipper's "latency of processing a
      batch"; a signal that included gate queueing would shrink the cap
      exactly when a backlog builds, and spiral.
    - Mean, not p99, inter-token latency: the TPOT SLO is a per-request mean,
      and the ITL tail is set by the steps that carry a long prefill chunk,
      which no batch cap removes. With p99 ITL the cap collapsed to 1 on
      conv-steady (8% SLO attainment against 94% for static-default).

    An interval without observations holds the cap.
    """

    def __init__(self, context: ControllerContext) -> None:
        self._context = context
        self._caps = {
            name: min(AIMD_START_CAP, context.max_num_seqs) for name in context.replica_names
        }
        self._previous: dict[str, Snapshot] = {}
        self._ttft, self._queue_wait, self._itl = AIMD_SIGNALS[context.engine_kind]

    def decide(self, now_s: float, snapshots: Mapping[str, Snapshot]) -> Mapping[str, Knobs]:
        decisions = {}
        ctx = self._context
        for name, snapshot in snapshots.items():
            previous = self._previous.get(name)
            self._previous[name] = dict(snapshot)
            cap = self._caps[name]
            if previous is not None:
                ttft = histogram_quantile(0.99, histogram_buckets(snapshot, self._ttft, previous))
                if self._queue_wait is not None:
                    ttft -= histogram_quantile(
                        0.99, histogram_buckets(snapshot, self._queue_wait, previous)
                    )
                itl = interval_mean(snapshot, previous, self._itl)
                if ttft * 1000.0 > ctx.slo_ttft_ms or itl * 1000.0 > ctx.slo_tpot_ms:
                    cap = max(1, math.floor(cap * AIMD_DECREASE))
                elif not (math.isnan(ttft) and math.isnan(itl)):
                    cap = min(ctx.max_num_seqs, cap + AIMD_INCREASE)
            self._caps[name] = cap
            decisions[name] = Knobs(max_concurrency=cap)
        return decisions


def make_aimd(context: ControllerContext) -> AimdController:
    return AimdController(context)


def interval_mean(snapshot: Snapshot, previous: Snapshot, histogram: str) -> float:
    """Mean of histogram `histogram` over the observations between two snapshots (NaN if none)."""
    count = snapshot[f"{histogram}_count"] - previous[f"{histogram}_count"]
    if count <= 0:
        return math.nan
    return (snapshot[f"{histogram}_sum"] - previous[f"{histogram}_sum"]) / count


def knob_grid(scenario: Scenario) -> list[Knobs]:
    engine = scenario.engine
    ceiling = engine.max_num_seqs
    # Halvings of the ceiling too, so that a small engine (llama.cpp's 16
    # slots) gets a grid to search and not one setting.
    halvings = {ceiling >> k for k in range(1, GRID_CEILING_HALVINGS + 1)} - {0}
    caps = sorted({c for c in GRID_BATCH_CAPS if c < ceiling} | {ceiling} | halvings)
    deadlines: tuple[int | None, ...] = (None, max(1, round(scenario.slo.ttft_ms)))
    budgets: tuple[int | None, ...] = (None,)
    if engine.runtime_tunable:
        budgets = tuple(sorted({*GRID_PREFILL_BUDGETS, engine.max_num_batched_tokens}))
    return [
        Knobs(max_concurrency=cap, queue_deadline_ms=deadline, max_num_batched_tokens=budget)
        for budget, cap, deadline in itertools.product(budgets, caps, deadlines)
    ]


def run_static_best(
    scenario: Scenario,
    workload: Workload,
    *,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> Simulation:
    grid = class_grid(scenario) if scenario.classes else knob_grid(scenario)
    jobs = [(scenario, workload, knobs) for knobs in grid]
    # Workers return scores, not runs: shipping 12-48 finished runs of ~30k
    # requests back costs more memory than replaying the winner once.
    scores = map_jobs(_score_fixed, jobs, executor, progress)
    return _run_fixed((scenario, workload, grid[_best_index(scores)]))


def run_oracle(
    scenario: Scenario,
    workload: Workload,
    *,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> Simulation:
    """Best grid setting per window, with hindsight, switched for free.

    Attribution: a window's score is the number of good requests among those
    that *arrive* in it. Each candidate is simulated from the real state at
    the window start (carried-over requests included) to the window end, and
    then on, still under the candidate and with later arrivals still coming,
    until its window's requests are done or ORACLE_TAIL_WINDOWS more windows
    have passed. The winner is then replayed for the window itself, and the
    next window starts from that state.
    """
    grid = knob_grid(scenario)
    window = scenario.control_interval_s * ORACLE_WINDOW_INTERVALS
    starts = [k * window for k in range(max(1, math.ceil(scenario.duration_s / window - 1e-9)))]
    sim = Simulation(scenario, workload)
    per_window = None if progress is None else (lambda share: progress(share / len(starts)))
    for start in starts:
        end = min(start + window, scenario.duration_s)
        state = sim.fork()  # without the past requests: cheap to copy and to ship to workers
        jobs = [(state, knobs, start, end, window * ORACLE_TAIL_WINDOWS) for knobs in grid]
        scores = map_jobs(score_window, jobs, executor, per_window)
        sim.apply(start, grid[_best_index(scores)])
        sim.run_until(end)
    sim.run_to_completion()
    return sim


def class_grid(scenario: Scenario) -> list[Knobs]:
    """static-best's sweep on a class scenario: grid caps x a deadline per class in {none, TTFT}."""
    caps = sorted({k.max_concurrency for k in knob_grid(scenario) if k.max_concurrency})
    classes = scenario.traffic_classes
    options = [(None, max(1, round(c.slo.ttft_ms))) for c in classes]
    grid = []
    for cap in caps:
        for deadlines in itertools.product(*options):
            grid.append(
                Knobs(
                    max_concurrency=cap,
                    aging_ms=MAX_AGING_MS,
                    classes=tuple(
                        ServiceClass(
                            name=c.name,
                            priority=c.priority,
                            weight=c.weight,
                            max_concurrency=c.max_concurrency,
                            queue_deadline_ms=deadline,
                        )
                        for c, deadline in zip(classes, deadlines, strict=True)
                    ),
                )
            )
    return grid


def _run_fixed(job: tuple[Scenario, Workload, Knobs]) -> Simulation:
    scenario, workload, knobs = job
    sim = Simulation(scenario, workload, knobs=knobs)
    sim.run_to_completion()
    return sim


def _score_fixed(job: tuple[Scenario, Workload, Knobs]) -> int | tuple[float, int]:
    sim = _run_fixed(job)
    scenario = sim.scenario
    if not scenario.classes:
        return scenario_good(sim.requests, scenario)
    return class_score(sim, scenario)


def class_score(sim: Simulation, scenario: Scenario) -> tuple[float, int]:
    """(top-priority classes' attainment capped at TOP_CLASS_TARGET, good requests)."""
    good = count_good_by_class(sim.requests, scenario)
    top = max(c.priority for c in scenario.traffic_classes)
    names = {c.name for c in scenario.traffic_classes if c.priority == top}
    arrived = sum(1 for r in sim.requests if r.service_class in names)
    top_good = sum(good[name] for name in names)
    attainment = top_good / arrived if arrived else 1.0
    return (min(attainment, TOP_CLASS_TARGET), sum(good.values()))


def score_window(job: tuple[Simulation, Knobs, float, float, float]) -> int:
    """Good requests among those arriving in [start, end) under `knobs`, followed `tail_s` on."""
    base, knobs, start, end, tail_s = job
    trial = base.fork()
    trial.apply(start, knobs)
    trial.run_until(end)
    mine = list(trial.requests)
    give_up = end + tail_s
    interval = trial.scenario.control_interval_s
    while trial.now < give_up and not all(r.done for r in mine):
        trial.run_until(min(trial.now + interval, give_up))
    return scenario_good(mine, trial.scenario)


def map_jobs(
    function: Callable[[Any], Any],
    jobs: Sequence[Any],
    executor: Executor | None,
    progress: Progress | None,
) -> list[Any]:
    results = []
    iterator = map(function, jobs) if executor is None else executor.map(function, jobs)
    for result in iterator:
        results.append(result)
        if progress is not None:
            progress(1.0 / len(jobs))
    return results


def _best_index(scores: Sequence[Any]) -> int:
    best = max(scores)
    return scores.index(best)
