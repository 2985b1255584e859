"""The live benchmark: a scenario's traffic against real llama-server replicas behind real gates.

Why one module: a standalone script whose parts (the fleet, the live
control loop, the comparison with the simulator) are stages of one run;
only its test imports it, to call `main`.

    python bench/live_engine.py bench/scenarios/live-chat-to-long-prompts.yaml \\
        [--controllers static-default,static-best,aimd,adaptive] [--json OUT] [--compare-sim]

Per controller, all on loopback and started afresh (so no run inherits
another's KV cache or queue):

- one llama-server per replica, started with the scenario engine's ceilings
  (`max_num_seqs` -> --parallel, `kv_cache_tokens` -> --ctx-size,
  `max_num_batched_tokens` -> --batch-size), serving the generated model;
- one `batchpilot gate` process in front of each;
- a real Prometheus scraping every gate's and every engine's /metrics each
  second, each target labelled with its replica as `pod`;
- the scenario's requests (sim/workload.py: the same arrivals and lengths
  the simulator replays) sent by `sim.load.replay`, round-robin over the gates;
- every `control_interval_s`, the controller gets each replica's snapshot
  (every series of that pod, read back from Prometheus) through the same
  `Controller.decide(now_s, snapshots)` interface the simulator's benchmark
  uses, and its answer goes to the gates' admin API, as the operator does.

`static-best` is not hindsight over the whole run here (each trial costs
wall time): it is the winner of a short sweep on the real engine, caps
{2, 4, 8, ceiling} x queue deadline {none, TTFT SLO}, each tried on the first
`--sweep-s` / phases seconds of every phase, then run on the whole scenario.

The result per controller has the simulator benchmark's fields plus wall-clock
facts: the machine's load average and the engines' and gates' CPU seconds.
With `--compare-sim`, the simulator runs the same scenario (its engine section
is the CPU engine's calibration) with each controller, `static-best` at the
setting the sweep chose, and the document gets the sim-vs-real error per
controller on goodput, TTFT p99 and TPOT p99. `--real OUT.json` skips the
live run and compares the simulator with the live results an earlier run
wrote (same scenario, same requests): a new calibration or simulator model
is checked against the same real run in seconds instead of half an hour.

`--direct` (static-default only) sends the traffic straight to the engines,
with no gate, no Prometheus and no controller: the simulator's model of the
engines alone, apart from what the serving stack around them adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.bench_adapter import ControllerContext
from batchpilot.operator.gates import GateClient, GateError
from batchpilot.sim.baselines import FixedController
from batchpilot.sim.bench import (
    Simulation,
    controller_context,
    run_online,
    scenario_header,
)
from batchpilot.sim.bench import summarize as sim_summarize
from batchpilot.sim.controllers import build_controller
from batchpilot.sim.llamacpp import SERVED_MODEL, ServerOptions
from batchpilot.sim.load import RequestRecord, replay, summarize
from batchpilot.sim.sandbox.llama_server import LlamaServer, start_llama_server
from batchpilot.sim.sandbox.process import ManagedProcess, cpu_seconds, free_loopback_port, http_ok
from batchpilot.sim.sandbox.prometheus import ScrapeTarget, start_prometheus
from batchpilot.sim.sandbox.tools import BATCHPILOT_GATE
from batchpilot.sim.scenario import Scenario, load_scenario
from batchpilot.sim.workload import Workload, build_workload

NAMESPACE = "bench"
ENGINE_KIND = "llamacpp"
SCRAPE_INTERVAL_S = 1.0
START_TIMEOUT_S = 60.0
# The gate's admin calls and Prometheus reads of one control step must not
# hold the step up for long: a slow one is counted and skipped.
CALL_TIMEOUT_S = 3.0
SWEEP_CAPS = (2, 4, 8)
LIVE_CONTROLLERS = ("static-default", "static-best", "aimd", "adaptive")
# Target labels Prometheus adds, which the engines' own series do not carry.
_TARGET_LABELS = frozenset({"__name__", "namespace", "pod", "instance", "job"})


@dataclass
class Replica:
    name: str
    engine: LlamaServer
    gate: ManagedProcess
    proxy_url: str
    admin_port: int


def server_options(scenario: Scenario) -> ServerOptions:
    engine = scenario.engine
    return ServerOptions(
        parallel=engine.max_num_seqs,
        ctx_size=engine.kv_cache_tokens,
        batch_size=engine.max_num_batched_tokens,
        ubatch_size=min(512, engine.max_num_batched_tokens),
    )


def live_context(scenario: Scenario) -> ControllerContext:
    return replace(
        controller_context(scenario),
        engine_kind=ENGINE_KIND,
        kv_cache_tokens=scenario.engine.kv_cache_tokens,
    )


class Fleet:
    """Engines, gates and Prometheus for one run; stopped in reverse order."""

    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        self.token = secrets.token_hex(16)
        workdir.mkdir(parents=True, exist_ok=True)
        token_file = workdir / "gate-token"
        token_file.write_text(self.token)
        self._stack = ExitStack()
        self.replicas: list[Replica] = []
        try:
            for name in scenario.replica_names:
                engine = self._stack.enter_context(
                    start_llama_server(server_options(scenario), workdir=workdir / name)
                )
                port, admin = free_loopback_port(), free_loopback_port()
                gate = ManagedProcess(
                    f"gate-{name}",
                    [*BATCHPILOT_GATE, "--upstream", engine.url,
                     "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                     "--token-file", str(token_file), "--log-level", "WARNING",
                     # Loopback, no Service to leave: stop at once.
                     "--shutdown-delay-s", "0"],
                    workdir / f"gate-{name}.log",
                )  # fmt: skip
                self._stack.callback(gate.stop)
                self.replicas.append(Replica(name, engine, gate, f"http://127.0.0.1:{port}", admin))
            for replica in self.replicas:
                replica.gate.wait_until(
                    lambda r=replica: http_ok(f"http://127.0.0.1:{r.admin_port}/readyz"),
                    START_TIMEOUT_S,
                    "ready (/readyz)",
                )
            targets = [
                ScrapeTarget(address, {"pod": r.name, "namespace": NAMESPACE})
                for r in self.replicas
                for address in (f"127.0.0.1:{r.admin_port}", r.engine.url.removeprefix("http://"))
            ]
            self.prometheus = self._stack.enter_context(
                start_prometheus(
                    targets, scrape_interval_s=SCRAPE_INTERVAL_S, workdir=workdir / "prometheus"
                )
            )
        except BaseException:
            self._stack.close()
            raise

    def cpu_seconds(self) -> dict[str, float]:
        pids = {
            "engines": [r.engine.process.pid for r in self.replicas],
            "gates": [r.gate.pid for r in self.replicas],
        }
        return {
            role: round(sum(cpu_seconds(pid) for pid in group), 1) for role, group in pids.items()
        }

    def stop(self) -> None:
        self._stack.close()


def snapshot_key(labels: Mapping[str, str]) -> str:
    """A Prometheus series' labels -> the snapshot key `name{k="v",...}` (target labels dropped)."""
    own = sorted((k, v) for k, v in labels.items() if k not in _TARGET_LABELS)
    name = labels["__name__"]
    if not own:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in own) + "}"


