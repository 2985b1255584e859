"""`batchpilot report BENCH.json --out DIR`: the benchmark document as plots and Markdown.

From the JSON that `batchpilot bench --json` writes (../shared/contracts/bench.md
plus the harness's per-interval `timeline` and optional summary fields):

- ``bench-goodput.png``: goodput per controller, grouped by scenario (bars);
- ``bench-timeline-<scenario>.png``: for one scenario, goodput per control
  interval and the batch cap in effect, one line per controller;
- ``benchmark.md``: the tables (per scenario, and a summary that checks the
  project's targets), the goodput plot and what each controller is
  (`render_markdown`).

`write_report` is the function other commands call; the command only maps
bad input to a one-line error and exit code 2.

One module, over 400 lines: the plots and the Markdown render the same checked
rows of one document; apart, they would pass those rows and checks between
modules.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from batchpilot.cli.app import fail
from batchpilot.sim.bench import beats_bound
from batchpilot.sim.controllers import BOUND, is_hindsight

GOODPUT_PLOT = "bench-goodput.png"
MARKDOWN = "benchmark.md"

# Controllers that decide without hindsight: adaptive must beat the best of them.
BASELINES = (
    "static-default",
    "aimd",
    "gradient2",
    "vegas",
    "envoy-gradient",
    "epp-flow-control",
    "vllm-queue-caps",
)
ADAPTIVE = "adaptive"
HINDSIGHT = ("static-best", "oracle", BOUND)
# Plots and tables list controllers in this order (baselines, the project's
# controller, then the hindsight references) so reports compare at a glance;
# a controller not named here follows in order of first appearance.
CONTROLLER_ORDER = (*BASELINES, ADAPTIVE, *HINDSIGHT)

# The project's targets (summary table).
BOUND_TARGET = 0.90  # adaptive / oracle-full
SHIFT_TARGET = 1.10  # adaptive / best baseline, scenarios with more than one phase
STEADY_TARGET = 0.98  # adaptive / best baseline, single-phase scenarios
SLO_BAR = 0.99  # a baseline this good sets the bar for adaptive's SLO attainment

EXPLANATION = """\
## Controllers

- `static-default`: engine defaults, no gate limits: max_num_seqs 256, engine prefill budget \
as configured, FCFS, no deadline.
- `aimd`: additive-increase / multiplicative-decrease of the batch cap on the SLO signal \
(Clipper-style peer baseline).
- `gradient2`: Netflix concurrency-limits' Gradient2 at its defaults on the gate's batch cap, \
fed by the per-token latency, updated per request every simulated second; over the limit a \
request waits at the gate up to the TTFT objective (a BlockingLimiter with that timeout).
- `vegas`: Netflix concurrency-limits' Vegas at its defaults, fed and placed like gradient2.
- `envoy-gradient`: Envoy's adaptive concurrency filter at its defaults (minRTT measured every \
60 s at concurrency 3 over 50 requests, gradient on the end-to-end latency's p50, 503 over the \
limit).
- `epp-flow-control`: llm-d endpoint-picker flow control at its defaults: the saturation \
detector (engine queue >= 5 or KV cache >= 0.8) holds requests at the gateway, FCFS; its \
request TTL defaults to none. In front of vLLM at its default 256 sequences.
- `vllm-queue-caps`: vLLM's static overload control: the prompt tokens queued in the engine \
capped at TTFT objective x prefill throughput, 503 on overflow; vLLM at its default 256 \
sequences, no gate.
- `adaptive`: the project's controller, seeing only what the Prometheus path would show it.
- `strict-priority`: static-default plus the scenario's SLO classes, strict priority between \
them (class scenarios only; see Classes).
- `static-best` (hindsight): the single setting that maximises goodput over the whole \
scenario, found by grid search with hindsight (what a careful load test would pick).
- `oracle` (hindsight): per window of `control_interval_s` x 10, the best *grid* setting \
(FCFS, a few caps, one deadline) with hindsight: a coarse reference, not the limit.
- `oracle-full` (hindsight): per control interval, the best setting with hindsight over the \
whole action space adaptive steers (cap, token budget, deadline, discipline/aging, prefill \
chunk where tunable), switched for free: the limit for a knob-steering controller, so no \
other controller should have more good requests.

