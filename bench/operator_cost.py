"""What the operator costs: CPU, memory and control-step time for many policies and pods.

Why one module: a standalone script whose parts (the synthetic exporter,
the operator process it measures, the report) are stages of one run that
nothing else imports.

    python bench/operator_cost.py [--policies 100] [--pods-per-policy 16] [--namespaces 10]
                                  [--shards 1] [--measure 180] [--json OUT]

Setup, all real and on loopback: the test stack's kube-apiserver (etcd
embedded) with the InferencePolicy CRD; `--policies` policies in Recommend
mode spread over `--namespaces` namespaces, each selecting its own
`--pods-per-policy` Ready pods (127.1.x.y pod IPs); one exporter per
namespace serving synthetic per-pod series for its pods (the series and
bucket layouts the gate and vLLM export, with per-pod traffic, seeded),
scraped by a real Prometheus every 15 s; and `batchpilot operator` as
`--shards` processes (shard_count / shard_index, docs/scale-out.md), at the
default tick (5 s), each policy stepping every 30 s over a 60 s window.

Recommend mode: the pods are not backed by gates, so Auto would only time
connection failures; Recommend runs everything else (pod index, queries,
fit, decision, guards, status writes).

Measured, after every policy has completed a step (warm-up): each operator
process's CPU time over `--measure` seconds (utime + stime from /proc) as a
share of one core, its peak and final RSS, the control-step duration
(select pods -> queries -> fit -> decide -> guard -> status) from the
operators' own histograms (summed over shards), p50/p99 interpolated within
their buckets, and the load on Prometheus: queries/s, series returned/s,
queries per control step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from batchpilot.contract.knobs import DISCIPLINES, Knobs
from batchpilot.controller.policy import EngineKind
from batchpilot.controller.signals import Kind, Signal, signal_specs
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.kube import GROUP, PLURAL, VERSION
from batchpilot.sim.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, build_1_2_5_buckets
from batchpilot.sim.sandbox.apiserver import start_kube_apiserver
from batchpilot.sim.sandbox.kube import create_crd, create_namespace, create_serving_pod
from batchpilot.sim.sandbox.process import (
    ManagedProcess,
    cpu_seconds,
    free_loopback_port,
    http_get,
    serve_in_thread,
)
from batchpilot.sim.sandbox.prometheus import start_prometheus

ROOT = Path(__file__).resolve().parents[1]

SCRAPE_INTERVAL_S = 15.0
POLICY_INTERVAL_S = 30
WINDOW_S = 60
TOKEN_BUCKETS = build_1_2_5_buckets(131_072)
STEP_HISTOGRAM = "batchpilot_operator_control_step_duration_seconds"
PHASE_HISTOGRAM = "batchpilot_operator_step_phase_duration_seconds"


# -- the exporter ----------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A per-pod distribution for a histogram signal: lognormal median and sigma."""

    median: float
    sigma: float
    buckets: Sequence[float]


# What each histogram signal's observations look like (seconds or tokens).
SHAPES: dict[Signal, Shape] = {
    Signal.GATE_TTFT: Shape(0.35, 0.9, TTFT_BUCKETS),
    Signal.GATE_QUEUE_WAIT: Shape(0.03, 1.2, TTFT_BUCKETS),
    Signal.TTFT: Shape(0.3, 0.8, TTFT_BUCKETS),
    Signal.ITL: Shape(0.03, 0.3, ITL_BUCKETS),
    Signal.TPOT: Shape(0.032, 0.25, ITL_BUCKETS),
    Signal.E2E: Shape(5.0, 0.8, E2E_BUCKETS),
    Signal.PROMPT_TOKENS: Shape(900.0, 0.9, TOKEN_BUCKETS),
    Signal.OUTPUT_TOKENS: Shape(150.0, 0.8, TOKEN_BUCKETS),
}


def _lognormal_cdf(x: float, median: float, sigma: float) -> float:
    return 0.5 * (1.0 + math.erf(math.log(x / median) / (sigma * math.sqrt(2.0))))


