"""What `batchpilot demo` shows and writes: the live view, the headless log, the summary, the plot.

All numbers are in scenario time (see cli/demo.py): latencies and goodput
come from the load generator's client-side records, already converted; a
queue deadline read from a gate (wall milliseconds) is multiplied by the
time scale before it is shown.

One module, over 400 lines: the live view, the headless log and the summary
render the same per-window records, and one module keeps their formats in
step.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from batchpilot.cli.app import ms_text
from batchpilot.cli.demo import (
    FLEETS,
    PLOT_FILE,
    RECENT_WINDOWS,
    SUMMARY_FILE,
    TERMINAL_FILE,
    DemoPlan,
    DemoState,
    FleetState,
    records_between,
    window_of,
)
from batchpilot.cli.recommend import describe_phase
from batchpilot.contract.knobs import Knobs
from batchpilot.controller.explain import reason_text
from batchpilot.sim.load import RequestRecord
from batchpilot.sim.load import summarize as summarize_records

FLEET_STYLE = {"adaptive": "green", "static": "yellow"}
PLOT_COLORS = {"adaptive": "tab:green", "static": "tab:orange"}


def knobs_text(knobs: Knobs | None, time_scale: float) -> str:
    """`cap 64, deadline 450 ms, fcfs` with the deadline in scenario milliseconds."""
    if knobs is None:
        return "-"
    cap = "none" if knobs.max_concurrency is None else str(knobs.max_concurrency)
    parts = [f"cap {cap}"]
    if knobs.queue_deadline_ms is not None:
        parts.append(f"deadline {knobs.queue_deadline_ms * time_scale:.0f} ms")
    if knobs.max_inflight_tokens is not None:
        parts.append(f"tokens {knobs.max_inflight_tokens}")
    parts.append(knobs.discipline)
    return ", ".join(parts)


def record_stats(
    records: Sequence[RequestRecord], duration_s: float, plan: DemoPlan
) -> dict[str, Any]:
    """The load generator's summary (the benchmark's definitions) over `records`,
    each request judged against its SLO class's objectives."""
    scenario = plan.scenario
    class_slos = {c.name: c.slo for c in scenario.classes} if scenario.classes else None
    return summarize_records(records, max(duration_s, 1e-9), scenario.slo, class_slos)


def phase_index(plan: DemoPlan, t_s: float) -> int:
    return max(i for i, start in enumerate(plan.phase_starts_s) if start <= t_s)


def intro(plan: DemoPlan) -> Any:
    scenario = plan.scenario
    lines = [
        f"scenario [bold]{scenario.name}[/bold], {len(scenario.replica_names)} replica(s) per fleet, "
        f"SLO: TTFT <= {scenario.slo.ttft_ms:g} ms, TPOT <= {scenario.slo.tpot_ms:g} ms",
        f"time scale {plan.time_scale:g}: {plan.duration_wall_s:.4g} wall s = {scenario.duration_s:.4g} scenario s; "
        f"control every {plan.interval_s:.3g} scenario s ({plan.interval_wall_s:.3g} wall s); all numbers in scenario time",
    ]
    for index, (start, phase) in enumerate(zip(plan.phase_starts_s, plan.phases, strict=True)):
        lines.append(f"  phase {index + 1} from {start:.1f} s: {describe_phase(phase)}")
    for service_class in scenario.classes:
        lines.append(
            f"  class {service_class.name} (priority {service_class.priority}): TTFT <= "
            f"{service_class.slo.ttft_ms:g} ms, TPOT <= {service_class.slo.tpot_ms:g} ms; "
            + "; ".join(describe_phase(phase) for phase in service_class.workload)
        )
    return Panel(
        "\n".join(lines), title="batchpilot demo: adaptive vs static batching", expand=False
    )


