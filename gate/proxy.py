"""The client-facing reverse proxy: admission in front of the engine, bytes passed through.

Why one module: the data port's request path, from route to last relayed
byte; its helpers (the resend rule, the SSE token counter) serve that path
alone, and the route contract below stays beside the code that keeps it.

- `POST /v1/completions`, `POST /v1/chat/completions`: sized (see
  `estimate`), queued and admitted by the `Gate`, then forwarded. The
  engine's answer is relayed as it arrives, chunk by chunk, whatever its
  status: SSE streams are never buffered, and engine errors reach the client
  unchanged (and are counted). These go out on the gate's own engine
  connections (upstream.py), whose read callback writes each chunk to the
  client (`ClientSink`): the per-token path, kept free of task switches.
- Every other route and method (`/v1/embeddings`, `/v1/models`, `/health`,
  `/tokenize`, the engine's `/metrics`, ...): passed through unthrottled and
  uncounted, the request body streamed to the engine as it arrives, and the
  answer streamed back. The caps model generation (batch slots, KV tokens);
  embeddings and the rest either do not use them or, on engines that serve
  both, are too unlike a generation to size. Users see exactly what the engine
  serves, its 404 included. docs/gate.md says which routes are which.
- Except `/set_internal_state` (any method): 403. It is SGLang's live-tuning
  endpoint, which the gate's native adapter steers behind the admin token; a
  client calling it through the data port would silently undo what the
  gate applied.
- Each admitted request is served in one SLO class (`estimate.classify`):
  classified once, on arrival, and counted per class once at admission or
  shed (runtime.py) and once at its first and last streamed byte here; the
  per-chunk loop does no per-class work.
- A request shed at its class's queue deadline gets 429 with `Retry-After`
  and an OpenAI-style error object naming the class and the deadline; the
  engine never sees it. A request that a
  client SDK marks as a retry (`x-stainless-retry-count` of 1 or more: the
  openai and anthropic SDKs resend a 429 twice by default, after
  `Retry-After`) is counted in retried_requests_total as well (metrics.py).
- A client that goes away, queued or mid-stream, gives its place back at
  once, and the upstream request is closed so the engine stops generating.
  This relies on aiohttp's `handler_cancellation` (set by the server).
- A request that went out on a pooled keep-alive connection the engine had
  already closed (llama-server closes after every streamed answer while
  advertising keep-alive, so the pool can hand out a connection whose close
  is still in flight) is sent once more, on a new connection of its own, as
  long as no byte of an answer came back: the engine cannot have processed
  it. Anything else that fails stays a failure (see `retry_reason`). A
  passed-through body is streamed, so it cannot be sent twice: such a request
  always goes out on a new connection of its own, which cannot be stale.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from types import SimpleNamespace

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, MultiMapping

from batchpilot.contract.gate_metrics import FailedReason, RetriedOutcome, RetryReason
from batchpilot.contract.knobs import DEFAULT_CLASS
from batchpilot.gate.estimate import RequestError, classify, estimate_payload, parse_body
from batchpilot.gate.metrics import ClassMetrics, GateMetrics, Histogram
from batchpilot.gate.runtime import Gate
from batchpilot.gate.upstream import EngineConnection, EnginePool, Flow

log = logging.getLogger("batchpilot.gate")

ADMITTED_ROUTES = ("/v1/completions", "/v1/chat/completions")
REFUSED_ROUTES = ("/set_internal_state",)
# Sent by the Stainless-generated SDKs (openai, anthropic): 0 on a first
# attempt, n on the n-th automatic retry.
RETRY_COUNT_HEADER = "x-stainless-retry-count"

# RFC 9110 section 7.6.1 hop-by-hop headers (plus any the Connection header
# names, see `_forwardable`), the framing headers that aiohttp recomputes for
# each leg (Host, Content-Length, Transfer-Encoding), and Expect: aiohttp's
# server has already answered a client's 100-continue itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An OpenAI-style error object, so client SDKs surface the message."""
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _forwardable(headers: MultiMapping[str]) -> CIMultiDict[str]:
    # A sender may declare more hop-by-hop fields by naming them in Connection.
    named = {
        token.strip().lower()
        for value in headers.getall(hdrs.CONNECTION, [])
        for token in value.split(",")
    }
    dropped = HOP_BY_HOP | named
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in dropped)


