"""The gate over real HTTP: a real gate between a real aiohttp client and a small engine.

The engine here is a few lines of aiohttp that stream tokens with a delay and
count, on its own side, how many requests and tokens it has in flight, so
every cap is checked where it matters: at the engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from batchpilot.contract.knobs import Knobs
from batchpilot.gate.server import GateServer
from batchpilot.gate.settings import load_settings

TOKEN = "s3cret-admin-token"


@dataclass
class FakeEngine:
    """An OpenAI-compatible streaming engine that records what reaches it.

    Request headers steer it: `x-hold` waits for `release_holds` before the
    first token, `x-fail-status` answers that status, `x-break-after` cuts
    the connection after that many tokens, `x-request-id` names the request
    in `arrivals`. `POST /v1/embeddings` stands for any route the gate passes
    through: it records what it received and echoes the body back chunk by
    chunk as it arrives.
    """

    token_delay_s: float = 0.002
    running: int = 0
    max_running: int = 0
    running_tokens: int = 0
    max_running_tokens: int = 0
    cancelled: int = 0
    arrivals: list[str] = field(default_factory=list)
    healthy: bool = True
    release_holds: asyncio.Event = field(default_factory=asyncio.Event)
    internal_state_calls: list[dict[str, Any]] = field(default_factory=list)
    internal_state_answer: tuple[int, Any] = (200, [True])
    passed_through: list[web.Request] = field(default_factory=list)
    port: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/completions", self.generate),
                web.post("/v1/chat/completions", self.generate),
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.post("/set_internal_state", self.set_internal_state),
                web.post("/v1/embeddings", self.echo),
            ]
        )
        return app

    async def echo(self, request: web.Request) -> web.StreamResponse:
        self.passed_through.append(request)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        headers = request.headers
        self.arrivals.append(headers.get("x-request-id", ""))
        if "x-fail-status" in headers:
            status = int(headers["x-fail-status"])
            return web.json_response({"error": {"message": f"engine says {status}"}}, status=status)
        tokens = int(headers.get("x-prompt-tokens", "0")) + body["max_tokens"]
        self.running += 1
        self.running_tokens += tokens
        self.max_running = max(self.max_running, self.running)
        self.max_running_tokens = max(self.max_running_tokens, self.running_tokens)
        try:
            if "x-hold" in headers:
                await self.release_holds.wait()
            return await self._answer(request, body, int(headers.get("x-break-after", "-1")))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
            self.running_tokens -= tokens

    async def _answer(
        self, request: web.Request, body: dict[str, Any], break_after: int
    ) -> web.StreamResponse:
        if not body.get("stream"):
            await asyncio.sleep(self.token_delay_s * body["max_tokens"])
            return web.json_response({"choices": [{"text": "x" * body["max_tokens"]}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(body["max_tokens"]):
            if index == break_after:
                assert request.transport is not None
                request.transport.abort()
                return response
            await asyncio.sleep(self.token_delay_s)
            await response.write(f"data: {json.dumps({'index': index})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def set_internal_state(self, request: web.Request) -> web.Response:
        self.internal_state_calls.append(await request.json())
        status, answer = self.internal_state_answer
        return web.json_response(answer, status=status)


@dataclass
class Stack:
    engine: FakeEngine
    gate: GateServer
    client: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gate.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.gate.admin_port}"

    async def complete(
        self, stream: bool = True, max_tokens: int = 4, **headers: str
    ) -> tuple[int, str]:
        body = {
            "model": "fake-model",
            "prompt": "hello",
            "max_tokens": max_tokens,
            "stream": stream,
        }
        async with self.client.post(
            f"{self.url}/v1/completions", json=body, headers=headers
        ) as response:
            return response.status, await response.text()

    async def put_config(self, body: Any, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.client.put(
            f"{self.admin_url}/config", data=data, headers=headers
        ) as response:
            return response.status, await response.json()

    async def get_config(self) -> dict[str, Any]:
        async with self.client.get(f"{self.admin_url}/config") as response:
            return await response.json()

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with self.client.get(f"{self.admin_url}/metrics") as response:
            text = await response.text()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


@asynccontextmanager
async def gate_stack(knobs: Knobs | None = None, **settings: Any) -> AsyncIterator[Stack]:
    engine = FakeEngine()
    engine_runner, engine.port = await _serve(engine.app())
    config: dict[str, Any] = {
        "upstream": f"http://127.0.0.1:{engine.port}",
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "token": TOKEN,
        "knobs": knobs or Knobs(),
        "health_interval_s": 0.05,
        "grace_period_s": 2.0,
        **settings,
    }
    gate = GateServer(load_settings(config, {}))
    await gate.start()
    # One connection per request: a burst must not be serialized by the client.
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as client:
            yield Stack(engine, gate, client)
    finally:
        engine.release_holds.set()
        await gate.stop()
        await engine_runner.cleanup()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def sse_indices(text: str) -> list[int]:
    """Token indices of a well-formed stream; fails on anything malformed or unterminated."""
    events = text.split("\n\n")
    assert events[-1] == "", f"stream does not end with a blank line: {text[-40:]!r}"
    assert events[-2] == "data: [DONE]", f"stream not terminated by [DONE]: {text[-40:]!r}"
    return [json.loads(event.removeprefix("data: "))["index"] for event in events[:-2]]


@pytest.mark.parametrize(
    ("knobs", "prompt_tokens", "max_tokens", "expected_running", "expected_tokens"),
    [
        (Knobs(max_concurrency=1), 10, 4, 1, 14),
        (Knobs(max_concurrency=5), 10, 4, 5, 70),
        (Knobs(max_concurrency=16), 10, 4, 16, 224),
        # 300 + 4 tokens each: a 1,000-token budget fits 3 at once.
        (Knobs(max_inflight_tokens=1000), 300, 4, 3, 912),
        # Both limits: the tighter one binds.
        (Knobs(max_concurrency=8, max_inflight_tokens=2000), 300, 4, 6, 1824),
    ],
)
def test_caps_hold_at_the_engine_under_a_burst(
    knobs: Knobs, prompt_tokens: int, max_tokens: int, expected_running: int, expected_tokens: int
) -> None:
    async def scenario() -> None:
        async with gate_stack(knobs) as stack:
            results = await asyncio.gather(
                *(
                    stack.complete(max_tokens=max_tokens, **{"x-prompt-tokens": str(prompt_tokens)})
                    for _ in range(60)
                )
            )
            assert [status for status, _ in results] == [200] * 60
            assert all(sse_indices(text) == list(range(max_tokens)) for _, text in results)
            # Reached and never exceeded, measured at the engine.
            assert stack.engine.max_running == expected_running
            assert stack.engine.max_running_tokens == expected_tokens

    run(scenario)


async def _queue_behind_blocker(
    stack: Stack, requests: list[tuple[str, dict[str, str]]], gap_s: float
) -> list[asyncio.Task[tuple[int, str]]]:
    """Occupy the only slot, then queue `requests` in order, `gap_s` apart."""
    blocker = asyncio.create_task(stack.complete(**{"x-hold": "1", "x-request-id": "blocker"}))
    await wait_until(lambda: stack.engine.running == 1)
    tasks = []
    for queued, (name, headers) in enumerate(requests, start=1):
        tasks.append(asyncio.create_task(stack.complete(**{"x-request-id": name, **headers})))
        await wait_until(lambda queued=queued: stack.gate.gate.queue.queued == queued)
        await asyncio.sleep(gap_s)
    stack.engine.release_holds.set()
    await blocker
    return tasks


@pytest.mark.parametrize(
    ("knobs", "requests", "gap_s", "expected_order"),
    [
        (
            Knobs(max_concurrency=1, discipline="fcfs"),
            [
                ("a", {"x-prompt-tokens": "900"}),
                ("b", {"x-prompt-tokens": "10"}),
                ("c", {"x-priority": "5"}),
            ],
            0.0,
            ["a", "b", "c"],
        ),
        (
            Knobs(max_concurrency=1, discipline="shortest-prompt-first", aging_ms=60_000),
            [
                ("long", {"x-prompt-tokens": "4000"}),
                ("mid", {"x-prompt-tokens": "800"}),
                ("short", {"x-prompt-tokens": "20"}),
            ],
            0.0,
            ["short", "mid", "long"],
        ),
        (
            Knobs(max_concurrency=1, discipline="priority", aging_ms=60_000),
            [
                ("low", {"x-priority": "0"}),
                ("high", {"x-priority": "3"}),
                ("mid", {"x-priority": "1"}),
            ],
            0.0,
            ["high", "mid", "low"],
        ),
        # Aging: "old" waited 0.3 s = 6 agings of 50 ms before "new" arrived,
        # more than new's 2 levels of priority, so it keeps its turn.
        (
            Knobs(max_concurrency=1, discipline="priority", aging_ms=50),
            [("old", {"x-priority": "0"}), ("new", {"x-priority": "2"})],
            0.3,
            ["old", "new"],
        ),
    ],
)
def test_each_discipline_admits_in_its_order(
    knobs: Knobs,
    requests: list[tuple[str, dict[str, str]]],
    gap_s: float,
    expected_order: list[str],
) -> None:
    async def scenario() -> None:
        async with gate_stack(knobs) as stack:
            tasks = await _queue_behind_blocker(stack, requests, gap_s)
            assert [status for status, _ in await asyncio.gather(*tasks)] == [200] * len(tasks)
            assert stack.engine.arrivals == ["blocker", *expected_order]

    run(scenario)


@pytest.mark.parametrize("set_by", ["startup", "api"])
def test_queue_deadline_sheds_on_time_with_429_and_retry_after(set_by: str) -> None:
    deadline_ms = 150

    async def scenario() -> None:
        startup = Knobs(
            max_concurrency=1, queue_deadline_ms=deadline_ms if set_by == "startup" else None
        )
        async with gate_stack(startup) as stack:
            blocker = asyncio.create_task(stack.complete(**{"x-hold": "1"}))
            await wait_until(lambda: stack.engine.running == 1)
            body = {"prompt": "hi", "max_tokens": 2, "stream": True}
            url = f"{stack.url}/v1/completions"
            started = time.monotonic()
            queued = [asyncio.create_task(stack.client.post(url, json=body)) for _ in range(3)]
            if set_by == "api":
                await wait_until(lambda: stack.gate.gate.queue.queued == 3)
                status, _ = await stack.put_config(
                    {"max_concurrency": 1, "queue_deadline_ms": deadline_ms}
                )
                assert status == 200
            # Shed while the engine is still busy: on the deadline, not at the next release.
            responses = await asyncio.wait_for(asyncio.gather(*queued), timeout=3)
            elapsed_ms = (time.monotonic() - started) * 1000
            assert deadline_ms <= elapsed_ms < deadline_ms + 500
            assert stack.engine.running == 1
            for response in responses:
                assert response.status == 429
                assert response.headers["Retry-After"] == "1"
                error = (await response.json())["error"]
                assert error["code"] == "queue_deadline_exceeded"
                assert f"deadline of {deadline_ms} ms" in error["message"]
            stack.engine.release_holds.set()
            assert (await blocker)[0] == 200
            metrics = await stack.metrics()
            assert metrics[("batchpilot_gate_shed_total", (("reason", "queue_deadline"),))] == 3
            assert len(stack.engine.arrivals) == 1

    run(scenario)


def test_request_admitted_before_its_deadline_is_served() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=1, queue_deadline_ms=2000)) as stack:
            blocker = asyncio.create_task(stack.complete(**{"x-hold": "1"}))
            await wait_until(lambda: stack.engine.running == 1)
            queued = [asyncio.create_task(stack.complete()) for _ in range(3)]
            await asyncio.sleep(0.1)
            stack.engine.release_holds.set()
            results = await asyncio.gather(blocker, *queued)
            assert [status for status, _ in results] == [200] * 4
            metrics = await stack.metrics()
            assert metrics[("batchpilot_gate_shed_total", (("reason", "queue_deadline"),))] == 0

    run(scenario)


def test_hundred_reconfigurations_during_500_streams_lose_nothing() -> None:
    # Two generators: the clients' draws interleave with the writer's in an
    # order the scheduler decides, and the writes must not depend on it.
    client_rng, config_rng = random.Random(4), random.Random(5)
    max_tokens = 6

    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=8)) as stack:
            stack.engine.token_delay_s = 0.003
            # Bounded client concurrency keeps the queue busy but the test quick.
            client_slots = asyncio.Semaphore(100)

            async def one() -> tuple[int, str]:
                async with client_slots:
                    return await stack.complete(
                        max_tokens=max_tokens, **{"x-priority": str(client_rng.randint(0, 3))}
                    )

            changes = 0

            async def reconfigure() -> None:
                nonlocal changes
                applied = stack.gate.gate.queue.knobs
                for _ in range(100):
                    knobs = Knobs(
                        max_concurrency=config_rng.randint(1, 32),
                        max_inflight_tokens=config_rng.choice([None, 200, 5000]),
                        discipline=config_rng.choice(["fcfs", "shortest-prompt-first", "priority"]),
                        aging_ms=config_rng.choice([10, 2000]),
                    )
                    changes += knobs != applied
                    applied = knobs
                    status, _ = await stack.put_config(knobs.to_mapping())
                    assert status == 200
                    await asyncio.sleep(0.01)

            load = asyncio.gather(*(one() for _ in range(500)))
            await reconfigure()
            results = await load
            assert [status for status, _ in results] == [200] * 500
            for _, text in results:
                assert sse_indices(text) == list(range(max_tokens))
            config = await stack.get_config()
            # One version per write that changed something (a repeat is not a change).
            assert changes > 90
            assert config["version"] == 1 + changes
            queue = stack.gate.gate.queue
            assert (queue.queued, queue.in_flight, queue.inflight_tokens) == (0, 0, 0)
            assert stack.engine.max_running <= 32

    run(scenario)


@pytest.mark.parametrize(
    ("settings", "token", "body", "expected_status", "expected_field"),
    [
        ({"token": None}, TOKEN, {"max_concurrency": 4}, 403, None),
        ({}, None, {"max_concurrency": 4}, 401, None),
        ({}, "wrong-token", {"max_concurrency": 4}, 401, None),
        ({}, TOKEN, b"{not json", 400, "<body>"),
        ({}, TOKEN, [1, 2], 400, "<body>"),
        ({}, TOKEN, {"max_concurency": 4}, 400, "max_concurency"),
        ({}, TOKEN, {"max_concurrency": 0}, 400, "max_concurrency"),
        ({}, TOKEN, {"max_concurrency": 4, "discipline": "lifo"}, 400, "discipline"),
        ({}, TOKEN, {"queue_deadline_ms": "100"}, 400, "queue_deadline_ms"),
    ],
)
def test_unauthorized_and_malformed_writes_change_nothing(
    settings: dict[str, Any],
    token: str | None,
    body: Any,
    expected_status: int,
    expected_field: str | None,
) -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=2), **settings) as stack:
            before = await stack.get_config()
            status, answer = await stack.put_config(body, token=token)
            assert status == expected_status
            if expected_field is not None:
                assert answer["error"]["field"] == expected_field
            if expected_status == 403:
                assert "BATCHPILOT_GATE_TOKEN_FILE" in answer["error"]["message"]
            after = await stack.get_config()
            assert after == before
            assert stack.gate.gate.queue.knobs == Knobs(max_concurrency=2)

    run(scenario)


@pytest.mark.parametrize(
    ("file_text", "expected_status"),
    [
        (f"{TOKEN}\n", 200),  # a Secret file's trailing newline is not part of the token
        ("", 403),  # empty: as if unconfigured
        (None, 403),  # missing file
    ],
)
def test_token_is_read_from_the_mounted_file(
    tmp_path: Path, file_text: str | None, expected_status: int
) -> None:
    token_file = tmp_path / "token"
    if file_text is not None:
        token_file.write_text(file_text)

    async def scenario() -> None:
        async with gate_stack(token=None, token_file=token_file) as stack:
            status, answer = await stack.put_config({"max_concurrency": 7})
            assert status == expected_status
            expected_version = 2 if expected_status == 200 else 1
            assert (await stack.get_config())["version"] == expected_version
            assert TOKEN not in json.dumps(answer)

    run(scenario)


def test_config_reports_version_and_source_and_repeats_are_no_ops() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=2)) as stack:
            first = await stack.get_config()
            assert (first["version"], first["source"], first["knobs"]["max_concurrency"]) == (
                1,
                "startup",
                2,
            )
            status, applied = await stack.put_config(
                {"max_concurrency": 9, "discipline": "priority"}
            )
            assert status == 200
            assert (applied["version"], applied["source"], applied["changed"]) == (2, "api", True)
            status, repeated = await stack.put_config(
                {"max_concurrency": 9, "discipline": "priority"}
            )
            assert (repeated["version"], repeated["changed"]) == (2, False)
            metrics = await stack.metrics()
            assert metrics[("batchpilot_gate_config_version", ())] == 2
            assert metrics[("batchpilot_gate_knob", (("knob", "max_concurrency"),))] == 9
            assert metrics[("batchpilot_gate_knob", (("knob", "queue_deadline_ms"),))] == float(
                "inf"
            )
            assert metrics[("batchpilot_gate_discipline", (("discipline", "priority"),))] == 1
            assert metrics[("batchpilot_gate_discipline", (("discipline", "fcfs"),))] == 0

    run(scenario)


def test_lowering_the_cap_only_stops_admitting() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=4)) as stack:
            held = [asyncio.create_task(stack.complete(**{"x-hold": "1"})) for _ in range(4)]
            await wait_until(lambda: stack.engine.running == 4)
            status, _ = await stack.put_config({"max_concurrency": 1})
            assert status == 200
            extra = asyncio.create_task(stack.complete())
            await wait_until(lambda: stack.gate.gate.queue.queued == 1)
            # The four admitted keep running; the new one waits.
            assert stack.engine.running == 4
            stack.engine.release_holds.set()
            assert [status for status, _ in await asyncio.gather(*held, extra)] == [200] * 5

    run(scenario)


def test_client_disconnect_mid_stream_frees_the_slot_and_cancels_upstream() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=1)) as stack:
            stack.engine.token_delay_s = 0.05
            body = {"prompt": "hi", "max_tokens": 1000, "stream": True}
            response = await stack.client.post(f"{stack.url}/v1/completions", json=body)
            assert response.status == 200
            await response.content.readline()  # the stream has started
            response.close()  # the client goes away mid-stream
            await wait_until(lambda: stack.engine.cancelled == 1)
            await wait_until(lambda: stack.gate.gate.queue.in_flight == 0)
            # The slot is free again: the next request is served.
            assert (await stack.complete())[0] == 200
            metrics = await stack.metrics()
            assert (
                metrics[("batchpilot_gate_failed_total", (("reason", "client_disconnect"),))] == 1
            )

    run(scenario)


def test_client_disconnect_while_queued_withdraws_the_request() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=1)) as stack:
            blocker = asyncio.create_task(
                stack.complete(**{"x-hold": "1", "x-request-id": "blocker"})
            )
            await wait_until(lambda: stack.engine.running == 1)
            queued = asyncio.create_task(stack.complete(**{"x-request-id": "gone"}))
            await wait_until(lambda: stack.gate.gate.queue.queued == 1)
            queued.cancel()  # closes the client connection
            await wait_until(lambda: stack.gate.gate.queue.queued == 0)
            stack.engine.release_holds.set()
            assert (await blocker)[0] == 200
            assert (await stack.complete(**{"x-request-id": "next"}))[0] == 200
            assert stack.engine.arrivals == ["blocker", "next"]

    run(scenario)


@pytest.mark.parametrize(
    ("status", "reason"),
    [(400, "upstream_4xx"), (422, "upstream_4xx"), (500, "upstream_5xx"), (503, "upstream_5xx")],
)
@pytest.mark.parametrize("stream", [True, False])
def test_engine_errors_pass_through_and_are_counted(status: int, reason: str, stream: bool) -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=2)) as stack:
            got_status, text = await stack.complete(stream=stream, **{"x-fail-status": str(status)})
            assert got_status == status
            assert json.loads(text) == {"error": {"message": f"engine says {status}"}}
            metrics = await stack.metrics()
            assert metrics[("batchpilot_gate_failed_total", (("reason", reason),))] == 1
            assert stack.gate.gate.queue.in_flight == 0

    run(scenario)


def test_engine_breaking_mid_stream_breaks_the_client_stream() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=2)) as stack:
            with pytest.raises(aiohttp.ClientPayloadError):
                await stack.complete(max_tokens=10, **{"x-break-after": "3"})
            metrics = await stack.metrics()
            assert (
                metrics[("batchpilot_gate_failed_total", (("reason", "upstream_stream_broken"),))]
                == 1
            )
            assert stack.gate.gate.queue.in_flight == 0

    run(scenario)


def test_unreachable_engine_gets_502_and_not_ready() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=2), upstream="http://127.0.0.1:9") as stack:
            status, text = await stack.complete()
            assert status == 502
            assert json.loads(text)["error"]["code"] == "upstream_unreachable"
            async with stack.client.get(f"{stack.admin_url}/readyz") as response:
                assert response.status == 503
            metrics = await stack.metrics()
            assert (
                metrics[("batchpilot_gate_failed_total", (("reason", "upstream_unreachable"),))]
                == 1
            )

    run(scenario)


@dataclass
class IdleClosingEngine:
    """A raw HTTP/1.1 engine whose kept-alive connections die the way llama-server's do.

    Streamed answers advertise keep-alive, so the gate pools the connection;
    what a generation request then gets is `on_new` on a connection's first
    request and `on_reuse` on a later one: "answer" (three token events and
    [DONE]), "close" (read, then closed unanswered: to the gate this is the
    engine having closed the idle connection just before the request went out),
    "reset" (the same with a TCP reset), "partial_head" (part of a status line,
    then closed), "partial_body" (the headers and one event, then closed).
    `/health` is answered and closed, so the gate's probe pools nothing.
    `generations` lists (connection number, request number on it) per
    generation request read.
    """

    on_new: str = "answer"
    on_reuse: str = "close"
    connections: int = 0
    generations: list[tuple[int, int]] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        served = 0
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                if head.startswith("GET /health"):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    await writer.drain()
                    return
                self.generations.append((connection, served))
                action = self.on_reuse if served else self.on_new
                served += 1
                if action == "answer":
                    writer.write(_chunked_stream(3))
                    await writer.drain()
                    continue
                if action == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if action == "partial_head":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Ty")
                elif action == "partial_body":
                    writer.write(_chunked_stream(3)[:150])
                await writer.drain()
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


def _chunked_stream(tokens: int) -> bytes:
    """A complete keep-alive SSE answer, one chunk per event, as llama-server frames it."""
    events = [f"data: {json.dumps({'index': i})}\n\n".encode() for i in range(tokens)]
    events.append(b"data: [DONE]\n\n")
    body = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"
    )
    return head + body + b"0\r\n\r\n"


@asynccontextmanager
async def socket_engine_stack(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    path: str = "",
) -> AsyncIterator[Stack]:
    """The gate in front of an engine written on raw sockets (`serve`, one
    call per connection), reached at `path` on it."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with gate_stack(upstream=f"http://127.0.0.1:{port}{path}") as stack:
            yield stack
    finally:
        server.close()
        await server.wait_closed()


