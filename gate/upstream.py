"""The engine leg of admitted requests: keep-alive HTTP/1.1 connections whose answer
bodies go from the socket's read callback straight to the client's socket.

Why not aiohttp's client here, which the rest of the gate uses: under load
(bench/gate_overhead.py, 200 streams x 40 tokens/s) a relayed chunk cost the
gate about 53 us of CPU, and profiling it showed that most of it was stream
machinery, not work: aiohttp's client hands each chunk to the handler task
through a StreamReader future (one task wake-up per chunk), and its server
frames each chunk in pure Python across three writes. Here a chunk costs one
parse in C (llhttp, through httptools: the same parser behind uvicorn, so
answer framing, chunked decoding and keep-alive follow the HTTP spec without
a hand-written parser) and one write to the client, with no task switch.

Only the per-chunk path moved. The request's task still does everything that
happens once per request (send, answer head, backpressure, the end), so its
cancellation still means "the client went away", exactly as with aiohttp.

- A connection is reused while the engine keeps it alive, for up to
  `IDLE_TIMEOUT_S` idle (aiohttp's own keep-alive default, which this leg
  replaced). `reused` tells the caller whether a request met a pooled
  connection, the resend rule's input (proxy.py).
- Failures are raised as the aiohttp exceptions the rest of the gate already
  handles and counts: a connection closed before the answer's head is
  complete is `ServerDisconnectedError`, a socket error `ClientOSError`, a
  malformed head `ClientConnectionError`, a body cut short or malformed
  `ClientPayloadError`.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from collections.abc import Iterable
from typing import Protocol, cast

import aiohttp
import httptools
from multidict import CIMultiDict
from yarl import URL

IDLE_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0
# Header fields are decoded as aiohttp decodes them, so the same bytes go back out.
_HEADER_CODEC = ("utf-8", "surrogateescape")
_NO_BODY_STATUSES = frozenset({204, 304})


class Flow(enum.Enum):
    """What a relayed body piece, or the end of a wait, means for the request's task."""

    MORE = "more"  # keep reading
    PAUSE = "pause"  # the client's socket buffer is full: drain it, then resume
    GONE = "gone"  # the client went away: close the engine connection
    DONE = "done"  # the answer is complete


class BodySink(Protocol):
    """Where a connection writes its answer's body, piece by decoded piece."""

    def body(self, data: bytes) -> Flow:
        """Take `data`; MORE, PAUSE (taken, but send no more until resumed) or GONE."""


