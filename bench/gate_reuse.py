"""Streams through the gate to llama-server while its config changes: do any fail?

    python bench/gate_reuse.py [--requests 5000] [--clients 16] [--max-tokens 8]
                               [--config-every 50] [--json OUT]

llama-server closes its connection after every streamed answer while
advertising keep-alive, so the gate's connection pool can hand a request a
connection that is already closed. The gate resends such a request once, on a
new connection, when no byte of an answer came back (gate/proxy.py); before
it did, about 5% of the requests here failed with 502 upstream_unreachable.
Each resend is counted in batchpilot_gate_upstream_retries_total, so the
`retries` reported here are the 502s there would have been without it.

Setup, all real and on loopback: llama-server (batchpilot.sim.sandbox, the generated
model; `--parallel` slots) and `batchpilot gate` as its own process in front
of it. `--clients` clients stream completions (`ignore_eos`, exactly
`--max-tokens` tokens each) back to back, `--requests` in all; after every
`--config-every` answers, one of them PUTs a new max_concurrency
(2, 8, 1, 16, 4, 12, ...). Every answer is checked: status 200, exactly
`--max-tokens` token events, and the final [DONE].

Reported: sent, ok, 502s, other failures (by kind), the gate's retries by
reason, its admitted + shed + failed against sent, config changes applied,
wall time, and the gate's mean time per output token.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from batchpilot.sim.llamacpp import SERVED_MODEL, ServerOptions
from batchpilot.sim.sandbox.llama_server import start_llama_server
from batchpilot.sim.sandbox.process import ManagedProcess

TOKEN = "gate-reuse-bench-token"
CAPS = (2, 8, 1, 16, 4, 12)
GATE_START_TIMEOUT_S = 30.0
# What the gate's `failed_total` counts that is not a request.
NOT_A_REQUEST = "native_apply"


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    status_502: int = 0
    other_failures: Counter[str] = field(default_factory=Counter)
    config_changes: int = 0
    config_failures: int = 0


def start_gate(upstream: str, workdir: Path, knobs: dict[str, Any]) -> tuple[ManagedProcess, str, str]:
    """`batchpilot gate` on free loopback ports: (process, proxy URL, admin URL)."""
    argv = [sys.executable, "-m", "batchpilot.cli.gate", "--upstream", upstream,
            "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--knobs", json.dumps(knobs)]
    process = ManagedProcess("gate", argv, workdir / "gate.log", {**os.environ, "BATCHPILOT_GATE_TOKEN": TOKEN})
    ports: list[re.Match[str]] = []

    def listening() -> bool:
        match = re.search(r"listening on port (\d+), admin on port (\d+)", process.log_path.read_text())
        if match is not None:
            ports.append(match)
        return match is not None

    process.wait_until(listening, GATE_START_TIMEOUT_S, "listening")
    return process, f"http://127.0.0.1:{ports[0].group(1)}", f"http://127.0.0.1:{ports[0].group(2)}"


def check_stream(text: str, max_tokens: int) -> str | None:
    """None for a complete answer of exactly `max_tokens` tokens, else what is wrong."""
    payloads = [event.removeprefix("data: ") for event in text.split("\n\n") if event]
    if payloads[-1:] != ["[DONE]"]:
        return "no_done"
    try:
        # One event per token, whatever its text (a special token's is empty),
        # then a closing one with the finish_reason and no token.
        tokens = sum(json.loads(payload)["choices"][0]["finish_reason"] is None for payload in payloads[:-1])
    except (ValueError, KeyError, IndexError, TypeError):
        return "malformed_event"
    return None if tokens == max_tokens else "wrong_token_count"


async def drive(args: argparse.Namespace, proxy: str, admin: str) -> Tally:
    tally = Tally()
    caps = itertools.cycle(CAPS)
    body = {"model": SERVED_MODEL, "prompt": "hello gate", "max_tokens": args.max_tokens,
            "stream": True, "ignore_eos": True}
    # One iterator shared by the clients: each request is sent once.
    requests = iter(range(args.requests))
    answered = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def put_config(cap: int) -> None:
            async with client.put(admin + "/config", json={"max_concurrency": cap},
                                  headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                if response.status == 200:
                    tally.config_changes += 1
                else:
                    tally.config_failures += 1

        async def one() -> None:
            tally.sent += 1
            try:
                async with client.post(proxy + "/v1/completions", json=body) as response:
                    text = await response.text()
            except aiohttp.ClientError as err:
                tally.other_failures[type(err).__name__] += 1
                return
            if response.status == 502:
                tally.status_502 += 1
            elif response.status != 200:
                tally.other_failures[f"status_{response.status}"] += 1
            elif (problem := check_stream(text, args.max_tokens)) is not None:
                tally.other_failures[problem] += 1
            else:
                tally.ok += 1

        async def client_loop() -> None:
            nonlocal answered
            for _ in requests:
                await one()
                answered += 1
                if answered % args.config_every == 0:
                    await put_config(next(caps))

        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
    return tally


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as client, client.get(url + "/metrics") as response:
        text = await response.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def by_reason(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[str, int]:
    return {dict(labels)["reason"]: int(value) for (sample, labels), value in samples.items() if sample == name}


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="batchpilot-gate-reuse-"))
    engine = start_llama_server(ServerOptions(parallel=args.parallel), workdir=workdir / "llama")
    try:
        gate, proxy, admin = start_gate(engine.url, workdir, {"max_concurrency": CAPS[0]})
        try:
            started = time.monotonic()
            tally = asyncio.run(drive(args, proxy, admin))
            wall_s = time.monotonic() - started
            samples = asyncio.run(scrape(admin))
        finally:
            gate.stop()
    finally:
        engine.stop()
    clean = tally.ok == tally.sent
    if clean:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = by_reason(samples, "batchpilot_gate_failed_total")
    failed_requests = sum(count for reason, count in failed.items() if reason != NOT_A_REQUEST)
    admitted = int(samples[("batchpilot_gate_admitted_total", ())])
    shed = sum(by_reason(samples, "batchpilot_gate_shed_total").values())
    retries = by_reason(samples, "batchpilot_gate_upstream_retries_total")
    tpot_count = samples[("batchpilot_gate_time_per_output_token_seconds_count", ())]
    tpot_sum = samples[("batchpilot_gate_time_per_output_token_seconds_sum", ())]
    return {
        "sent": tally.sent,
        "ok": tally.ok,
        "status_502": tally.status_502,
        "other_failures": dict(tally.other_failures),
        "retries": retries,
        "retries_total": sum(retries.values()),
        "retries_per_request": round(sum(retries.values()) / max(tally.sent, 1), 4),
        "gate_failed": {reason: count for reason, count in failed.items() if count},
        "admitted": admitted,
        "shed": shed,
        "admitted_shed_failed": admitted + shed + failed_requests,
        "admitted_shed_failed_equals_sent": admitted + shed + failed_requests == tally.sent,
        "config_changes": tally.config_changes,
        "config_failures": tally.config_failures,
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(tally.sent / wall_s, 1),
        "gate_tpot_mean_ms": round(1000 * tpot_sum / tpot_count, 3) if tpot_count else None,
        # The gate's and llama-server's logs, kept when a request failed.
        "log_dir": None if clean else str(workdir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--config-every", type=int, default=50, help="answers between config changes")
    parser.add_argument("--parallel", type=int, default=16, help="llama-server slots")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if min(args.requests, args.clients, args.max_tokens, args.config_every, args.parallel) < 1:
        parser.error("every count must be >= 1")

    result = run(args)
    document = {
        "benchmark": "gate_reuse",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1m_at_end": os.getloadavg()[0]},
        "config": {"requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
                   "config_every": args.config_every, "parallel": args.parallel},
        "result": result,
    }
    text = json.dumps(document, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