def _retries(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {
        labels[0][1]: value
        for (name, labels), value in metrics.items()
        if name == "batchpilot_gate_upstream_retries_total"
    }


def _failed(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {
        labels[0][1]: value
        for (name, labels), value in metrics.items()
        if name == "batchpilot_gate_failed_total" and value
    }


@pytest.mark.parametrize(
    ("on_reuse", "reason"), [("close", "server_disconnected"), ("reset", "socket_error")]
)
def test_request_on_a_pooled_connection_the_engine_closed_is_resent_on_a_new_one(
    on_reuse: str, reason: str
) -> None:
    async def scenario() -> None:
        engine = IdleClosingEngine(on_reuse=on_reuse)
        async with socket_engine_stack(engine.serve) as stack:
            for _ in range(4):
                status, text = await stack.complete()
                assert status == 200
                assert sse_indices(text) == [0, 1, 2]
            # The 2nd and 4th requests went out on the connection the 1st and
            # 3rd left in the pool, met it closed, and went out again on a new
            # connection of their own (closed after it: the 3rd opens another).
            connections = [connection for connection, _ in engine.generations]
            assert [served for _, served in engine.generations] == [0, 1, 0, 0, 1, 0]
            assert connections[0] == connections[1] and connections[3] == connections[4]
            assert len(set(connections)) == 4
            metrics = await stack.metrics()
            assert _retries(metrics) == {"server_disconnected": 0, "socket_error": 0, reason: 2}
            assert _failed(metrics) == {}

    run(scenario)


@pytest.mark.parametrize("on_reuse", ["partial_head", "partial_body"])
def test_no_resend_once_any_answer_byte_came_back(on_reuse: str) -> None:
    async def scenario() -> None:
        engine = IdleClosingEngine(on_reuse=on_reuse)
        async with socket_engine_stack(engine.serve) as stack:
            assert (await stack.complete())[0] == 200
            if on_reuse == "partial_head":
                status, text = await stack.complete()
                assert status == 502
                assert json.loads(text)["error"]["code"] == "upstream_unreachable"
                expected = "upstream_unreachable"
            else:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await stack.complete()
                expected = "upstream_stream_broken"
            # The engine saw the second request once: it may have run it.
            assert [served for _, served in engine.generations] == [0, 1]
            metrics = await stack.metrics()
            assert _retries(metrics) == {"server_disconnected": 0, "socket_error": 0}
            assert _failed(metrics) == {expected: 1}

    run(scenario)


def test_failure_on_a_new_connection_is_not_resent() -> None:
    async def scenario() -> None:
        engine = IdleClosingEngine(on_new="close")
        async with socket_engine_stack(engine.serve) as stack:
            status, text = await stack.complete()
            assert status == 502
            error = json.loads(text)["error"]
            assert error["code"] == "upstream_unreachable"
            assert "Server disconnected" in error["message"]
            assert engine.generations == [(engine.generations[0][0], 0)]
            metrics = await stack.metrics()
            assert _retries(metrics) == {"server_disconnected": 0, "socket_error": 0}
            assert _failed(metrics) == {"upstream_unreachable": 1}

    run(scenario)


def test_a_resend_that_fails_too_is_final() -> None:
    async def scenario() -> None:
        engine = IdleClosingEngine()
        async with socket_engine_stack(engine.serve) as stack:
            assert (await stack.complete())[0] == 200
            engine.on_new = "close"
            status, text = await stack.complete()
            assert status == 502
            assert json.loads(text)["error"]["code"] == "upstream_unreachable"
            # The first request, then the second twice: once pooled, once new.
            assert [served for _, served in engine.generations] == [0, 1, 0]
            metrics = await stack.metrics()
            assert _retries(metrics) == {"server_disconnected": 1, "socket_error": 0}
            assert _failed(metrics) == {"upstream_unreachable": 1}

    run(scenario)


def test_readiness_follows_engine_health_and_liveness_does_not() -> None:
    async def scenario() -> None:
        async with gate_stack() as stack:

            async def probe(path: str) -> int:
                async with stack.client.get(f"{stack.admin_url}{path}") as response:
                    return response.status

            for healthy, expected in [(True, 200), (False, 503), (True, 200)]:
                stack.engine.healthy = healthy
                deadline = time.monotonic() + 2
                while await probe("/readyz") != expected:
                    assert time.monotonic() < deadline, f"readyz never became {expected}"
                    await asyncio.sleep(0.02)
                assert await probe("/livez") == 200

    run(scenario)


def test_generation_is_admitted_and_every_other_route_passes_through_unthrottled() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=1, queue_deadline_ms=100)) as stack:
            # The one slot is taken: a generation request would queue and be shed.
            blocker = asyncio.create_task(stack.complete(**{"x-hold": "1"}))
            await wait_until(lambda: stack.engine.running == 1)
            url = f"{stack.url}/v1/embeddings?encoding=float"
            body = json.dumps({"model": "fake-model", "input": ["a", "b"]}).encode()
            async with stack.client.post(url, data=body) as response:
                assert (response.status, await response.read()) == (200, body)
            passed = stack.engine.passed_through[-1]
            assert (passed.method, passed.path_qs) == ("POST", "/v1/embeddings?encoding=float")
            # The client's framing is kept: a sized body is not re-sent chunked.
            assert passed.headers["Content-Length"] == str(len(body))
            async with stack.client.get(f"{stack.url}/v1/models") as response:
                assert (await response.json())["data"][0]["id"] == "fake-model"
            # What the engine does not serve, the client hears from the engine.
            async with stack.client.get(f"{stack.url}/tokenize") as response:
                assert (response.status, await response.text()) == (404, "404: Not Found")
            stack.engine.release_holds.set()
            assert (await blocker)[0] == 200
            metrics = await stack.metrics()
            # Only the generation request went through admission.
            assert metrics[("batchpilot_gate_admitted_total", ())] == 1
            assert metrics[("batchpilot_gate_shed_total", (("reason", "queue_deadline"),))] == 0

    run(scenario)


