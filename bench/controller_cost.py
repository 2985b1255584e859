"""What one decision of the adaptive controller costs, for a policy with many pods.

    python bench/controller_cost.py [--pods 64] [--warmup 40] [--intervals 30] [--json OUT]

Targets (issue #5): one decision (fit + decide + guard + report, metrics
already fetched) <= 50 ms median, and <= 5 MiB of memory per policy.

Method. Synthetic cumulative metrics for every pod (the series and bucket
layouts vLLM and the gate export, traffic that drifts and bursts, seeded)
are turned into raw readings by the snapshot source OUTSIDE the
measurement: that is the fetch. The controller then reads those readings
through a source that only hands them over, so what is timed and traced
is the controller alone: building observations, the model fit (ring buffer
full after the warm-up), the decision and the guards. Memory is
tracemalloc's traced size of everything the controller allocated and still
holds after warm-up and measurement (its ring buffer, model and state).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from batchpilot.controller.loop import STEPS, PolicyController
from batchpilot.controller.observe import RawWindow
from batchpilot.controller.policy import Behavior, EngineSpec, MetricsSpec, Mode, Policy, Slo
from batchpilot.controller.sources import SnapshotSource

DECISION_TARGET_MS = 50.0
MEMORY_TARGET_MIB = 5.0
INTERVAL_S = 30.0

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5) if m * 10**e <= 131_072)


class _Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.array(bounds)
        self.counts = np.zeros(len(bounds) + 1)
        self.total = 0.0

    def observe(self, values: np.ndarray) -> None:
        self.counts += np.bincount(np.searchsorted(self.bounds, values), minlength=len(self.counts))
        self.total += float(values.sum())

    def samples(self, name: str) -> dict[str, float]:
        cumulative = np.cumsum(self.counts)
        out = {f'{name}_bucket{{le="{float(le)!r}"}}': float(c) for le, c in zip(self.bounds, cumulative[:-1], strict=True)}
        out[f'{name}_bucket{{le="+Inf"}}'] = float(cumulative[-1])
        out[f"{name}_sum"] = self.total
        out[f"{name}_count"] = float(cumulative[-1])
        return out


class SyntheticPod:
    """Cumulative vLLM + gate series of one pod under drifting, bursty traffic."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.counters = {"admitted": 0.0, "shed": 0.0, "prompt": 0.0, "generation": 0.0, "preempt": 0.0}
        self.hist = {
            "batchpilot_gate_time_to_first_token_seconds": _Histogram(TTFT_BUCKETS),
            "batchpilot_gate_queue_wait_seconds": _Histogram(TTFT_BUCKETS),
            "vllm:time_to_first_token_seconds": _Histogram(TTFT_BUCKETS),
            "vllm:inter_token_latency_seconds": _Histogram(ITL_BUCKETS),
            "vllm:e2e_request_latency_seconds": _Histogram(E2E_BUCKETS),
            "vllm:request_prompt_tokens": _Histogram(TOKEN_BUCKETS),
            "vllm:request_generation_tokens": _Histogram(TOKEN_BUCKETS),
        }

    def advance(self, interval: int) -> dict[str, float]:
        rng = self.rng
        # Load and mix drift over ~20 intervals; bursts on top.
        load = 12.0 * (1.0 + 0.5 * math.sin(interval / 20.0)) * rng.gamma(4.0, 0.25)
        prompt_p50 = 1000.0 * (1.0 + 0.5 * math.sin(interval / 13.0))
        requests = int(rng.poisson(load * INTERVAL_S))
        prompts = np.maximum(1, rng.lognormal(math.log(prompt_p50), 0.8, requests))
        outputs = np.maximum(1, rng.lognormal(math.log(150.0), 1.0, requests))
        step = 0.012 + 0.0008 * load
        shed = int(rng.binomial(requests, 0.02))
        self.counters["admitted"] += requests - shed
        self.counters["shed"] += shed
        self.counters["prompt"] += float(prompts.sum())
        self.counters["generation"] += float(outputs.sum())
        self.counters["preempt"] += float(rng.poisson(0.1))
        ttft_engine = prompts * 2e-5 + rng.exponential(step, requests)
        waits = rng.exponential(0.2, requests)
        self.hist["vllm:time_to_first_token_seconds"].observe(ttft_engine)
        self.hist["batchpilot_gate_queue_wait_seconds"].observe(waits)
        self.hist["batchpilot_gate_time_to_first_token_seconds"].observe(ttft_engine + waits)
        self.hist["vllm:inter_token_latency_seconds"].observe(rng.gamma(4.0, step / 4.0, min(int(outputs.sum()), 20_000)))
        self.hist["vllm:e2e_request_latency_seconds"].observe(ttft_engine + outputs * step)
        self.hist["vllm:request_prompt_tokens"].observe(prompts)
        self.hist["vllm:request_generation_tokens"].observe(outputs)
        running = load * 150.0 * step
        snapshot = {
            "batchpilot_gate_admitted_total": self.counters["admitted"],
            'batchpilot_gate_shed_total{reason="queue_deadline"}': self.counters["shed"],
            "vllm:prompt_tokens_total": self.counters["prompt"],
            "vllm:generation_tokens_total": self.counters["generation"],
            "vllm:num_preemptions_total": self.counters["preempt"],
            "vllm:num_requests_running": running,
            "vllm:num_requests_waiting": float(rng.poisson(1.0)),
            "vllm:kv_cache_usage_perc": min(1.0, running * 1200.0 / 400_000.0),
            "batchpilot_gate_queue_length": float(rng.poisson(2.0)),
            "batchpilot_gate_inflight_requests": running,
            "batchpilot_gate_inflight_tokens": running * 1400.0,
            'batchpilot_gate_knob{knob="max_concurrency"}': 128.0,
            'batchpilot_gate_knob{knob="max_inflight_tokens"}': 150_000.0,
            'batchpilot_gate_knob{knob="queue_deadline_ms"}': 1800.0,
            'batchpilot_gate_knob{knob="aging_ms"}': 2000.0,
            'batchpilot_gate_knob{knob="max_num_batched_tokens"}': 8192.0,
            'batchpilot_gate_discipline{discipline="fcfs"}': 0.0,
            'batchpilot_gate_discipline{discipline="shortest-prompt-first"}': 1.0,
            'batchpilot_gate_discipline{discipline="priority"}': 0.0,
        }
        for name, hist in self.hist.items():
            snapshot.update(hist.samples(name))
        return snapshot


