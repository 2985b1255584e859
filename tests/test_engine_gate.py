"""The gate in front of the real engine: llama.cpp's llama-server (sim/sandbox/llama_server.py).

The gate runs as its own process (`batchpilot gate`, on uvloop), as in the
pod, started with tests/test_faults_gate.py's helpers. The clients are plain
aiohttp (the `openai` package is not a dependency) streaming completions
with `ignore_eos`, so every answer is exactly `max_tokens` tokens.

What only a real engine shows: llama-server closes its connection after
every streamed answer while advertising keep-alive, so the gate's pool hands
out connections that are already closed (the gate resends those requests on
a new connection, see gate/proxy.py); it stops generating when the gate
drops a request's connection; and its own per-token timings are there to
check the gate's time per output token against.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_faults_gate import TOKEN, GateProcess, start_gate, wait_ready

from batchpilot.sim.llamacpp import SERVED_MODEL, ServerOptions
from batchpilot.sim.sandbox.llama_server import LlamaServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

FAILED = "batchpilot_gate_failed_total"
RETRIES = "batchpilot_gate_upstream_retries_total"
TPOT = "batchpilot_gate_time_per_output_token_seconds"
PROMPT = "batchpilot_gate_prompt_tokens"
OUTPUT = "batchpilot_gate_output_tokens"


@pytest.fixture(scope="module")
def engine(llama_server: Callable[..., LlamaServer]) -> Iterator[LlamaServer]:
    server = llama_server(ServerOptions(parallel=16))
    yield server
    server.stop()


@pytest.fixture
def gate(engine: LlamaServer, tmp_path: Path) -> Iterator[GateProcess]:
    process = start_gate(tmp_path, engine.url, {"max_concurrency": 8})
    try:
        wait_ready(process, True)
        yield process
    finally:
        process.process.stop()


def completion(max_tokens: int, prompt: str = "hello gate") -> dict[str, Any]:
    return {
        "model": SERVED_MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }


@dataclass
class Stream:
    status: int
    events: list[dict[str, Any]]
    done: bool

    @property
    def tokens(self) -> int:
        """Token events: one per token, whatever its text (a special token's is empty).

        Not tokens: llama-server's closing event (it carries the finish_reason)
        and a chat stream's opening one when it carries only the role
        (`content: null`); under load llama-server sends the role with the
        first token instead, and that event counts.
        """
        return sum(
            1
            for event in self.events
            if event["choices"][0]["finish_reason"] is None
            and isinstance(
                event["choices"][0].get(
                    "text", event["choices"][0].get("delta", {}).get("content")
                ),
                str,
            )
        )

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.events[-1]["timings"])


async def stream(
    client: aiohttp.ClientSession, url: str, body: dict[str, Any], path: str = "/v1/completions"
) -> Stream:
    async with client.post(url + path, json=body) as response:
        text = await response.text()
    if response.status != 200:
        return Stream(response.status, [], False)
    payloads = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    done = payloads[-1:] == ["[DONE]"]
    events = [json.loads(payload) for payload in payloads[: -1 if done else None]]
    return Stream(response.status, events, done)


async def scrape(client: aiohttp.ClientSession, url: str) -> Samples:
    async with client.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def by_reason(samples: Samples, name: str) -> dict[str, float]:
    return {
        dict(labels)["reason"]: value
        for (sample, labels), value in samples.items()
        if sample == name
    }


def run(coroutine: Any, timeout_s: float = 120.0) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streams_through_the_gate_carry_exactly_max_tokens(gate: GateProcess, path: str) -> None:
    async def scenario() -> list[Stream]:
        body = completion(24)
        if path == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        async with aiohttp.ClientSession() as client:
            return [await stream(client, gate.url, body, path) for _ in range(3)]

    for answer in run(scenario()):
        assert answer.status == 200
        assert answer.done
        assert answer.tokens == 24
        assert answer.events[-1]["choices"][0]["finish_reason"] == "length"


def test_hundreds_of_streams_across_config_changes_and_no_502(gate: GateProcess) -> None:
    """16 clients, a max_concurrency change every 20 answers: every request must succeed.

    Before the gate resent requests that met a connection llama-server had
    closed, about 5% of these failed with 502 upstream_unreachable.
    """
    total, clients, max_tokens, every = 960, 16, 6, 20
    caps = itertools.cycle([2, 8, 1, 16, 4, 12])

    async def scenario() -> tuple[list[Stream], int, Samples, float]:
        answers: list[Stream] = []
        changes = 0
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

            async def put_config(cap: int) -> None:
                nonlocal changes
                async with client.put(
                    gate.admin_url + "/config",
                    json={"max_concurrency": cap},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as response:
                    assert response.status == 200, await response.text()
                changes += 1

            # One iterator shared by the clients: each request is sent once.
            requests = iter(range(total))

            async def worker() -> None:
                for _ in requests:
                    answers.append(await stream(client, gate.url, completion(max_tokens)))
                    if len(answers) % every == 0:
                        await put_config(next(caps))

            await asyncio.gather(*(worker() for _ in range(clients)))
            elapsed = time.monotonic() - started
            return answers, changes, await scrape(client, gate.admin_url), elapsed

    answers, changes, samples, elapsed = run(scenario())
    print(f"{len(answers)} streams, {changes} config changes in {elapsed:.1f} s")
    assert len(answers) == total
    assert Counter(a.status for a in answers) == {200: total}
    assert [(a.done, a.tokens) for a in answers if not a.done or a.tokens != max_tokens] == []
    failed = by_reason(samples, FAILED)
    assert sum(failed.values()) == 0, failed
    admitted = samples[("batchpilot_gate_admitted_total", ())]
    shed = sum(by_reason(samples, "batchpilot_gate_shed_total").values())
    assert admitted + shed + sum(failed.values()) == total
    assert changes >= total // every - 1
    assert samples[("batchpilot_gate_config_version", ())] == 1 + changes
    # The reuse case happened (so without the resend, some of these were 502s).
    retries = by_reason(samples, RETRIES)
    print(f"resent: {retries}")
    assert sum(retries.values()) > 0


def test_a_client_leaving_mid_stream_stops_the_engine_generating(
    gate: GateProcess, engine: LlamaServer
) -> None:
    processing = ("llamacpp:requests_processing", ())
    disconnects = (FAILED, (("reason", "client_disconnect"),))

    async def scenario() -> tuple[float, float, float]:
        async with aiohttp.ClientSession() as client:
            # 4,000 tokens: some 10 s of generating if nothing stops it.
            response = await client.post(gate.url + "/v1/completions", json=completion(4000))
            assert response.status == 200
            for _ in range(6):
                await response.content.readline()
            before = (await scrape(client, engine.url))[processing]
            response.close()
            left = time.monotonic()
            while (await scrape(client, engine.url))[processing] != 0:
                assert time.monotonic() - left < 3.0, "the engine is still generating"
                await asyncio.sleep(0.05)
            stopped_after = time.monotonic() - left
            while (await scrape(client, gate.admin_url))[disconnects] != 1:
                assert time.monotonic() - left < 3.0, "the gate did not count the disconnect"
                await asyncio.sleep(0.05)
            return before, stopped_after, (await scrape(client, gate.admin_url))[disconnects]

    before, stopped_after, counted = run(scenario())
    print(f"the engine stopped {stopped_after * 1000:.0f} ms after the client left")
    assert before == 1
    assert counted == 1


def test_time_per_output_token_agrees_with_the_engines_own_timings(gate: GateProcess) -> None:
    requests, max_tokens = 6, 128

    async def scenario() -> tuple[list[Stream], Samples]:
        async with aiohttp.ClientSession() as client:
            # One at a time: each answer's engine timings are then its own.
            answers = [
                await stream(client, gate.url, completion(max_tokens)) for _ in range(requests)
            ]
            return answers, await scrape(client, gate.admin_url)

    answers, samples = run(scenario())
    assert [(a.status, a.tokens) for a in answers] == [(200, max_tokens)] * requests
    engine_ms = sum(a.timings["predicted_per_token_ms"] for a in answers) / requests
    assert samples[(TPOT + "_count", ())] == requests
    gate_ms = samples[(TPOT + "_sum", ())] / requests * 1000
    print(f"time per output token: gate {gate_ms:.2f} ms, engine {engine_ms:.2f} ms")
    # They agree within a few % on an idle machine. On a busy one, llama-server's
    # HTTP thread can start a stream late and send its first tens of events
    # at once, which shortens the span the gate sees (clients see the same).
    assert 0.5 * engine_ms < gate_ms < 2.0 * engine_ms
    # The length histograms: "hello gate" is 10 characters, sized as 3 tokens;
    # each answer is its tokens plus llama-server's closing event.
    assert samples[(PROMPT + "_count", ())] == requests
    assert samples[(PROMPT + "_sum", ())] == requests * 3
    assert samples[(OUTPUT + "_count", ())] == requests
    assert samples[(OUTPUT + "_sum", ())] == requests * (max_tokens + 1)


def test_an_engine_that_is_down_gets_502_naming_it_and_no_resends(
    llama_server: Callable[..., LlamaServer], tmp_path: Path
) -> None:
    doomed = llama_server(ServerOptions(parallel=2))
    gate = start_gate(tmp_path, doomed.url, {"max_concurrency": 4})

    async def scenario() -> tuple[list[tuple[int, dict[str, Any]]], Samples]:
        async with aiohttp.ClientSession() as client:
            assert (await stream(client, gate.url, completion(8))).done
            doomed.stop()
            answers = []
            for _ in range(5):
                async with client.post(
                    gate.url + "/v1/completions", json=completion(8)
                ) as response:
                    answers.append((response.status, (await response.json())["error"]))
            return answers, await scrape(client, gate.admin_url)

    try:
        wait_ready(gate, True)
        answers, samples = run(scenario())
        for status, error in answers:
            assert status == 502
            assert error["code"] == "upstream_unreachable"
            assert f"the engine at {doomed.url} is unreachable" in error["message"]
        assert by_reason(samples, FAILED)["upstream_unreachable"] == 5
        assert by_reason(samples, RETRIES) == {"server_disconnected": 0, "socket_error": 0}
        wait_ready(gate, False)
    finally:
        gate.process.stop()


def test_interactive_requests_wait_far_less_than_a_batch_flood(
    engine: LlamaServer, tmp_path: Path
) -> None:
    """SLO classes in front of the real engine: a batch flood fills the queue
    behind a cap of 2; interactive requests sent into it are admitted at the
    next free slot, not behind the flood."""
    knobs = {
        "max_concurrency": 2,
        "classes": [{"name": "interactive", "priority": 1}, {"name": "batch"}],
    }
    gate = start_gate(tmp_path, engine.url, knobs)
    flood, interactive_requests = 32, 6

    async def scenario() -> tuple[list[Stream], list[Stream], Samples, float]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

            async def send(service_class: str, max_tokens: int) -> Stream:
                body = completion(max_tokens)
                headers = {"x-batchpilot-class": service_class}
                async with client.post(
                    gate.url + "/v1/completions", json=body, headers=headers
                ) as response:
                    text = await response.text()
                done = text.rstrip().endswith("data: [DONE]")
                return Stream(response.status, [], done)

            batch = [asyncio.create_task(send("batch", 16)) for _ in range(flood)]
            await asyncio.sleep(0.3)
            interactive = []
            for _ in range(interactive_requests):
                interactive.append(await send("interactive", 4))
                await asyncio.sleep(0.05)
            # Still backlogged: every interactive request met the flood.
            backlog = (await scrape(client, gate.admin_url))[
                ("batchpilot_gate_class_queue_length", (("class", "batch"),))
            ]
            answers = await asyncio.gather(*batch)
            return answers, interactive, await scrape(client, gate.admin_url), backlog

    try:
        wait_ready(gate, True)
        batch, interactive, samples, backlog = run(scenario())
    finally:
        gate.process.stop()
    assert backlog > 0
    assert [(s.status, s.done) for s in batch + interactive] == [(200, True)] * (
        flood + interactive_requests
    )
    wait = "batchpilot_gate_class_queue_wait_seconds"
    counts = {
        name: samples[(wait + "_count", (("class", name),))] for name in ("interactive", "batch")
    }
    assert counts == {"interactive": interactive_requests, "batch": flood}
    mean_s = {
        name: samples[(wait + "_sum", (("class", name),))] / counts[name]
        for name in ("interactive", "batch")
    }
    print(f"mean queue wait: interactive {mean_s['interactive'] * 1000:.0f} ms, "
          f"batch {mean_s['batch'] * 1000:.0f} ms")  # fmt: skip
    # An interactive request waits for one slot to free (part of one batch
    # answer); the flood waits half of itself on average, 8 of 16 rounds of 2.
    assert mean_s["interactive"] < 0.3 * mean_s["batch"]
    ttft = "batchpilot_gate_class_time_to_first_token_seconds"
    assert samples[(ttft + "_count", (("class", "interactive"),))] == interactive_requests
    assert samples[(ttft + "_count", (("class", "default"),))] == 0