def render(state: DemoState) -> Any:
    """The live view: progress, one row per replica of each fleet, the last decision."""
    plan = state.plan
    now = min(state.now_s, plan.scenario.duration_s)
    phase = phase_index(plan, now)
    header = Text.assemble(
        ("done" if state.finished else "running", "bold"),
        f"  t = {now:5.1f} / {plan.scenario.duration_s:.4g} scenario s, phase {phase + 1}/{len(plan.phase_starts_s)}",
    )
    progress = Table.grid(padding=(0, 2))
    progress.add_row(
        header,
        ProgressBar(
            total=plan.duration_wall_s,
            completed=min(state.now_wall_s, plan.duration_wall_s),
            width=40,
        ),
    )
    table = Table(
        caption=f"latency and goodput: requests of the last {RECENT_WINDOWS} completed control windows",
        expand=False,
    )
    for column in (
        "fleet", "replica", "settings (gate)", "queue", "running",
        "TTFT p99 ms", "TPOT p99 ms", "goodput/s", "SLO att.",
    ):  # fmt: skip
        table.add_column(
            column, justify="left" if column in ("fleet", "replica", "settings (gate)") else "right"
        )
    for name in FLEETS:
        fleet = state.fleets[name]
        recent = _recent_records(fleet)
        span = RECENT_WINDOWS * plan.interval_s
        by_replica = fleet.replica_of_url
        for replica in fleet.replicas:
            mine = [r for r in recent if by_replica.get(r.url) == replica.name]
            stats = record_stats(mine, span, plan) if mine else None
            pod = (
                fleet.observation.pods.get(replica.name) if fleet.observation is not None else None
            )
            table.add_row(
                f"[{FLEET_STYLE[name]}]{name}[/]",
                replica.name,
                knobs_text(pod.applied if pod else None, plan.time_scale),
                _number(pod.gate_queue if pod else None),
                _number(pod.running if pod else None),
                ms_text(stats["ttft_p99_ms"] if stats else None),
                ms_text(stats["tpot_p99_ms"] if stats else None),
                f"{stats['goodput_rps']:.2f}" if stats else "-",
                f"{stats['slo_attainment']:.0%}" if stats else "-",
            )
    parts: list[Any] = [progress, table]
    if state.decisions:
        decision = state.decisions[-1]
        parts.append(
            Text.assemble(
                ("last decision ", "bold"),
                f"(t = {decision.time_s * plan.time_scale:.1f} s): target {knobs_text(decision.target, plan.time_scale)}",
            )
        )
        for reason in decision.reasons[:4]:
            parts.append(Text(f"  - {reason_text(reason)}", overflow="ellipsis", no_wrap=True))
        parts.append(
            Text(
                "  (the controller runs on the wall clock: its own numbers are wall time)",
                style="dim",
            )
        )
    else:
        parts.append(Text("waiting for the first control interval...", style="dim"))
    return Group(*parts)


class HeadlessLog:
    """--headless: one line per control interval instead of the live view."""

    def __init__(self, console: Any) -> None:
        self._console = console
        self._decisions = 0

    def __call__(self, state: DemoState) -> None:
        if len(state.decisions) == self._decisions and not state.finished:
            return
        self._decisions = len(state.decisions)
        plan = state.plan
        parts = [
            f"t={min(state.now_s, plan.scenario.duration_s):6.1f}s phase {phase_index(plan, min(state.now_s, plan.scenario.duration_s)) + 1}"
        ]
        for name in FLEETS:
            fleet = state.fleets[name]
            recent = _recent_records(fleet)
            stats = record_stats(recent, RECENT_WINDOWS * plan.interval_s, plan) if recent else None
            applied = _fleet_setting(fleet, plan.time_scale)
            attainment = f"{stats['slo_attainment']:.0%}" if stats else "-"
            goodput = f"{stats['goodput_rps']:.1f}/s" if stats else "-"
            by_class = ""
            if stats and "classes" in stats:
                # Escaped: the console reads "[...]" as markup and would drop it.
                by_class = escape(
                    " ["
                    + ", ".join(
                        f"{c} {o['slo_attainment']:.0%}" for c, o in stats["classes"].items()
                    )
                    + "]"
                )
            parts.append(f"{name}: {applied} good {goodput} ({attainment}){by_class}")
        if state.finished:
            parts.append("load finished")
        self._console.print(" | ".join(parts), highlight=False)


# -- summary and files ---------------------------------------------------------------