async def read_snapshots(
    session: aiohttp.ClientSession, prometheus_url: str
) -> dict[str, dict[str, float]]:
    """Every series of every replica, at its latest scrape, grouped by pod."""
    async with session.get(
        f"{prometheus_url}/api/v1/query", params={"query": f'{{namespace="{NAMESPACE}"}}'}
    ) as response:
        response.raise_for_status()
        result = (await response.json())["data"]["result"]
    snapshots: dict[str, dict[str, float]] = {}
    for item in result:
        labels = item["metric"]
        snapshots.setdefault(labels["pod"], {})[snapshot_key(labels)] = float(item["value"][1])
    return snapshots


@dataclass
class RunLog:
    config_changes: int = 0
    actuation_errors: int = 0
    read_errors: int = 0


async def control(
    fleet: Fleet, controller: Any, interval_s: float, stop: asyncio.Event, log: RunLog
) -> None:
    """Step the controller every interval until `stop`, actuating the gates."""
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    applied: dict[str, Knobs] = {}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        gates = GateClient(session, CALL_TIMEOUT_S)
        started = asyncio.get_running_loop().time()
        step = 0
        while not stop.is_set():
            now_s = asyncio.get_running_loop().time() - started
            try:
                snapshots = {} if step == 0 else await read_snapshots(session, fleet.prometheus.url)
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                log.read_errors += 1
                snapshots = None
            if snapshots is not None:
                decisions = controller.decide(now_s, snapshots)
                for replica in fleet.replicas:
                    knobs = decisions.get(replica.name)
                    if knobs is None or knobs == applied.get(replica.name):
                        continue
                    try:
                        await gates.write("127.0.0.1", replica.admin_port, fleet.token, knobs)
                    except GateError:
                        log.actuation_errors += 1
                        continue
                    # The first setting is the startup one, as in the simulator's count.
                    log.config_changes += replica.name in applied
                    applied[replica.name] = knobs
            step += 1
            deadline = started + step * interval_s
            with suppress(TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), max(0.0, deadline - asyncio.get_running_loop().time())
                )