class Answer:
    """An answer's status line and headers."""

    __slots__ = ("content_length", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: CIMultiDict[str]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        length = headers.get("Content-Length")
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self.content_length = int(length) if length is not None and not chunked else None


class EngineConnection(asyncio.Protocol):
    """One connection to the engine, carrying one request at a time."""

    def __init__(self, pool: EnginePool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self.reused = False
        # Goes back to the pool after a complete answer, if the engine keeps it alive.
        self.poolable = True
        # Any byte of the current answer came back: the engine has the request.
        self.answered = False
        self._parser: httptools.HttpResponseParser | None = None
        self._reason = b""
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._answer: Answer | None = None
        self._keep_alive = False
        self._until_close = False
        self._complete = False
        self._pieces: list[bytes] = []
        self._sink: BodySink | None = None
        self._waiter: asyncio.Future[Flow] | None = None
        # A PAUSE or GONE that came while the request's task was not waiting.
        self._held: Flow | None = None
        self._error: BaseException | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:
            # Bytes nobody asked for (an idle connection, or past an answer's
            # end): the connection's framing can no longer be trusted.
            self._pool.forget(self)
            self.abort()
            return
        self.answered = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._fail_parse(err)
            return
        if self._sink is not None:
            self._relay()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._pool.forget(self)
        if self._complete or self._parser is None:
            return
        if self._answer is not None and self._until_close and exc is None:
            # An answer framed by the connection's end, which this is.
            self._complete = True
            self._wake(Flow.DONE)
            return
        error: BaseException
        if self._answer is not None:
            error = aiohttp.ClientPayloadError(f"the engine's answer was cut short: {exc or 'EOF'}")
        elif isinstance(exc, OSError):
            error = aiohttp.ClientOSError(exc.errno, str(exc))
        elif self.answered:
            error = aiohttp.ServerDisconnectedError("the engine closed the connection mid-head")
        else:
            error = aiohttp.ServerDisconnectedError()
        self._fail(error)

    # --- httptools callbacks ---------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        # llhttp hands over a span per read, so a split status line comes in parts.
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.add(name.decode(*_HEADER_CODEC), value.decode(*_HEADER_CODEC))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status < 200:
            # An interim answer (103 Early Hints, an unasked-for 100): the
            # final one follows on the same connection.
            self._reason = b""
            self._headers = CIMultiDict()
            return
        answer = Answer(status, self._reason.decode(*_HEADER_CODEC), self._headers)
        self._answer = answer
        self._keep_alive = self._parser.should_keep_alive()
        self._until_close = (
            answer.content_length is None
            and "Transfer-Encoding" not in answer.headers
            and status not in _NO_BODY_STATUSES
        )
        self._wake(Flow.DONE)

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        if self._answer is not None:
            self._complete = True

    # --- the request's side -------------------------------------------------------

    def send(self, request: bytes) -> None:
        """Start a request: `request` is its whole head and body."""
        assert self._transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self.answered = False
        self._transport.write(request)

    async def head(self) -> Answer:
        """The answer's status line and headers, once they are complete."""
        if self._answer is None:
            await self._wait()
        assert self._answer is not None
        return self._answer

    def start_relay(self, sink: BodySink) -> None:
        """From now on, hand every piece of the answer's body to `sink` as it comes."""
        self._sink = sink
        self._relay()

    async def wait(self) -> Flow:
        """The relay's next event: PAUSE, GONE or DONE; raises if the answer breaks."""
        held, self._held = self._held, None
        if held is not None:
            return held
        if self._complete and not self._pieces:
            return Flow.DONE
        return await self._wait()

    def resume(self) -> None:
        """Read again after a PAUSE, once the client's socket has drained."""
        if self._transport is not None:
            self._transport.resume_reading()

    def finish(self) -> None:
        """The answer is complete: keep the connection for the next request if the engine does."""
        if self._keep_alive and self.poolable and self.usable:
            self._reset()
            self._pool.keep(self)
        else:
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection mid-answer: how an engine learns to stop generating."""
        if self._transport is not None:
            self._transport.abort()

    def idle_until(self, timer: asyncio.TimerHandle | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = timer

    @property
    def usable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    # --- internals -----------------------------------------------------------------

    def _relay(self) -> None:
        pieces = self._pieces
        if pieces:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            assert self._sink is not None
            flow = self._sink.body(data)
            if flow is Flow.PAUSE and not self._complete and self._transport is not None:
                self._transport.pause_reading()
                self._hand_over(flow)
                return
            if flow is Flow.GONE:
                self.abort()
                self._hand_over(flow)
                return
        if self._complete:
            self._wake(Flow.DONE)

    async def _wait(self) -> Flow:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def _wake(self, flow: Flow) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(flow)

    def _hand_over(self, flow: Flow) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(flow)
        else:
            self._held = flow

    def _fail(self, error: BaseException) -> None:
        self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _fail_parse(self, err: httptools.HttpParserError) -> None:
        self.abort()
        if self._answer is None:
            self._fail(aiohttp.ClientConnectionError(f"the engine sent a malformed head: {err}"))
        else:
            self._fail(
                aiohttp.ClientPayloadError(f"the engine sent a malformed answer body: {err}")
            )

    def _reset(self) -> None:
        self._parser = None
        self._reason = b""
        self._headers = CIMultiDict()
        self._answer = None
        self._complete = False
        self._sink = None
        self._error = None
        self._held = None


class EnginePool:
    """Keep-alive connections to the engine at `base_url` (http or https, optional path prefix)."""

    def __init__(self, base_url: str) -> None:
        url = URL(base_url)
        if url.host is None or url.port is None:
            raise ValueError(f"engine URL {base_url!r} names no host, or no port for its scheme")
        self._host = url.host
        self._port = url.port
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.raw_path.rstrip("/")
        self._host_header = url.host_port_subcomponent
        self._idle: list[EngineConnection] = []

    async def connect(self, reuse: bool = True) -> EngineConnection:
        """A pooled connection if one is idle and `reuse`, else a new one, which
        goes back to the pool after its answer only if `reuse`.

        Raises OSError or TimeoutError when the engine cannot be reached.
        """
        while reuse and self._idle:
            connection = self._idle.pop()
            connection.idle_until(None)
            if connection.usable:
                connection.reused = True
                return connection
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, protocol = await loop.create_connection(
                lambda: EngineConnection(self),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        protocol.poolable = reuse
        return protocol

    def request(
        self, method: str, path_qs: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> bytes:
        """A request's bytes on the wire: `headers` are the client's forwardable ones."""
        lines = [f"{method} {self._prefix}{path_qs} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers)
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        return "".join(lines).encode(*_HEADER_CODEC) + body

    def keep(self, connection: EngineConnection) -> None:
        self._idle.append(connection)
        loop = asyncio.get_running_loop()
        connection.idle_until(loop.call_later(IDLE_TIMEOUT_S, self._expire, connection))

    def forget(self, connection: EngineConnection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)
            connection.idle_until(None)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _expire(self, connection: EngineConnection) -> None:
        self.forget(connection)
        connection.close()
