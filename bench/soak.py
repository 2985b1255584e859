"""Soak: the operator steering two gated simulated engines under shifting load, for a long run.

Everything is a real process on loopback: kube-apiserver (batchpilot.sim.sandbox), two
serving "pods" (each `batchpilot sim serve` behind `batchpilot gate`, on
127.0.0.2 and 127.0.0.3), Prometheus scraping all four, `batchpilot
operator`, and `batchpilot sim load` replaying a workload whose output
lengths shift short -> long -> short -> long. The engines run `--time-scale`
simulated seconds per wall second, so `--sim-minutes` of simulated time take
sim-minutes x 60 / time-scale wall seconds; the policy's SLOs are divided by
the time scale, as in tests/test_e2e_operator.py.

Sampled every `--sample-s` wall seconds: the RSS of the operator and of both
gates (/proc), and the operator's own control-step duration histogram (its
/metrics), from which the mean step time per sample interval follows. The
report compares the first and last quarter of the run (drift), as JSON:

    python bench/soak.py --json out/soak.json                 # 30 simulated min at x10
    python bench/soak.py --sim-minutes 5 --json out/soak.json # a quick look

Needs the local stack (scripts/dev-setup) and the shared calibration CSV.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from batchpilot.operator.kube import GROUP, PLURAL, VERSION
from batchpilot.sim.sandbox.apiserver import start_kube_apiserver
from batchpilot.sim.sandbox.fleet import GATE_TOKEN_SECRET, Fleet, start_fleet
from batchpilot.sim.sandbox.kube import create_crd, create_namespace
from batchpilot.sim.sandbox.operator_process import OperatorProcess
from batchpilot.sim.sandbox.process import http_get
from batchpilot.sim.sandbox.tools import BATCHPILOT_CLI

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT.parent / "shared" / "data" / "calibration" / "llama3.1-8b_vllm_step_latency.csv"

POD_IPS = ("127.0.0.2", "127.0.0.3")
NAMESPACE = "soak"
# Scenario SLOs (simulated time); the policy gets them divided by the time scale.
SLO_TTFT_MS, SLO_TPOT_MS = 24_000, 400
STEP_SUM = "batchpilot_operator_control_step_duration_seconds_sum"
STEP_COUNT = "batchpilot_operator_control_step_duration_seconds_count"


def scenario_yaml(sim_seconds: float, rate_rps: float) -> str:
    # Four phases alternating short and long outputs: every shift asks the
    # operator to move the gates' token budget and concurrency again.
    phase_s = sim_seconds / 4
    short = "{dist: lognormal, p50: 10, p90: 30, max: 60}"
    long = "{dist: lognormal, p50: 100, p90: 200, max: 400}"
    phases = "".join(
        f"""
  - duration_s: {phase_s:g}
    synthetic:
      arrival: {{process: poisson, rate_rps: {rate_rps:g}}}
      prompt_tokens: {{dist: lognormal, p50: 300, p90: 900, max: 2000}}
      output_tokens: {outputs}"""
        for outputs in (short, long, short, long)
    )
    return f"""
name: soak-shifting
seed: 9
engine:
  calibration: {CALIBRATION}
  model: meta-llama/Meta-Llama-3.1-8B
  system: h100_sxm
  slowdown: 16
  kv_cache_tokens: 20000
  max_num_seqs: 256
  max_num_batched_tokens: 8192
replicas: 2
slo: {{ttft_ms: {SLO_TTFT_MS}, tpot_ms: {SLO_TPOT_MS}}}
workload:{phases}
"""


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return round(int(match.group(1)) / 1024, 1) if match else float("nan")


def step_totals(metrics_url: str) -> tuple[float, float]:
    """(sum of control-step seconds, number of steps) from the operator's /metrics."""
    reply = http_get(metrics_url)
    if reply is None or reply[0] != 200:
        return 0.0, 0.0
    totals = {STEP_SUM: 0.0, STEP_COUNT: 0.0}
    for line in reply[1].decode().splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals[STEP_SUM], totals[STEP_COUNT]