async def run_live(
    scenario: Scenario, workload: Workload, controller: Any, workdir: Path
) -> dict[str, Any]:
    load_before = os.getloadavg()
    fleet = Fleet(scenario, workdir)
    try:
        log = RunLog()
        stop = asyncio.Event()
        stepping = asyncio.create_task(
            control(fleet, controller, scenario.control_interval_s, stop, log)
        )
        # One interval for the startup settings to land before the first request.
        await asyncio.sleep(1.0)
        started = time.monotonic()
        records = await replay(
            workload,
            [r.proxy_url for r in fleet.replicas],
            model=SERVED_MODEL,
            request_timeout_s=600.0,
        )
        wall_s = time.monotonic() - started
        stop.set()
        await stepping
        return run_result(
            records, workload, scenario, wall_s, load_before, fleet.cpu_seconds(), log
        )
    finally:
        fleet.stop()


async def run_direct(scenario: Scenario, workload: Workload, workdir: Path) -> dict[str, Any]:
    """The workload round-robin straight to the engines: nothing between client and engine."""
    load_before = os.getloadavg()
    with ExitStack() as stack:
        engines = [
            stack.enter_context(
                start_llama_server(server_options(scenario), workdir=workdir / name)
            )
            for name in scenario.replica_names
        ]
        started = time.monotonic()
        records = await replay(
            workload,
            [engine.url for engine in engines],
            model=SERVED_MODEL,
            request_timeout_s=600.0,
            fresh_connections=True,
        )
        wall_s = time.monotonic() - started
        engine_cpu_s = round(sum(cpu_seconds(engine.process.pid) for engine in engines), 1)
    # No controller: nothing changed, nothing to actuate or read.
    return run_result(
        records, workload, scenario, wall_s, load_before, {"engines": engine_cpu_s}, RunLog()
    )


def run_result(
    records: Sequence[RequestRecord],
    workload: Workload,
    scenario: Scenario,
    wall_s: float,
    load_before: tuple[float, float, float],
    cpu_s: Mapping[str, float],
    log: RunLog,
) -> dict[str, Any]:
    """One controller's result: the simulator benchmark's fields plus the machine's."""
    summary = summarize(records, workload.duration_s, scenario.slo)
    summary.pop("by_url")
    return {
        **summary,
        "preemptions": 0,  # llama-server never preempts: a full KV cache fails the request
        "config_changes": log.config_changes,
        "actuation_errors": log.actuation_errors,
        "prometheus_read_errors": log.read_errors,
        "wall_s": round(wall_s, 1),
        "machine": {
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "cpu_s": dict(cpu_s),
            "cores": os.cpu_count(),
        },
    }