def test_passed_through_bodies_stream_both_ways_without_buffering() -> None:
    """The engine echoes each part of the body back before the client sends the next:
    this completes only if neither the request nor the answer is held back whole."""

    async def scenario() -> None:
        async with gate_stack() as stack:
            echoed: asyncio.Queue[bytes] = asyncio.Queue()
            parts = [f"part {index};".encode() * 1000 for index in range(5)]

            async def body() -> AsyncIterator[bytes]:
                for part in parts:
                    yield part
                    received = b""
                    while len(received) < len(part):
                        received += await echoed.get()
                    assert received == part

            async with stack.client.post(f"{stack.url}/v1/embeddings", data=body()) as response:
                assert response.status == 200
                async for chunk in response.content.iter_any():
                    echoed.put_nowait(chunk)
            # Sent chunked by the client, so chunked to the engine: no size was known.
            passed = stack.engine.passed_through[-1]
            assert passed.headers.get("Transfer-Encoding") == "chunked"
            assert "Content-Length" not in passed.headers

    run(scenario)


def test_hop_by_hop_headers_stop_at_the_gate_and_end_to_end_ones_pass() -> None:
    async def scenario() -> None:
        async with gate_stack() as stack:
            headers = {
                # RFC 9110 7.6.1: fields that Connection names are hop-by-hop.
                "Connection": "keep-alive, x-hop-secret",
                "x-hop-secret": "for the gate only",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Authorization": "Bearer engine-api-key",
                "x-end-to-end": "kept",
            }
            url = f"{stack.url}/v1/embeddings"
            async with stack.client.post(url, data=b"{}", headers=headers) as response:
                assert response.status == 200
            received = stack.engine.passed_through[-1].headers
            for hop in ("x-hop-secret", "Keep-Alive", "TE"):
                assert hop not in received, hop
            assert "x-hop-secret" not in received.get("Connection", "")
            assert received["Authorization"] == "Bearer engine-api-key"
            assert received["x-end-to-end"] == "kept"

    run(scenario)


