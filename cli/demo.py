"""`batchpilot demo`: adaptive vs static batching on a local fleet, live, in about two minutes.

What runs (no cluster, no Prometheus):

- two identical fleets (cli/demo_fleet.py), each replica a simulated engine
  (`sim serve`) behind a real gate, on 127.0.0.1; both start at the static
  default (vLLM's batch cap of 256, FCFS, no queue deadline);
- the same load on both (sim/load.py `replay`: the scenario's requests, same
  arrivals, same lengths), a traffic mix that shifts half-way;
- on the *adaptive* fleet only, the controller in Auto mode through the
  operator's code path: the fleet's /metrics scraped into the controller's
  snapshot metrics source (controller/sources.py `SnapshotSource`), one
  control iteration per interval (controller/loop.py), and the decision sent
  to every gate through the operator's gate admin client
  (operator/gates.py `GateClient`).

Time. The engines run `--time-scale` simulated seconds per wall second
(default 0.25: a 6 ms H100 step takes 25 ms of wall time, so the HTTP traffic
stays within what two shared cores carry). Everything the user reads is in
simulated (scenario) time, like the benchmark: the load generator converts
its measurements, and the plot's axis is scenario seconds. The gate and the
controller live on the wall clock, so the controller's policy states the SLOs
in wall time (SLO / time-scale) and reads the engine's seconds histograms with
a metric-override scale of 1 / time-scale.

The scenario's phases are scaled to fill `--duration` wall seconds, keeping
their proportions; the control interval scales with them.

The load is sent one control window at a time (one `replay` per window,
each started on time), so a window's client-side records are complete as
soon as its requests finish: the live view shows measured latency and
goodput per replica, not estimates from histograms.

One module, over 400 lines: it is one command's run read top to bottom (plan,
fleets, load windows, control loop, teardown); what it shows and the fleet it
starts already live apart (demo_view.py, demo_fleet.py).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import numpy as np
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live

import batchpilot.sim
from batchpilot.cli.app import fail
from batchpilot.cli.demo_fleet import HOST, Fleet, FleetError, FleetSpec, ReplicaAddress
from batchpilot.contract.knobs import Knobs
from batchpilot.controller.bench_adapter import ControllerContext, policy_for
from batchpilot.controller.explain import Decision
from batchpilot.controller.loop import PolicyController
from batchpilot.controller.observe import Observation, observe
from batchpilot.controller.policy import ClassSpec, MetricOverride, Policy
from batchpilot.controller.signals import ENGINE_PRESETS, Signal
from batchpilot.controller.sources import SnapshotSource
from batchpilot.operator.gates import GateClient, GateError
from batchpilot.sim.baselines import VLLM_DEFAULT_MAX_NUM_SEQS
from batchpilot.sim.bench import class_spec
from batchpilot.sim.calibration import write_builtin_calibration
from batchpilot.sim.load import RequestRecord, replay
from batchpilot.sim.scenario import Phase, Scenario, ScenarioError, load_scenario, parse_scenario
from batchpilot.sim.workload import Workload, build_workload

BUILTIN_SCENARIO_NAME = "demo-shift.yaml"
# `--classes`: an interactive class beside a batch class that floods mid-run.
BUILTIN_CLASSES_SCENARIO_NAME = "demo-classes.yaml"
DEFAULT_TIME_SCALE = 0.25
DEFAULT_DURATION_S = 90.0
# Below 2 s of wall time per control interval a window holds too few
# requests (about 10 at the demo's rates) for a p99 to mean anything.
MIN_INTERVAL_S = 2.0
# Scrapes per control interval: rate() over a window of two intervals then
# has four to five samples instead of two or three.
SCRAPES_PER_INTERVAL = 2
# Live per-replica latency and goodput cover this many completed windows.
RECENT_WINDOWS = 2
# A request still streaming this long (wall) after it was sent is abandoned:
# it missed its SLO long ago, and the demo must end.
REQUEST_TIMEOUT_S = 60.0
FLEETS = ("adaptive", "static")
# A fresh token per run: the gates listen on 127.0.0.1 only, but nothing else
# on the machine should be able to steer them.
ADMIN_TOKEN = secrets.token_urlsafe(24)
PLOT_FILE = "demo.png"
SUMMARY_FILE = "demo-summary.json"
TERMINAL_FILE = "demo-terminal.txt"


class DemoError(RuntimeError):
    """The demo cannot run; the message says why and what to do."""


@dataclass(frozen=True)
class DemoPlan:
    """The scenario as the demo plays it, and the clocks that relate wall and scenario time."""

    scenario: Scenario  # phases scaled to the run, control interval in scenario seconds
    workload: Workload
    time_scale: float  # scenario seconds per wall second
    duration_wall_s: float
    interval_wall_s: float
    phase_starts_s: tuple[float, ...]  # scenario seconds
    # The phases the timeline marks (see `timeline_phases`), scaled.
    phases: tuple[Phase, ...]

    @property
    def interval_s(self) -> float:
        """The control interval in scenario seconds."""
        return self.interval_wall_s * self.time_scale

    @property
    def shift_s(self) -> float:
        """Scenario time of the first change of traffic phase (the end, with one phase)."""
        return self.phase_starts_s[1] if len(self.phase_starts_s) > 1 else self.scenario.duration_s

    @property
    def windows(self) -> int:
        return max(1, math.ceil(self.scenario.duration_s / self.interval_s - 1e-9))


def builtin_scenario_path(name: str = BUILTIN_SCENARIO_NAME) -> Path:
    return Path(batchpilot.sim.__file__).resolve().parent / name


def timeline_phases(scenario: Scenario) -> tuple[Phase, ...]:
    """The phases whose changes the demo marks: the default class's traffic,
    or, when SLO classes carry it all, the class whose traffic changes most often."""
    if scenario.workload:
        return scenario.workload
    return max((c.workload for c in scenario.classes), key=len)


def plan_demo(scenario: Scenario, *, time_scale: float, duration_s: float) -> DemoPlan:
    """Scale the scenario's phases to `duration_s` wall seconds at `time_scale`."""
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise DemoError(f"--time-scale: must be a positive number, got {time_scale:g}")
    if not (math.isfinite(duration_s) and duration_s >= 10 * MIN_INTERVAL_S):
        raise DemoError(
            f"--duration: must be at least {10 * MIN_INTERVAL_S:g} s (ten control intervals), got {duration_s:g}"
        )
    stretch = duration_s * time_scale / scenario.duration_s

    def stretched(phases: tuple[Phase, ...]) -> tuple[Phase, ...]:
        return tuple(replace(phase, duration_s=phase.duration_s * stretch) for phase in phases)

    interval_wall = max(MIN_INTERVAL_S, scenario.control_interval_s * stretch / time_scale)
    scaled = replace(
        scenario,
        workload=stretched(scenario.workload),
        classes=tuple(replace(c, workload=stretched(c.workload)) for c in scenario.classes),
        control_interval_s=interval_wall * time_scale,
    )
    phases = timeline_phases(scaled)
    starts = [0.0]
    for phase in phases[:-1]:
        starts.append(starts[-1] + phase.duration_s)
    return DemoPlan(
        scenario=scaled,
        workload=build_workload(scaled),
        time_scale=time_scale,
        duration_wall_s=duration_s,
        interval_wall_s=interval_wall,
        phase_starts_s=tuple(starts),
        phases=phases,
    )


