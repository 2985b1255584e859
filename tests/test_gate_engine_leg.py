"""The admitted requests' engine leg (gate/upstream.py) against engines that answer
in raw HTTP/1.1, framed in each way the specification allows.

The shared gate tests (test_gate_http.py) cover the contract against a
well-behaved aiohttp engine; these cover what only a hand-written answer can
show: flow control towards a slow client, answers framed by the connection's
end, a malformed head, and the exact request line and headers the engine gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from test_gate_http import _failed, run, socket_engine_stack

COMPLETION = {"model": "fake-model", "prompt": "hello", "max_tokens": 4, "stream": True}

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawEngine:
    """Reads each generation request whole, records its head, and lets `answer` write the reply."""

    answer: Answer
    heads: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET ") and b"/health HTTP/1.1\r\n" in head:
                    # The gate's readiness probe, on its own pooled connection.
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                self.heads.append(head)
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                await self.answer(writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


def test_a_slow_client_holds_the_engine_back_and_still_gets_every_byte() -> None:
    """The gate stops reading the engine while the client's socket is full, and loses nothing."""
    piece = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
    pieces = 1024  # 64 MiB: far more than the kernel's socket buffers on both legs hold
    sent = 0

    async def answer(writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(pieces):
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            sent += len(piece)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def scenario() -> None:
        async with socket_engine_stack(RawEngine(answer).serve) as stack:
            async with stack.client.post(f"{stack.url}/v1/completions", json=COMPLETION) as reply:
                assert reply.status == 200
                await asyncio.sleep(1.0)
                # Both legs' socket buffers together hold ~20 MiB at most on loopback.
                assert sent < 48 * 1024 * 1024, f"the engine sent {sent} bytes to a stalled client"
                digest = hashlib.sha256()
                received = 0
                async for data in reply.content.iter_any():
                    digest.update(data)
                    received += len(data)
            assert received == pieces * len(piece)
            assert digest.digest() == hashlib.sha256(piece * pieces).digest()
            assert _failed(await stack.metrics()) == {}

    run(scenario)


def test_an_answer_framed_by_the_connection_end_is_relayed_whole() -> None:
    body = json.dumps({"choices": [{"text": "end of answer"}]}).encode()

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        engine = RawEngine(answer)
        async with socket_engine_stack(engine.serve) as stack:
            for _ in range(2):
                status, text = await stack.complete(stream=False)
                assert (status, text.encode()) == (200, body)
            # The first connection ended with its answer; the second request
            # went out on a new one rather than failing on the closed one.
            metrics = await stack.metrics()
            assert _failed(metrics) == {}
            assert len(engine.heads) == 2

    run(scenario)


def test_a_malformed_answer_head_is_a_502_naming_the_engine() -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 2OO Okay\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def scenario() -> None:
        async with socket_engine_stack(RawEngine(answer).serve) as stack:
            status, text = await stack.complete()
            assert status == 502
            error = json.loads(text)["error"]
            assert error["code"] == "upstream_unreachable"
            assert "malformed" in error["message"] and "127.0.0.1" in error["message"]
            assert _failed(await stack.metrics()) == {"upstream_unreachable": 1}

    run(scenario)


def test_an_interim_answer_is_skipped_for_the_final_one() -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n")
        await writer.drain()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Final: yes\r\n\r\n{}")
        await writer.drain()

    async def scenario() -> None:
        async with (
            socket_engine_stack(RawEngine(answer).serve) as stack,
            stack.client.post(f"{stack.url}/v1/completions", json=COMPLETION) as reply,
        ):
            assert (reply.status, await reply.text()) == (200, "{}")
            assert reply.headers["X-Final"] == "yes" and "Link" not in reply.headers

    run(scenario)


def test_the_engine_gets_the_upstream_path_prefix_and_no_hop_by_hop_headers() -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async def scenario() -> None:
        engine = RawEngine(answer)
        async with socket_engine_stack(engine.serve, path="/engine") as stack:
            headers = {"Connection": "keep-alive, x-hop", "x-hop": "1", "x-keep": "2"}
            async with stack.client.post(
                f"{stack.url}/v1/completions?trace=1", json=COMPLETION, headers=headers
            ) as reply:
                assert (reply.status, await reply.text()) == (200, "{}")
            lines = engine.heads[0].decode().split("\r\n")
            assert lines[0] == "POST /engine/v1/completions?trace=1 HTTP/1.1"
            fields = {
                name.lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines[1:] if line)
            }
            port = stack.gate.settings.upstream_url.split(":")[2].split("/")[0]
            assert fields["host"] == f"127.0.0.1:{port}"
            assert fields["x-keep"] == "2"
            assert "x-hop" not in fields and "connection" not in fields
            assert fields["content-length"] == str(len(json.dumps(COMPLETION)))

    run(scenario)


def test_pooled_connections_carry_one_request_after_another() -> None:
    """A keep-alive answer leaves its connection to the next request, unchanged."""
    peers: list[object] = []

    async def answer(writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername"))
        body = b'data: {"index": 0}\n\ndata: [DONE]\n\n'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        await writer.drain()

    async def scenario() -> None:
        async with socket_engine_stack(RawEngine(answer).serve) as stack:
            for _ in range(3):
                status, text = await stack.complete()
                assert status == 200 and text.endswith("data: [DONE]\n\n")
            assert len(peers) == 3 and len(set(peers)) == 1
            metrics = await stack.metrics()
            assert metrics[("batchpilot_gate_output_tokens_count", ())] == 3

    run(scenario)


def test_client_disconnect_mid_answer_drops_the_engine_connection() -> None:
    closed = asyncio.Event()

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while True:
                event = b'data: {"index": 0}\n\n'
                writer.write(b"%x\r\n%b\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            closed.set()
            raise

    async def scenario() -> None:
        async with socket_engine_stack(RawEngine(answer).serve) as stack:
            async with (
                aiohttp.ClientSession() as client,
                client.post(f"{stack.url}/v1/completions", json=COMPLETION) as reply,
            ):
                await reply.content.readany()
            await asyncio.wait_for(closed.wait(), 5)
            assert _failed(await stack.metrics()) == {"client_disconnect": 1}

    run(scenario)