def test_engine_live_tuning_route_is_refused_on_the_data_port() -> None:
    async def scenario() -> None:
        async with gate_stack(native="sglang") as stack:
            body = {"server_args": {"chunked_prefill_size": 1}}
            async with stack.client.post(f"{stack.url}/set_internal_state", json=body) as response:
                assert response.status == 403
                error = (await response.json())["error"]
                assert error["code"] == "engine_admin_route"
                assert "PUT /config" in error["message"]
            assert stack.engine.internal_state_calls == []

    run(scenario)


async def _stainless_like_client(stack: Stack, name: str, retries: int = 2) -> int:
    """What the openai SDK does by default: resend a 429 twice, after its Retry-After,
    numbering the attempts in x-stainless-retry-count. Returns the last status."""
    body = {"prompt": "hi", "max_tokens": 2, "stream": True}
    for attempt in range(retries + 1):
        headers = {"x-stainless-retry-count": str(attempt), "x-request-id": name}
        async with stack.client.post(
            f"{stack.url}/v1/completions", json=body, headers=headers
        ) as response:
            await response.read()
            if response.status != 429 or attempt == retries:
                return response.status
            await asyncio.sleep(float(response.headers["Retry-After"]))
    raise AssertionError("unreachable")


def test_client_retries_of_shed_requests_are_counted_apart() -> None:
    retried = "batchpilot_gate_retried_requests_total"
    shed = ("batchpilot_gate_shed_total", (("reason", "queue_deadline"),))

    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=1, queue_deadline_ms=100)) as stack:
            blocker = asyncio.create_task(stack.complete(**{"x-hold": "1"}))
            await wait_until(lambda: stack.engine.running == 1)
            # 4 requests, each shed on its first attempt and both retries.
            statuses = await asyncio.gather(
                *(_stainless_like_client(stack, f"r{index}") for index in range(4))
            )
            assert statuses == [429] * 4
            metrics = await stack.metrics()
            assert metrics[shed] == 12
            assert metrics[(retried, (("outcome", "shed"),))] == 8
            # Distinct requests that met the full queue: sheds less retried sheds.
            assert metrics[shed] - metrics[(retried, (("outcome", "shed"),))] == 4
            stack.engine.release_holds.set()
            assert (await blocker)[0] == 200
            # A retry that finds room is admitted and counted so; a header that
            # is not a number is a first attempt, never a reason to refuse.
            assert (await stack.complete(**{"x-stainless-retry-count": "1"}))[0] == 200
            for not_a_count in ("soon", "²"):
                headers = {"x-stainless-retry-count": not_a_count}
                assert (await stack.complete(**headers))[0] == 200
            metrics = await stack.metrics()
            assert metrics[(retried, (("outcome", "admitted"),))] == 1
            assert metrics[("batchpilot_gate_admitted_total", ())] == 4

    run(scenario)


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        (b"not json", {}, "body"),
        (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), {}, "max_tokens"),
        (json.dumps({"prompt": "x"}).encode(), {"x-priority": "high"}, "x-priority"),
        (json.dumps({"max_tokens": 3}).encode(), {}, "prompt"),
    ],
)
def test_unsizable_requests_get_400_naming_the_field(
    body: bytes, headers: dict[str, str], param: str
) -> None:
    async def scenario() -> None:
        async with gate_stack() as stack:
            url = f"{stack.url}/v1/completions"
            async with stack.client.post(url, data=body, headers=headers) as response:
                assert response.status == 400
                assert (await response.json())["error"]["param"] == param
            assert stack.engine.arrivals == []

    run(scenario)