def is_client_retry(headers: Mapping[str, str]) -> bool:
    """Whether a client SDK says this request is its retry of one it sent before.

    A value that is not a number counts as a first attempt: the header is the
    SDK's, not an interface of the gate's, so it never fails a request.
    """
    try:
        return int(headers.get(RETRY_COUNT_HEADER, "0")) > 0
    except ValueError:
        return False


class Attempt:
    """One request's trace context: did its connection come from the pool?

    Set by the `connection_trace()` hooks, which aiohttp calls once per
    connection it hands out: either it reused a pooled one or it opened one.
    """

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


async def _connection_reused(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: object
) -> None:
    # Requests that pass no Attempt (the health probe, native adapters) are not retried here.
    if context.trace_request_ctx is not None:
        context.trace_request_ctx.reused = True


async def _connection_opening(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: object
) -> None:
    if context.trace_request_ctx is not None:
        context.trace_request_ctx.reused = False


def connection_trace() -> aiohttp.TraceConfig:
    """The pooled session's trace hooks that fill in each request's `Attempt`."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(_connection_reused)
    trace.on_connection_create_start.append(_connection_opening)
    return trace


def retry_reason(err: BaseException, reused: bool) -> RetryReason | None:
    """The retries_total reason when `err` means the engine never got the request, else None.

    Only a request whose connection came from the pool and which failed before
    its answer's status line and headers were complete (the caller's part:
    only `session.request()` failures get here) qualifies: the engine closed
    that idle connection, and the request met a closed socket. On a new
    connection the same errors mean the engine itself is failing, and sending
    again would double its load; once any answer byte came back, the engine
    has the request, and sending it again could run it twice.
    """
    if not reused:
        return None
    if isinstance(err, aiohttp.ServerDisconnectedError):
        # aiohttp puts the partly parsed answer here when some bytes of it came.
        return RetryReason.SERVER_DISCONNECTED if isinstance(err.message, str) else None
    # A reset, or "Can not write request body": the socket was closed under us.
    # (ClientConnectorError is a ClientOSError too, but a connection being
    # opened is not a reused one.)
    if isinstance(err, aiohttp.ClientOSError):
        return RetryReason.SOCKET_ERROR
    return None


# SSE event marker; JSON payloads escape newlines, so it only matches a field
# at a line start. Six bytes: a marker split across two chunks lies within
# the previous chunk's last five bytes and the next one's first five.
_EVENT = b"\ndata:"
_SEAM = len(_EVENT) - 1
# Enough of the stream's end to hold "data: [DONE]" and the blank line after it.
_TAIL = 16


class TokenEvents:
    """Counts the SSE data events of a relayed stream and times the first and last one.

    Costs two `bytes.count` per chunk (one over at most ten bytes) and a
    16-byte slice. Exact for any chunking: an event whose marker straddles
    chunks is counted once, at the chunk that completes it.
    """

    __slots__ = ("_tail", "events", "first_s", "last_s")

    def __init__(self) -> None:
        self.events = 0
        self.first_s = 0.0
        self.last_s = 0.0
        # The stream starts at a line start, which the newline stands for.
        self._tail = b"\n"

    def feed(self, chunk: bytes, now_s: float) -> None:
        found = chunk.count(_EVENT) + (self._tail[-_SEAM:] + chunk[:_SEAM]).count(_EVENT)
        self._tail = chunk[-_TAIL:] if len(chunk) >= _TAIL else (self._tail + chunk)[-_TAIL:]
        if found:
            if not self.events:
                self.first_s = now_s
            self.events += found
            self.last_s = now_s

    @property
    def tokens(self) -> int:
        """Token events: every data event but the final `data: [DONE]`."""
        return self.events - (1 if self._tail.rstrip().endswith(b"[DONE]") else 0)

    def observe(
        self,
        per_token: Histogram,
        output_tokens: Histogram,
        class_per_token: Histogram | None = None,
    ) -> None:
        """Observe a finished stream's output length and, with at least two
        token events, its mean time per token (in `class_per_token` too).

        The time `data: [DONE]` arrived counts as the last event's, which it
        follows at once.
        """
        tokens = self.tokens
        if tokens >= 1:
            output_tokens.observe(tokens)
        if tokens >= 2:
            mean_s = (self.last_s - self.first_s) / (tokens - 1)
            per_token.observe(mean_s)
            if class_per_token is not None:
                class_per_token.observe(mean_s)


class Proxy:
    """Request handlers of the data port."""

    def __init__(
        self,
        gate: Gate,
        session: aiohttp.ClientSession,
        fresh_session: aiohttp.ClientSession,
        engine: EnginePool,
        upstream_url: str,
        default_max_tokens: int,
    ) -> None:
        """`session`: the pooled one, traced by `connection_trace()`;
        `fresh_session`: opens a new connection for every request (for retries);
        `engine`: the admitted requests' connections (upstream.py)."""
        self._gate = gate
        self._session = session
        self._fresh_session = fresh_session
        self._engine = engine
        self._upstream_url = upstream_url
        self._default_max_tokens = default_max_tokens

    def routes(self) -> list[web.RouteDef]:
        return [
            *(web.post(path, self.handle_generate) for path in ADMITTED_ROUTES),
            *(web.route("*", path, self.handle_refused) for path in REFUSED_ROUTES),
            web.route("*", "/{tail:.*}", self.handle_passthrough),
        ]

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        arrival_s = asyncio.get_running_loop().time()
        body = await request.read()
        headers = request.headers
        try:
            payload = parse_body(body)
            size = estimate_payload(payload, headers, self._default_max_tokens)
        except RequestError as err:
            return error_response(400, err.message, "invalid_request_error", param=err.field)
        metrics = self._gate.metrics
        service_class, defaulted = classify(payload, headers, self._gate.queue.knobs)
        if defaulted is not None:
            metrics.class_defaulted[defaulted] += 1
        ticket = await self._gate.acquire(size, arrival_s, service_class)
        if is_client_retry(headers):
            outcome = RetriedOutcome.SHED if ticket is None else RetriedOutcome.ADMITTED
            metrics.retried_requests[outcome] += 1
        if ticket is None:
            return self._shed_response(arrival_s, service_class)
        metrics.prompt_tokens.observe(size.prompt_tokens)
        try:
            return await self._relay_admitted(
                request,
                body,
                arrival_s if size.stream else None,
                metrics.classes[ticket.service_class],
            )
        finally:
            self._gate.release(ticket)

    async def handle_passthrough(self, request: web.Request) -> web.StreamResponse:
        body = request.content if request.body_exists else None
        return await self._forward(request, body, None, count=False)

    async def handle_refused(self, request: web.Request) -> web.Response:
        return error_response(
            403,
            f"{request.path} is not passed to the engine by the batchpilot gate: the gate steers "
            "the engine's live settings itself; change them with PUT /config on the gate's admin "
            "port (see docs/gate.md)",
            "permission_error",
            code="engine_admin_route",
        )

    def _shed_response(self, arrival_s: float, service_class: str) -> web.Response:
        knobs = self._gate.queue.knobs
        if service_class not in knobs.class_names:
            # Configured away while the request waited: it was shed in the default class.
            service_class = DEFAULT_CLASS
        own_ms = knobs.service_class(service_class).queue_deadline_ms
        deadline_ms = (own_ms if own_ms is not None else knobs.queue_deadline_ms) or 0
        waited_ms = (asyncio.get_running_loop().time() - arrival_s) * 1000.0
        retry_after_s = max(1, math.ceil(deadline_ms / 1000.0))
        return error_response(
            429,
            f"request waited {waited_ms:.0f} ms in the batchpilot gate queue, past the queue "
            f"deadline of {deadline_ms} ms of its SLO class {service_class}: the engine is "
            f"saturated; retry after {retry_after_s} s or send it to another replica",
            "rate_limit_exceeded",
            code="queue_deadline_exceeded",
            headers={"Retry-After": str(retry_after_s)},
        )

    async def _relay_admitted(
        self,
        request: web.Request,
        body: bytes,
        ttft_from_s: float | None,
        served: ClassMetrics,
    ) -> web.StreamResponse:
        """Relay an admitted request to the engine and its answer back, as `_forward`
        does for the rest, with the answer's body written from the engine
        connection's read callback (upstream.py says why).

        `ttft_from_s`: observe time-to-first-token from this arrival time, and
        time per output token (streaming requests only). `served`: the metrics
        of the request's SLO class, which observe them too.
        """
        metrics = self._gate.metrics
        wire = self._engine.request(
            request.method, request.rel_url.path_qs, _forwardable(request.headers).items(), body
        )
        connection: EngineConnection | None = None
        try:
            try:
                connection = await self._engine.connect()
                connection.send(wire)
                answer = await connection.head()
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
                assert connection is not None  # connect() raises neither
                retry = retry_reason(err, connection.reused and not connection.answered)
                if retry is None:
                    raise
                metrics.upstream_retries[retry] += 1
                # A new connection, not pooled afterwards: the pool may hold
                # more that the engine has closed. A failure here is final.
                connection = await self._engine.connect(reuse=False)
                connection.send(wire)
                answer = await connection.head()
        except asyncio.CancelledError:
            # The client went away before the engine answered.
            if connection is not None:
                connection.abort()
            metrics.failed[FailedReason.CLIENT_DISCONNECT] += 1
            raise
        except (aiohttp.ClientConnectionError, OSError, TimeoutError) as err:
            if connection is not None:
                connection.abort()
            metrics.failed[FailedReason.UPSTREAM_UNREACHABLE] += 1
            return _unreachable(self._upstream_url, err)
        response = web.StreamResponse(status=answer.status, reason=answer.reason)
        try:
            response.headers.extend(_forwardable(answer.headers))
            if answer.content_length is not None:
                response.content_length = answer.content_length
            _count_engine_error(metrics, answer.status)
            ttft_from_s = ttft_from_s if answer.status < 300 else None
            tokens = TokenEvents() if ttft_from_s is not None else None
            await response.prepare(request)
            if request.transport is None:
                self._client_gone(connection, count=True)
                return response
            sink = ClientSink(
                request.transport,
                response.headers.get(hdrs.TRANSFER_ENCODING) == "chunked",
                tokens,
                ttft_from_s,
                (metrics.time_to_first_token, served.time_to_first_token),
            )
            connection.start_relay(sink)
            while (flow := await connection.wait()) is Flow.PAUSE:
                await request.writer.drain()
                connection.resume()
            if flow is Flow.GONE:
                self._client_gone(connection, count=True)
                return response
            if tokens is not None:
                tokens.observe(
                    metrics.time_per_output_token,
                    metrics.output_tokens,
                    served.time_per_output_token,
                )
            await response.write_eof()
            connection.finish()
            return response
        except aiohttp.ClientPayloadError:
            metrics.failed[FailedReason.UPSTREAM_STREAM_BROKEN] += 1
            # Cut the client's connection too: a clean end would pass a
            # truncated answer off as complete.
            if request.transport is not None:
                request.transport.abort()
            return response
        except ConnectionResetError:
            # The client went away while we wrote to it.
            self._client_gone(connection, count=True)
            return response
        except asyncio.CancelledError:
            # The client went away while we waited on the engine.
            self._client_gone(connection, count=True)
            raise

    async def _forward(
        self,
        request: web.Request,
        body: bytes | aiohttp.StreamReader | None,
        ttft_from_s: float | None,
        count: bool,
        served: ClassMetrics | None = None,
    ) -> web.StreamResponse:
        """Relay one request to the engine and its answer back, chunk by chunk.

        `body`: read already, or the client's stream to relay as it arrives.
        `ttft_from_s`: observe time-to-first-token from this arrival time, and
        time per output token (streaming requests only: for a non-streaming
        one the first byte comes at the end). `count`: count engine errors as
        failed requests. `served`: the metrics of the request's SLO class,
        which observe its time-to-first-token and per-token time too.
        """
        metrics = self._gate.metrics
        url = self._upstream_url + request.rel_url.path_qs
        headers = _forwardable(request.headers)
        attempt = Attempt()
        try:
            try:
                if isinstance(body, aiohttp.StreamReader):
                    upstream = await self._send_streamed(request, url, headers, body)
                else:
                    upstream = await self._session.request(
                        request.method,
                        url,
                        data=body or None,
                        headers=headers,
                        trace_request_ctx=attempt,
                    )
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
                retry = retry_reason(err, attempt.reused)
                if retry is None:
                    raise
                metrics.upstream_retries[retry] += 1
                # Not the pool again: it may hold more connections the engine
                # has closed. A failure here is the engine's, and is final.
                upstream = await self._fresh_session.request(
                    request.method, url, data=body or None, headers=headers
                )
        except asyncio.CancelledError:
            # The client went away before the engine answered.
            if count:
                metrics.failed[FailedReason.CLIENT_DISCONNECT] += 1
            raise
        except (aiohttp.ClientConnectionError, TimeoutError) as err:
            if count:
                metrics.failed[FailedReason.UPSTREAM_UNREACHABLE] += 1
            return _unreachable(self._upstream_url, err)
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(_forwardable(upstream.headers))
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            if count:
                _count_engine_error(metrics, upstream.status)
            ttft_from_s = ttft_from_s if upstream.status < 300 else None
            tokens = TokenEvents() if ttft_from_s is not None else None
            await response.prepare(request)
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                    metrics.failed[FailedReason.UPSTREAM_STREAM_BROKEN] += 1
                    # Cut the client's connection too: a clean end would pass
                    # a truncated answer off as complete.
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if not chunk:
                    break
                if tokens is not None:
                    now_s = asyncio.get_running_loop().time()
                    if ttft_from_s is not None:
                        # Once per request, at its first chunk.
                        ttft_s = now_s - ttft_from_s
                        metrics.time_to_first_token.observe(ttft_s)
                        if served is not None:
                            served.time_to_first_token.observe(ttft_s)
                        ttft_from_s = None
                    tokens.feed(chunk, now_s)
                await response.write(chunk)
            if tokens is not None:
                tokens.observe(
                    metrics.time_per_output_token,
                    metrics.output_tokens,
                    None if served is None else served.time_per_output_token,
                )
            await response.write_eof()
            return response
        except ConnectionResetError:
            # The client went away while we wrote to it.
            self._client_gone(upstream, count)
            return response
        except asyncio.CancelledError:
            # The client went away while we waited on the engine.
            self._client_gone(upstream, count)
            raise
        finally:
            upstream.release()

    async def _send_streamed(
        self,
        request: web.Request,
        url: str,
        headers: CIMultiDict[str],
        body: aiohttp.StreamReader,
    ) -> aiohttp.ClientResponse:
        """Send a request whose body is relayed from the client as it arrives.

        On the fresh session: a stream cannot be replayed, so it must not meet
        a pooled connection the engine has closed (the module docstring).
        """
        if request.content_length is not None:
            # Keep the client's framing: a stream has no size aiohttp could
            # compute, and would otherwise go out chunked.
            headers[hdrs.CONTENT_LENGTH] = str(request.content_length)
        return await self._fresh_session.request(request.method, url, data=body, headers=headers)

    def _client_gone(
        self, upstream: aiohttp.ClientResponse | EngineConnection, count: bool
    ) -> None:
        if count:
            self._gate.metrics.failed[FailedReason.CLIENT_DISCONNECT] += 1
        # Dropping (not releasing) the engine connection mid-answer is how
        # OpenAI-compatible engines learn to abort a request.
        if isinstance(upstream, EngineConnection):
            upstream.abort()
        else:
            upstream.close()


