"""`batchpilot sim serve`: the simulated engine in real time, as an OpenAI-compatible server.

Why one module: the driver (`LiveEngine`) and the HTTP handlers
(`SimServer`) are the two halves of one hand-off (submissions, knob changes,
cancels and token streams passed between them), read together.

One `Replica` (sim/engine.py) runs on the wall clock: simulated seconds =
wall seconds x `time_scale`. A single asyncio task, the driver, owns the
replica: request handlers hand it their submissions and knob changes and
wait; it advances the replica to "now", wakes again when the engine step in
progress ends, and passes each token to its request's stream as the step
that produced it completes. So SSE chunks leave at their simulated token
times (to within event-loop jitter), and a non-streaming answer at the
finish time.

This is the engine only. Its gate model runs with no limits (`Knobs()`),
because the real gate runs in front of it; and its /metrics carries only
the engine's `vllm:*` series (a real vLLM exports no batchpilot_gate_*
series, and two copies per pod would double-count in `sum by (pod)`).

Requests: prompt length and priority are read as the gate reads them
(batchpilot.gate.estimate: `x-prompt-tokens`, token-id prompts, else
characters / 4; `x-priority`). Output length: the `x-output-tokens` header,
else max_completion_tokens / max_tokens, else `default_max_tokens`; the
replica generates exactly that many tokens (there is no EOS model). `n` > 1
is refused: one choice per request.

Engine-native tuning: when the engine is `runtime_tunable`, SGLang's
`POST /set_internal_state` with `{"server_args": {"chunked_prefill_size":
N}}` sets the prefill token budget per step, answering as SGLang does (a
list with one `{"updated": ..., "server_args": ...}` per rank); otherwise
the endpoint is absent (404), as on vLLM.

A client that disconnects has its request cancelled in the engine, as vLLM
aborts the request of a closed connection: it leaves the waiting queue or the
running batch, and its KV blocks and batch slot go to the others.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from batchpilot.contract.knobs import KnobError, Knobs
from batchpilot.gate.estimate import RequestError, estimate_payload
from batchpilot.gate.proxy import error_response
from batchpilot.sim.engine import EngineConfig, EngineEvent, Replica, SimRequest

log = logging.getLogger("batchpilot.sim.serve")

OUTPUT_TOKENS_HEADER = "x-output-tokens"
# Events a request's stream receives from the driver.
TOKENS, FINISHED, SHED, REJECTED = "tokens", "finished", "shed", "rejected"

_Result = TypeVar("_Result")


@dataclass
class RequestStream:
    """What the driver tells one request's handler, in order."""

    request: SimRequest
    events: asyncio.Queue[tuple[str, int]] = field(default_factory=asyncio.Queue)


class LiveEngine:
    """A Replica advanced in real time by one driver task (`run`)."""

    def __init__(self, config: EngineConfig, time_scale: float) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale: must be > 0, got {time_scale}")
        self.config = config
        self.time_scale = time_scale
        self.replica = Replica(config, Knobs(), name="sim-serve", record_tokens=True)
        self._streams: dict[int, RequestStream] = {}
        self._commands: list[tuple[Callable[[float], Any], asyncio.Future[Any]]] = []
        self._wakeup: asyncio.Future[None] | None = None
        self._start_wall = 0.0

    def sim_now(self) -> float:
        return (asyncio.get_running_loop().time() - self._start_wall) * self.time_scale

    async def submit(self, prompt_tokens: int, output_tokens: int, priority: int) -> RequestStream:
        def submit_now(now: float) -> RequestStream:
            request = self.replica.submit(now, prompt_tokens, output_tokens, priority)
            stream = RequestStream(request)
            self._streams[request.request_id] = stream
            return stream

        submitted = self._call(submit_now)
        try:
            # Shielded, so that the answer outlives a client that leaves
            # before the driver takes the request: it is still submitted (a
            # queued command runs), and must then be cancelled.
            return await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(self._abandon_submitted)
            raise

    def abandon(self, stream: RequestStream) -> None:
        """The client went away: stop routing its events and cancel it if it has not ended."""
        request_id = stream.request.request_id
        # No stream left means its last event (finished, shed, rejected) was routed.
        if self._streams.pop(request_id, None) is not None:
            self._call(lambda now: self.replica.cancel(now, request_id))

    async def set_prefill_budget(self, tokens: int) -> Knobs:
        """Change the engine's prefill token budget per step; returns the knobs in effect."""
        knobs = self.replica.knobs.with_changes(max_num_batched_tokens=tokens)
        return await self._call(lambda now: self.replica.set_knobs(now, knobs))

    async def run(self) -> None:
        """The driver: the only code that touches the replica. Runs until cancelled."""
        loop = asyncio.get_running_loop()
        self._start_wall = loop.time()
        while True:
            now = self.sim_now()
            commands, self._commands = self._commands, []
            for command, done in commands:
                # A waiter cancelled meanwhile (its client left) wants no answer,
                # but the command still runs: it was accepted.
                try:
                    result = command(now)
                except ValueError as err:  # the replica's own input checks
                    if not done.done():
                        done.set_exception(err)
                    continue
                if not done.done():
                    done.set_result(result)
            for event in self.replica.advance(now):
                self._dispatch(event)
            if self._commands:
                continue
            self._wakeup = loop.create_future()
            next_s = self.replica.next_event_s()
            timer = None
            if next_s is not None:
                timer = loop.call_at(self._start_wall + next_s / self.time_scale, self._wake)
            try:
                await self._wakeup
            finally:
                if timer is not None:
                    timer.cancel()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _call(self, command: Callable[[float], _Result]) -> asyncio.Future[_Result]:
        """Queue `command(now)` for the driver; the future holds what it returns."""
        done: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._commands.append((command, done))
        self._wake()
        return done

    def _abandon_submitted(self, submitted: asyncio.Future[RequestStream]) -> None:
        # exception() first: it marks a refused submission's error as seen.
        if submitted.exception() is None:
            self.abandon(submitted.result())

    def _dispatch(self, event: EngineEvent) -> None:
        request_id = event.request.request_id
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if event.kind == TOKENS:
            stream.events.put_nowait((TOKENS, len(event.token_times)))
        elif event.kind in (FINISHED, SHED, REJECTED):
            stream.events.put_nowait((event.kind, 0))
            del self._streams[request_id]