@pytest.mark.parametrize(
    ("engine_answer", "expected_status"),
    [
        ((200, [True]), "applied"),
        ((200, [{"updated": True, "server_args": {}}]), "applied"),
        ((200, [True, False]), "rejected"),  # one data-parallel rank refused
        ((200, {"success": False, "error_msg": "no"}), "rejected"),
        ((404, {"detail": "Not Found"}), "unsupported"),
        ((500, {"detail": "boom"}), "rejected"),
    ],
)
def test_sglang_native_adapter_reports_the_engine_answer(
    engine_answer: tuple[int, Any], expected_status: str
) -> None:
    async def scenario() -> None:
        async with gate_stack(native="sglang") as stack:
            stack.engine.internal_state_answer = engine_answer
            status, answer = await stack.put_config(
                {"max_concurrency": 4, "max_num_batched_tokens": 2048}
            )
            assert status == 200
            assert answer["native"]["status"] == expected_status
            assert stack.engine.internal_state_calls[-1] == {
                "server_args": {"chunked_prefill_size": 2048}
            }
            # The gate's own knobs apply whatever the engine said.
            assert stack.gate.gate.queue.knobs.max_concurrency == 4
            metrics = await stack.metrics()
            failed = metrics[("batchpilot_gate_failed_total", (("reason", "native_apply"),))]
            assert failed == (1 if expected_status == "rejected" else 0)

    run(scenario)