def sweep_workload(workload: Workload, scenario: Scenario, seconds: float) -> Workload:
    """The first seconds / phases of every phase, back to back."""
    per_phase = seconds / len(scenario.workload)
    starts = np.cumsum([0.0] + [phase.duration_s for phase in scenario.workload])
    keep = np.zeros(len(workload), dtype=bool)
    shift = np.zeros(len(workload))
    for index, start in enumerate(starts[:-1]):
        in_phase = (workload.arrival_s >= start) & (workload.arrival_s < start + per_phase)
        keep |= in_phase
        shift[in_phase] = start - index * per_phase
    return Workload(
        arrival_s=workload.arrival_s[keep] - shift[keep],
        prompt_tokens=workload.prompt_tokens[keep],
        output_tokens=workload.output_tokens[keep],
        phase=workload.phase[keep],
        duration_s=per_phase * len(scenario.workload),
    )


def sweep_grid(scenario: Scenario) -> list[Knobs]:
    ceiling = scenario.engine.max_num_seqs
    caps = sorted({cap for cap in SWEEP_CAPS if cap < ceiling} | {ceiling})
    deadlines = (None, round(scenario.slo.ttft_ms))
    return [Knobs(max_concurrency=c, queue_deadline_ms=d) for c in caps for d in deadlines]


async def live_benchmark(
    scenario: Scenario, controllers: Sequence[str], sweep_s: float, workdir: Path
) -> dict[str, Any]:
    workload = build_workload(scenario)
    context = live_context(scenario)
    results: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    best: Knobs | None = None
    for name in controllers:
        print(f"== {scenario.name} / {name}", flush=True)
        if name == "static-best":
            trial = sweep_workload(workload, scenario, sweep_s)
            for index, knobs in enumerate(sweep_grid(scenario)):
                outcome = await run_live(
                    scenario, trial, FixedController(context, knobs), workdir / f"sweep-{index}"
                )
                sweep.append(
                    {
                        "knobs": knobs.to_mapping(),
                        "good": outcome["good"],
                        "arrived": outcome["arrived"],
                    }
                )
                print(
                    f"   sweep {knobs.to_mapping()}: {outcome['good']}/{outcome['arrived']} good",
                    flush=True,
                )
            best = Knobs.from_mapping(max(sweep, key=lambda s: s["good"])["knobs"])
            controller: Any = FixedController(context, best)
        else:
            controller = build_controller(name, context)
        result = await run_live(scenario, workload, controller, workdir / name)
        result["controller"] = name
        if name == "static-best" and best is not None:
            result["knobs"] = best.to_mapping()
        print(
            f"   good {result['good']}/{result['arrived']}  goodput {result['goodput_rps']:.2f}/s  "
            f"TTFT p99 {result['ttft_p99_ms']}  TPOT p99 {result['tpot_p99_ms']}",
            flush=True,
        )
        results.append(result)
    return {
        **scenario_header(scenario, len(workload)),
        "replicas": scenario.replicas,
        "engine": {"kind": ENGINE_KIND, **vars(server_options(scenario))},
        "static_best_sweep": sweep,
        "results": results,
    }