"Best baseline" is the non-hindsight baseline (static-default, aimd, gradient2, vegas, \
envoy-gradient, epp-flow-control, vllm-queue-caps) with the most good requests in a scenario.

## Classes

Our extension of the benchmark contract (../shared/contracts/bench.md) for SLO classes (issue #20); a scenario without `classes` is read and run exactly as before. A scenario may declare an optional top-level `classes` list; each class has a `name` (1-32 lower-case letters, digits and dashes, unique, not `default`), a `priority` (default 0; higher is served first), a `weight` (default 1; the share among classes of equal priority, counted in tokens), an optional `slo: {ttft_ms, tpot_ms}` (each no looser than the top-level `slo`; a key left out keeps the top-level value), an optional `max_concurrency` (the class's requests in flight per replica) and its own `workload`: a list of phases in the usual format, played back to back from t = 0 beside the other classes'. With classes the top-level `workload` is optional: it is the traffic of the implicit `default` class (priority 0, weight 1, the top-level `slo`). Unknown keys are errors with their field path, e.g. `classes[0].slo.ttft_ms: must be <= the top-level slo.ttft_ms (2000), ...`.

```yaml
slo: {ttft_ms: 20000, tpot_ms: 100}   # the default class's, and the loosest
classes:
  - name: interactive
    priority: 1
    slo: {ttft_ms: 800, tpot_ms: 60}
    workload:
      - duration_s: 300
        synthetic: {arrival: {process: poisson, rate_rps: 4}, prompt_tokens: {...}, output_tokens: {...}}
  - name: batch
    max_concurrency: 96
    workload: [...]
```

The classes' requests merge in time order (ties: the default class, then the declared order); a declared class's synthetic phase i draws from a generator seeded by (seed, i, CRC-32 of the class name), the default class's by (seed, i) as without classes, so editing, adding or removing one class never changes another's requests. Each request is sent in its class (the gate's class header) and is good when it meets its own class's SLO; the scenario's duration is its longest class's. Each result row keeps the contract's fields over all requests and adds `classes: {name: {arrived, good, goodput_rps, slo_attainment, ttft_p99_ms, tpot_p99_ms, shed, served_tokens}}` (served tokens: prompt + output tokens of the class's finished requests) and `jain_index`.

`jain_index` is Jain's fairness index between the classes of equal priority, over the contention period of each priority band with two or more classes that had traffic: from the latest of their first arrivals to the earliest of their last arrivals. With tokens = prompt + output tokens (what the gate's token counter charges): a class's *served* tokens are those of its requests whose first token came in the period; its *demand* those of its requests that arrived by the period's end and had no first token before its start; the *fair shares* split the total served over the demands weighted max-min (water-filling: a class asking less than its weight's share gets what it asks, the rest is split by weight); x = served / fair share per class, J = (sum x)^2 / (n sum x^2): 1 when every class got its fair share, 1/n when one got everything. The row reports the lowest band's J, or null when no band has two classes with traffic.

Controllers on class scenarios: `static-default`, `aimd` and the request-path limiters set no classes (one FCFS queue: every request is served in the default class); `strict-priority` is static-default's knobs plus the scenario's classes (priority, weight, class cap) with aging at its maximum (a higher class always goes first); `epp-flow-control` gets llm-d's priority bands from the class priorities, fairness inside a band and FCFS within a flow (the gate's classes with equal weights, aging off); the adaptive controller gets the classes as `spec.classes`. `static-best` sweeps the grid's batch caps x a queue deadline per class in {none, the class's TTFT SLO} (every combination), the scenario's classes with aging off, and picks the setting with the highest attainment of the top-priority classes counted up to 0.99, then the most good requests: the best static per-class setting, and the yardstick for a lower class's goodput. `oracle` searches its one-class FCFS grid as before (each request judged by its class's SLO). `oracle-full` is not run on class scenarios (the document's `skipped` says so): its search covers one class's knobs, not the class priorities, weights and per-class deadlines, so there it would bound nothing (strict-priority can beat it). The analytic upper bound holds every request to the top-level, loosest SLO and uses the whole run's capacity only, so it stays a bound.