class Exporter:
    """Synthetic cumulative series for every pod: counters grow with time at per-pod rates."""

    def __init__(self, pods: Sequence[tuple[str, str]], seed: int) -> None:
        rng = random.Random(seed)
        specs = signal_specs(EngineKind.VLLM, {})
        self.started = time.monotonic()
        # (series line prefix, value per second of uptime, constant) per series.
        self.series: list[tuple[str, float, float]] = []
        for namespace, pod in pods:
            labels = f'namespace="{namespace}",pod="{pod}"'
            rps = rng.uniform(2.0, 6.0)
            scale = rng.uniform(0.8, 1.25)
            for signal, spec in specs.items():
                self._add(signal, spec.kind, spec.metric.metric, labels, rps, scale, rng)

    def _add(self, signal: Signal, kind: Kind, name: str, labels: str, rps: float, scale: float,
             rng: random.Random) -> None:
        add = self.series.append
        if kind is Kind.COUNTER:
            per_request = {Signal.PROMPT_TOKENS_PROCESSED: 900.0, Signal.GENERATION_TOKENS: 150.0,
                           Signal.SHED: 0.01, Signal.PREEMPTIONS: 0.001}.get(signal, 1.0)
            suffix = ',reason="queue_deadline"' if signal is Signal.SHED else ""
            add((f"{name}{{{labels}{suffix}}}", rps * per_request, 0.0))
        elif kind in (Kind.GAUGE_SUM, Kind.GAUGE_MAX):
            level = {Signal.KV_USAGE: 0.6, Signal.GATE_INFLIGHT_TOKENS: 40_000.0}.get(signal, rps * 4.0)
            add((f"{name}{{{labels}}}", 0.0, level * rng.uniform(0.8, 1.2)))
        elif kind is Kind.LABELLED and signal is Signal.GATE_KNOB:
            for knob, value in Knobs(max_concurrency=256).to_mapping().items():
                if knob != "discipline":
                    add((f'{name}{{{labels},knob="{knob}"}}', 0.0, math.inf if value is None else float(value)))
        elif kind is Kind.LABELLED:
            for discipline in DISCIPLINES:
                add((f'{name}{{{labels},discipline="{discipline}"}}', 0.0, float(discipline == "fcfs")))
        else:
            shape = SHAPES[signal]
            median = shape.median * scale
            for bound in (*shape.buckets, math.inf):
                share = 1.0 if math.isinf(bound) else _lognormal_cdf(bound, median, shape.sigma)
                le = "+Inf" if math.isinf(bound) else repr(float(bound))
                add((f'{name}_bucket{{{labels},le="{le}"}}', rps * share, 0.0))
            add((f"{name}_count{{{labels}}}", rps, 0.0))
            mean = median * math.exp(shape.sigma**2 / 2)
            add((f"{name}_sum{{{labels}}}", rps * mean, 0.0))

    def render(self) -> bytes:
        uptime = time.monotonic() - self.started
        return "".join(
            f"{prefix} {rate * uptime + constant:.6g}\n" if not math.isinf(constant) else f"{prefix} +Inf\n"
            for prefix, rate, constant in self.series
        ).encode()


@contextmanager
def serving(exporter: Exporter) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exporter.render()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass  # one line per scrape is noise

    with serve_in_thread(Handler) as port:
        yield f"127.0.0.1:{port}"


# -- the operator process -----------------------------------------------------------


def proc_rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024.0
    return values["VmRSS"], values["VmHWM"]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (le, count) buckets."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return lower_bound


def operator_metrics(url: str) -> dict[str, float]:
    """Every batchpilot_operator_* sample of the operator's /metrics, by sample name."""
    # An operator stepping a thousand policies on two shared cores answers
    # in seconds, not the probe's default fraction of one.
    reply = http_get(url, timeout_s=30.0)
    if reply is None or reply[0] != 200:
        raise RuntimeError(f"operator /metrics at {url} not answering")
    samples: dict[str, float] = {}
    for line in reply[1].decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("batchpilot_operator_") and not name.endswith("_created"):
            samples[name] = float(value)
    return samples


def window_quantiles(
    before: dict[str, float], after: dict[str, float], histogram: str, label: str | None = None
) -> dict[str, Any]:
    """p50/p99/mean of one histogram over the measurement window (after minus before).

    Series of the histogram are summed over their labels, or only those
    carrying `label` (e.g. 'phase="fit"').
    """
    buckets: dict[float, float] = {}
    count = total = 0.0
    for name, value in after.items():
        if label is not None and label not in name:
            continue
        change = value - before.get(name, 0.0)
        if name.startswith(f"{histogram}_bucket"):
            le = name.split('le="')[1].split('"')[0]
            bound = math.inf if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + change
        elif name.startswith(f"{histogram}_count"):
            count += change
        elif name.startswith(f"{histogram}_sum"):
            total += change
    return {
        "count": int(count),
        "p50": _round(histogram_quantile(0.5, list(buckets.items()))),
        "p99": _round(histogram_quantile(0.99, list(buckets.items()))),
        "mean": _round(total / count if count else None),
    }