def simulate(scenario: Scenario, document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The simulator's run of each live controller (static-best at the sweep's setting)."""
    workload = build_workload(scenario)
    context = controller_context(scenario)
    rows = []
    for live in document["results"]:
        name = live["controller"]
        if name == "static-best":
            controller: Any = FixedController(context, Knobs.from_mapping(live["knobs"]))
        else:
            controller = build_controller(name, context)
        started = time.perf_counter()
        sim: Simulation = run_online(scenario, workload, controller)
        rows.append(sim_summarize(sim, name, time.perf_counter() - started))
    return rows


def stored_live_run(path: Path, scenario: Scenario) -> dict[str, Any]:
    """The live results an earlier `--json` run wrote, checked to be this scenario's."""
    try:
        document = json.loads(path.read_text())["scenarios"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise SystemExit(f"--real {path}: not a live benchmark's --json output ({err})") from err
    arrived = len(build_workload(scenario))
    for field, expected in (("name", scenario.name), ("seed", scenario.seed), ("arrived", arrived)):
        if document.get(field) != expected:
            raise SystemExit(
                f"--real {path}: {field} is {document.get(field)!r}, the scenario's is "
                f"{expected!r}; compare a run of this scenario file"
            )
    return {key: value for key, value in document.items() if key not in ("sim_vs_real", "wall_s")}


def relative_error(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None or real == 0:
        return None
    return round((sim - real) / real, 3)


def compare(
    live: Sequence[Mapping[str, Any]], simulated: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    rows = []
    for real, sim in zip(live, simulated, strict=True):
        rows.append(
            {
                "controller": real["controller"],
                **{
                    f"{field}_error": relative_error(sim[field], real[field])
                    for field in ("goodput_rps", "ttft_p99_ms", "tpot_p99_ms")
                },
                "sim": {f: sim[f] for f in ("goodput_rps", "ttft_p99_ms", "tpot_p99_ms", "shed")},
            }
        )
    return rows


def print_table(document: Mapping[str, Any]) -> None:
    header = f"{'controller':16} {'good':>6} {'goodput/s':>9} {'SLO att.':>8} {'TTFT p99':>9} {'TPOT p99':>9} {'shed':>5} {'err':>4} {'chg':>4}"
    print(header)
    for row in document["results"]:
        print(
            f"{row['controller']:16} {row['good']:>6} {row['goodput_rps']:>9.2f} "
            f"{row['slo_attainment']:>8.3f} {_ms(row['ttft_p99_ms']):>9} {_ms(row['tpot_p99_ms']):>9} "
            f"{row['shed']:>5} {row['errors']:>4} {row['config_changes']:>4}"
        )
    for row in document.get("sim_vs_real", ()):
        print(
            f"sim vs real {row['controller']:16} goodput {row['goodput_rps_error']}  "
            f"TTFT p99 {row['ttft_p99_ms_error']}  TPOT p99 {row['tpot_p99_ms_error']}"
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--controllers", default=",".join(LIVE_CONTROLLERS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--sweep-s", type=float, default=40.0, help="scenario seconds per static-best trial"
    )
    parser.add_argument(
        "--compare-sim", action="store_true", help="also run the simulator and report its error"
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="static-default straight to the engines: no gates, no Prometheus, no controller",
    )
    parser.add_argument(
        "--real",
        type=Path,
        default=None,
        help="no live run: compare the simulator with the results an earlier --json run of "
        "this scenario wrote",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.controllers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(LIVE_CONTROLLERS))
    if unknown:
        parser.error(
            f"--controllers: {', '.join(unknown)} not live-benchmarkable; choose from {', '.join(LIVE_CONTROLLERS)}"
        )
    if args.direct and names != ["static-default"]:
        parser.error(
            "--direct: only static-default runs without a gate to apply knobs; "
            "pass --controllers static-default"
        )
    scenario = load_scenario(args.scenario)
    started = time.monotonic()
    if args.real is not None:
        document = stored_live_run(args.real, scenario)
    elif args.direct:
        with tempfile.TemporaryDirectory(prefix="batchpilot-direct-") as workdir:
            workload = build_workload(scenario)
            result = asyncio.run(run_direct(scenario, workload, Path(workdir)))
        document = {
            **scenario_header(scenario, len(workload)),
            "mode": "direct",
            "replicas": scenario.replicas,
            "engine": {"kind": ENGINE_KIND, **vars(server_options(scenario))},
            "results": [{**result, "controller": "static-default"}],
        }
    else:
        with tempfile.TemporaryDirectory(prefix="batchpilot-live-") as workdir:
            document = asyncio.run(live_benchmark(scenario, names, args.sweep_s, Path(workdir)))
    if args.compare_sim or args.real is not None:
        document["sim_vs_real"] = compare(document["results"], simulate(scenario, document))
    document["wall_s"] = round(time.monotonic() - started, 1)
    print_table(document)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"scenarios": [document]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