## How the upper bound is derived

The upper bound is a per-phase, per-replica work bound from the calibrated step-cost model \
under the scenario's SLOs. Each good request needs its prefill work, and its decode tokens at \
a step cadence that keeps its TPOT within the SLO; in every phase the decode busy time and the \
prefill busy time must each fit into the phase window plus the SLO tail (a first prefill into \
the window plus the TTFT objective alone). KV capacity, queueing and how a prefill chunk \
stretches the decodes beside it are ignored, so the bound is loose: on this suite it is at or \
near the arrivals wherever a scenario's average load fits the engine, and what no controller \
reaches there is lost to bursts, not to capacity. Read the ratio oracle-full / upper bound as \
how loose it is, not as a shortfall of any controller. The exact derivation is in the \
docstring of `batchpilot.sim.bound`.
"""


class ReportError(ValueError):
    """The benchmark document cannot be plotted; the message names the field."""


def load_document(path: Path) -> dict[str, Any]:
    """Read and check a benchmark JSON document (only the fields the report uses)."""
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except OSError as err:
        raise ReportError(f"cannot read {path} ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not JSON (line {err.lineno}: {err.msg})") from err
    check_document(document)
    return document


def check_document(document: Any) -> None:
    scenarios = document.get("scenarios") if isinstance(document, Mapping) else None
    if not isinstance(scenarios, list) or not scenarios:
        raise ReportError(
            "scenarios: the document needs a non-empty `scenarios` list (write one with "
            "`batchpilot bench SCENARIO.yaml --json OUT.json`)"
        )
    _check_optional(document, "command", str, "", "must be a string")
    _check_optional(document, "wall_s", int | float, "", "must be a number of seconds")
    for i, scenario in enumerate(scenarios):
        where = f"scenarios[{i}]"
        if not isinstance(scenario, Mapping) or not isinstance(scenario.get("name"), str):
            raise ReportError(f"{where}.name: every scenario needs a name")
        results = scenario.get("results")
        if not isinstance(results, list) or not results:
            raise ReportError(f"{where}.results: needs at least one controller result")
        for j, result in enumerate(results):
            if not isinstance(result, Mapping) or not isinstance(result.get("controller"), str):
                raise ReportError(f"{where}.results[{j}].controller: missing")
            for field in ("goodput_rps", "good", "slo_attainment"):
                if not isinstance(result.get(field), int | float):
                    raise ReportError(f"{where}.results[{j}].{field}: must be a number")
        _check_optional(scenario, "phases", int | list, f"{where}.", "must be a phase count")
        _check_optional(scenario, "classes", list, f"{where}.", "must be a list of classes")
        _check_optional(
            scenario, "skipped", Mapping, f"{where}.", "must map controllers to reasons"
        )
        for j, result in enumerate(results):
            _check_optional(
                result, "classes", Mapping, f"{where}.results[{j}].", "must map classes to results"
            )
        warnings = scenario.get("warnings")
        if warnings is not None and not (
            isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)
        ):
            raise ReportError(f"{where}.warnings: must be a list of strings")
        bound = scenario.get("upper_bound")
        if bound is None:
            continue
        if not isinstance(bound, Mapping):
            raise ReportError(f"{where}.upper_bound: must be an object")
        for field in ("good", "capacity_good", "arrived"):
            if not isinstance(bound.get(field), int | float):
                raise ReportError(f"{where}.upper_bound.{field}: must be a number")


def _check_optional(
    container: Mapping[str, Any], key: str, kind: Any, where: str, requirement: str
) -> None:
    """An optional field may be absent, but when present it must be usable."""
    value = container.get(key)
    if value is not None and not isinstance(value, kind):
        raise ReportError(f"{where}{key}: {requirement}")


def write_report(
    document: Mapping[str, Any], out_dir: Path, *, scenario: str | None = None
) -> list[Path]:
    """Write the goodput bars, one scenario's timeline and the Markdown; return the files."""
    check_document(document)
    scenarios = document["scenarios"]
    chosen = _pick_scenario(scenarios, scenario)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / GOODPUT_PLOT]
    plot_goodput_bars(scenarios, written[0])
    if any(result.get("timeline") for result in chosen["results"]):
        timeline_path = out_dir / f"bench-timeline-{_slug(chosen['name'])}.png"
        plot_timeline(chosen, timeline_path)
        written.append(timeline_path)
    markdown_path = out_dir / MARKDOWN
    markdown_path.write_text(render_markdown(document))
    written.append(markdown_path)
    return written