def demo_policy(plan: DemoPlan) -> Policy:
    """The benchmark adapter's policy (controller/bench_adapter.py), in wall-clock units."""
    scenario, scale = plan.scenario, plan.time_scale
    engine = scenario.engine
    policy = policy_for(
        ControllerContext(
            slo_ttft_ms=scenario.slo.ttft_ms / scale,
            slo_tpot_ms=scenario.slo.tpot_ms / scale,
            control_interval_s=plan.interval_wall_s,
            replica_names=scenario.replica_names,
            max_num_seqs=engine.max_num_seqs,
            max_num_batched_tokens=engine.max_num_batched_tokens,
            # The demo's gates have no engine-native adapter: the prefill
            # budget stays at the engine's startup value.
            runtime_tunable=False,
            classes=tuple(
                _wall_clock_class(class_spec(c, scenario), scale) for c in scenario.classes
            ),
        )
    )
    preset = ENGINE_PRESETS[policy.engine.kind]
    # The engine's seconds are scenario seconds: divide by the time scale to
    # get the wall seconds that the gate's histograms and the SLOs above use.
    overrides = {
        signal.value: MetricOverride(
            preset[signal].metric, preset[signal].labels, preset[signal].scale / scale
        )
        for signal in (Signal.TTFT, Signal.ITL, Signal.TPOT, Signal.E2E)
    }
    return replace(policy, name="demo", metrics=replace(policy.metrics, overrides=overrides))