def quarter_mean(values: list[float], which: str) -> float | None:
    quarter = max(1, len(values) // 4)
    part = values[:quarter] if which == "first" else values[-quarter:]
    return round(sum(part) / len(part), 2) if part else None


def summarize(samples: list[dict[str, Any]], key: str) -> dict[str, Any]:
    values = [sample[key] for sample in samples if sample.get(key) is not None]
    if not values:
        return {}
    return {
        "start": values[0],
        "end": values[-1],
        "max": max(values),
        "first_quarter_mean": quarter_mean(values, "first"),
        "last_quarter_mean": quarter_mean(values, "last"),
        "growth": round(values[-1] - values[0], 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    sim_seconds = args.sim_minutes * 60
    workdir = Path(tempfile.mkdtemp(prefix="batchpilot-soak-"))
    scenario = workdir / "scenario.yaml"
    scenario.write_text(scenario_yaml(sim_seconds, args.rate_rps))
    with start_kube_apiserver() as kube, kube.api_client() as api:
        create_crd(api, yaml.safe_load((ROOT / "crds" / "inferencepolicy.yaml").read_text()))
        create_namespace(api, NAMESPACE)
        with (
            start_fleet(
                api,
                NAMESPACE,
                scenario=scenario,
                ips=POD_IPS,
                labels={"app": "soak-chat"},
                workdir=workdir,
                time_scale=args.time_scale,
            ) as fleet,
            OperatorProcess(
                workdir=workdir,
                kubeconfig=kube.kubeconfig,
                prometheus_url=fleet.prometheus_url,
                namespaces=[NAMESPACE],
                # Fine enough for 5 s policy intervals, with half the default's timer wake-ups.
                tick_seconds=1,
            ).start() as operator,
        ):
            return soak(args, api, fleet, operator, scenario)


def soak(
    args: argparse.Namespace,
    api: client.ApiClient,
    fleet: Fleet,
    operator: OperatorProcess,
    scenario: Path,
) -> dict[str, Any]:
    """Create the policy in Auto, replay the load, sample RSS and step time until it ends."""
    console = Console(stderr=True)
    wall_s = args.sim_minutes * 60 / args.time_scale
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        NAMESPACE,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferencePolicy",
            "metadata": {"name": "soak"},
            "spec": {
                "selector": {"matchLabels": {"app": "soak-chat"}},
                "engine": {"kind": "vllm", "maxNumSeqs": 256, "maxNumBatchedTokens": 8192},
                "actuation": {
                    "adminPort": fleet.admin_port,
                    "tokenSecretRef": {"name": GATE_TOKEN_SECRET},
                },
                "metrics": {"windowSeconds": 10, "stalenessSeconds": 10},
                "slo": {
                    "ttftMs": round(SLO_TTFT_MS / args.time_scale),
                    "tpotMs": max(1, round(SLO_TPOT_MS / args.time_scale)),
                },
                "behavior": {"intervalSeconds": 5, "stabilizationWindowSeconds": 10},
                "mode": "Auto",
            },
        },
    )
    load_out = fleet.workdir / "load.json"
    load = subprocess.Popen(
        [
            *BATCHPILOT_CLI,
            "sim",
            "load",
            str(scenario),
            *[a for url in fleet.gate_urls for a in ("--url", url)],
            "--json",
            str(load_out),
            "--time-scale",
            str(args.time_scale),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(fleet.workdir / "load.log").open("wb"),
    )
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    last_sum, last_count = step_totals(operator.metrics_url)
    progress = Progress(
        TextColumn("[bold]soak"),
        BarColumn(),
        TextColumn("{task.fields[note]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task("soak", total=wall_s, note="")
        while load.poll() is None:
            time.sleep(args.sample_s)
            elapsed = time.monotonic() - started
            step_sum, step_count = step_totals(operator.metrics_url)
            steps = step_count - last_count
            sample = {
                "wall_s": round(elapsed, 1),
                "sim_s": round(elapsed * args.time_scale, 1),
                "operator_rss_mib": rss_mib(operator.pid),
                **{f"gate_{pod.name}_rss_mib": rss_mib(pod.gate.pid) for pod in fleet.pods},
                "steps": int(steps),
                "step_ms_mean": round(1000 * (step_sum - last_sum) / steps, 2) if steps else None,
            }
            last_sum, last_count = step_sum, step_count
            samples.append(sample)
            progress.update(
                task,
                completed=min(elapsed, wall_s),
                note=f"operator {sample['operator_rss_mib']} MiB",
            )
    policy = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "soak"
    )
    load_summary = json.loads(load_out.read_text())["summary"] if load_out.exists() else None
    status = policy.get("status") or {}
    return {
        "sim_minutes": args.sim_minutes,
        "time_scale": args.time_scale,
        "wall_s": round(time.monotonic() - started, 1),
        "rate_rps_sim": args.rate_rps,
        "load_exit_code": load.returncode,
        "operator_rss_mib": summarize(samples, "operator_rss_mib"),
        "operator_step_ms": summarize(samples, "step_ms_mean"),
        **{
            f"gate_{pod.name}_rss_mib": summarize(samples, f"gate_{pod.name}_rss_mib")
            for pod in fleet.pods
        },
        "control_steps": sum(sample["steps"] for sample in samples),
        "final_conditions": {c["type"]: c["status"] for c in status.get("conditions", [])},
        "final_knobs": (status.get("recommendation") or {}).get("knobs"),
        "load_summary": {k: v for k, v in (load_summary or {}).items() if k != "by_url"},
        "samples": samples,
        "workdir": str(fleet.workdir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sim-minutes", type=float, default=30.0, help="Simulated minutes of load."
    )
    parser.add_argument(
        "--time-scale", type=float, default=10.0, help="Simulated seconds per wall second."
    )
    parser.add_argument(
        "--rate-rps",
        type=float,
        default=0.6,
        help="Arrivals per simulated second (x time-scale per wall second).",
    )
    parser.add_argument("--sample-s", type=float, default=5.0, help="Wall seconds between samples.")
    parser.add_argument("--json", type=Path, required=True, help="Write the report here.")
    args = parser.parse_args()
    if not CALIBRATION.exists():
        parser.error(f"needs the shared calibration data at {CALIBRATION}")
    report = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    table = Table(title=f"soak: {args.sim_minutes:g} simulated min at x{args.time_scale:g}")
    for column in ("series", "start", "end", "max", "first 1/4 mean", "last 1/4 mean"):
        table.add_column(column, justify="right" if column != "series" else "left")
    for key in (
        "operator_rss_mib",
        "operator_step_ms",
        *[k for k in report if k.startswith("gate_")],
    ):
        row = report[key]
        if row:
            table.add_row(
                key,
                *(
                    str(row[field])
                    for field in ("start", "end", "max", "first_quarter_mean", "last_quarter_mean")
                ),
            )
    Console().print(table)


if __name__ == "__main__":
    main()
