"""`batchpilot recommend`: starting settings for a traffic mix, found offline with the simulator.

Input is a scenario file (../shared/contracts/bench.md) or a bare trace CSV
(``TIMESTAMP,ContextTokens,GeneratedTokens``) plus the engine calibration and
the SLOs as options. For every phase of the workload (a scenario's phases, or
a trace cut into ``--phase-s`` windows) every setting of the benchmark's grid
(sim/baselines.py `knob_grid`: batch cap x queue deadline, and the prefill
budget where the engine takes it live) is simulated on that phase's requests
alone, starting from an idle replica. The recommendation for a phase is the
setting with the most good requests; among settings within
`TIE_TOLERANCE` of the best, the one with the lowest p99 TTFT (the most
headroom when the load rises), then the first in grid order, i.e. the smaller
batch cap: a cap larger than the traffic needs buys nothing and gives away
TPOT and KV-cache headroom.

The single static setting best overall is found the way the benchmark's
static-best baseline finds it: each grid setting over the whole workload, phases
back to back (so one phase's backlog weighs on the next).

A scenario with SLO classes (docs/slo-classes.md) overlaps its classes'
phases, so it gets that overall recommendation only, from the benchmark's
per-class grid (sim/baselines.py `class_grid`: batch cap x a queue deadline
per class), each request judged against its own class's objectives and the
setting chosen as static-best chooses it on classes (`class_score`: the top
classes' attainment up to 99% first, then good requests), with a row per class.

One module, over 400 lines: one offline search read in order (workload ->
phases -> grid -> choice -> table); the simulation it runs lives in sim/.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressDisplay
from rich.table import Table

from batchpilot.cli.app import fail, ms_text
from batchpilot.contract.knobs import Knobs
from batchpilot.sim.baselines import class_grid, class_score, knob_grid
from batchpilot.sim.bench import RequestTable, Simulation, class_outcomes, scenario_good_mask
from batchpilot.sim.scenario import (
    Scenario,
    ScenarioClass,
    ScenarioError,
    ScenarioSlo,
    TracePhase,
    load_scenario,
    parse_scenario,
)
from batchpilot.sim.workload import TraceError, Workload, build_workload, load_trace

# Settings whose good-request count is within 0.5% (and at least one request)
# of the best count as tied: replays of one phase differ by a few requests
# between caps that the traffic never reaches.
TIE_TOLERANCE = 0.005

Progress = Callable[[str], None]


class RecommendError(ValueError):
    """Bad input to `recommend`; the message names the option and the fix."""


@dataclass(frozen=True)
class Outcome:
    """One setting simulated over one stretch of requests."""

    knobs: Knobs
    arrived: int
    good: int
    duration_s: float
    ttft_p99_ms: float | None
    tpot_p99_ms: float | None
    shed: int
    # Per SLO class (a scenario with classes): arrived, good, slo_attainment, ttft_p99_ms, shed.
    classes: Mapping[str, Mapping[str, Any]] | None = None
    # What static-best on classes ranks by (sim/baselines.py `class_score`).
    class_rank: tuple[float, int] | None = None

    @property
    def goodput_rps(self) -> float:
        return self.good / self.duration_s

    @property
    def slo_attainment(self) -> float:
        return self.good / self.arrived if self.arrived else 0.0


@dataclass(frozen=True)
class PhaseRecommendation:
    index: int
    label: str
    start_s: float
    duration_s: float
    arrived: int
    prompt_p50: float
    output_p50: float
    best: Outcome
    # The overall best static setting replayed on this phase alone, for comparison.
    static_best: Outcome
    candidates: tuple[Outcome, ...]


@dataclass(frozen=True)
class Recommendations:
    scenario: str
    slo_ttft_ms: float
    slo_tpot_ms: float
    phases: tuple[PhaseRecommendation, ...]
    overall: Outcome
    overall_candidates: tuple[Outcome, ...]
    # The scenario's SLO classes with traffic (the default class alone without classes).
    classes: tuple[ScenarioClass, ...] = ()


def pick_best(outcomes: Sequence[Outcome]) -> Outcome:
    """Most good requests; among near-ties (TIE_TOLERANCE) the lowest p99 TTFT, then grid order.

    With SLO classes: the best `class_rank` (the first in grid order on a tie).
    """
    ranked = [o for o in outcomes if o.class_rank is not None]
    if ranked:
        return max(reversed(ranked), key=lambda o: o.class_rank or (0.0, 0))
    top = max(outcome.good for outcome in outcomes)
    floor = top - max(1.0, TIE_TOLERANCE * top)
    tied = [(index, o) for index, o in enumerate(outcomes) if o.good >= floor]
    return min(tied, key=lambda pair: (_or_inf(pair[1].ttft_p99_ms), pair[0]))[1]


def recommend_for(scenario: Scenario, *, progress: Progress | None = None) -> Recommendations:
    """Simulate the grid per phase and over the whole workload (CPU: about 1 s per 15k requests)."""
    workload = build_workload(scenario)
    grid = _grid(scenario)
    overall_candidates = tuple(
        _simulate(scenario, workload, knobs, progress, "whole workload") for knobs in grid
    )
    overall = pick_best(overall_candidates)
    phases = []
    start = 0.0
    # A class scenario's classes overlap in time: no phase is the whole traffic.
    for index, phase in enumerate(() if scenario.classes else scenario.workload):
        part = _phase_slice(workload, index, start, phase.duration_s)
        label = f"phase {index + 1}/{len(scenario.workload)}"
        candidates = tuple(_simulate(scenario, part, knobs, progress, label) for knobs in grid)
        static = next(
            c for c, knobs in zip(candidates, grid, strict=True) if knobs == overall.knobs
        )
        phases.append(
            PhaseRecommendation(
                index=index,
                label=describe_phase(phase),
                start_s=start,
                duration_s=phase.duration_s,
                arrived=len(part),
                prompt_p50=float(np.median(part.prompt_tokens)) if len(part) else math.nan,
                output_p50=float(np.median(part.output_tokens)) if len(part) else math.nan,
                best=pick_best(candidates),
                static_best=static,
                candidates=candidates,
            )
        )
        start += phase.duration_s
    return Recommendations(
        scenario=scenario.name,
        slo_ttft_ms=scenario.slo.ttft_ms,
        slo_tpot_ms=scenario.slo.tpot_ms,
        phases=tuple(phases),
        overall=overall,
        overall_candidates=overall_candidates,
        classes=scenario.traffic_classes,
    )


def describe_phase(phase: Any) -> str:
    if isinstance(phase, TracePhase):
        return f"{phase.trace.name} from {phase.start_s:g} s x{phase.rate_scale:g}"
    arrival = phase.arrival
    return (
        f"synthetic {arrival.rate_rps:g} rps ({arrival.process}), "
        f"prompt p50 {phase.prompt_tokens.p50:g}, output p50 {phase.output_tokens.p50:g}"
    )


def scenario_from_trace(
    trace: Path,
    *,
    calibration: Path,
    model: str,
    system: str,
    slo_ttft_ms: float,
    slo_tpot_ms: float,
    rate_scale: float,
    start_s: float,
    duration_s: float | None,
    phase_s: float | None,
    kv_cache_tokens: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    slowdown: float,
    replicas: int,
    seed: int = 0,
) -> Scenario:
    """A scenario replaying `trace`, cut into phases of `phase_s` (all of it when None)."""
    try:
        span_s = load_trace(trace.resolve()).span_s
    except TraceError as err:
        raise RecommendError(f"TRACE: {err}") from err
    if start_s >= span_s:
        raise RecommendError(
            f"--start-s: must be below the trace's span ({span_s:.0f} s), got {start_s:g}"
        )
    total_s = duration_s if duration_s is not None else (span_s - start_s) / rate_scale
    step_s = phase_s if phase_s is not None else total_s
    phases = []
    offset = 0.0
    while offset < total_s - 1e-9:
        length = min(step_s, total_s - offset)
        phases.append(
            {
                "duration_s": length,
                "trace": str(trace.resolve()),
                # start_s is in trace seconds: scenario time x rate_scale.
                "start_s": min(start_s + offset * rate_scale, span_s),
                "rate_scale": rate_scale,
            }
        )
        offset += length
    document = {
        "name": trace.stem,
        "seed": seed,
        "engine": {
            "calibration": str(calibration.resolve()),
            "model": model,
            "system": system,
            "slowdown": slowdown,
            "kv_cache_tokens": kv_cache_tokens,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
        },
        "replicas": replicas,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "workload": phases,
    }
    try:
        return parse_scenario(document, base_dir=Path.cwd())
    except ScenarioError as err:
        raise RecommendError(_as_option(err)) from err


def recommend(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="SOURCE",
            help="A scenario .yaml, or a trace .csv (TIMESTAMP,ContextTokens,GeneratedTokens).",
        ),
    ],
    calibration: Annotated[
        Path | None,
        typer.Option(help="Step-latency CSV (needed with a trace; a scenario names its own)."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="Calibration rows to use (model column).")
    ] = "meta-llama/Meta-Llama-3.1-8B",
    system: Annotated[
        str, typer.Option(help="Calibration rows to use (system column).")
    ] = "h100_sxm",
    ttft_ms: Annotated[
        float | None, typer.Option(help="TTFT SLO in ms (trace default: 2000).")
    ] = None,
    tpot_ms: Annotated[
        float | None, typer.Option(help="TPOT SLO in ms (trace default: 50).")
    ] = None,
    rate_scale: Annotated[
        float, typer.Option(help="Trace only: replay this many times faster.")
    ] = 1.0,
    start_s: Annotated[
        float, typer.Option(min=0.0, help="Trace only: offset into the trace (trace seconds).")
    ] = 0.0,
    duration_s: Annotated[
        float | None,
        typer.Option(help="Trace only: seconds of replay (default: the rest of the trace)."),
    ] = None,
    phase_s: Annotated[
        float | None,
        typer.Option(help="Trace only: cut the replay into phases of this many seconds."),
    ] = None,
    kv_cache_tokens: Annotated[
        int, typer.Option(help="Trace only: KV capacity per replica.")
    ] = 450_000,
    max_num_seqs: Annotated[
        int, typer.Option(help="Trace only: engine startup batch ceiling.")
    ] = 512,
    max_num_batched_tokens: Annotated[
        int, typer.Option(help="Trace only: engine startup prefill budget per step.")
    ] = 8192,
    slowdown: Annotated[float, typer.Option(help="Trace only: multiplies every step cost.")] = 1.0,
    replicas: Annotated[int, typer.Option(help="Trace only: replicas sharing the traffic.")] = 1,
    plot: Annotated[
        Path | None, typer.Option(help="Also write goodput per setting per phase as a PNG.")
    ] = None,
) -> None:
    """Recommend starting batch settings per phase of a workload, and the best single static setting.

    Every grid setting (batch cap x queue deadline) is simulated on each phase;
    the table shows the recommendation per phase with its expected goodput and
    p99 latencies, next to what the best single static setting gets there.

    Examples:

      batchpilot recommend ../shared/scenarios/conv-to-code-shift.yaml

      batchpilot recommend ../shared/data/traces/azure_llm_code_2023.csv --rate-scale 5 \\
          --duration-s 600 --phase-s 300 --ttft-ms 2000 --tpot-ms 50 \\
          --calibration ../shared/data/calibration/llama3.1-8b_vllm_step_latency.csv --plot code.png
    """
    try:
        if source.suffix.lower() in (".yaml", ".yml"):
            try:
                scenario = load_scenario(source)
            except ScenarioError as err:
                raise RecommendError(f"{source}: {err}") from err
            scenario = _with_slo(scenario, ttft_ms, tpot_ms)
        elif source.suffix.lower() == ".csv":
            if calibration is None:
                raise RecommendError(
                    "--calibration: a trace needs the engine's step-latency CSV, e.g. "
                    "--calibration ../shared/data/calibration/llama3.1-8b_vllm_step_latency.csv"
                )
            _check_positive(
                ("--rate-scale", rate_scale), ("--duration-s", duration_s), ("--phase-s", phase_s)
            )
            scenario = scenario_from_trace(
                source,
                calibration=calibration,
                model=model,
                system=system,
                slo_ttft_ms=2000.0 if ttft_ms is None else ttft_ms,
                slo_tpot_ms=50.0 if tpot_ms is None else tpot_ms,
                rate_scale=rate_scale,
                start_s=start_s,
                duration_s=duration_s,
                phase_s=phase_s,
                kv_cache_tokens=kv_cache_tokens,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                slowdown=slowdown,
                replicas=replicas,
            )
        else:
            raise RecommendError(
                f"SOURCE: {source} is neither a scenario (.yaml) nor a trace (.csv)"
            )
    except RecommendError as err:
        fail(str(err))
    result = _run_with_progress(scenario)
    print_recommendations(result)
    if plot is not None:
        plot_recommendations(result, plot)
        typer.echo(f"wrote {plot}")


def print_recommendations(result: Recommendations) -> None:
    table = Table(
        title=f"{result.scenario}: recommended settings per phase "
        f"(SLO: TTFT <= {result.slo_ttft_ms:g} ms, TPOT <= {result.slo_tpot_ms:g} ms)"
    )
    for column in (
        "phase", "traffic", "req", "prompt p50", "output p50", "recommended", "goodput/s",
        "SLO att.", "TTFT p99", "TPOT p99", "static best here",
    ):  # fmt: skip
        table.add_column(
            column, justify="left" if column in ("phase", "traffic", "recommended") else "right"
        )
    for phase in result.phases:
        best = phase.best
        table.add_row(
            f"{phase.index + 1} ({phase.start_s:g}-{phase.start_s + phase.duration_s:g} s)",
            phase.label,
            str(phase.arrived),
            f"{phase.prompt_p50:.0f}",
            f"{phase.output_p50:.0f}",
            knobs_text(best.knobs),
            f"{best.goodput_rps:.2f}",
            f"{best.slo_attainment:.1%}",
            ms_text(best.ttft_p99_ms),
            ms_text(best.tpot_p99_ms),
            f"{phase.static_best.goodput_rps:.2f}/s",
        )
    # A pipe gets 160 columns, not rich's 80: the table has eleven.
    console = Console(width=None if Console().is_terminal else 160)
    if result.phases:
        console.print(table)
    overall = result.overall
    if overall.classes is not None:
        console.print(class_table(result))
    console.print(
        f"best single static setting: [bold]{knobs_text(overall.knobs)}[/bold] -> "
        f"{overall.goodput_rps:.2f} good req/s, SLO attainment {overall.slo_attainment:.1%}, "
        f"TTFT p99 {ms_text(overall.ttft_p99_ms)} ms, TPOT p99 {ms_text(overall.tpot_p99_ms)} ms"
    )


def class_table(result: Recommendations) -> Table:
    """The best single setting's outcome per SLO class, and the deadline it gives each."""
    overall = result.overall
    table = Table(title=f"{result.scenario}: the best single setting, per SLO class")
    for column in ("class", "priority", "SLO TTFT/TPOT ms", "deadline", "req", "goodput/s",
                   "SLO att.", "TTFT p99", "shed"):  # fmt: skip
        table.add_column(column, justify="left" if column == "class" else "right")
    for service_class in result.classes:
        outcome = (overall.classes or {}).get(service_class.name)
        if outcome is None:
            continue
        deadline = overall.knobs.service_class(service_class.name).queue_deadline_ms
        table.add_row(
            service_class.name,
            str(service_class.priority),
            f"{service_class.slo.ttft_ms:g}/{service_class.slo.tpot_ms:g}",
            "none" if deadline is None else f"{deadline} ms",
            str(outcome["arrived"]),
            f"{outcome['good'] / overall.duration_s:.2f}",
            f"{outcome['slo_attainment']:.1%}",
            ms_text(outcome["ttft_p99_ms"]),
            str(outcome["shed"]),
        )
    return table


