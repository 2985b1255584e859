"""`oracle-full`: the best setting per control interval over everything adaptive steers.

The grid `oracle` (sim/baselines.py) picks per window of ten intervals among
a dozen FCFS settings; the adaptive controller also steers the in-flight
token budget, the queue deadline, the discipline and its aging, and (on a
runtime-tunable engine) the prefill budget, every interval, so it beat that
oracle by up to 2x, and an oracle that is beaten bounds nothing. This one
searches the adaptive controller's whole action space (`action_space`) for
every control interval, with hindsight: the setting whose interval arrivals
end up with the most good requests (each candidate simulated from the real
state at the interval start, through the interval, then on under the same
setting with later arrivals still coming until those requests are done or
the grid oracle's window and tail have passed), applied to every replica
and switched for free.

Exhaustive search is out of reach (thousands of settings per interval), so
the search is coordinate descent:

1. Seeds: the grid oracle's candidates and the previous interval's winner
   (a good setting usually stays good).
2. From the best seed, each knob in turn tries every value on its ladder
   with the others held; the best (ties keep the current value) is kept.
3. Rounds repeat until one changes nothing, at most `SEARCH_ROUNDS`.

Every setting is scored once per interval (a cache), the candidates of one
step run in parallel on the executor, and the winner is chosen by (score,
then candidate order), so the result does not depend on the worker count.
`batchpilot bench` warns when any controller beats it (sim/bench.py
`bound_violations`): the search would then be too weak to bound that
scenario, to be strengthened, not accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import cast

from batchpilot.contract.knobs import Knobs
from batchpilot.sim.baselines import (
    GRID_PREFILL_BUDGETS,
    ORACLE_TAIL_WINDOWS,
    ORACLE_WINDOW_INTERVALS,
    knob_grid,
    map_jobs,
    score_window,
)
from batchpilot.sim.bench import Progress, Simulation
from batchpilot.sim.scenario import Scenario
from batchpilot.sim.workload import Workload

SEARCH_ROUNDS = 3
# Queue deadlines as shares of the TTFT SLO: past the SLO a wait can only
# hurt; below half of it, shedding turns away requests that would be good.
DEADLINE_SHARES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# (discipline, aging_ms): aging only matters once a queue is reordered.
ORDERS = (("fcfs", 2_000), ("shortest-prompt-first", 500), ("shortest-prompt-first", 2_000),
          ("shortest-prompt-first", 8_000))  # fmt: skip
# The smallest in-flight token budget tried: below a few prompts' worth it
# only starves the engine.
MIN_TOKEN_BUDGET = 1_024

Setting = tuple[object, ...]


def action_space(scenario: Scenario) -> dict[str, tuple[object, ...]]:
    """Each knob's ladder: powers of two up to the engine's limits, plus the limits."""
    engine = scenario.engine
    slo_ttft_ms = scenario.slo.ttft_ms
    space: dict[str, tuple[object, ...]] = {
        "max_concurrency": _ladder(1, engine.max_num_seqs),
        "max_inflight_tokens": (None, *_ladder(MIN_TOKEN_BUDGET, engine.kv_cache_tokens)),
        "queue_deadline_ms": (None, *(max(1, round(s * slo_ttft_ms)) for s in DEADLINE_SHARES)),
        "order": ORDERS,
    }
    if engine.runtime_tunable:
        space["max_num_batched_tokens"] = tuple(
            sorted({*GRID_PREFILL_BUDGETS, engine.max_num_batched_tokens})
        )
    return space


def run_oracle_full(
    scenario: Scenario,
    workload: Workload,
    *,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> Simulation:
    space = action_space(scenario)
    seeds = [_setting_of(knobs, space) for knobs in knob_grid(scenario)]
    interval = scenario.control_interval_s
    # An interval's requests are followed as long as the grid oracle follows
    # a window's: long enough for a backlog a setting leaves to count.
    tail_s = interval * ORACLE_WINDOW_INTERVALS * ORACLE_TAIL_WINDOWS
    count = max(1, math.ceil(scenario.duration_s / interval - 1e-9))
    starts = [k * interval for k in range(count)]
    sim = Simulation(scenario, workload)
    previous: Setting | None = None
    for start in starts:
        end = min(start + interval, scenario.duration_s)
        state = sim.fork()
        search = _IntervalSearch(state, space, start, end, tail_s, executor)
        best = search.run([*seeds, *([previous] if previous is not None else [])])
        sim.apply(start, _knobs_of(best, space))
        sim.run_until(end)
        previous = best
        if progress is not None:
            progress(1.0 / len(starts))
    sim.run_to_completion()
    return sim


class _IntervalSearch:
    """Coordinate descent over one interval's settings, each scored at most once."""

    def __init__(
        self,
        state: Simulation,
        space: dict[str, tuple[object, ...]],
        start: float,
        end: float,
        tail_s: float,
        executor: Executor | None,
    ) -> None:
        self._state = state
        self._space = space
        self._span = (start, end, tail_s)
        self._executor = executor
        self._scores: dict[Setting, int] = {}

    def run(self, seeds: Sequence[Setting]) -> Setting:
        best = self._best(seeds)
        for _ in range(SEARCH_ROUNDS):
            before = best
            for axis, values in enumerate(self._space.values()):
                candidates = [(*best[:axis], value, *best[axis + 1 :]) for value in values]
                # The current setting first: a tie never moves the search.
                best = self._best([best, *candidates])
            if best == before:
                break
        return best

    def _best(self, candidates: Sequence[Setting]) -> Setting:
        unique = list(dict.fromkeys(candidates))
        fresh = [c for c in unique if c not in self._scores]
        start, end, tail_s = self._span
        jobs = [(self._state, _knobs_of(c, self._space), start, end, tail_s) for c in fresh]
        scores = map_jobs(score_window, jobs, self._executor, None)
        self._scores.update(zip(fresh, scores, strict=True))
        return max(unique, key=lambda c: (self._scores[c], -unique.index(c)))


def _ladder(low: int, high: int) -> tuple[int, ...]:
    values = []
    value = low
    while value < high:
        values.append(value)
        value *= 2
    return (*values, high)


def _setting_of(knobs: Knobs, space: dict[str, tuple[object, ...]]) -> Setting:
    values: dict[str, object] = {
        "max_concurrency": knobs.max_concurrency,
        "max_inflight_tokens": knobs.max_inflight_tokens,
        "queue_deadline_ms": knobs.queue_deadline_ms,
        "order": (knobs.discipline, knobs.aging_ms),
        "max_num_batched_tokens": knobs.max_num_batched_tokens,
    }
    return tuple(values[name] for name in space)


def _knobs_of(setting: Setting, space: dict[str, tuple[object, ...]]) -> Knobs:
    values = dict(zip(space, setting, strict=True))
    discipline, aging_ms = cast(tuple[str, int], values.pop("order"))
    return Knobs(discipline=discipline, aging_ms=aging_ms, **values)  # type: ignore[arg-type]
