"""One gate process: the proxy and admin servers, the engine probe, the annotation watcher.

Lifecycle: `start()` binds both ports and starts the background loops;
`stop()` drains: readiness turns false, the proxy stops accepting, and
admitted and queued requests get up to `grace_period_s` to finish before
they are cancelled. `run()` does both around SIGTERM/SIGINT; on SIGTERM it
first spends `shutdown_delay_s` not ready but still serving (see `run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

import aiohttp
from aiohttp import hdrs, web

from batchpilot.contract.gate_api import ConfigSource
from batchpilot.gate.admin import Admin
from batchpilot.gate.annotations import AnnotationError, knobs_from_annotations
from batchpilot.gate.native import make_adapter
from batchpilot.gate.proxy import Proxy, connection_trace
from batchpilot.gate.runtime import Gate
from batchpilot.gate.settings import GateSettings, parse_host_port
from batchpilot.gate.upstream import EnginePool

log = logging.getLogger("batchpilot.gate")

# The engine connection pool is unbounded (limit=0): admission already caps
# what reaches the engine, and a second, hidden cap here (aiohttp's default
# is 100 connections) would make the gate's max_concurrency lie.
# No total timeout: a long generation may stream for minutes.
_UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0)


class GateServer:
    def __init__(self, settings: GateSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._fresh_session: aiohttp.ClientSession | None = None
        self._engine: EnginePool | None = None
        self._gate: Gate | None = None
        self._proxy_runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._upstream_ready = False
        self._draining = False
        self.proxy_port = 0
        self.admin_port = 0

    @property
    def gate(self) -> Gate:
        if self._gate is None:
            raise RuntimeError("GateServer.start() has not run")
        return self._gate

    async def start(self) -> None:
        settings = self.settings
        # The pooled session tells each proxied request whether its connection
        # was reused; one the engine had closed meanwhile is retried on the
        # second session, whose connections are always new and closed after
        # one answer, so a retry can never meet a stale one (see proxy.py).
        # Retries are rare, so paying a connection setup for each costs little.
        self._session = _upstream_session(
            aiohttp.TCPConnector(limit=0), trace_configs=[connection_trace()]
        )
        self._fresh_session = _upstream_session(aiohttp.TCPConnector(limit=0, force_close=True))
        native = make_adapter(settings.native, self._session, settings.upstream_url)
        self._gate = Gate(settings.knobs, native)
        # Admitted requests' own connections; the sessions above serve the
        # passed-through routes, the health probe and the native adapters.
        self._engine = EnginePool(settings.upstream_url)

        proxy = Proxy(
            self._gate,
            self._session,
            self._fresh_session,
            self._engine,
            settings.upstream_url,
            settings.default_max_tokens,
        )
        proxy_app = web.Application(client_max_size=settings.max_body_bytes)
        proxy_app.add_routes(proxy.routes())
        proxy_app.on_response_prepare.append(self._close_connections_when_draining)
        # handler_cancellation: a client that disconnects cancels its handler,
        # which is what frees its queue place or slot (see proxy.py).
        self._proxy_runner = web.AppRunner(
            proxy_app,
            handler_cancellation=True,
            shutdown_timeout=settings.grace_period_s,
            access_log=None,
        )
        admin = Admin(self._gate, settings.token_file, settings.token, self.readiness)
        admin_app = web.Application()
        admin_app.add_routes(admin.routes())
        self._admin_runner = web.AppRunner(admin_app, access_log=None)

        self.proxy_port = await _serve(
            self._proxy_runner, *parse_host_port("listen", settings.listen)
        )
        self.admin_port = await _serve(
            self._admin_runner, *parse_host_port("admin", settings.admin)
        )
        log.info(
            "gate proxying %s: listening on port %d, admin on port %d",
            settings.upstream_url,
            self.proxy_port,
            self.admin_port,
        )
        self._tasks.append(asyncio.create_task(self._probe_upstream()))
        if settings.annotations_file is not None:
            self._tasks.append(asyncio.create_task(self._watch_annotations()))

    def readiness(self) -> tuple[bool, str]:
        if self._draining:
            return False, "draining: shutting down"
        if not self._upstream_ready:
            return False, f"engine at {self.settings.upstream_url} is not answering /health"
        return True, "ready"

    async def _close_connections_when_draining(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        # A kept-alive client connection outlives the pod's endpoint: its
        # next request would come here again, and race the listener's close.
        # Closed after each answer, the client's next connect goes through
        # the Service to a pod that stays. (aiohttp has written its own
        # Connection header before this hook runs, hence both lines.)
        if self._draining:
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"

    async def stop(self) -> None:
        """Drain and shut down; idempotent."""
        self._draining = True
        if self._proxy_runner is not None:
            log.info(
                "draining: waiting up to %.0f s for admitted and queued requests",
                self.settings.grace_period_s,
            )
            await self._proxy_runner.cleanup()
            self._proxy_runner = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        for session in (self._session, self._fresh_session):
            if session is not None:
                await session.close()
        self._session = self._fresh_session = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        log.info("gate stopped")

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain.

        SIGTERM is how the kubelet stops a pod, and the pod leaves the
        Service's endpoints only after that, as the EndpointSlice change
        reaches kube-proxy on every node. So on SIGTERM the gate first turns
        not ready and keeps serving for `shutdown_delay_s`, answering with
        `Connection: close`, and only then stops accepting. SIGINT (Ctrl-C)
        or a second signal skips what is left of that delay: no load
        balancer routes to a gate run by hand.
        """
        signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signals.put_nowait, signum)
        try:
            await self.start()
            # Everything alive now (modules, the app, the metric registry:
            # ~50,000 objects) lives as long as the process. Frozen, the
            # collector no longer walks it on every full collection, which
            # had paused the relay for ~20 ms at 1,000 streams.
            gc.freeze()
            if await signals.get() == signal.SIGTERM:
                await self._leave_endpoints(signals)
        finally:
            await self.stop()

    async def _leave_endpoints(self, signals: asyncio.Queue[signal.Signals]) -> None:
        delay = self.settings.shutdown_delay_s
        if delay <= 0:
            return
        self._draining = True
        log.info(
            "SIGTERM: not ready; still accepting for %.1f s while the pod leaves "
            "the Service's endpoints",
            delay,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signals.get(), delay)

    async def _probe_upstream(self) -> None:
        assert self._session is not None
        url = f"{self.settings.upstream_url}/health"
        interval = self.settings.health_interval_s
        timeout = aiohttp.ClientTimeout(total=min(interval, 2.0))
        while True:
            try:
                async with self._session.get(url, timeout=timeout) as response:
                    ready = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ready = False
            if ready != self._upstream_ready:
                log.info("engine %s", "ready" if ready else "not ready")
                self._upstream_ready = ready
                if ready:
                    # A (re)started engine runs its startup settings: give it
                    # the engine-native knobs again.
                    await self.gate.resend_native()
            await asyncio.sleep(interval)

    async def _watch_annotations(self) -> None:
        path = self.settings.annotations_file
        assert path is not None
        last_seen: tuple[int, int, int] | None = None
        last_text: str | None = None
        while True:
            await asyncio.sleep(self.settings.annotation_poll_s)
            try:
                stat = path.stat()
                signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                if signature == last_seen:
                    continue
                last_seen = signature
                text = path.read_text()
            except OSError as err:
                if last_seen is not None:
                    log.warning("annotations file %s unreadable: %s", path, err.strerror)
                last_seen = None
                continue
            if text == last_text:
                continue
            last_text = text
            try:
                knobs = knobs_from_annotations(text)
            except AnnotationError as err:
                log.warning("ignoring annotations file %s: %s", path, err)
                continue
            if knobs is not None:
                await self.gate.apply(knobs, ConfigSource.FILE)


def _upstream_session(
    connector: aiohttp.TCPConnector, trace_configs: list[aiohttp.TraceConfig] | None = None
) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        timeout=_UPSTREAM_TIMEOUT,
        # Relay bytes as the engine sent them (compressed or not), and add
        # no headers the client did not send.
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        trace_configs=trace_configs,
    )


async def _serve(runner: web.AppRunner, host: str, port: int) -> int:
    """Start `runner` on host:port and return the bound port (port 0 picks a free one)."""
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return int(runner.addresses[0][1])