def summarize(state: DemoState) -> dict[str, Any]:
    """The JSON summary: goodput before/after the shift per fleet, per phase, per window."""
    plan = state.plan
    scenario = plan.scenario
    end = scenario.duration_s
    shift = plan.shift_s
    fleets: dict[str, Any] = {}
    for name in FLEETS:
        fleet = state.fleets[name]
        records = fleet.records()
        phases = []
        for index, start in enumerate(plan.phase_starts_s):
            stop = plan.phase_starts_s[index + 1] if index + 1 < len(plan.phase_starts_s) else end
            phases.append(
                _brief(record_stats(records_between(records, start, stop), stop - start, plan))
            )
        overall = record_stats(records, end, plan)
        fleets[name] = {
            "overall": _brief(overall),
            "before_shift": _brief(record_stats(records_between(records, 0.0, shift), shift, plan)),
            "after_shift": _brief(
                record_stats(records_between(records, shift, end), end - shift, plan)
            ),
            "phases": phases,
            "scrape_failures": fleet.scrape_failures,
        }
        if "classes" in overall:
            fleets[name]["classes"] = overall["classes"]
    return {
        "scenario": scenario.name,
        "replicas": len(scenario.replica_names),
        "time_scale": plan.time_scale,
        "duration_wall_s": plan.duration_wall_s,
        "wall_s": round(state.now_wall_s, 1),
        "scenario_duration_s": end,
        "control_interval_s": plan.interval_s,
        "shift_s": shift,
        "slo": {"ttft_ms": scenario.slo.ttft_ms, "tpot_ms": scenario.slo.tpot_ms},
        "phases": [
            {"start_s": start, "duration_s": phase.duration_s, "traffic": describe_phase(phase)}
            for start, phase in zip(plan.phase_starts_s, plan.phases, strict=True)
        ],
        "fleets": fleets,
        "decisions": [
            {
                "t_s": round(decision.time_s * plan.time_scale, 3),
                "target": knobs_text(decision.target, plan.time_scale),
                "reasons": [reason_text(reason) for reason in decision.reasons],
            }
            for decision in state.decisions
        ],
        "actuation_errors": state.actuation_errors,
        "timeline": timeline(state),
    }


def timeline(state: DemoState) -> list[dict[str, Any]]:
    """Per control window (by arrival): each fleet's goodput, p99s and mean batch cap."""
    plan = state.plan
    per_fleet = {name: _by_window(state.fleets[name], plan) for name in FLEETS}
    entries = []
    for index in range(plan.windows):
        start = index * plan.interval_s
        entry: dict[str, Any] = {"t_s": round(start, 3)}
        for name in FLEETS:
            stats = record_stats(per_fleet[name].get(index, []), plan.interval_s, plan)
            entry[name] = {
                "arrived": stats["arrived"],
                "good": stats["good"],
                "goodput_rps": round(stats["goodput_rps"], 3),
                "ttft_p99_ms": stats["ttft_p99_ms"],
                "tpot_p99_ms": stats["tpot_p99_ms"],
                "batch_cap": _mean_cap(state.fleets[name], start + plan.interval_s),
            }
        entries.append(entry)
    return entries


def write_outputs(
    state: DemoState, summary: Mapping[str, Any], out: Path, console: Any
) -> list[Path]:
    table = summary_table(summary)
    console.print(table)
    per_class = class_table(summary)
    if per_class is not None:
        console.print(per_class)
    plot_path = out / PLOT_FILE
    plot_demo(summary, plot_path)
    summary_path = out / SUMMARY_FILE
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    # The capture is what the terminal showed at the end: the intro, the
    # final live view and the summary table (a live view's redraws are not
    # worth keeping).
    capture = Console(record=True, width=150, file=io.StringIO())
    capture.print(intro(state.plan))
    capture.print(render(state))
    capture.print(table)
    if per_class is not None:
        capture.print(per_class)
    terminal_path = out / TERMINAL_FILE
    capture.save_text(str(terminal_path))
    return [plot_path, summary_path, terminal_path]


def summary_table(summary: Mapping[str, Any]) -> Any:
    table = Table(
        title=f"{summary['scenario']}: goodput before and after the shift at {summary['shift_s']:.1f} s"
    )
    for column in (
        "fleet", "before: goodput/s", "SLO att.", "after: goodput/s", "SLO att.",
        "TTFT p99 ms", "TPOT p99 ms", "shed", "errors",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "fleet" else "right")
    for name in FLEETS:
        fleet = summary["fleets"][name]
        before, after, overall = fleet["before_shift"], fleet["after_shift"], fleet["overall"]
        table.add_row(
            f"[{FLEET_STYLE[name]}]{name}[/]",
            f"{before['goodput_rps']:.2f}",
            f"{before['slo_attainment']:.1%}",
            f"{after['goodput_rps']:.2f}",
            f"{after['slo_attainment']:.1%}",
            ms_text(overall["ttft_p99_ms"]),
            ms_text(overall["tpot_p99_ms"]),
            str(overall["shed"]),
            str(overall["errors"]),
        )
    return table