def policy_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePolicy",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"batchpilot.dev/bench-policy": name}},
            "slo": {"ttftMs": 2000, "tpotMs": 50},
            "metrics": {"windowSeconds": WINDOW_S},
            "behavior": {"intervalSeconds": POLICY_INTERVAL_S},
            "mode": "Recommend",
        },
    }


def pod_ip(index: int) -> str:
    return f"127.1.{index // 250}.{index % 250 + 1}"


class _Bar:
    """A rich progress bar on a terminal, silence elsewhere."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(transient=True, disable=not Console(stderr=True).is_terminal)

    def __enter__(self) -> Any:
        self.progress.__enter__()
        return self.progress

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", type=int, default=100)
    parser.add_argument("--pods-per-policy", type=int, default=16)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--shards", type=int, default=1, help="operator processes, each running one shard")
    parser.add_argument("--measure", type=float, default=180.0, help="seconds of measurement after warm-up")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.policies < 1 or args.pods_per_policy < 1 or not 1 <= args.namespaces <= args.policies:
        parser.error("--policies and --pods-per-policy must be >= 1, --namespaces in 1..policies")
    if not 1 <= args.shards <= args.policies:
        parser.error("--shards must be in 1..policies")
    total_pods = args.policies * args.pods_per_policy
    if total_pods > 250 * 256:
        parser.error("at most 64,000 pods (127.1.0.0/16 pod IPs)")

    workdir = Path(tempfile.mkdtemp(prefix="batchpilot-operator-cost-"))
    kube = start_kube_apiserver(workdir / "kube")
    processes: list[ManagedProcess] = []
    try:
        api = kube.api_client()
        create_crd(api, yaml.safe_load((ROOT / "crds" / "inferencepolicy.yaml").read_text()))
        namespaces = [f"bench-{i}" for i in range(args.namespaces)]
        for namespace in namespaces:
            create_namespace(api, namespace)
        assignments = []  # (namespace, policy, pod)
        for p in range(args.policies):
            namespace, policy = namespaces[p % args.namespaces], f"policy-{p:03d}"
            assignments += [(namespace, policy, f"{policy}-pod-{k:02d}") for k in range(args.pods_per_policy)]

        def make_pod(item: tuple[int, tuple[str, str, str]]) -> None:
            index, (namespace, policy, pod) = item
            create_serving_pod(api, namespace, pod, pod_ip=pod_ip(index), ports={"admin": 9090},
                               labels={"batchpilot.dev/bench-policy": policy})

        with _Bar() as bar:
            task = bar.add_task(f"creating {total_pods} pods", total=total_pods)
            # 4 writers: the API server's own etcd shares the two cores.
            with ThreadPoolExecutor(4) as pool:
                for _ in pool.map(make_pod, enumerate(assignments)):
                    bar.advance(task)

        # One exporter (and scrape target) per namespace: one target of
        # millions of series would not be parsed within the scrape timeout.
        exporters = [Exporter([(ns, pod) for ns, _, pod in assignments if ns == namespace],
                              args.seed + index)
                     for index, namespace in enumerate(namespaces)]
        with ExitStack() as served:
            addresses = [served.enter_context(serving(exporter)) for exporter in exporters]
            prometheus = start_prometheus(addresses, scrape_interval_s=SCRAPE_INTERVAL_S,
                                          workdir=workdir / "prom", timeout_s=300.0)
            try:
                result = run_operator(args, kube, api, prometheus, namespaces, workdir, processes,
                                      sum(len(exporter.series) for exporter in exporters))
            finally:
                prometheus.stop()
    finally:
        for process in processes:
            process.stop()
        kube.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    document = {
        "benchmark": "operator_cost",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1m_at_end": os.getloadavg()[0]},
        **result,
    }
    text = json.dumps(document, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print_table(document)
    if args.json is None:
        print(text)


def run_operator(args: argparse.Namespace, kube: Any, api: client.ApiClient, prometheus: Any,
                 namespaces: list[str], workdir: Path, processes: list[ManagedProcess],
                 series: int) -> dict[str, Any]:
    prometheus_url, prometheus_pid = prometheus.url, prometheus.process.pid
    custom = client.CustomObjectsApi(api)
    for p in range(args.policies):
        namespace = namespaces[p % args.namespaces]
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                               policy_manifest(f"policy-{p:03d}"))
    operators, metrics_urls = [], []
    for shard in range(args.shards):
        health_port, metrics_port = free_loopback_port(), free_loopback_port()
        config = workdir / f"operator-{shard}.yaml"
        config.write_text(yaml.safe_dump({
            "prometheus": {"default": prometheus_url}, "namespaces": namespaces,
            "health_host": "127.0.0.1", "health_port": health_port, "metrics_port": metrics_port,
            "shard_count": args.shards, "shard_index": shard,
        }))
        operator = ManagedProcess(f"operator-{shard}",
                                  [sys.executable, "-m", "batchpilot.cli.main", "operator",
                                   "--config", str(config)],
                                  workdir / f"operator-{shard}.log",
                                  {**os.environ, "KUBECONFIG": str(kube.kubeconfig)})
        processes.append(operator)
        operators.append(operator)
        metrics_urls.append(f"http://127.0.0.1:{metrics_port}/metrics")
    started = time.monotonic()

    def stepped() -> int:
        count = 0
        for namespace in namespaces:
            for item in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
                status = item.get("status") or {}
                count += "recommendation" in status or "conditions" in status
        return count

    with _Bar() as bar:
        task = bar.add_task("warm-up: first step of every policy", total=args.policies)
        # Two intervals: the first steps queue behind max_parallel_steps, and
        # Prometheus needs two scrapes for rate(); a large fleet's first
        # listings and pod indexes take longer.
        deadline = time.monotonic() + 4 * POLICY_INTERVAL_S + 120 + 0.3 * args.policies
        while (done := stepped()) < args.policies:
            bar.update(task, completed=done)
            for operator in operators:
                if not operator.running():
                    raise RuntimeError(f"{operator.name} exited; its log ends:\n{operator.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done}/{args.policies} policies stepped; log:\n"
                                   f"{operators[0].log_tail()}")
            time.sleep(2.0)
    warmup_s = time.monotonic() - started
    before_each = [operator_metrics(url) for url in metrics_urls]
    before = merged(before_each)
    neighbours = {"prometheus": prometheus_pid, "kube-apiserver": kube.process.pid, "exporter": os.getpid()}
    neighbours_before = {name: cpu_seconds(pid) for name, pid in neighbours.items()}
    cpu_before = [cpu_seconds(operator.pid) for operator in operators]
    wall_before = time.monotonic()
    rss_samples: list[list[float]] = [[] for _ in operators]
    with _Bar() as bar:
        task = bar.add_task(f"measuring {args.measure:.0f} s", total=args.measure)
        while (elapsed := time.monotonic() - wall_before) < args.measure:
            for samples, operator in zip(rss_samples, operators, strict=True):
                samples.append(proc_rss_mib(operator.pid)[0])
            bar.update(task, completed=elapsed)
            time.sleep(1.0)
    cpu_after = [cpu_seconds(operator.pid) for operator in operators]
    wall = time.monotonic() - wall_before
    neighbour_cpu = {name: round((cpu_seconds(pid) - neighbours_before[name]) / wall, 4)
                     for name, pid in neighbours.items()}
    prometheus_rss = proc_rss_mib(prometheus_pid)[1]
    after_each = [operator_metrics(url) for url in metrics_urls]
    after = merged(after_each)
    per_process = [
        {"shard": index,
         "control_steps": window_quantiles(before_each[index], after_each[index], STEP_HISTOGRAM)["count"],
         "cpu_share_of_one_core": round((cpu_after[index] - cpu_before[index]) / wall, 4),
         "rss_mib": {"mean": round(sum(samples) / len(samples), 1),
                     "peak": round(proc_rss_mib(operator.pid)[1], 1)}}
        for index, (operator, samples) in enumerate(zip(operators, rss_samples, strict=True))
    ]

    def delta(prefix: str) -> int:
        return int(sum(value - before.get(name, 0.0) for name, value in after.items() if name.startswith(prefix)))

    defaults = OperatorConfig()
    available = sum(_condition(item, "MetricsAvailable") == "True"
                    for namespace in namespaces
                    for item in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"])
    steps = window_quantiles(before, after, STEP_HISTOGRAM)
    queries = delta("batchpilot_operator_prometheus_queries_total")
    samples_returned = delta("batchpilot_operator_prometheus_samples_total")
    return {
        "setup": {"policies": args.policies, "pods_per_policy": args.pods_per_policy,
                  "pods": args.policies * args.pods_per_policy, "namespaces": args.namespaces,
                  "shards": args.shards,
                  "mode": "Recommend", "policy_interval_s": POLICY_INTERVAL_S, "window_s": WINDOW_S,
                  "scrape_interval_s": SCRAPE_INTERVAL_S, "exporter_series": series,
                  "operator_tick_s": defaults.tick_seconds,
                  "max_parallel_steps": defaults.max_parallel_steps},
        "warmup_s": round(warmup_s, 1),
        "measure_s": round(wall, 1),
        # Summed over the shard processes; per_process has each one.
        "cpu_share_of_one_core": round(sum(p["cpu_share_of_one_core"] for p in per_process), 4),
        "rss_mib": {"mean": round(sum(p["rss_mib"]["mean"] for p in per_process), 1),
                    "peak_per_process": max(p["rss_mib"]["peak"] for p in per_process)},
        "per_process": per_process,
        # The rest of the stack on the same machine, for context (the
        # exporters share the benchmark's own process).
        "colocated_cpu_share_of_one_core": neighbour_cpu,
        "prometheus_peak_rss_mib": round(prometheus_rss, 1),
        # Quantiles interpolated within the operators' histogram buckets,
        # over the measurement window only.
        "control_step_s": steps,
        "slot_wait_s": window_quantiles(before, after, "batchpilot_operator_step_slot_wait_seconds"),
        "query_s": window_quantiles(before, after, "batchpilot_operator_prometheus_query_duration_seconds"),
        # The controller's own phases inside a step (observe = the PromQL queries).
        "phase_s": {phase: window_quantiles(before, after, PHASE_HISTOGRAM, f'phase="{phase}"')
                    for phase in ("observe", "fit", "recommend", "guard", "report", "actuate")},
        "queries": queries,
        "prometheus_load": {
            "queries_per_s": round(queries / wall, 2),
            "series_returned_per_s": round(samples_returned / wall, 1),
            "queries_per_control_step": round(queries / steps["count"], 2) if steps["count"] else None,
        },
        "status_writes": delta("batchpilot_operator_status_writes_total"),
        "policies_with_metrics_available": available,
    }


def merged(pages: Sequence[dict[str, float]]) -> dict[str, float]:
    """Every shard's batchpilot_operator_* samples, summed by sample name."""
    total: dict[str, float] = {}
    for page in pages:
        for name, value in page.items():
            total[name] = total.get(name, 0.0) + value
    return total


