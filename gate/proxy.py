"""The client-facing reverse proxy: admission in front of the engine, bytes passed through.

- `POST /v1/completions`, `POST /v1/chat/completions`: sized (see
  `estimate`), queued and admitted by the `Gate`, then forwarded. The
  engine's answer is relayed as it arrives, chunk by chunk, whatever its
  status: SSE streams are never buffered, and engine errors reach the client
  unchanged (and are counted).
- `GET /v1/models`, `GET /health`: forwarded without admission.
- A request shed at the queue deadline gets 429 with `Retry-After` and an
  OpenAI-style error object; the engine never sees it.
- A client that goes away, queued or mid-stream, gives its place back at
  once, and the upstream request is closed so the engine stops generating.
  This relies on aiohttp's `handler_cancellation` (set by the server).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from batchpilot.gate.estimate import RequestError, estimate_request
from batchpilot.gate.metrics import (
    FAILED_CLIENT_DISCONNECT,
    FAILED_UPSTREAM_4XX,
    FAILED_UPSTREAM_5XX,
    FAILED_UPSTREAM_STREAM_BROKEN,
    FAILED_UPSTREAM_UNREACHABLE,
)
from batchpilot.gate.runtime import Gate

log = logging.getLogger("batchpilot.gate")

ADMITTED_ROUTES = ("/v1/completions", "/v1/chat/completions")
PASSTHROUGH_ROUTES = ("/v1/models", "/health")

# RFC 9110 section 7.6.1 hop-by-hop headers, plus the framing headers that
# aiohttp recomputes for each leg (Host, Content-Length, Transfer-Encoding).
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


def _forwardable(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


class Proxy:
    """Request handlers of the data port."""

    def __init__(
        self, gate: Gate, session: aiohttp.ClientSession, upstream_url: str, default_max_tokens: int
    ) -> None:
        self._gate = gate
        self._session = session
        self._upstream_url = upstream_url
        self._default_max_tokens = default_max_tokens

    def routes(self) -> list[web.RouteDef]:
        return [
            *(web.post(path, self.handle_generate) for path in ADMITTED_ROUTES),
            *(web.get(path, self.handle_passthrough) for path in PASSTHROUGH_ROUTES),
            web.route("*", "/{tail:.*}", self.handle_unknown),
        ]

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        arrival_s = asyncio.get_running_loop().time()
        body = await request.read()
        try:
            size = estimate_request(body, request.headers, self._default_max_tokens)
        except RequestError as err:
            return error_response(400, err.message, "invalid_request_error", param=err.param)
        ticket = await self._gate.acquire(size, arrival_s)
        if ticket is None:
            return self._shed_response(arrival_s)
        try:
            return await self._forward(
                request, body, arrival_s if size.stream else None, count=True
            )
        finally:
            self._gate.release(ticket)

    async def handle_passthrough(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, await request.read(), None, count=False)

    async def handle_unknown(self, request: web.Request) -> web.Response:
        routes = ", ".join([*ADMITTED_ROUTES, *PASSTHROUGH_ROUTES])
        return error_response(
            404,
            f"{request.method} {request.path} is not served by the batchpilot gate; it serves {routes}",
            "invalid_request_error",
            code="not_found",
        )

    def _shed_response(self, arrival_s: float) -> web.Response:
        deadline_ms = self._gate.queue.knobs.queue_deadline_ms or 0
        waited_ms = (asyncio.get_running_loop().time() - arrival_s) * 1000.0
        retry_after_s = max(1, math.ceil(deadline_ms / 1000.0))
        return error_response(
            429,
            f"request waited {waited_ms:.0f} ms in the batchpilot gate queue, past its queue "
            f"deadline of {deadline_ms} ms: the engine is saturated; retry after {retry_after_s} s "
            "or send it to another replica",
            "rate_limit_exceeded",
            code="queue_deadline_exceeded",
            headers={"Retry-After": str(retry_after_s)},
        )

    async def _forward(
        self,
        request: web.Request,
        body: bytes,
        ttft_from_s: float | None,
        count: bool,
    ) -> web.StreamResponse:
        """Relay one request to the engine and its answer back, chunk by chunk.

        `ttft_from_s`: observe time-to-first-token from this arrival time
        (streaming requests only: for a non-streaming one the first byte
        comes at the end). `count`: count engine errors as failed requests.
        """
        metrics = self._gate.metrics
        url = self._upstream_url + request.rel_url.path_qs
        try:
            upstream = await self._session.request(
                request.method, url, data=body or None, headers=_forwardable(request.headers)
            )
        except asyncio.CancelledError:
            # The client went away before the engine answered.
            if count:
                metrics.failed[FAILED_CLIENT_DISCONNECT] += 1
            raise
        except (aiohttp.ClientConnectionError, TimeoutError) as err:
            if count:
                metrics.failed[FAILED_UPSTREAM_UNREACHABLE] += 1
            return error_response(
                502,
                f"the engine at {self._upstream_url} is unreachable: {err}",
                "upstream_error",
                code="upstream_unreachable",
            )
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(_forwardable(upstream.headers))
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            if count and upstream.status >= 400:
                reason = FAILED_UPSTREAM_5XX if upstream.status >= 500 else FAILED_UPSTREAM_4XX
                metrics.failed[reason] += 1
            ttft_from_s = ttft_from_s if upstream.status < 300 else None
            await response.prepare(request)
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                    metrics.failed[FAILED_UPSTREAM_STREAM_BROKEN] += 1
                    # Cut the client's connection too: a clean end would pass
                    # a truncated answer off as complete.
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if not chunk:
                    break
                if ttft_from_s is not None:
                    metrics.time_to_first_token.observe(
                        asyncio.get_running_loop().time() - ttft_from_s
                    )
                    ttft_from_s = None
                await response.write(chunk)
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

    def _client_gone(self, upstream: aiohttp.ClientResponse, count: bool) -> None:
        if count:
            self._gate.metrics.failed[FAILED_CLIENT_DISCONNECT] += 1
        # Closing (not releasing) drops the engine connection mid-answer,
        # which is how OpenAI-compatible engines learn to abort a request.
        upstream.close()