def class_table(summary: Mapping[str, Any]) -> Any:
    """Per SLO class and fleet, over the whole run; None for a scenario without classes."""
    if "classes" not in summary["fleets"][FLEETS[0]]:
        return None
    table = Table(title=f"{summary['scenario']}: each SLO class against its own objectives")
    for column in ("fleet", "class", "arrived", "goodput/s", "SLO att.", "TTFT p99 ms", "shed"):
        table.add_column(column, justify="left" if column in ("fleet", "class") else "right")
    for name in FLEETS:
        for service_class, outcome in summary["fleets"][name]["classes"].items():
            table.add_row(
                f"[{FLEET_STYLE[name]}]{name}[/]",
                service_class,
                str(outcome["arrived"]),
                f"{outcome['goodput_rps']:.2f}",
                f"{outcome['slo_attainment']:.1%}",
                ms_text(outcome["ttft_p99_ms"]),
                str(outcome["shed"]),
            )
    return table


def plot_demo(summary: Mapping[str, Any], path: Path) -> None:
    # Imported on the first plot, not with the CLI: matplotlib costs every
    # other command (the operator among them) ~0.6 s and a font cache to write.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    entries = summary["timeline"]
    times = [entry["t_s"] for entry in entries]
    slo = summary["slo"]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    cap_ax, ttft_ax, tpot_ax, goodput_ax = axes
    for name in FLEETS:
        color = PLOT_COLORS[name]
        series = [entry[name] for entry in entries]
        cap_ax.step(
            times, [_nan(s["batch_cap"]) for s in series], where="post", color=color, label=name
        )
        ttft_ax.step(
            times, [_nan(s["ttft_p99_ms"]) for s in series], where="post", color=color, label=name
        )
        tpot_ax.step(
            times, [_nan(s["tpot_p99_ms"]) for s in series], where="post", color=color, label=name
        )
        goodput_ax.step(
            times, [s["goodput_rps"] for s in series], where="post", color=color, label=name
        )
    ttft_ax.axhline(slo["ttft_ms"], color="red", linestyle=":", label="SLO")
    tpot_ax.axhline(slo["tpot_ms"], color="red", linestyle=":", label="SLO")
    for ax in (ttft_ax, tpot_ax):
        ax.set_yscale("log")
    cap_ax.set_ylabel("batch cap")
    ttft_ax.set_ylabel("TTFT p99 (ms)")
    tpot_ax.set_ylabel("TPOT p99 (ms)")
    goodput_ax.set_ylabel("goodput (good req/s)")
    goodput_ax.set_xlabel("scenario time (s), by request arrival")
    for ax in axes:
        for phase in summary["phases"][1:]:
            ax.axvline(phase["start_s"], color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    cap_ax.legend(fontsize=8, loc="upper right")
    ttft_ax.legend(fontsize=8, loc="upper left")
    adaptive, static = summary["fleets"]["adaptive"], summary["fleets"]["static"]
    fig.suptitle(
        f"{summary['scenario']}: after the shift adaptive {adaptive['after_shift']['goodput_rps']:.1f} vs "
        f"static {static['after_shift']['goodput_rps']:.1f} good req/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- helpers -------------------------------------------------------------------------


def _recent_records(fleet: FleetState) -> list[RequestRecord]:
    done = sorted(fleet.windows)[-RECENT_WINDOWS:]
    return [record for index in done for record in fleet.windows[index]]


def _by_window(fleet: FleetState, plan: DemoPlan) -> dict[int, list[RequestRecord]]:
    grouped: dict[int, list[RequestRecord]] = {}
    for record in fleet.records():
        grouped.setdefault(window_of(record.arrival_s, plan.interval_s, plan.windows), []).append(
            record
        )
    return grouped


def _mean_cap(fleet: FleetState, until_s: float) -> float | None:
    """Mean over replicas of the batch cap each gate reported last before `until_s`."""
    latest: dict[str, Knobs] = {}
    for t, replica, knobs in fleet.applied_log:
        if t <= until_s:
            latest[replica] = knobs
    caps = [knobs.max_concurrency for knobs in latest.values()]
    capped = [cap for cap in caps if cap is not None]
    if not caps or len(capped) < len(caps):
        return None
    return sum(capped) / len(capped)


def _fleet_setting(fleet: FleetState, time_scale: float) -> str:
    if fleet.observation is None or not fleet.observation.pods:
        return "-"
    settings = {knobs_text(pod.applied, time_scale) for pod in fleet.observation.pods.values()}
    return " / ".join(sorted(settings))


def _brief(stats: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "arrived",
        "ok",
        "good",
        "goodput_rps",
        "slo_attainment",
        "ttft_p99_ms",
        "tpot_p99_ms",
        "shed",
        "errors",
    )
    return {key: stats[key] for key in keys}


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