def _unreachable(upstream_url: str, err: BaseException) -> web.Response:
    return error_response(
        502,
        f"the engine at {upstream_url} is unreachable: {err}",
        "upstream_error",
        code="upstream_unreachable",
    )


def _count_engine_error(metrics: GateMetrics, status: int) -> None:
    if status >= 500:
        metrics.failed[FailedReason.UPSTREAM_5XX] += 1
    elif status >= 400:
        metrics.failed[FailedReason.UPSTREAM_4XX] += 1


# The client's socket buffer past which the engine connection is not read
# until it drains: where aiohttp's own writer drains too.
_CLIENT_HIGH_WATER = 1 << 16


class ClientSink:
    """Writes an admitted answer's body to the client's socket, framed as its
    head announced, and counts its token events.

    Called from the engine connection's read callback, once per read: the
    per-chunk path of the gate. Its work per chunk is `TokenEvents.feed`, one
    clock read and one write; time-to-first-token is observed once.
    """

    __slots__ = ("_chunked", "_first_token_histograms", "_tokens", "_transport", "_ttft_from_s")

    def __init__(
        self,
        transport: asyncio.Transport,
        chunked: bool,
        tokens: TokenEvents | None,
        ttft_from_s: float | None,
        first_token_histograms: tuple[Histogram, ...],
    ) -> None:
        self._transport = transport
        self._chunked = chunked
        self._tokens = tokens
        self._ttft_from_s = ttft_from_s
        self._first_token_histograms = first_token_histograms

    def body(self, data: bytes) -> Flow:
        transport = self._transport
        if transport.is_closing():
            return Flow.GONE
        tokens = self._tokens
        if tokens is not None:
            now_s = asyncio.get_running_loop().time()
            if self._ttft_from_s is not None:
                ttft_s = now_s - self._ttft_from_s
                for histogram in self._first_token_histograms:
                    histogram.observe(ttft_s)
                self._ttft_from_s = None
            tokens.feed(data, now_s)
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        return Flow.PAUSE if transport.get_write_buffer_size() > _CLIENT_HIGH_WATER else Flow.MORE