def test_vllm_native_adapter_reports_unsupported_without_the_endpoint() -> None:
    async def scenario() -> None:
        async with gate_stack(native="vllm") as stack:
            status, answer = await stack.put_config({"max_concurrency": 4})
            assert status == 200
            assert answer["native"]["status"] == "unsupported"
            assert stack.gate.gate.queue.knobs.max_concurrency == 4

    run(scenario)


def test_metric_names_and_labels_are_exactly_the_contract() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=1)) as stack:
            await stack.complete()
            async with stack.client.get(f"{stack.admin_url}/metrics") as response:
                text = await response.text()
            # What the controller queries, with the label keys it relies on.
            families = {
                family.name: (
                    family.type,
                    {key for sample in family.samples for key in sample.labels if key != "le"},
                )
                for family in text_string_to_metric_families(text)
            }
            assert families == {
                "batchpilot_gate_queue_length": ("gauge", set()),
                "batchpilot_gate_inflight_requests": ("gauge", set()),
                "batchpilot_gate_inflight_tokens": ("gauge", set()),
                "batchpilot_gate_queue_wait_seconds": ("histogram", set()),
                "batchpilot_gate_time_to_first_token_seconds": ("histogram", set()),
                "batchpilot_gate_time_per_output_token_seconds": ("histogram", set()),
                "batchpilot_gate_prompt_tokens": ("histogram", set()),
                "batchpilot_gate_output_tokens": ("histogram", set()),
                "batchpilot_gate_admitted": ("counter", set()),
                "batchpilot_gate_shed": ("counter", {"reason"}),
                "batchpilot_gate_failed": ("counter", {"reason"}),
                "batchpilot_gate_upstream_retries": ("counter", {"reason"}),
                "batchpilot_gate_retried_requests": ("counter", {"outcome"}),
                "batchpilot_gate_knob": ("gauge", {"knob"}),
                "batchpilot_gate_discipline": ("gauge", {"discipline"}),
                "batchpilot_gate_config_version": ("gauge", set()),
                "batchpilot_gate_config_writes_rejected": ("counter", {"reason"}),
                # Per SLO class: one `class` value per configured class.
                "batchpilot_gate_class_queue_length": ("gauge", {"class"}),
                "batchpilot_gate_class_inflight_requests": ("gauge", {"class"}),
                "batchpilot_gate_class_admitted": ("counter", {"class"}),
                "batchpilot_gate_class_admitted_tokens": ("counter", {"class"}),
                "batchpilot_gate_class_shed": ("counter", {"class"}),
                "batchpilot_gate_class_queue_wait_seconds": ("histogram", {"class"}),
                "batchpilot_gate_class_time_to_first_token_seconds": ("histogram", {"class"}),
                "batchpilot_gate_class_time_per_output_token_seconds": ("histogram", {"class"}),
                "batchpilot_gate_class_defaulted": ("counter", {"reason"}),
            }
            assert 'batchpilot_gate_time_to_first_token_seconds_bucket{le="2560.0"}' in text
            # Without classes, every request is in the default class.
            assert 'batchpilot_gate_class_admitted_total{class="default"} 1.0' in text
            # The fake engine's 4 token events, 2 ms apart.
            assert "batchpilot_gate_time_per_output_token_seconds_count 1.0" in text
            assert 'batchpilot_gate_upstream_retries_total{reason="socket_error"} 0.0' in text
            assert 'batchpilot_gate_retried_requests_total{outcome="shed"} 0.0' in text
            assert "batchpilot_gate_admitted_total 1.0" in text

    run(scenario)


