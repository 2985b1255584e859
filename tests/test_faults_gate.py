"""Gate faults with real processes over real HTTP: `batchpilot sim serve` behind `batchpilot gate`.

tests/test_gate_http.py checks the same behaviours in-process against a fake
engine; here both sides are the shipped commands, each its own OS process,
so what is checked is what a pod runs: the engine dying and coming back,
clients vanishing mid-stream, a 30x overload burst while the config changes,
and the gate's memory over a few thousand requests.

The process helpers here (`start_sim`, `start_gate`, `gate_metrics`) are
reused by tests/test_security_gate.py and tests/test_props_gate.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchpilot.sim.sandbox.process import ManagedProcess, http_get

SHARED = Path(__file__).resolve().parents[2] / "shared"
CALIBRATION = SHARED / "data" / "calibration" / "llama3.1-8b_vllm_step_latency.csv"
MODEL = "meta-llama/Meta-Llama-3.1-8B"
CLI = (sys.executable, "-m", "batchpilot.cli.main")
TOKEN = "gate-admin-token-7f3a9c"

# Processes start in ~1 s on an idle machine; 4-5 engineers share 2 cores.
START_TIMEOUT_S = 30.0
# The gate probes the engine every 0.1 s here (default 2 s), so readiness
# follows the engine within a fraction of a second.
HEALTH_INTERVAL_S = 0.1

pytestmark = pytest.mark.skipif(
    not CALIBRATION.exists(), reason=f"needs the shared calibration data at {CALIBRATION}"
)


@dataclass
class SimProcess:
    process: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class GateProcess:
    process: ManagedProcess
    proxy_port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None, status
        return int(match.group(1)) * 1024


def _wait_for_log(process: ManagedProcess, pattern: str) -> re.Match[str]:
    found: list[re.Match[str]] = []

    def logged() -> bool:
        match = re.search(pattern, process.log_path.read_text(errors="replace"))
        if match is not None:
            found.append(match)
        return match is not None

    process.wait_until(logged, START_TIMEOUT_S, f"logged {pattern!r}")
    return found[0]


def start_sim(log_dir: Path, port: int = 0, time_scale: float = 20.0) -> SimProcess:
    """`batchpilot sim serve` on 127.0.0.1:port (0: a free one), simulated H100 + Llama-3.1-8B."""
    argv = [
        *CLI,
        *("sim", "serve", "--calibration", str(CALIBRATION), "--model", MODEL),
        *("--system", "h100_sxm", "--listen", f"127.0.0.1:{port}"),
        *("--time-scale", str(time_scale)),
    ]
    log = log_dir / f"sim-{time.monotonic_ns()}.log"
    process = ManagedProcess("sim serve", argv, log)
    match = _wait_for_log(process, r"on port (\d+)")
    return SimProcess(process, int(match.group(1)))


def start_gate(
    log_dir: Path,
    upstream: str,
    knobs: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    log_level: str = "INFO",
) -> GateProcess:
    """`batchpilot gate` on free loopback ports with TOKEN as its admin token."""
    argv = [
        *CLI,
        *("gate", "--upstream", upstream, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"),
        *("--knobs", json.dumps(dict(knobs)), "--log-level", log_level),
    ]
    process_env = {
        **os.environ,
        "BATCHPILOT_GATE_TOKEN": TOKEN,
        "BATCHPILOT_GATE_HEALTH_INTERVAL_S": str(HEALTH_INTERVAL_S),
        **(env or {}),
    }
    log = log_dir / f"gate-{time.monotonic_ns()}.log"
    process = ManagedProcess("gate", argv, log, env=process_env)
    match = _wait_for_log(process, r"listening on port (\d+), admin on port (\d+)")
    return GateProcess(process, int(match.group(1)), int(match.group(2)))


@contextmanager
def sim_and_gate(
    log_dir: Path,
    knobs: Mapping[str, Any],
    time_scale: float = 20.0,
    env: Mapping[str, str] | None = None,
    log_level: str = "INFO",
) -> Iterator[tuple[SimProcess, GateProcess]]:
    sim = start_sim(log_dir, time_scale=time_scale)
    try:
        gate = start_gate(log_dir, sim.url, knobs, env=env, log_level=log_level)
        try:
            wait_ready(gate, True)
            yield sim, gate
        finally:
            gate.process.stop()
    finally:
        sim.process.stop()


def readyz(gate: GateProcess) -> int | None:
    answer = http_get(gate.admin_url + "/readyz")
    return None if answer is None else answer[0]


def wait_ready(gate: GateProcess, ready: bool, timeout_s: float = 10.0) -> None:
    wanted = 200 if ready else 503
    gate.process.wait_until(
        lambda: readyz(gate) == wanted, timeout_s, f"answering /readyz with {wanted}"
    )


def gate_metrics(gate: GateProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the gate's /metrics."""
    answer = http_get(gate.admin_url + "/metrics")
    assert answer is not None and answer[0] == 200, answer
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(answer[1].decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_sum(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str
) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


def completion(max_tokens: int, stream: bool = True, prompt: str = "hello gate") -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}