def _condition(item: dict[str, Any], kind: str) -> str | None:
    for condition in (item.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition.get("status")
    return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def print_table(document: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    setup = document["setup"]
    table = Table(title=f"operator cost: {setup['policies']} policies x {setup['pods_per_policy']} pods "
                        f"({setup['pods']} pods), {setup['shards']} shard(s), "
                        f"{document['measure_s']:.0f} s measured")
    table.add_column("metric")
    table.add_column("value", justify="right")
    steps = document["control_step_s"]
    rows = [
        ("CPU, all shards (share of one core)", f"{document['cpu_share_of_one_core']:.1%}"),
        ("CPU per shard (share of one core)",
         ", ".join(f"{p['cpu_share_of_one_core']:.0%}" for p in document["per_process"])),
        ("RSS peak per shard (MiB)", ", ".join(f"{p['rss_mib']['peak']:.0f}" for p in document["per_process"])),
        ("control steps", str(steps["count"])),
        ("control step p50 / p99 (ms)", f"{_ms(steps['p50'])} / {_ms(steps['p99'])}"),
        ("slot wait p50 / p99 (ms)",
         f"{_ms(document['slot_wait_s']['p50'])} / {_ms(document['slot_wait_s']['p99'])}"),
        ("PromQL query p50 / p99 (ms)",
         f"{_ms(document['query_s']['p50'])} / {_ms(document['query_s']['p99'])}"),
        ("fit p50 / p99 (ms)",
         f"{_ms(document['phase_s']['fit']['p50'])} / {_ms(document['phase_s']['fit']['p99'])}"),
        ("PromQL queries", str(document["queries"])),
        ("queries/s, series returned/s",
         f"{document['prometheus_load']['queries_per_s']:.0f}, "
         f"{document['prometheus_load']['series_returned_per_s']:.0f}"),
        ("queries per control step", str(document["prometheus_load"]["queries_per_control_step"])),
        ("Prometheus peak RSS (MiB)", f"{document['prometheus_peak_rss_mib']:.0f}"),
        ("co-located CPU (share of one core)",
         ", ".join(f"{name} {share:.0%}" for name, share in document["colocated_cpu_share_of_one_core"].items())),
        ("status writes", str(document["status_writes"])),
        ("policies with metrics", f"{document['policies_with_metrics_available']}/{setup['policies']}"),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


if __name__ == "__main__":
    main()