def plot_goodput_bars(scenarios: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Bars of goodput per controller, grouped by scenario; SLO attainment is in the tables.

    Sized for the full suite (about 11 controllers x 9 scenarios): a fixed width
    per bar, the legend outside the axes, a distinct colour per controller
    position (tab20's ten hues first, then their light shades), black for the
    project's own controller so it stands out, and hatching on the hindsight
    references, which are yardsticks rather than competitors.
    """
    plt = _pyplot()
    controllers = _controllers_in_order(scenarios)
    width = 0.8 / len(controllers)
    tab20 = plt.get_cmap("tab20").colors
    colours = tab20[0::2] + tab20[1::2]
    fig, ax = plt.subplots(figsize=(max(7.0, 2.0 + 0.22 * len(scenarios) * len(controllers)), 5))
    for k, controller in enumerate(controllers):
        present = [
            (i, r) for i, s in enumerate(scenarios) if (r := _result(s, controller)) is not None
        ]
        ax.bar(
            [i - 0.4 + width * (k + 0.5) for i, _ in present],
            [r["goodput_rps"] for _, r in present],
            width,
            label=controller,
            color="black" if controller == ADAPTIVE else colours[k % len(colours)],
            hatch="//" if is_hindsight(controller) else None,
            edgecolor="white",
            linewidth=0.3,
        )
    ax.set_xticks(range(len(scenarios)), [s["name"] for s in scenarios], rotation=15, ha="right")
    ax.set_ylabel("goodput (good requests / s)")
    ax.set_title("goodput per controller (hatched: hindsight references)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_timeline(scenario: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (goodput_ax, cap_ax) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for result in scenario["results"]:
        entries = result.get("timeline") or []
        if not entries:
            continue
        minutes = [entry["t_s"] / 60.0 for entry in entries]
        goodput_ax.step(
            minutes,
            [entry["goodput_rps"] for entry in entries],
            where="post",
            label=result["controller"],
        )
        cap_ax.step(
            minutes,
            [_mean_cap(entry.get("knobs") or {}) for entry in entries],
            where="post",
            label=result["controller"],
        )
    goodput_ax.set_ylabel("goodput (req/s)")
    goodput_ax.set_title(f"{scenario['name']}: goodput and batch cap per control interval")
    goodput_ax.legend(fontsize=8)
    goodput_ax.grid(alpha=0.3)
    cap_ax.set_ylabel("batch cap (mean over replicas)")
    cap_ax.set_xlabel("scenario time (min)")
    cap_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_markdown(document: Mapping[str, Any]) -> str:
    """The benchmark as Markdown: header, summary against the targets, plot, per-scenario tables.

    `document` must pass `check_document`.
    """
    scenarios = document["scenarios"]
    controllers = _controllers_in_order(scenarios)
    parts = [
        _header(document),
        _summary(scenarios),
        f"![goodput per controller]({GOODPUT_PLOT})\n",
        *(_scenario_section(scenario, controllers) for scenario in scenarios),
        EXPLANATION,
    ]
    return "\n".join(parts)


def best_baseline(scenario: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The non-hindsight baseline with the most good requests (first in order on a tie)."""
    baselines = [r for name in BASELINES if (r := _result(scenario, name)) is not None]
    return max(baselines, key=lambda r: r["good"], default=None)


def _header(document: Mapping[str, Any]) -> str:
    lines = [
        "# Benchmark: adaptive batching against the baselines",
        "",
        "Every scenario replayed against every controller on the simulator's calibrated "
        "step-cost model (`batchpilot bench`, format in ../shared/contracts/bench.md). A request "
        "is good when it completes within both its TTFT and its TPOT SLO; goodput is good "
        "requests per second of workload.",
        "",
    ]
    command = document.get("command")
    if command is None:
        lines.append(
            "This file is generated; the document does not record the exact command, but "
            "`batchpilot bench SCENARIO.yaml ... --json OUT.json --report DIR` writes it."
        )
    else:
        lines += ["This file is generated; regenerate it with:", "", "```sh", command, "```"]
    wall_s = document.get("wall_s")
    if wall_s is not None:
        lines += ["", f"The benchmark ran for {wall_s / 60:.1f} min (wall time)."]
    return "\n".join(lines) + "\n"


def _summary(scenarios: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "## Summary",
        "",
        f"Targets: adaptive >= {BOUND_TARGET:.2f} x {BOUND}; adaptive >= {SHIFT_TARGET:.2f} x "
        f"the best non-hindsight baseline on shift scenarios (more than one workload phase), "
        f">= {STEADY_TARGET:.2f} x on steady ones; adaptive's SLO attainment >= that "
        f'baseline\'s wherever the baseline reaches {SLO_BAR:.0%}. "bound holds": no '
        f"controller has more good requests than {BOUND}.",
        "",
        _row(
            "scenario",
            "kind",
            f"adaptive / {BOUND}",
            f">= {BOUND_TARGET:.2f}",
            "best baseline",
            "adaptive / baseline",
            f">= {SHIFT_TARGET:.2f} shift, {STEADY_TARGET:.2f} steady",
            "SLO att. adaptive vs baseline",
            "SLO >= baseline",
            "bound holds",
        ),
        _row(*["---"] * 10),
    ]
    lines += [_summary_row(scenario) for scenario in scenarios]
    return "\n".join(lines) + "\n"


def _summary_row(scenario: Mapping[str, Any]) -> str:
    kind = _kind(scenario)
    adaptive = _result(scenario, ADAPTIVE)
    bound = _result(scenario, BOUND)
    baseline = best_baseline(scenario)
    to_bound = _ratio(adaptive, bound)
    to_baseline = _ratio(adaptive, baseline)
    baseline_target = {"shift": SHIFT_TARGET, "steady": STEADY_TARGET}.get(kind)
    if to_baseline is None:
        baseline_met = "-"
    elif baseline_target is None:
        baseline_met = "?"
    else:
        baseline_met = _met(to_baseline >= baseline_target)
    if adaptive is None or baseline is None:
        slo_vs, slo_met = "-", "-"
    else:
        slo_vs = f"{adaptive['slo_attainment']:.2%} vs {baseline['slo_attainment']:.2%}"
        slo_met = (
            _met(adaptive["slo_attainment"] >= baseline["slo_attainment"])
            if baseline["slo_attainment"] >= SLO_BAR
            else "n/a"
        )
    beaten = _beats_bound(scenario)
    return _row(
        scenario["name"],
        kind,
        _fmt_ratio(to_bound),
        "-" if to_bound is None else _met(to_bound >= BOUND_TARGET),
        "-" if baseline is None else baseline["controller"],
        _fmt_ratio(to_baseline),
        baseline_met,
        slo_vs,
        slo_met,
        "-" if bound is None else "yes" if not beaten else "NO: " + ", ".join(beaten),
    )


def _scenario_section(scenario: Mapping[str, Any], controllers: Sequence[str]) -> str:
    bound = _result(scenario, BOUND)
    baseline = best_baseline(scenario)
    beaten = _beats_bound(scenario)
    lines = [f"## {scenario['name']}", "", _scenario_facts(scenario), ""]
    lines += [
        _row(
            "controller",
            "good",
            "goodput/s",
            "SLO att. (%)",
            "TTFT p99 (ms)",
            "TPOT p99 (ms)",
            "shed",
            "config changes",
            f"/ {BOUND}",
            "/ best baseline",
        ),
        _row("---", *["---:"] * 9),
    ]
    for name in controllers:
        result = _result(scenario, name)
        if result is None:
            continue
        to_bound = _fmt_ratio(_ratio(result, bound))
        lines.append(
            _row(
                f"**{name}**" if result is baseline else name,
                str(result["good"]),
                f"{result['goodput_rps']:.2f}",
                f"{result['slo_attainment'] * 100:.2f}",
                _fmt_number(result.get("ttft_p99_ms"), ".0f"),
                _fmt_number(result.get("tpot_p99_ms"), ".1f"),
                _fmt_number(result.get("shed"), "d"),
                _fmt_number(result.get("config_changes"), "d"),
                f"**{to_bound} beats its bound**" if name in beaten else to_bound,
                _fmt_ratio(_ratio(result, baseline)),
            )
        )
    notes = ["Bold: the best non-hindsight baseline."] if baseline is not None else []
    upper = scenario.get("upper_bound")
    if upper is not None:
        notes += [
            f"upper bound: {upper['good']} good (capacity {upper['capacity_good']}, "
            f"arrived {upper['arrived']})",
        ]
        if bound is not None:
            notes.append(f"{BOUND} / upper bound: {_fmt_ratio(_ratio(bound, upper))}")
    notes += [f"warning: {warning}" for warning in scenario.get("warnings", ())]
    skipped = scenario.get("skipped")
    if isinstance(skipped, Mapping):
        notes += [f"not run: {name}: {reason}" for name, reason in skipped.items()]
    lines += ["", *(f"- {note}" for note in notes)]
    classes = _class_section(scenario, controllers)
    if classes:
        lines += ["", classes]
    return "\n".join(lines) + "\n"


def _class_section(scenario: Mapping[str, Any], controllers: Sequence[str]) -> str:
    """Per SLO class, each controller's attainment, goodput and latency (class scenarios only)."""
    declared = scenario.get("classes")
    if not isinstance(declared, list) or not declared:
        return ""
    lines = [
        "Per SLO class (each request judged against its class's SLO; Jain's index: fairness "
        "of served tokens between classes of equal priority, docs/benchmark.md):",
        "",
        _row(
            "controller",
            "class",
            "priority",
            "SLO (TTFT/TPOT ms)",
            "arrived",
            "good",
            "goodput/s",
            "SLO att. (%)",
            "TTFT p99 (ms)",
            "TPOT p99 (ms)",
            "shed",
            "served tokens",
            "Jain",
        ),
        _row("---", "---", *["---:"] * 11),
    ]
    for name in controllers:
        result = _result(scenario, name)
        if result is None or not isinstance(result.get("classes"), Mapping):
            continue
        jain = _fmt_number(result.get("jain_index"), ".3f")
        for info in declared:
            outcome = result["classes"].get(info.get("name"))
            if not isinstance(outcome, Mapping):
                continue
            slo = info.get("slo") or {}
            lines.append(
                _row(
                    name,
                    str(info.get("name")),
                    str(info.get("priority")),
                    f"{_fmt_number(slo.get('ttft_ms'), '.0f')}/{_fmt_number(slo.get('tpot_ms'), '.0f')}",
                    str(outcome["arrived"]),
                    str(outcome["good"]),
                    f"{outcome['goodput_rps']:.2f}",
                    f"{outcome['slo_attainment'] * 100:.2f}",
                    _fmt_number(outcome.get("ttft_p99_ms"), ".0f"),
                    _fmt_number(outcome.get("tpot_p99_ms"), ".1f"),
                    _fmt_number(outcome.get("shed"), "d"),
                    _fmt_number(outcome.get("served_tokens"), "d"),
                    jain,
                )
            )
    return "\n".join(lines)


def _scenario_facts(scenario: Mapping[str, Any]) -> str:
    facts = [f"kind: {_kind(scenario)}"]
    if "duration_s" in scenario:
        facts.append(f"{scenario['duration_s']} s of workload")
    if "arrived" in scenario:
        facts.append(f"{scenario['arrived']} requests arrived")
    slo = scenario.get("slo")
    if isinstance(slo, Mapping):
        facts.append(f"SLO: TTFT {slo.get('ttft_ms')} ms, TPOT {slo.get('tpot_ms')} ms")
    return "; ".join(facts) + "."


def _kind(scenario: Mapping[str, Any]) -> str:
    phases = scenario.get("phases")
    if phases is None:
        return "?"
    # A count per the harness; a list of phases is read by its length.
    count = len(phases) if isinstance(phases, list) else phases
    return "shift" if count > 1 else "steady"


def _beats_bound(scenario: Mapping[str, Any]) -> list[str]:
    """Controllers with more good requests than oracle-full: its search missed a better setting."""
    return [r["controller"] for r in beats_bound(scenario["results"])]


def _ratio(part: Mapping[str, Any] | None, whole: Mapping[str, Any] | None) -> float | None:
    """good / good; None where either side is absent or the denominator is 0."""
    if part is None or whole is None or not whole["good"]:
        return None
    ratio: float = part["good"] / whole["good"]
    return ratio


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_number(value: Any, spec: str) -> str:
    # Percentiles are null when nothing finished; older documents may lack a column.
    return "-" if value is None else format(value, spec)


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def report(
    bench_json: Annotated[
        Path, typer.Argument(metavar="BENCH.json", help="Output of `batchpilot bench --json`.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Directory for the PNG files (created if missing).")
    ],
    scenario: Annotated[
        str | None,
        typer.Option("--scenario", help="Scenario whose timeline to plot (default: the first)."),
    ] = None,
) -> None:
    """Plot a benchmark result: goodput per controller per scenario, and one scenario over time.

    Examples:

      batchpilot bench ../shared/scenarios/*.yaml --json bench.json

      batchpilot report bench.json --out report/

      batchpilot report bench.json --out report/ --scenario conv-to-code-shift
    """
    try:
        document = load_document(bench_json)
        written = write_report(document, out, scenario=scenario)
    except ReportError as err:
        fail(str(err))
    for path in written:
        typer.echo(f"wrote {path}")


def _pick_scenario(scenarios: Sequence[Mapping[str, Any]], name: str | None) -> Mapping[str, Any]:
    if name is None:
        return scenarios[0]
    for scenario in scenarios:
        if scenario["name"] == name:
            return scenario
    known = ", ".join(s["name"] for s in scenarios)
    raise ReportError(f"--scenario: no scenario named {name!r} in the document (it has: {known})")


def _controllers_in_order(scenarios: Sequence[Mapping[str, Any]]) -> list[str]:
    seen = {result["controller"]: None for s in scenarios for result in s["results"]}
    return [name for name in CONTROLLER_ORDER if name in seen] + [
        name for name in seen if name not in CONTROLLER_ORDER
    ]


def _result(scenario: Mapping[str, Any], controller: str) -> Mapping[str, Any] | None:
    return next((r for r in scenario["results"] if r["controller"] == controller), None)


def _mean_cap(knobs_by_replica: Mapping[str, Mapping[str, Any]]) -> float:
    """Mean batch cap over replicas; an uncapped replica counts as NaN (a gap in the line)."""
    caps = [k.get("max_concurrency") for k in knobs_by_replica.values()]
    capped = [cap for cap in caps if cap is not None]
    if not caps or len(capped) < len(caps):
        return math.nan
    mean: float = sum(capped) / len(capped)
    return mean


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "scenario"


def _pyplot() -> Any:
    # Imported on the first plot, not with the CLI: matplotlib costs every
    # other command (the operator among them) ~0.6 s and a font cache to write.
    import matplotlib

    # Agg: files only, no display needed (CI, ssh sessions, the demo's headless mode).
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
