"""What the gate adds to every streamed token: latency per chunk, TTFT, and its own CPU.

Three processes: a paced streaming engine (this script, `--role engine`), the
gate (`batchpilot gate`, its own process so its CPU can be read from /proc),
and this script as the load generator: one asyncio process, one aiohttp
session. `--streams` concurrent clients each stream completions back to back
at `--tokens-per-s`; every phase runs once straight to the engine and once
through the gate, alternating the order each round so that drift in the
machine's load falls on both sides.

Per-chunk latency is the engine's send time (written into each chunk) to the
client's receive time, both on CLOCK_MONOTONIC, which all processes on a
Linux host share. TTFT is request sent to first chunk received; the engine
waits one token interval before its first token. Reported: the gate's added
p50/p99 per chunk and added p99 TTFT (gate minus direct, per round, and the
median over rounds), and the gate's CPU in cores.

    python bench/gate_overhead.py --json out/gate_overhead.json

Linux only (/proc for the gate's CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

TARGETS = {"added_chunk_p99_ms": 2.0, "added_ttft_p99_ms": 5.0, "gate_cpu_cores": 1.0}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the engine ---------------------------------------------------------------


async def _engine_completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    interval_s = 1.0 / float(request.headers["x-tokens-per-s"])
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    start = time.monotonic()
    # An OpenAI-sized chunk (~150 bytes), with the send time for the client.
    template = '{"id":"cmpl-bench","object":"text_completion","model":"bench","choices":[{"index":0,"text":" tok","finish_reason":null}],"t":%r}'
    for index in range(body["max_tokens"]):
        # Absolute schedule: the pace does not drift with event-loop delays.
        delay = start + (index + 1) * interval_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await response.write(b"data: " + (template % time.monotonic()).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _engine_health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _run_engine() -> None:
    app = web.Application()
    app.add_routes(
        [web.post("/v1/completions", _engine_completions), web.get("/health", _engine_health)]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


# --- the load generator ------------------------------------------------------


@dataclass
class PhaseResult:
    chunk_latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    gate_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    # The measurement window (monotonic clock) and the chunks received in it,
    # the same window the CPU readings cover.
    window_start: float = math.inf
    window_end: float = math.inf
    window_chunks: int = 0

    def summary(self) -> dict[str, Any]:
        chunks = np.asarray(self.chunk_latencies_s) * 1000.0
        ttfts = np.asarray(self.ttfts_s) * 1000.0
        summary: dict[str, Any] = {
            "requests": self.requests,
            "errors": self.errors,
            "chunks": int(chunks.size),
            "chunk_latency_p50_ms": float(np.percentile(chunks, 50)),
            "chunk_latency_p99_ms": float(np.percentile(chunks, 99)),
            "ttft_p50_ms": float(np.percentile(ttfts, 50)),
            "ttft_p99_ms": float(np.percentile(ttfts, 99)),
            "wall_s": round(self.wall_s, 2),
            "client_cpu_cores": round(self.client_cpu_s / self.wall_s, 3),
        }
        if self.gate_cpu_s is not None:
            summary["gate_cpu_cores"] = round(self.gate_cpu_s / self.wall_s, 3)
            # The gate's service time per relayed chunk, free of scheduling
            # delays: the floor of what it adds on an idle core.
            summary["gate_cpu_us_per_chunk"] = round(
                self.gate_cpu_s / max(1, self.window_chunks) * 1e6, 1
            )
        return summary


async def _stream_once(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    result: PhaseResult,
) -> None:
    sent = time.monotonic()
    first = True
    latencies: list[float] = []
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            result.errors += 1
            await response.read()
            return
        async for line in response.content:
            now = time.monotonic()
            if not line.startswith(b'data: {"'):
                continue
            if first:
                ttft = now - sent
                first = False
            latencies.append(now - json.loads(line[6:])["t"])
            if result.window_start <= now < result.window_end:
                result.window_chunks += 1
    # Only requests sent inside the window count (not the warm-up's).
    if sent >= result.window_start:
        result.requests += 1
        result.ttfts_s.append(ttft)
        result.chunk_latencies_s.extend(latencies)


async def _phase(
    session: aiohttp.ClientSession,
    base_url: str,
    args: argparse.Namespace,
    gate_pid: int | None,
    on_tick: Any,
) -> PhaseResult:
    url = f"{base_url}/v1/completions"
    body = json.dumps(
        {"model": "bench", "prompt": "x" * 400, "max_tokens": args.tokens, "stream": True}
    ).encode()
    headers = {"Content-Type": "application/json", "x-tokens-per-s": str(args.tokens_per_s)}
    result = PhaseResult()
    stop_at = time.monotonic() + args.warmup_s + args.duration_s

    async def client() -> None:
        while time.monotonic() < stop_at:
            await _stream_once(session, url, body, headers, result)

    clients = [asyncio.create_task(client()) for _ in range(args.streams)]
    await asyncio.sleep(args.warmup_s)
    gate_cpu_start = _process_cpu_s(gate_pid) if gate_pid else None
    client_cpu_start = _own_cpu_s()
    started = result.window_start = time.monotonic()
    result.window_end = stop_at
    while time.monotonic() < stop_at:
        await asyncio.sleep(1.0)
        on_tick()
    result.wall_s = time.monotonic() - started
    if gate_pid and gate_cpu_start is not None:
        result.gate_cpu_s = _process_cpu_s(gate_pid) - gate_cpu_start
    result.client_cpu_s = _own_cpu_s() - client_cpu_start
    # Streams in progress at the stop time finish and count: they were sent in the window.
    await asyncio.gather(*clients)
    return result


def _process_cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name (which may hold spaces) start at ")".
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]
    return (int(utime) + int(stime)) / _CLOCK_TICKS


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _start_engine() -> tuple[subprocess.Popen[str], int]:
    engine = subprocess.Popen(
        [sys.executable, __file__, "--role", "engine"], stdout=subprocess.PIPE, text=True
    )
    assert engine.stdout is not None
    return engine, int(engine.stdout.readline())


def _start_gate(engine_port: int, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    with log_path.open("wb") as log:
        gate = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "batchpilot.cli.main",
                "gate",
                "--upstream",
                f"http://127.0.0.1:{engine_port}",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                # A cap above the load: the admission path runs on every
                # request, but nothing queues, so this measures the gate's own cost.
                "--knobs",
                '{"max_concurrency": 1024}',
            ],
            stderr=log,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(r"listening on port (\d+)", log_path.read_text())
        if match:
            return gate, int(match.group(1))
        if gate.poll() is not None:
            raise SystemExit(f"gate exited:\n{log_path.read_text()}")
        time.sleep(0.1)
    raise SystemExit(f"gate did not start listening within 20 s:\n{log_path.read_text()}")


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from rich.progress import Progress

    engine, engine_port = _start_engine()
    gate, gate_port = _start_gate(engine_port, Path(tempfile.mkdtemp()) / "gate.log")
    rounds: list[dict[str, Any]] = []
    phase_s = args.warmup_s + args.duration_s
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            with Progress(disable=not sys.stderr.isatty()) as progress:
                task = progress.add_task("gate overhead", total=args.rounds * 2 * args.duration_s)
                for round_index in range(args.rounds):
                    order = ["direct", "gate"] if round_index % 2 == 0 else ["gate", "direct"]
                    phases: dict[str, Any] = {}
                    for side in order:
                        progress.update(
                            task, description=f"round {round_index + 1}: {side} (~{phase_s:.0f} s)"
                        )
                        url = f"http://127.0.0.1:{gate_port if side == 'gate' else engine_port}"
                        pid = gate.pid if side == "gate" else None
                        result = await _phase(
                            session, url, args, pid, lambda: progress.advance(task)
                        )
                        phases[side] = result.summary()
                    rounds.append({**phases, "added": _added(phases["direct"], phases["gate"])})
    finally:
        gate.terminate()
        engine.terminate()
        gate.wait(30)
        engine.wait(30)
    return _report(args, rounds)


def _added(direct: dict[str, Any], gate: dict[str, Any]) -> dict[str, float]:
    return {
        "added_chunk_p50_ms": gate["chunk_latency_p50_ms"] - direct["chunk_latency_p50_ms"],
        "added_chunk_p99_ms": gate["chunk_latency_p99_ms"] - direct["chunk_latency_p99_ms"],
        "added_ttft_p99_ms": gate["ttft_p99_ms"] - direct["ttft_p99_ms"],
        "gate_cpu_cores": gate["gate_cpu_cores"],
        "gate_cpu_us_per_chunk": gate["gate_cpu_us_per_chunk"],
    }


def _report(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    added = {key: [r["added"][key] for r in rounds] for key in rounds[0]["added"]}
    median = {key: float(np.median(values)) for key, values in added.items()}
    return {
        "benchmark": "gate_overhead",
        "config": {
            "streams": args.streams,
            "tokens_per_s": args.tokens_per_s,
            "tokens_per_request": args.tokens,
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "rounds": args.rounds,
        },
        "machine": {
            "cpus": os.cpu_count(),
            # Load from everything on the machine; above the core count, the
            # latency differences measure CPU contention more than the gate.
            "loadavg_1m_at_end": os.getloadavg()[0],
            "python": sys.version.split()[0],
        },
        "rounds": rounds,
        "result": {key: round(value, 3) for key, value in median.items()},
        # Spread of each difference over rounds: how far to trust the medians.
        "noise_range": {key: [round(min(v), 3), round(max(v), 3)] for key, v in added.items()},
        "targets": TARGETS,
        "met": {key: median[key] <= limit for key, limit in TARGETS.items()},
    }


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"gate overhead: {report['config']['streams']} streams x {report['config']['tokens_per_s']} tok/s"
    )
    for column in (
        "round",
        "side",
        "requests",
        "chunk p50 ms",
        "chunk p99 ms",
        "ttft p99 ms",
        "gate cpu",
        "client cpu",
    ):
        table.add_column(column, justify="right")
    for index, round_result in enumerate(report["rounds"], start=1):
        for side in ("direct", "gate"):
            phase = round_result[side]
            table.add_row(
                str(index),
                side,
                str(phase["requests"]),
                f"{phase['chunk_latency_p50_ms']:.2f}",
                f"{phase['chunk_latency_p99_ms']:.2f}",
                f"{phase['ttft_p99_ms']:.2f}",
                str(phase.get("gate_cpu_cores", "")),
                str(phase["client_cpu_cores"]),
            )
    console = Console()
    console.print(table)
    for key, value in report["result"].items():
        target = ""
        if key in TARGETS:
            target = f" (target <= {TARGETS[key]}: {'met' if report['met'][key] else 'MISSED'})"
        console.print(f"{key}: {value:.3f}{target}; range over rounds {report['noise_range'][key]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--role", choices=["bench", "engine"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--streams", type=int, default=200, help="concurrent streaming clients")
    parser.add_argument("--tokens-per-s", type=float, default=40.0, help="engine pace per stream")
    parser.add_argument("--tokens", type=int, default=80, help="tokens per request")
    parser.add_argument("--duration-s", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds per phase")
    parser.add_argument(
        "--rounds", type=int, default=3, help="direct/gate pairs, order alternating"
    )
    parser.add_argument("--json", type=Path, required=False, help="write the JSON report here")
    args = parser.parse_args()
    if args.role == "engine":
        asyncio.run(_run_engine())
        return
    report = asyncio.run(_bench(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)


if __name__ == "__main__":
    main()