def _wall_clock_class(spec: ClassSpec, scale: float) -> ClassSpec:
    if spec.slo is None:
        return spec
    ttft_ms, tpot_ms = (max(1, round(ms / scale)) for ms in (spec.slo.ttft_ms, spec.slo.tpot_ms))
    return replace(spec, slo=replace(spec.slo, ttft_ms=ttft_ms, tpot_ms=tpot_ms))


def snapshot_from_text(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {`name{label="v",...}`: value}, the snapshot format."""
    snapshot: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(
                    f'{key}="{_escape(value)}"' for key, value in sample.labels.items()
                )
                snapshot[f"{sample.name}{{{labels}}}"] = float(sample.value)
            else:
                snapshot[sample.name] = float(sample.value)
    return snapshot


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- the run --------------------------------------------------------------------


@dataclass
class FleetState:
    name: str
    replicas: tuple[ReplicaAddress, ...]
    source: Any  # SnapshotSource
    # Completed load windows: index -> records (arrival_s in scenario seconds).
    windows: dict[int, list[RequestRecord]] = field(default_factory=dict)
    observation: Observation | None = None
    # (scenario time, replica, applied knobs) from every scrape.
    applied_log: list[tuple[float, str, Knobs]] = field(default_factory=list)
    scrape_failures: int = 0

    @property
    def replica_of_url(self) -> dict[str, str]:
        return {replica.proxy_url: replica.name for replica in self.replicas}

    def records(self) -> list[RequestRecord]:
        return [record for index in sorted(self.windows) for record in self.windows[index]]


@dataclass
class DemoState:
    plan: DemoPlan
    policy: Policy
    fleets: dict[str, FleetState]
    started_wall: float = 0.0
    now_wall_s: float = 0.0
    decisions: list[Decision] = field(default_factory=list)
    actuation_errors: list[str] = field(default_factory=list)
    finished: bool = False

    @property
    def now_s(self) -> float:
        """Scenario seconds since the load started."""
        return self.now_wall_s * self.plan.time_scale


async def run_demo(state: DemoState, on_tick: Any) -> None:
    """Play the load on both fleets while scraping, steering the adaptive one, and calling on_tick."""
    plan = state.plan
    adaptive = state.fleets["adaptive"]
    controller = PolicyController(state.policy, adaptive.source)
    loop = asyncio.get_running_loop()
    state.started_wall = loop.time()
    loads = [
        asyncio.create_task(_play_window(state, fleet, index))
        for fleet in state.fleets.values()
        for index in range(plan.windows)
    ]
    scrape_every = plan.interval_wall_s / SCRAPES_PER_INTERVAL
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        gates = GateClient(session, timeout_s=2.0)
        tick = 0
        while not all(task.done() for task in loads):
            await asyncio.sleep(max(0.0, state.started_wall + tick * scrape_every - loop.time()))
            state.now_wall_s = loop.time() - state.started_wall
            await asyncio.gather(
                *(_scrape(session, state, fleet) for fleet in state.fleets.values())
            )
            # Control on whole intervals after the first (rate() needs two samples).
            if (
                tick % SCRAPES_PER_INTERVAL == 0
                and tick > 0
                and state.now_wall_s <= plan.duration_wall_s + 1e-6
            ):
                names = [replica.name for replica in adaptive.replicas]
                # CPU work (scikit-learn fits): off the event loop, as the operator does.
                decision = await asyncio.to_thread(controller.run_once, state.now_wall_s, names)
                state.decisions.append(decision)
                await _actuate(gates, state, adaptive, decision)
            for fleet in state.fleets.values():
                fleet.observation = _observe(state, fleet)
            on_tick(state)
            tick += 1
        await asyncio.gather(*loads)
    state.finished = True
    on_tick(state)


async def _play_window(state: DemoState, fleet: FleetState, index: int) -> None:
    """Replay the requests arriving in control window `index`, starting on time."""
    plan = state.plan
    start_s = index * plan.interval_s
    window = _window_workload(
        plan.workload, start_s, min(start_s + plan.interval_s, plan.scenario.duration_s)
    )
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, state.started_wall + start_s / plan.time_scale - loop.time()))
    if len(window) == 0:
        fleet.windows[index] = []
        return
    records = await replay(
        window,
        [replica.proxy_url for replica in fleet.replicas],
        time_scale=plan.time_scale,
        model=plan.scenario.engine.model,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    for record in records:
        record.arrival_s += start_s
    fleet.windows[index] = records


def _window_workload(workload: Workload, start_s: float, end_s: float) -> Workload:
    first, last = np.searchsorted(workload.arrival_s, [start_s, end_s])
    return Workload(
        arrival_s=workload.arrival_s[first:last] - start_s,
        prompt_tokens=workload.prompt_tokens[first:last],
        output_tokens=workload.output_tokens[first:last],
        phase=workload.phase[first:last],
        duration_s=end_s - start_s,
        service_class=workload.class_of()[first:last],
        class_names=workload.class_names,
    )


async def _scrape(session: Any, state: DemoState, fleet: FleetState) -> None:
    async def one(replica: ReplicaAddress) -> tuple[str, dict[str, float]] | None:
        snapshot: dict[str, float] = {}
        try:
            for url in replica.metrics_urls:
                async with session.get(url) as response:
                    response.raise_for_status()
                    snapshot.update(snapshot_from_text(await response.text()))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            # A replica that misses a scrape is simply stale for the
            # controller, as with Prometheus: count it and go on.
            fleet.scrape_failures += 1
            return None
        return replica.name, snapshot

    results = await asyncio.gather(*(one(replica) for replica in fleet.replicas))
    snapshots = dict(result for result in results if result is not None)
    fleet.source.ingest(state.now_wall_s, snapshots)


async def _actuate(gates: Any, state: DemoState, fleet: FleetState, decision: Decision) -> None:
    """Send each gate its target through the admin API, as the operator does in Auto mode."""
    if not decision.actuate:
        return

    async def one(replica: ReplicaAddress) -> None:
        target = decision.per_pod.get(replica.name, decision.target)
        try:
            await gates.write(HOST, replica.admin_port, ADMIN_TOKEN, target)
        except GateError as err:
            state.actuation_errors.append(f"t={state.now_s:.1f}s {replica.name}: {err}")

    await asyncio.gather(*(one(replica) for replica in fleet.replicas))


def _observe(state: DemoState, fleet: FleetState) -> Observation | None:
    observation = observe(
        fleet.source, state.policy, state.now_wall_s, [r.name for r in fleet.replicas]
    )
    for name, pod in observation.pods.items():
        if pod.applied is not None:
            fleet.applied_log.append((state.now_s, name, pod.applied))
    return observation


# -- the command ------------------------------------------------------------------


def demo(
    scenario_path: Annotated[
        Path | None,
        typer.Option(
            "--scenario",
            help="Scenario YAML to play (default: the built-in demo-shift, chat traffic then long-prompt code traffic).",
        ),
    ] = None,
    classes: Annotated[
        bool,
        typer.Option(
            "--classes",
            help="Play the built-in SLO-classes scenario instead: an interactive class with a tight "
            "TTFT beside a batch class that floods mid-run (docs/slo-classes.md).",
        ),
    ] = False,
    time_scale: Annotated[
        float,
        typer.Option(
            "--time-scale", help="Simulated seconds per wall second (lower: lighter on the CPU)."
        ),
    ] = DEFAULT_TIME_SCALE,
    duration: Annotated[
        float, typer.Option("--duration", help="Wall seconds of load.")
    ] = DEFAULT_DURATION_S,
    headless: Annotated[
        bool, typer.Option("--headless", help="No live view: one line per control interval.")
    ] = False,
    out: Annotated[
        Path,
        typer.Option("--out", help="Directory for the plot, summary JSON and terminal capture."),
    ] = Path("out/demo"),
) -> None:
    """Run a local fleet twice, adaptive vs static batching settings, through a traffic shift.

    Starts two identical simulated fleets (engine + real gate per replica, on
    127.0.0.1), replays the same shifting traffic on both, and lets the
    controller steer only one of them. Shows a live view, then writes
    demo.png, demo-summary.json and demo-terminal.txt to --out.

    Examples:

      batchpilot demo

      batchpilot demo --headless --out docs/img --duration 90

      batchpilot demo --scenario ../shared/scenarios/conv-to-code-shift.yaml --duration 120

      batchpilot demo --classes --headless
    """
    # Here, not at the top: demo_view imports this module.
    from batchpilot.cli import demo_view

    if classes and scenario_path is not None:
        fail("--classes: plays a built-in scenario; give either --classes or --scenario, not both")
    if classes:
        scenario_path = builtin_scenario_path(BUILTIN_CLASSES_SCENARIO_NAME)
    try:
        plan = plan_demo(
            load_demo_scenario(scenario_path), time_scale=time_scale, duration_s=duration
        )
    except DemoError as err:
        fail(str(err))
    if len(plan.scenario.replica_names) > 4:
        fail(
            f"--scenario: the demo runs at most 4 replicas per fleet on one machine, the scenario has {len(plan.scenario.replica_names)}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"--out: cannot create {out} ({err.strerror})")
    # A pipe or a file gets 150 columns, not rich's 80: the live table has nine.
    console = Console(width=None if Console().is_terminal else 150)
    console.print(demo_view.intro(plan))
    try:
        state = _run(plan, console, headless)
    except DemoError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    except KeyboardInterrupt:
        # The fleets are already stopped (_run's finally); 130 = 128 + SIGINT.
        typer.echo("interrupted: no report written", err=True)
        raise typer.Exit(130) from None
    summary = demo_view.summarize(state)
    written = demo_view.write_outputs(state, summary, out, console)
    for path in written:
        console.print(f"wrote {path}")


def load_demo_scenario(path: Path | None) -> Scenario:
    """The scenario file, or the built-in one (a built-in one with the built-in calibration when ../shared is absent)."""
    chosen = path or builtin_scenario_path()
    builtin = chosen.parent == builtin_scenario_path().parent
    try:
        return load_scenario(chosen)
    except ScenarioError as err:
        if builtin and err.field == "engine.calibration":
            return _builtin_without_shared(chosen)
        raise DemoError(f"--scenario {chosen}: {err}") from err


def _builtin_without_shared(path: Path) -> Scenario:
    """The built-in scenario on the step-cost model fitted to the shared calibration CSV.

    The built-in scenario names the shared H100 calibration file; without
    ../shared the demo uses the coefficients `batchpilot sim calibrate` fitted
    to it (below), so it still runs on a bare checkout.
    """
    data = yaml.safe_load(path.read_text())
    directory = Path(tempfile.mkdtemp(prefix="batchpilot-demo-"))
    data["engine"]["calibration"] = str(
        write_builtin_calibration(
            directory / "h100-step-cost.csv", data["engine"]["model"], data["engine"]["system"]
        )
    )
    return parse_scenario(data, base_dir=path.parent, source=path)


def _run(plan: DemoPlan, console: Any, headless: bool) -> DemoState:
    # Here, not at the top: demo_view imports this module.
    from batchpilot.cli import demo_view

    scenario = plan.scenario
    policy = demo_policy(plan)
    engine = scenario.engine.config()
    startup = _static_default(VLLM_DEFAULT_MAX_NUM_SEQS, scenario.engine.max_num_seqs)
    fleets = {
        name: Fleet(
            FleetSpec(
                name,
                scenario.replica_names,
                engine,
                plan.time_scale,
                scenario.engine.model,
                ADMIN_TOKEN,
                startup,
            )
        )
        for name in FLEETS
    }
    try:
        with console.status("starting two fleets (engine + gate per replica)..."):
            for fleet in fleets.values():
                fleet.start()
        state = DemoState(
            plan,
            policy,
            {
                name: FleetState(name, fleet.replicas, SnapshotSource(policy))
                for name, fleet in fleets.items()
            },
        )
        started = time.monotonic()
        if headless:
            asyncio.run(run_demo(state, demo_view.HeadlessLog(console)))
        else:
            with Live(
                demo_view.render(state), console=console, auto_refresh=False, transient=False
            ) as live:
                asyncio.run(
                    run_demo(state, lambda s: live.update(demo_view.render(s), refresh=True))
                )
        state.now_wall_s = time.monotonic() - started
        return state
    except FleetError as err:
        raise DemoError(str(err)) from err
    finally:
        for fleet in fleets.values():
            fleet.stop()


def _static_default(default_cap: int, ceiling: int) -> Knobs:
    return Knobs(max_concurrency=min(default_cap, ceiling))


def window_of(arrival_s: float, interval_s: float, windows: int) -> int:
    return min(int(arrival_s // interval_s), windows - 1)


def records_between(
    records: Sequence[RequestRecord], start_s: float, end_s: float
) -> list[RequestRecord]:
    return [record for record in records if start_s <= record.arrival_s < end_s]
