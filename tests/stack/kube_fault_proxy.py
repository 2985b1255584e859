"""An HTTPS reverse proxy in front of the test apiserver that can fail requests on purpose.

    with KubeFaultProxy(kube_api) as proxy:
        kubeconfig = proxy.kubeconfig_for(kube_api.token, "operator")
        rule = proxy.inject(409, method="PATCH", path=r"/inferencepolicies/[^/]+/status$", count=5)
        ...
        assert rule.injected == 5

Every request is forwarded to the real apiserver (its CA verified, the
client's Authorization passed through), responses stream back chunk by chunk,
so watches stay live for as long as the apiserver keeps them open. A rule
answers the requests it matches itself, with the Status document the
apiserver would send: 409 `Conflict` as for an update against a stale
resourceVersion, 429 `TooManyRequests` with `Retry-After` as API Priority and
Fairness sends when a priority level's queues are full. Every request is
recorded (`proxy.requests`) with its time and what it got.

The proxy runs an aiohttp server on its own event loop in a daemon thread;
its certificate is self-signed by openssl for 127.0.0.1, and is the CA of the
kubeconfigs it writes.
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

# The gate is a reverse proxy on aiohttp too: the headers it never forwards
# (RFC 9110 7.6.1 hop-by-hop ones, and the framing aiohttp sets per leg) are
# the ones this proxy must not forward either.
from batchpilot.gate.proxy import HOP_BY_HOP
from batchpilot.sim.sandbox.apiserver import KubeAPIServer, write_kubeconfig
from batchpilot.sim.sandbox.process import Stoppable, free_loopback_port
from batchpilot.sim.sandbox.tools import StackError, run_openssl

# Starting the loop and binding takes milliseconds; a loaded machine gets more.
START_TIMEOUT_S = 30.0
# Connecting to the loopback apiserver is instant when it runs; when it does
# not, the refusal is too. No total timeout: watches are meant to last minutes.
UPSTREAM_CONNECT_TIMEOUT_S = 5.0
# /api/v1/[namespaces/{ns}/]{resource}/{name} or /apis/{group}/{version}/...,
# for the `details` of a Conflict.
_OBJECT_PATH = re.compile(
    r"^/(?:api/[^/]+|apis/(?P<group>[^/]+)/[^/]+)/(?:namespaces/[^/]+/)?"
    r"(?P<resource>[^/]+)/(?P<name>[^/]+)"
)


@dataclass
class FaultRule:
    """Answer requests matching `method` and the regular expression `path` with `status`.

    `count`: the first N matching requests. `fraction`: that share of the
    requests to each method and path (the query aside), spread evenly and
    deterministically, starting with the first: 0.5 fails the 1st, 3rd, 5th
    ... request to each path, so a client that retries gets through on its
    second try. Counted per path, because with one count for all, two
    clients retrying in step can take turns with one of them always refused
    (seen: a kopf listing refused 5 times in a row). One of the two is set;
    the rule holds until KubeFaultProxy.clear().
    """

    status: int
    method: str | None
    path: re.Pattern[str]
    count: int | None
    fraction: float | None
    retry_after_s: int
    matched: int = 0
    injected: int = 0
    # (method, path) -> [matched, injected], for `fraction`.
    _per_path: dict[tuple[str, str], list[int]] = field(default_factory=dict, repr=False)

    def take(self, method: str, path: str) -> bool:
        """Whether this request is one to fail (and count it)."""
        if self.method is not None and method != self.method:
            return False
        if not self.path.search(path):
            return False
        self.matched += 1
        if self.count is not None:
            wanted = self.injected < self.count
        else:
            assert self.fraction is not None
            counts = self._per_path.setdefault((method, path), [0, 0])
            counts[0] += 1
            # The epsilon keeps 3 x 0.1 = 0.30000000000000004 from counting as more than 0.3.
            wanted = math.ceil(counts[0] * self.fraction - 1e-9) > counts[1]
            counts[1] += wanted
        self.injected += wanted
        return wanted


@dataclass(frozen=True)
class ProxiedRequest:
    at_s: float  # time.monotonic() when it arrived
    method: str
    path: str  # without the query
    query: str
    injected: int | None  # the status a rule answered with; None: forwarded


class KubeFaultProxy(Stoppable):
    """A running proxy to `kube`. Use as a context manager, or call stop()."""

    def __init__(self, kube: KubeAPIServer, workdir: Path | None = None) -> None:
        self._upstream = kube.server
        self._upstream_ca = kube.ca_file
        self.workdir = Path(tempfile.mkdtemp(prefix="kube-fault-proxy-", dir=workdir))
        self.ca_file, key_file = _self_signed_certificate(self.workdir)
        self.port = free_loopback_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self._rules: list[FaultRule] = []
        self._requests: list[ProxiedRequest] = []
        # Rules and records are written on the proxy's loop and read by the test.
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kube-fault-proxy", daemon=True
        )
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._call(self._start(key_file), START_TIMEOUT_S)

    # -- the test's side -------------------------------------------------------

    def inject(
        self,
        status: int,
        *,
        method: str | None = None,
        path: str = "",
        count: int | None = None,
        fraction: float | None = None,
        retry_after_s: int = 1,
    ) -> FaultRule:
        """Add a rule (409 or 429; see FaultRule); it applies until clear()."""
        if status not in (409, 429):
            raise ValueError(f"status: {status} is not one the proxy injects; use 409 or 429")
        if (count is None) == (fraction is None):
            raise ValueError("count / fraction: give exactly one of them")
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"fraction: {fraction} is not in (0, 1]")
        if retry_after_s < 1:
            # Retry-After is whole seconds (RFC 9110 10.2.3); 0 would ask for a hot loop.
            raise ValueError(f"retry_after_s: {retry_after_s} must be 1 or more")
        rule = FaultRule(status, method, re.compile(path), count, fraction, retry_after_s)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule: from now on all requests are forwarded."""
        with self._lock:
            self._rules.clear()

    @property
    def requests(self) -> list[ProxiedRequest]:
        """Every request so far, in order of arrival."""
        with self._lock:
            return list(self._requests)

    def kubeconfig_for(self, token: str, user: str) -> Path:
        """A kubeconfig that reaches the apiserver through this proxy as `token`."""
        return write_kubeconfig(
            self.workdir / f"kubeconfig-{user}",
            server=self.server,
            ca_file=self.ca_file,
            token=token,
            user=user,
        )

    def stop(self) -> None:
        """Close every connection and the listener; end the thread. Safe to call twice."""
        if self._thread.is_alive():
            self._call(self._stop(), START_TIMEOUT_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    # -- the proxy's loop ------------------------------------------------------

    def _call(self, coroutine: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    async def _start(self, key_file: Path) -> None:
        upstream_tls = ssl.create_default_context(cafile=str(self._upstream_ca))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream_tls),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=UPSTREAM_CONNECT_TIMEOUT_S),
            # Bodies pass through as the apiserver encoded them, gzip included.
            auto_decompress=False,
            # Only the client's own headers go upstream. The kubernetes client
            # sends bodies without a Content-Type, which the apiserver reads as
            # JSON; aiohttp's default application/octet-stream it refuses (415).
            skip_auto_headers=("Content-Type", "User-Agent", "Accept", "Accept-Encoding"),
        )
        serving_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving_tls.load_cert_chain(str(self.ca_file), str(key_file))
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A client that hangs up (a watch the operator closes) cancels its
        # handler, which closes the upstream request with it. On stop, watches
        # still open are cut after 1 s rather than waited for (60 s by default).
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=serving_tls)
        try:
            await site.start()
        except OSError as error:
            raise StackError(
                f"kube fault proxy: cannot listen on {self.server}: {error}"
            ) from error

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _decide(self, request: web.Request) -> FaultRule | None:
        with self._lock:
            rule = next((r for r in self._rules if r.take(request.method, request.path)), None)
            self._requests.append(
                ProxiedRequest(
                    time.monotonic(),
                    request.method,
                    request.path,
                    request.query_string,
                    None if rule is None else rule.status,
                )
            )
        return rule

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rule = self._decide(request)
        if rule is not None:
            return _status_response(rule, request.path)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        try:
            upstream = await self._session.request(
                request.method,
                self._upstream + request.path_qs,
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
        except aiohttp.ClientConnectionError as error:
            # What a load balancer in front of a down apiserver answers.
            return web.Response(
                status=502, text=f"kube fault proxy: apiserver unreachable: {error}"
            )
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            try:
                # Chunk by chunk, as they come: a watch sends one event per chunk.
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                # The apiserver went away mid-stream: end ours as abruptly, so
                # the client sees a broken stream, not a completed one.
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
        return response


def _status_response(rule: FaultRule, path: str) -> web.Response:
    """The Status document the apiserver sends for this failure."""
    if rule.status == 409:
        found = _OBJECT_PATH.match(path)
        resource, name = found.group("resource", "name") if found else ("", "")
        group = (found and found["group"]) or ""  # the core group has no name
        qualified = f"{resource}.{group}" if group else resource
        document: dict[str, Any] = {
            "message": (
                f'Operation cannot be fulfilled on {qualified} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again"
            ),
            "reason": "Conflict",
            # The core group's objects have no `group` key, as the apiserver writes it.
            "details": {"name": name, **({"group": group} if group else {}), "kind": resource},
        }
        headers: dict[str, str] = {}
    else:
        document = {
            "message": "Too many requests, please try again later.",
            "reason": "TooManyRequests",
            "details": {"retryAfterSeconds": rule.retry_after_s},
        }
        headers = {"Retry-After": str(rule.retry_after_s)}
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        **document,
        "code": rule.status,
    }
    return web.json_response(body, status=rule.status, headers=headers)


def _self_signed_certificate(workdir: Path) -> tuple[Path, Path]:
    """(certificate, key): an EC P-256 certificate for 127.0.0.1, its own CA."""
    cert, key = workdir / "proxy.crt", workdir / "proxy.key"
    run_openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "1",
        "-subj", "/CN=batchpilot-kube-fault-proxy",
        "-addext", "subjectAltName=IP:127.0.0.1",
    )  # fmt: skip
    return cert, key