def plot_recommendations(result: Recommendations, path: Path) -> None:
    # Imported on the first plot, not with the CLI: matplotlib costs every
    # other command (the operator among them) ~0.6 s and a font cache to write.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    caps: set[int] = set()
    for phase in result.phases:
        # Per (cap, deadline), the best over prefill budgets (one value unless runtime_tunable).
        best: dict[tuple[int, int], float] = {}
        for c in phase.candidates:
            key = (c.knobs.max_concurrency or 0, c.knobs.queue_deadline_ms or 0)
            best[key] = max(best.get(key, 0.0), c.goodput_rps)
        for deadline in sorted({deadline for _, deadline in best}):
            points = sorted((cap, goodput) for (cap, d), goodput in best.items() if d == deadline)
            caps.update(cap for cap, _ in points)
            ax.plot(
                *zip(*points, strict=True),
                "-" if deadline == 0 else "--",
                color=f"C{phase.index}",
                marker="o",
                label=f"phase {phase.index + 1}"
                + (f", deadline {deadline} ms" if deadline else ""),
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(caps), [str(cap) for cap in sorted(caps)])
    ax.set_xlabel("batch cap (max concurrent sequences)")
    ax.set_ylabel("goodput (good req/s)")
    ax.set_title(f"{result.scenario}: goodput per setting and phase")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def knobs_text(knobs: Knobs) -> str:
    parts = [f"cap {knobs.max_concurrency if knobs.max_concurrency is not None else 'none'}"]
    if any(c.queue_deadline_ms is not None for c in knobs.classes):
        parts.append("a deadline per class (below)")
    else:
        parts.append(
            f"deadline {knobs.queue_deadline_ms} ms" if knobs.queue_deadline_ms else "no deadline"
        )
    if knobs.max_num_batched_tokens is not None:
        parts.append(f"prefill {knobs.max_num_batched_tokens}")
    return ", ".join(parts)