def _annotations(knobs_json: str) -> str:
    return (
        f'kubernetes.io/config.seen="2024-01-01"\nbatchpilot.dev/knobs={json.dumps(knobs_json)}\n'
    )


def test_annotation_file_applies_good_knobs_and_ignores_bad_ones(tmp_path: Path) -> None:
    annotations = tmp_path / "annotations"
    annotations.write_text(_annotations('{"max_concurrency": 3}'))

    async def scenario() -> None:
        async with gate_stack(annotations_file=annotations, annotation_poll_s=0.02) as stack:
            await wait_until(lambda: stack.gate.gate.config.version == 2)
            config = await stack.get_config()
            assert (config["source"], config["knobs"]["max_concurrency"]) == ("file", 3)
            for bad in [
                '{"max_concurrency": 5, "discipline": "lifo"}',  # one bad field: nothing applies
                '{"max_concurrency": 5',  # truncated JSON
                "garbage without quotes",
            ]:
                annotations.write_text(_annotations(bad) if "garbage" not in bad else bad)
                await asyncio.sleep(0.15)
                assert stack.gate.gate.config.version == 2
                assert stack.gate.gate.queue.knobs.max_concurrency == 3
            annotations.write_text(_annotations('{"max_concurrency": 6, "discipline": "priority"}'))
            await wait_until(lambda: stack.gate.gate.config.version == 3)
            assert stack.gate.gate.queue.knobs == Knobs(max_concurrency=6, discipline="priority")

    run(scenario)