class HandOver:
    """A metrics source that hands over readings fetched beforehand."""

    def __init__(self) -> None:
        self.window: RawWindow | None = None

    def read(self, now_s: float, pods: Sequence[str]) -> RawWindow:
        assert self.window is not None and self.window.time_s == now_s
        return self.window


def policy(pods: int) -> Policy:
    return Policy.default_for(
        Slo(2000, 50),
        EngineSpec(max_num_seqs=512),
        behavior=Behavior(interval_s=INTERVAL_S),
        mode=Mode.AUTO,
        metrics=MetricsSpec(window_s=2 * INTERVAL_S, staleness_s=3 * INTERVAL_S),
        name=f"cost-{pods}",
    )


def fetched_windows(pods: int, intervals: int, seed: int, progress: object) -> list[RawWindow]:
    names = [f"llm-{i}" for i in range(pods)]
    the_policy = policy(pods)
    store = SnapshotSource(the_policy)
    generators = [SyntheticPod(np.random.default_rng([seed, i])) for i in range(pods)]
    windows = []
    for interval in range(1, intervals + 1):
        now = interval * INTERVAL_S
        store.ingest(now, {name: gen.advance(interval) for name, gen in zip(names, generators, strict=True)})
        windows.append(store.read(now, names))
        _advance(progress)
    return windows


def measure(pods: int, warmup: int, intervals: int, seed: int) -> dict[str, object]:
    names = [f"llm-{i}" for i in range(pods)]
    with _progress(warmup + intervals, f"fetching metrics for {pods} pods") as progress:
        windows = fetched_windows(pods, warmup + intervals, seed, progress)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    source = HandOver()
    controller = PolicyController(policy(pods), source)
    per_step: dict[str, list[float]] = {step: [] for step in STEPS}
    decision_ms: list[float] = []
    with _progress(len(windows), "deciding") as progress:
        for index, window in enumerate(windows):
            source.window = window
            decision = controller.run_once(window.time_s, names)
            if index >= warmup:
                for step, seconds in decision.step_seconds.items():
                    per_step[step].append(seconds * 1e3)
                decision_ms.append(sum(s for k, s in decision.step_seconds.items() if k != "observe") * 1e3)
            _advance(progress)
    source.window = None
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # tracemalloc slows allocation-heavy code: time again without it.
    controller = PolicyController(policy(pods), source)
    timed: list[float] = []
    observe_ms: list[float] = []
    start = time.perf_counter()
    for index, window in enumerate(windows):
        source.window = window
        decision = controller.run_once(window.time_s, names)
        if index >= warmup:
            timed.append(sum(s for k, s in decision.step_seconds.items() if k != "observe") * 1e3)
            observe_ms.append(decision.step_seconds["observe"] * 1e3)
    wall_s = time.perf_counter() - start
    median = statistics.median(timed)
    memory_mib = held / 2**20
    return {
        "pods": pods,
        "warmup_intervals": warmup,
        "measured_intervals": intervals,
        "model_samples": controller.model.samples,
        "decision_ms": {"median": median, "p90": _p90(timed), "max": max(timed)},
        # Typed observations from the fetched readings: reported apart, the
        # target counts the decision from fetched metrics on.
        "observe_ms_median": statistics.median(observe_ms),
        "steps_ms_median_traced": {step: statistics.median(v) for step, v in per_step.items()},
        "memory_mib": memory_mib,
        "wall_s": wall_s,
        "targets": {"decision_ms_median": DECISION_TARGET_MS, "memory_mib": MEMORY_TARGET_MIB},
        "meets": {"decision": median <= DECISION_TARGET_MS, "memory": memory_mib <= MEMORY_TARGET_MIB},
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def _p90(values: list[float]) -> float:
    return float(np.quantile(values, 0.9))


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(total: int, label: str) -> object:
    if not sys.stderr.isatty():
        return _NoProgress()
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.task = bar.add_task(label, total=total)  # type: ignore[attr-defined]
    return bar


def _advance(progress: object) -> None:
    task = getattr(progress, "task", None)
    if task is not None:
        progress.advance(task)  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=40, help="intervals before measuring (fills the ring buffer)")
    parser.add_argument("--intervals", type=int, default=30, help="intervals measured")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    for name in ("pods", "warmup", "intervals"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    result = measure(args.pods, args.warmup, args.intervals, args.seed)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"controller cost, {args.pods} pods")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    decision = result["decision_ms"]
    assert isinstance(decision, dict)
    table.add_row("decision median (ms)", f"{decision['median']:.1f}", f"<= {DECISION_TARGET_MS:g}")
    table.add_row("decision p90 (ms)", f"{decision['p90']:.1f}", "")
    table.add_row("observe median (ms)", f"{result['observe_ms_median']:.1f}", "")
    table.add_row("memory (MiB)", f"{result['memory_mib']:.2f}", f"<= {MEMORY_TARGET_MIB:g}")
    Console(stderr=True).print(table)
    document = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(document + "\n")
    else:
        print(document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