# -- helpers --------------------------------------------------------------------


def _simulate(
    scenario: Scenario, workload: Workload, knobs: Knobs, progress: Progress | None, label: str
) -> Outcome:
    sim = Simulation(scenario, workload, knobs=knobs)
    sim.run_to_completion()
    table = RequestTable.of(sim.requests, classes=bool(scenario.classes))
    good = scenario_good_mask(table, scenario)
    finished = table.finished
    multi = finished & (table.output_tokens > 1)
    if progress is not None:
        progress(label)
    return Outcome(
        knobs=knobs,
        arrived=len(sim.requests),
        good=int(good.sum()),
        duration_s=workload.duration_s,
        ttft_p99_ms=_p99_ms(table.ttft_s[finished], np),
        tpot_p99_ms=_p99_ms(table.tpot_s[multi], np),
        shed=int(table.shed.sum()),
        classes=(
            class_outcomes(
                table, good, [c.name for c in scenario.traffic_classes], workload.duration_s
            )
            if scenario.classes
            else None
        ),
        class_rank=class_score(sim, scenario) if scenario.classes else None,
    )


def _grid(scenario: Scenario) -> list[Knobs]:
    return class_grid(scenario) if scenario.classes else knob_grid(scenario)


def _phase_slice(workload: Workload, index: int, start_s: float, duration_s: float) -> Workload:
    """The requests of one phase, re-timed to start at 0 (same requests as in the whole run)."""
    mine = workload.phase == index
    return Workload(
        arrival_s=workload.arrival_s[mine] - start_s,
        prompt_tokens=workload.prompt_tokens[mine],
        output_tokens=workload.output_tokens[mine],
        phase=workload.phase[mine] * 0,
        duration_s=duration_s,
    )