class SimServer:
    """The HTTP face of a LiveEngine."""

    def __init__(
        self,
        config: EngineConfig,
        model: str,
        time_scale: float = 1.0,
        default_max_tokens: int = 256,
    ) -> None:
        self.engine = LiveEngine(config, time_scale)
        self.model = model
        self.default_max_tokens = default_max_tokens
        # Generation requests open at the HTTP layer: what a gate in front must cap.
        self.open_requests = 0
        self.max_open_requests = 0
        self._ids = itertools.count()
        self._runner: web.AppRunner | None = None
        self._driver: asyncio.Task[None] | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.add_routes(
            [
                web.post("/v1/completions", self.generate),
                web.post("/v1/chat/completions", self.generate),
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics),
            ]
        )
        if self.engine.config.runtime_tunable:
            app.router.add_route("POST", "/set_internal_state", self.set_internal_state)
            app.router.add_route("PUT", "/set_internal_state", self.set_internal_state)
        return app

    async def start(self, host: str, port: int) -> int:
        """Serve on host:port (0: a free port); returns the bound port."""
        self._driver = asyncio.create_task(self.engine.run())
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, backlog=1024).start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
            self._driver = None

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = json.loads(await request.read())
            size = estimate_payload(payload, request.headers, self.default_max_tokens)
            output_tokens = _output_tokens(payload, request.headers, self.default_max_tokens)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return error_response(
                400,
                f"request body is not valid JSON ({err})",
                "invalid_request_error",
                param="body",
            )
        except RequestError as err:
            return error_response(400, err.message, "invalid_request_error", param=err.field)
        try:
            stream = await self.engine.submit(size.prompt_tokens, output_tokens, size.priority)
        except ValueError as err:  # e.g. x-prompt-tokens: 0
            return error_response(400, str(err), "invalid_request_error", param="prompt")
        self.open_requests += 1
        self.max_open_requests = max(self.max_open_requests, self.open_requests)
        try:
            answer = _Answer(
                chat=request.path.endswith("/chat/completions"),
                request_id=next(self._ids),
                model=self.model,
                prompt_tokens=size.prompt_tokens,
                include_usage=_include_usage(payload),
            )
            if size.stream:
                return await self._stream(request, stream, answer)
            return await self._complete(stream, answer)
        finally:
            self.open_requests -= 1
            self.engine.abandon(stream)

    async def _stream(
        self, request: web.Request, stream: RequestStream, answer: _Answer
    ) -> web.StreamResponse:
        kind, count = await stream.events.get()
        if kind != TOKENS:
            return self._refusal(kind, stream.request)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        while kind == TOKENS:
            chunks = b"".join(answer.sse_token() for _ in range(count))
            await response.write(chunks)
            kind, count = await stream.events.get()
        await response.write(answer.sse_end())
        await response.write_eof()
        return response

    async def _complete(self, stream: RequestStream, answer: _Answer) -> web.Response:
        kind, count = await stream.events.get()
        while kind == TOKENS:
            answer.generated += count
            kind, count = await stream.events.get()
        if kind != FINISHED:
            return self._refusal(kind, stream.request)
        return web.json_response(answer.full())

    def _refusal(self, kind: str, request: SimRequest) -> web.Response:
        if kind == SHED:
            return error_response(
                429,
                "shed by the simulated gate's queue deadline",
                "rate_limit_exceeded",
                code="queue_deadline_exceeded",
            )
        capacity = self.engine.config.kv_cache_tokens
        return error_response(
            400,
            f"prompt ({request.prompt_tokens}) + output ({request.output_tokens}) tokens exceed "
            f"the engine's KV cache of {capacity} tokens",
            "invalid_request_error",
            param="max_tokens",
        )

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "batchpilot-sim"}
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def metrics(self, request: web.Request) -> web.Response:
        # render_text() without a time reads the state as of the driver's last
        # step (at most one step old) and so never moves the replica itself.
        text = _engine_series_only(self.engine.replica.render_text())
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def set_internal_state(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            server_args = body["server_args"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            return web.json_response(
                {"detail": 'expected a JSON body {"server_args": {"chunked_prefill_size": N}}'},
                status=400,
            )
        if not isinstance(server_args, dict):
            return web.json_response({"detail": "server_args must be an object"}, status=400)
        unsupported = sorted(set(server_args) - {"chunked_prefill_size"})
        if unsupported:
            # SGLang's answer to keys outside its allow-list: not updated.
            log.warning(
                "set_internal_state: only chunked_prefill_size is live here, not %s", unsupported
            )
            return web.json_response([{"updated": False, "server_args": self._server_args()}])
        try:
            await self.engine.set_prefill_budget(server_args["chunked_prefill_size"])
        except KnobError as err:
            return web.json_response({"detail": f"chunked_prefill_size: {err.message}"}, status=400)
        return web.json_response([{"updated": True, "server_args": self._server_args()}])

    def _server_args(self) -> dict[str, Any]:
        return {"chunked_prefill_size": self.engine.replica.knobs.max_num_batched_tokens}


def _output_tokens(payload: dict[str, Any], headers: Mapping[str, str], default: int) -> int:
    if (payload.get("n") or 1) != 1:
        raise RequestError("n", "sim serve generates one choice per request; send n=1")
    raw = headers.get(OUTPUT_TOKENS_HEADER)
    if raw is None:
        for key in ("max_completion_tokens", "max_tokens"):
            if payload.get(key) is not None:
                return int(payload[key])
        return default
    try:
        value = int(raw)
    except ValueError as err:
        raise RequestError(OUTPUT_TOKENS_HEADER, f"header must be an integer, got {raw!r}") from err
    if value < 1:
        raise RequestError(OUTPUT_TOKENS_HEADER, f"header must be at least 1, got {value}")
    return value


def _include_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _engine_series_only(text: str) -> str:
    kept = [
        line
        for line in text.splitlines()
        if not line.startswith(
            ("batchpilot_gate_", "# HELP batchpilot_gate_", "# TYPE batchpilot_gate_")
        )
    ]
    return "\n".join(kept) + "\n"


@dataclass
class _Answer:
    """OpenAI response bodies for one request: SSE chunks as tokens come, or the whole."""

    chat: bool
    request_id: int
    model: str
    prompt_tokens: int
    include_usage: bool
    generated: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-sim{self.request_id}"

    def _envelope(self, choice: dict[str, Any], whole: bool = False) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion" if whole else "chat.completion.chunk"
        else:
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.generated,
            "total_tokens": self.prompt_tokens + self.generated,
        }

    def sse_token(self) -> bytes:
        text = f" t{self.generated}"
        self.generated += 1
        if self.chat:
            delta = (
                {"content": text} if self.generated > 1 else {"role": "assistant", "content": text}
            )
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": None,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return b"data: " + json.dumps(self._envelope(choice)).encode() + b"\n\n"

    def sse_end(self) -> bytes:
        # The answer always stops at its token count: finish_reason "length".
        last: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if self.chat:
            last["delta"] = {}
        else:
            last["text"] = ""
        events = [self._envelope(last)]
        if self.include_usage:
            events.append({**self._envelope(last), "choices": [], "usage": self._usage()})
        body = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
        return body + b"data: [DONE]\n\n"

    def full(self) -> dict[str, Any]:
        text = "".join(f" t{index}" for index in range(self.generated))
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return {**self._envelope(choice, whole=True), "usage": self._usage()}
