"""operator/gates.py against a real gate process-in-a-loop: the admin API as the operator uses it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from batchpilot.contract.knobs import Knobs
from batchpilot.gate.annotations import knobs_from_annotations
from batchpilot.gate.server import GateServer
from batchpilot.gate.settings import load_settings
from batchpilot.operator.gates import (
    APPLIED_ANNOTATION,
    AppliedRecord,
    GateClient,
    GateError,
    parse_gate_config,
)

TOKEN = "op-test-token"


@asynccontextmanager
async def running_gate(**settings: Any) -> AsyncIterator[GateServer]:
    # No engine behind it: the admin API answers regardless (readiness says so).
    base = {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "upstream": "http://127.0.0.1:9"}
    server = GateServer(load_settings({**base, **settings}, {}))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def run(test: Callable[[GateClient], Awaitable[None]], timeout_s: float = 2.0) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            await test(GateClient(session, timeout_s))

    asyncio.run(main())


def test_read_then_write_then_idempotent_write() -> None:
    async def scenario(client: GateClient) -> None:
        async with running_gate(token=TOKEN, knobs={"max_concurrency": 96}) as gate:
            startup = await client.read("127.0.0.1", gate.admin_port)
            assert (startup.knobs, startup.version, startup.source) == (Knobs(max_concurrency=96), 1, "startup")
            target = Knobs(max_concurrency=32, discipline="shortest-prompt-first", queue_deadline_ms=1500)
            first = await client.write("127.0.0.1", gate.admin_port, TOKEN, target)
            assert (first.knobs, first.version, first.changed) == (target, 2, True)
            again = await client.write("127.0.0.1", gate.admin_port, TOKEN, target)
            assert (again.version, again.changed) == (2, False)
            assert gate.gate.queue.knobs == target

    run(scenario)


@pytest.mark.parametrize(
    ("gate_token", "sent", "says"),
    [
        (TOKEN, "wrong-token", "refused the admin token (401)"),
        (None, TOKEN, "refused the admin token (403)"),
    ],
)
def test_token_problems_are_named(gate_token: str | None, sent: str, says: str) -> None:
    async def scenario(client: GateClient) -> None:
        async with running_gate(token=gate_token) as gate:
            with pytest.raises(GateError) as caught:
                await client.write("127.0.0.1", gate.admin_port, sent, Knobs(max_concurrency=8))
            assert says in str(caught.value)
            assert gate.gate.config.version == 1  # nothing applied

    run(scenario)


def test_unreachable_gate_is_a_gate_error() -> None:
    async def scenario(client: GateClient) -> None:
        async with running_gate() as gate:
            port = gate.admin_port
        with pytest.raises(GateError) as caught:
            await client.read("127.0.0.1", port)
        assert "unreachable" in str(caught.value)

    run(scenario)


def test_a_gate_that_never_answers_times_out() -> None:
    async def scenario(client: GateClient) -> None:
        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(30)

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(GateError) as caught:
                await client.read("127.0.0.1", port)
            assert "did not answer within 0.2 s" in str(caught.value)
        finally:
            server.close()

    run(scenario, timeout_s=0.2)


@pytest.mark.parametrize(
    "text",
    ["not json", "{}", '{"knobs": {"max_concurrency": 0}, "version": 1}', '{"knobs": {}, "version": "x"}'],
)
def test_unreadable_gate_answers_are_gate_errors(text: str) -> None:
    with pytest.raises(GateError):
        parse_gate_config(text, "http://127.0.0.2:9090/config")


def test_applied_record_round_trips_and_feeds_the_gate_annotation() -> None:
    record = AppliedRecord("chat", Knobs(max_concurrency=48, max_inflight_tokens=200_000), 7,
                           "2026-05-01T12:00:00Z", startup=Knobs(max_concurrency=256))
    assert AppliedRecord.from_json(record.to_json()) == record
    annotations = record.annotations()
    assert annotations[APPLIED_ANNOTATION] == record.to_json()
    # The gate's own Downward API parser reads the knobs annotation we write.
    downward_file = "\n".join(f"{key}={json.dumps(value)}" for key, value in annotations.items())
    assert knobs_from_annotations(downward_file) == record.knobs
    # A canary's record says so; others keep the bytes they had before the flag existed.
    canary = AppliedRecord("chat", Knobs(max_concurrency=64), 8, "2026-05-01T12:01:00Z", canary=True)
    assert AppliedRecord.from_json(canary.to_json()) == canary
    assert '"canary":true' in canary.to_json() and "canary" not in record.to_json()


@pytest.mark.parametrize(
    "text",
    [None, "", "{", '{"policy": "p"}', '{"policy": "p", "knobs": {"max_concurrency": -1}, "version": 1, "time": "t"}',
     '{"policy": "p", "knobs": {}, "version": true, "time": "t"}', "[]"],
)
def test_unreadable_records_read_as_absent(text: str | None) -> None:
    assert AppliedRecord.from_json(text) is None