def _run_with_progress(scenario: Scenario) -> Recommendations:
    console = Console(stderr=True)
    if not console.is_terminal:
        return recommend_for(scenario)
    phases = 0 if scenario.classes else len(scenario.workload)
    total = len(_grid(scenario)) * (phases + 1)
    with ProgressDisplay(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
        TimeElapsedColumn(), console=console,
    ) as bar:  # fmt: skip
        task = bar.add_task("simulating", total=total)
        return recommend_for(
            scenario, progress=lambda label: bar.update(task, advance=1, description=label)
        )


def _with_slo(scenario: Scenario, ttft_ms: float | None, tpot_ms: float | None) -> Scenario:
    _check_positive(("--ttft-ms", ttft_ms), ("--tpot-ms", tpot_ms))
    if ttft_ms is None and tpot_ms is None:
        return scenario
    slo = ScenarioSlo(
        ttft_ms=scenario.slo.ttft_ms if ttft_ms is None else ttft_ms,
        tpot_ms=scenario.slo.tpot_ms if tpot_ms is None else tpot_ms,
    )
    return replace(scenario, slo=slo)


def _check_positive(*options: tuple[str, float | None]) -> None:
    for name, value in options:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise RecommendError(f"{name}: must be a positive number, got {value:g}")


# Scenario fields built from command-line options -> the option to name in errors.
_OPTION_OF_FIELD = {
    "engine.calibration": "--calibration",
    "engine.model": "--model",
    "engine.system": "--system",
    "engine.slowdown": "--slowdown",
    "engine.kv_cache_tokens": "--kv-cache-tokens",
    "engine.max_num_seqs": "--max-num-seqs",
    "engine.max_num_batched_tokens": "--max-num-batched-tokens",
    "replicas": "--replicas",
    "slo.ttft_ms": "--ttft-ms",
    "slo.tpot_ms": "--tpot-ms",
}


def _as_option(err: Any) -> str:
    field = err.field
    if field in _OPTION_OF_FIELD:
        return f"{_OPTION_OF_FIELD[field]}: {err.message}"
    if field.startswith("workload"):
        return f"TRACE ({field}): {err.message}"
    return str(err)


def _p99_ms(values: Any, np: Any) -> float | None:
    return None if len(values) == 0 else float(np.percentile(values, 99)) * 1000.0


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else round(value)