@asynccontextmanager
async def gate_process(upstream_port: int, *options: str) -> AsyncIterator[GateProcess]:
    """The gate as its own process, the way the pod runs it."""
    env = {
        **os.environ,
        "BATCHPILOT_GATE_TOKEN": TOKEN,
        "BATCHPILOT_GATE_KNOBS": '{"max_concurrency": 2}',
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchpilot.cli.main",
            "gate",
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            *options,
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        listening = None
        while listening is None:
            line = await asyncio.to_thread(process.stderr.readline)
            assert line, "gate exited before listening"
            listening = re.search(r"listening on port (\d+), admin on port (\d+)", line)
        yield GateProcess(process, int(listening[1]), int(listening[2]))
    finally:
        if process.poll() is None:
            process.kill()


@dataclass
class GateProcess:
    process: subprocess.Popen[str]
    proxy_port: int
    admin_port: int

    @property
    def completions(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/v1/completions"

    async def exit_code(self) -> int:
        return await asyncio.to_thread(self.process.wait, 15)


def test_sigterm_serves_through_the_delay_then_drains_and_stops_accepting() -> None:
    """SIGTERM: not ready at once; requests that still arrive in the shutdown
    delay are served (with Connection: close); then no new connection is
    accepted, and everything admitted or queued finishes."""

    async def scenario() -> None:
        engine = FakeEngine(token_delay_s=0.1)
        engine_runner, engine.port = await _serve(engine.app())
        delay_s = 1.5
        options = ("--shutdown-delay-s", str(delay_s), "--grace-period-s", "10")
        try:
            async with (
                gate_process(engine.port, *options) as gate,
                aiohttp.ClientSession() as client,
            ):
                body = {"prompt": "hi", "max_tokens": 10, "stream": True}
                streams = [
                    asyncio.create_task(_read_all(client, gate.completions, body)) for _ in range(3)
                ]
                await wait_until(lambda: engine.running == 2)
                gate.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(0.3)
                readyz = f"http://127.0.0.1:{gate.admin_port}/readyz"
                async with client.get(readyz) as response:
                    assert response.status == 503
                    assert "draining" in await response.text()
                # Still routed here by a kube-proxy that has not yet heard:
                # served, queued behind the two streams, on a connection that
                # then closes.
                async with client.post(
                    gate.completions, json={"prompt": "late", "max_tokens": 2}
                ) as response:
                    assert response.status == 200
                    assert response.headers["Connection"] == "close"
                    assert (await response.json())["choices"]
                await asyncio.sleep(max(0.0, signalled + delay_s + 0.3 - time.monotonic()))
                with pytest.raises(aiohttp.ClientConnectionError):
                    await _read_all(client, gate.completions, body)
                # Two were streaming and one was queued: all three finish.
                for text in await asyncio.gather(*streams):
                    assert sse_indices(text) == list(range(10))
                assert await gate.exit_code() == 0
        finally:
            await engine_runner.cleanup()

    run(scenario)


def test_sigint_stops_accepting_at_once() -> None:
    """Ctrl-C on a gate run by hand skips the shutdown delay (5 s by default)."""

    async def scenario() -> None:
        engine = FakeEngine()
        engine_runner, engine.port = await _serve(engine.app())
        try:
            async with gate_process(engine.port) as gate, aiohttp.ClientSession() as client:
                body = {"prompt": "hi", "max_tokens": 2}
                await _read_all(client, gate.completions, body)
                gate.process.send_signal(signal.SIGINT)
                await asyncio.sleep(0.5)
                with pytest.raises(aiohttp.ClientConnectionError):
                    await _read_all(client, gate.completions, body)
                assert await gate.exit_code() == 0
        finally:
            await engine_runner.cleanup()

    run(scenario)


async def _read_all(client: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
    async with client.post(url, json=body) as response:
        assert response.status == 200
        return await response.text()