@dataclass
class Answer:
    status: int
    body: str
    retry_after: str | None

    @property
    def complete_stream(self) -> bool:
        return self.status == 200 and self.body.rstrip().endswith("data: [DONE]")

    def token_events(self) -> int:
        events = [line for line in self.body.splitlines() if line.startswith("data: {")]
        # The last JSON event carries finish_reason and no token text.
        return sum(1 for event in events if '"finish_reason": null' in event)


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Answer:
    async with session.post(url + "/v1/completions", json=body) as response:
        text = await response.text()
        return Answer(response.status, text, response.headers.get("Retry-After"))


async def put_config(
    session: aiohttp.ClientSession, gate: GateProcess, body: Any, token: str | None = TOKEN
) -> tuple[int, dict[str, Any]]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with session.put(gate.admin_url + "/config", json=body, headers=headers) as response:
        return response.status, await response.json()


def run(coroutine: Any, timeout_s: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


# -- the engine goes down and comes back ---------------------------------------


def test_engine_down_and_back_readiness_and_clear_errors(tmp_path: Path) -> None:
    sim = start_sim(tmp_path)
    gate = start_gate(tmp_path, sim.url, {"max_concurrency": 8})
    restarted: SimProcess | None = None
    try:
        wait_ready(gate, True)

        async def burst(count: int) -> list[Answer]:
            async with aiohttp.ClientSession() as session:
                return await asyncio.gather(
                    *(send(session, gate.url, completion(8)) for _ in range(count))
                )

        before = run(burst(5))
        assert all(answer.complete_stream for answer in before), before

        sim.process.stop()
        wait_ready(gate, False)
        during = run(burst(6))
        assert [answer.status for answer in during] == [502] * 6
        for answer in during:
            error = json.loads(answer.body)["error"]
            assert error["code"] == "upstream_unreachable"
            assert sim.url in error["message"] and "unreachable" in error["message"]
        assert readyz(gate) == 503
        assert http_get(gate.admin_url + "/livez") == (200, b"ok\n")

        # Same port: the Service and the gate's --upstream do not change when
        # the kubelet restarts the engine container.
        restarted = start_sim(tmp_path, port=sim.port)
        wait_ready(gate, True)
        after = run(burst(5))
        assert all(answer.complete_stream for answer in after), after
        assert all(answer.token_events() == 8 for answer in after)

        samples = gate_metrics(gate)
        failed = ("batchpilot_gate_failed_total", (("reason", "upstream_unreachable"),))
        assert samples[failed] == 6
        assert samples[("batchpilot_gate_admitted_total", ())] == 16
        assert samples[("batchpilot_gate_inflight_requests", ())] == 0
    finally:
        gate.process.stop()
        if restarted is not None:
            restarted.process.stop()
        sim.process.stop()


# -- clients vanish mid-stream and while queued --------------------------------


def test_clients_vanishing_mid_stream_and_queued_free_every_slot(tmp_path: Path) -> None:
    # Time scale 1: a 4,000-token answer streams for ~25 s, far longer than
    # the test, so every admitted stream is still open when its client leaves.
    with sim_and_gate(tmp_path, {"max_concurrency": 2}, time_scale=1.0) as (_, gate):

        async def scenario() -> Answer:
            async with aiohttp.ClientSession() as session:
                admitted = [
                    await session.post(gate.url + "/v1/completions", json=completion(4000))
                    for _ in range(2)
                ]
                for response in admitted:
                    assert response.status == 200
                    assert (await response.content.readline()).startswith(b"data: ")
                queued = [
                    asyncio.create_task(send(session, gate.url, completion(4000))) for _ in range(4)
                ]
                await _until(lambda: gate_metrics(gate)[QUEUE_LENGTH] == 4)
                for task in queued:
                    task.cancel()
                await asyncio.gather(*queued, return_exceptions=True)
                # Withdrawn from the queue first, so that none of them takes
                # a slot the admitted streams free below.
                await _until(lambda: gate_metrics(gate)[QUEUE_LENGTH] == 0)
                for response in admitted:
                    response.close()
                await _until(
                    lambda: (
                        gate_metrics(gate)[INFLIGHT] == 0 and gate_metrics(gate)[QUEUE_LENGTH] == 0
                    )
                )
                return await send(session, gate.url, completion(4))

        follow_up = run(scenario())
        assert follow_up.complete_stream and follow_up.token_events() == 4
        samples = gate_metrics(gate)
        assert samples[("batchpilot_gate_failed_total", (("reason", "client_disconnect"),))] == 2
        assert samples[("batchpilot_gate_admitted_total", ())] == 3
        assert samples[("batchpilot_gate_inflight_tokens", ())] == 0


QUEUE_LENGTH = ("batchpilot_gate_queue_length", ())
INFLIGHT = ("batchpilot_gate_inflight_requests", ())


def _sim_generated_tokens(sim: SimProcess) -> float:
    answer = http_get(sim.url + "/metrics")
    assert answer is not None and answer[0] == 200
    # By sample name, not family: prometheus_client's parser files a counter
    # sample whose name has a colon under a family of its own.
    values = [
        sample.value
        for family in text_string_to_metric_families(answer[1].decode())
        for sample in family.samples
        if sample.name == "vllm:generation_tokens_total"
    ]
    assert values, "sim serve exports no vllm:generation_tokens_total"
    return sum(values)


def test_engine_stops_generating_when_its_client_leaves(tmp_path: Path) -> None:
    sim = start_sim(tmp_path, time_scale=1.0)
    try:

        async def scenario() -> tuple[float, float]:
            async with aiohttp.ClientSession() as session:
                response = await session.post(sim.url + "/v1/completions", json=completion(4000))
                await response.content.readline()
                response.close()
                # A second request makes the engine step, so its counters move.
                await send(session, sim.url, completion(4))
                settled = _sim_generated_tokens(sim)
                await asyncio.sleep(1.0)
                await send(session, sim.url, completion(4))
                return settled, _sim_generated_tokens(sim)

        settled, later = run(scenario())
        # Only the 4 tokens of the second short request may be added; an
        # engine still decoding the abandoned answer adds ~150 tokens/s.
        assert later - settled <= 4
    finally:
        sim.process.stop()


async def _until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {timeout_s} s")
        await asyncio.sleep(0.05)


# -- overload: 30x the cap at once, while the config changes -------------------

CAP = 4
BURST = 30 * CAP
DEADLINE_MS = 300


def test_overload_burst_sheds_with_retry_after_and_loses_nothing(tmp_path: Path) -> None:
    knobs = {"max_concurrency": CAP, "queue_deadline_ms": DEADLINE_MS}
    # Time scale 1: one 40-token answer takes ~0.3 s at this batch size, so
    # four slots serve ~13 requests/s and most of a 120-request burst must
    # outlive the 300 ms deadline.
    with sim_and_gate(tmp_path, knobs, time_scale=1.0) as (_, gate):
        changes = [
            {**knobs, "max_concurrency": cap, "discipline": discipline}
            for cap, discipline in [
                (6, "shortest-prompt-first"),
                (3, "priority"),
                (CAP, "fcfs"),
                (8, "fcfs"),
                (CAP, "shortest-prompt-first"),
            ]
        ]

        async def scenario() -> tuple[list[Answer], list[int]]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                requests = asyncio.gather(
                    *(
                        send(session, gate.url, completion(40, prompt="word " * (1 + i % 50)))
                        for i in range(BURST)
                    )
                )
                statuses = []
                for change in changes:
                    await asyncio.sleep(0.1)
                    status, _ = await put_config(session, gate, change)
                    statuses.append(status)
                return await requests, statuses

        answers, put_statuses = run(scenario())
        assert put_statuses == [200] * len(changes)

        served = [answer for answer in answers if answer.status == 200]
        shed = [answer for answer in answers if answer.status == 429]
        print(f"overload: {BURST} sent, {len(served)} served, {len(shed)} shed with 429")
        assert len(served) + len(shed) == BURST, sorted({a.status for a in answers})
        assert len(served) >= CAP and len(shed) >= BURST // 2, (len(served), len(shed))
        for answer in served:
            assert answer.complete_stream and answer.token_events() == 40
        for answer in shed:
            assert answer.retry_after == "1"  # ceil(300 ms) in whole seconds
            assert json.loads(answer.body)["error"]["code"] == "queue_deadline_exceeded"

        samples = gate_metrics(gate)
        admitted = samples[("batchpilot_gate_admitted_total", ())]
        shed_total = metric_sum(samples, "batchpilot_gate_shed_total")
        failed_total = metric_sum(samples, "batchpilot_gate_failed_total")
        assert (admitted, shed_total, failed_total) == (len(served), len(shed), 0)
        assert admitted + shed_total + failed_total == BURST
        assert samples[INFLIGHT] == 0 and samples[QUEUE_LENGTH] == 0
        assert samples[("batchpilot_gate_config_version", ())] == 1 + len(changes)
        config = json.loads(http_get(gate.admin_url + "/config")[1])  # type: ignore[index]
        assert config["knobs"]["discipline"] == "shortest-prompt-first"


# -- memory over a few thousand requests ----------------------------------------

WARMUP_REQUESTS = 300
MEASURED_REQUESTS = 3000
CLIENT_CONCURRENCY = 32
# Generous on purpose: the point is "bounded", not a tight budget. A leak of
# one ticket, buffer or task per request at this count would be many MiB.
RSS_GROWTH_LIMIT = 50 << 20


def test_gate_rss_stays_bounded_over_thousands_of_requests(
    tmp_path: Path, record_property: Any
) -> None:
    # Time scale 200: each 4-token answer is nearly instant, so the run is
    # bounded by the gate's own per-request work, which is what is measured.
    with sim_and_gate(tmp_path, {"max_concurrency": 16}, time_scale=200.0) as (_, gate):

        async def drive(count: int) -> int:
            ok = 0
            remaining = iter(range(count))

            async def worker(session: aiohttp.ClientSession) -> None:
                nonlocal ok
                for index in remaining:
                    answer = await send(session, gate.url, completion(4, stream=index % 2 == 0))
                    ok += answer.status == 200

            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(worker(session) for _ in range(CLIENT_CONCURRENCY)))
            return ok

        assert run(drive(WARMUP_REQUESTS)) == WARMUP_REQUESTS
        rss_before = gate.rss_bytes()
        started = time.monotonic()
        assert run(drive(MEASURED_REQUESTS), timeout_s=300) == MEASURED_REQUESTS
        elapsed_s = time.monotonic() - started
        rss_after = gate.rss_bytes()
        growth = rss_after - rss_before
        record_property("gate_rss_before_mib", round(rss_before / 2**20, 1))
        record_property("gate_rss_after_mib", round(rss_after / 2**20, 1))
        print(
            f"gate RSS {rss_before / 2**20:.1f} MiB -> {rss_after / 2**20:.1f} MiB "
            f"over {MEASURED_REQUESTS} requests in {elapsed_s:.1f} s"
        )
        assert growth < RSS_GROWTH_LIMIT, f"gate RSS grew {growth / 2**20:.1f} MiB"
        samples = gate_metrics(gate)
        assert (
            samples[("batchpilot_gate_admitted_total", ())] == WARMUP_REQUESTS + MEASURED_REQUESTS
        )
