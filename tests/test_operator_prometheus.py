"""The operator's Prometheus client (operator/prometheus.py) against a REAL Prometheus.

Prometheus scrapes two exporters that serve the simulator's replica metrics
(sim/metrics.py: every series the controller queries). In front of it, for
the tests that need one, stands `AuthProxy`, an authenticating reverse proxy
started here on 127.0.0.1, as a Mimir gateway or an nginx with auth would
stand: it requires a tenant header and a bearer token or basic auth, serves
TLS with a certificate openssl makes here, answers 429 or 503 on purpose when
told to, can hold each request a while, and records what it saw.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from policyspec import controller_spec
from prometheus_api_client import PrometheusConnect
from stack import PrometheusServer, ScrapeTarget

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.observe import MetricsUnavailable, RawWindow
from batchpilot.controller.policy import Policy
from batchpilot.controller.promql import QueryBuilder
from batchpilot.controller.signals import CLASS_METRICS, Signal, signal_specs
from batchpilot.controller.sources import PrometheusSource, PromQueryClient
from batchpilot.operator.config import (
    BasicAuth,
    ConfigError,
    OperatorConfig,
    PrometheusEndpoint,
    load_config,
)
from batchpilot.operator.metrics import OperatorMetrics
from batchpilot.operator.prometheus import BURST_S, QueryPool, open_query_client
from batchpilot.operator.runtime import Operator, open_operator
from batchpilot.sim.metrics import ReplicaGauges, ReplicaMetrics
from batchpilot.sim.sandbox.process import serve_in_thread
from batchpilot.sim.sandbox.tools import run_openssl

NAMESPACE = "serving"
PODS = ("llm-0", "llm-1")
TENANT = "team-a"
TOKEN = "s3cret-token"
USER, PASSWORD = "batchpilot", "pa55:word"
# A policy without classes queries every signal but the per-class ones.
SIGNALS = len(Signal) - len(CLASS_METRICS)
# Prometheus scrapes every second; rate() needs two scrapes in the window.
DATA_TIMEOUT_S = 30.0


# -- the metrics Prometheus scrapes --------------------------------------------


def _exporter(scale: int) -> type[BaseHTTPRequestHandler]:
    """An exporter of one replica's metrics, every counter and histogram growing per scrape."""
    metrics = ReplicaMetrics(block_size=16, num_gpu_blocks=4096)
    lock = threading.Lock()

    class Exporter(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                metrics.gate_admitted_total += 10 * scale
                metrics.count_shed("queue_deadline")
                metrics.prompt_tokens_total += 9000 * scale
                metrics.generation_tokens_total += 1500 * scale
                metrics.preemptions_total += 1
                for histogram, value in (
                    (metrics.ttft, 0.2 * scale),
                    (metrics.itl, 0.03 * scale),
                    (metrics.e2e, 4.0 * scale),
                    (metrics.prompt_tokens_hist, 900.0 * scale),
                    (metrics.generation_tokens_hist, 150.0 * scale),
                    (metrics.gate_queue_wait, 0.05 * scale),
                    (metrics.gate_ttft, 0.3 * scale),
                ):
                    histogram.observe(value, times=10)
                gauges = ReplicaGauges(
                    running=8 * scale,
                    waiting=scale,
                    kv_usage=0.2 * scale,
                    gate_queued=2 * scale,
                    gate_in_flight=9 * scale,
                    gate_inflight_tokens=12_000 * scale,
                    knobs=Knobs(max_concurrency=32 * scale),
                    config_version=1,
                )
                body = metrics.render_text(gauges).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # a scrape a second would flood the test output

    return Exporter


def _policy(name: str = "chat", timeout_s: float = 5.0) -> Policy:
    spec = controller_spec(metrics={"timeoutSeconds": timeout_s})
    return Policy.from_spec(spec, name=name, namespace=NAMESPACE)


def _read(
    client: PromQueryClient, now_s: float, pool: Any = None, policy: Policy | None = None
) -> RawWindow:
    return PrometheusSource(client, policy or _policy(), pool).read(now_s, PODS)


@dataclass(frozen=True)
class Fleet:
    url: str
    # An evaluation time both pods have data for, far enough back that no
    # scrape can still add a sample before it: every read at it is the same.
    now_s: float
    # The readings there, read straight from Prometheus, one query at a time.
    expected: RawWindow


@pytest.fixture(scope="module")
def fleet(prometheus: Callable[..., PrometheusServer]) -> Iterator[Fleet]:
    with ExitStack() as stack:
        targets = [
            ScrapeTarget(
                f"127.0.0.1:{stack.enter_context(serve_in_thread(_exporter(index + 1)))}",
                {"namespace": NAMESPACE, "pod": pod},
            )
            for index, pod in enumerate(PODS)
        ]
        server = prometheus(targets)
        stack.callback(server.stop)
        direct = PrometheusConnect(url=server.url)
        deadline = time.monotonic() + DATA_TIMEOUT_S
        while True:
            now_s = time.time() - 2.0
            expected = _read(direct, now_s)
            if set(expected.readings[Signal.ADMITTED]) == set(PODS):
                break
            assert time.monotonic() < deadline, "Prometheus has no rate for both pods yet"
            time.sleep(0.5)
        yield Fleet(server.url, now_s, expected)


# -- the proxy in front of it --------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    cert: Path  # the proxy's, for 127.0.0.1, its own CA
    key: Path
    other_ca: Path  # a CA that signed nothing the proxy serves


def _self_signed(workdir: Path, name: str) -> tuple[Path, Path]:
    cert, key = workdir / f"{name}.crt", workdir / f"{name}.key"
    run_openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
        "-addext", "subjectAltName=IP:127.0.0.1",
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    workdir = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(workdir, "auth-proxy")
    other_ca, _ = _self_signed(workdir, "other-ca")
    return Certificates(cert, key, other_ca)


class AuthProxy:
    """An authenticating reverse proxy to Prometheus' query API on 127.0.0.1.

    `tenant`, `token` and `basic` are what it requires (None: nothing); a
    test changes them to rotate credentials. `overload(status, count)` makes
    it answer the next `count` queries itself. Its own event loop runs in a
    daemon thread, so its counters need no lock.
    """

    def __init__(
        self,
        upstream: str,
        *,
        tls: Certificates | None = None,
        tenant: str | None = None,
        token: str | None = None,
        basic: tuple[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.tenant, self.token, self.basic = tenant, token, basic
        self.delay_s = delay_s
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._upstream = upstream
        self._overloads: deque[tuple[int, dict[str, str]]] = deque()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self._sock.getsockname()[1]}"
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(str(tls.cert), str(tls.key))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._start())

    def overload(self, status: int, count: int, retry_after: str | None = None) -> None:
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        self._loop.call_soon_threadsafe(self._overloads.extend, [(status, headers)] * count)

    def stop(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get("/api/v1/query", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock, ssl_context=self._tls).start()

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            refusal = self._refusal(request)
            if refusal is not None:
                return refusal
            if self._overloads:
                status, headers = self._overloads.popleft()
                return web.Response(status=status, headers=headers, text="overloaded")
            async with self._session.get(
                self._upstream + "/api/v1/query", params=request.query
            ) as answer:
                body = await answer.read()
            return web.Response(status=answer.status, body=body, content_type="application/json")
        finally:
            self.in_flight -= 1

    def _refusal(self, request: web.Request) -> web.Response | None:
        if self.tenant is not None:
            tenant = request.headers.get("X-Scope-OrgID")
            if tenant is None:
                return web.Response(status=401, text="no org id")
            if tenant != self.tenant:
                return web.Response(status=403, text=f"tenant {tenant} may not read here")
        authorization = request.headers.get("Authorization")
        if self.token is not None and authorization != f"Bearer {self.token}":
            return web.Response(status=401, text="bad token")
        if self.basic is not None:
            expected = base64.b64encode(":".join(self.basic).encode()).decode()
            if authorization != f"Basic {expected}":
                return web.Response(status=401, text="bad user or password")
        return None


@pytest.fixture
def auth_proxy(fleet: Fleet) -> Iterator[Callable[..., AuthProxy]]:
    """auth_proxy(**AuthProxy options) -> a started AuthProxy to the fleet's Prometheus."""
    started: list[AuthProxy] = []

    def start(**options: Any) -> AuthProxy:
        proxy = AuthProxy(fleet.url, **options)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def _secret(path: Path, text: str) -> Path:
    """Write a secret as the kubelet updates a Secret volume: a new file swapped in."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_text(text + "\n")
    os.replace(staged, path)
    return path


def _client(
    endpoint: PrometheusEndpoint,
    metrics: OperatorMetrics | None = None,
    *,
    connections: int = 8,
    per_second: float = 0.0,
) -> PromQueryClient:
    return open_query_client(
        "mimir",
        endpoint,
        connections=connections,
        max_per_second=per_second,
        metrics=metrics or OperatorMetrics(),
    )


def _sample(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextmanager
def _operator(config: OperatorConfig) -> Iterator[Operator]:
    """The operator's object graph as startup builds it (its HTTP session wants a loop)."""
    loop = asyncio.new_event_loop()
    op = loop.run_until_complete(open_operator(config, kube=None))  # type: ignore[arg-type]
    try:
        yield op
    finally:
        loop.run_until_complete(op.close())
        loop.close()


# -- (d) the same readings, one query at a time or all at once ----------------


def test_the_fleet_has_data_for_most_signals(fleet: Fleet) -> None:
    """Without this, the comparisons below could pass on empty answers."""
    full = [s for s, by_pod in fleet.expected.readings.items() if set(by_pod) == set(PODS)]
    assert len(full) >= SIGNALS - 2, sorted(set(Signal) - set(full))


def test_concurrent_reads_return_exactly_the_sequential_readings(fleet: Fleet) -> None:
    metrics = OperatorMetrics()
    client = _client(PrometheusEndpoint(fleet.url), metrics)
    pool = QueryPool(8, metrics)
    try:
        assert _read(client, fleet.now_s, pool) == fleet.expected
        assert _read(client, fleet.now_s) == fleet.expected
        with ThreadPoolExecutor(3) as threads:
            assert _read(client, fleet.now_s, threads) == fleet.expected
    finally:
        pool.shutdown()
    reads = 3
    # Every answer's series are counted: the load the queries put on Prometheus.
    policy = _policy()
    builder = QueryBuilder(policy.metrics, NAMESPACE)
    specs = signal_specs(policy.engine.kind, policy.metrics.overrides).values()
    direct = PrometheusConnect(url=fleet.url)
    series = sum(
        len(direct.custom_query(builder.query(spec, PODS), params={"time": fleet.now_s}))
        for spec in specs
    )
    prefix = "batchpilot_operator_prometheus_"
    assert _sample(metrics, prefix + "samples_total", endpoint="mimir") == reads * series
    ok = _sample(metrics, prefix + "queries_total", endpoint="mimir", result="ok")
    assert ok == reads * len(specs)
    # Only the read on the query pool waited for its slots.
    assert _sample(metrics, prefix + "query_slot_wait_seconds_count") == len(specs)
    assert _sample(metrics, prefix + "queries_in_flight", endpoint="mimir") == 0


# -- (a) a Thanos / Mimir style backend: tenant, credentials, TLS ---------------


def test_the_mapping_form_reaches_an_authenticating_tls_backend(
    fleet: Fleet, auth_proxy: Callable[..., AuthProxy], certificates: Certificates, tmp_path: Path
) -> None:
    proxy = auth_proxy(tls=certificates, tenant=TENANT, token=TOKEN)
    token_file = _secret(tmp_path / "token", TOKEN)
    config_file = tmp_path / "operator.yaml"
    config_file.write_text(
        f"prometheus:\n"
        f"  default: http://127.0.0.1:9\n"
        f"  mimir:\n"
        f"    url: {proxy.url}/\n"
        f"    tenant: {TENANT}\n"
        f"    bearer_token_file: {token_file}\n"
        f"    ca_file: {certificates.cert}\n"
    )
    config = load_config(config_file, {})
    assert config.endpoint("mimir") == PrometheusEndpoint(
        proxy.url, tenant=TENANT, bearer_token_file=token_file, ca_file=certificates.cert
    )
    assert config.endpoint_url("default") == "http://127.0.0.1:9"
    with _operator(config) as op:
        client = op.query_client("mimir", proxy.url)
        assert op.query_client("mimir", proxy.url) is client  # one per endpoint
        stepper = op.stepper_factory(_policy(), client)
        # The stepper the operator builds reads with the operator's query pool.
        stepper.run_once(fleet.now_s, list(PODS))
        assert stepper.outage is None
        assert _read(client, fleet.now_s, op.query_pool) == fleet.expected
        assert _sample(op.metrics, "batchpilot_operator_prometheus_query_slot_wait_seconds_count")
        assert proxy.max_in_flight > 1


@pytest.mark.parametrize(
    ("wrong", "says"),
    [
        ("token", ["401", "bad token", "prometheus.mimir", "bearer_token_file"]),
        ("tenant", ["403", "tenant", "prometheus.mimir"]),
        ("no tenant", ["401", "no org id", "tenant"]),
        ("ca", ["CERTIFICATE_VERIFY_FAILED", "prometheus.mimir.ca_file"]),
        ("token file gone", ["prometheus.mimir.bearer_token_file", "cannot read"]),
    ],
)
def test_wrong_access_is_a_clear_metrics_unavailable(
    fleet: Fleet,
    auth_proxy: Callable[..., AuthProxy],
    certificates: Certificates,
    tmp_path: Path,
    wrong: str,
    says: list[str],
) -> None:
    proxy = auth_proxy(tls=certificates, tenant=TENANT, token=TOKEN)
    token_file = _secret(tmp_path / "token", "another-token" if wrong == "token" else TOKEN)
    tenant = {"tenant": "team-b", "no tenant": ""}.get(wrong, TENANT)
    ca_file = certificates.other_ca if wrong == "ca" else certificates.cert
    client = _client(
        PrometheusEndpoint(proxy.url, tenant=tenant, bearer_token_file=token_file, ca_file=ca_file)
    )
    if wrong == "token file gone":
        token_file.unlink()
    with pytest.raises(MetricsUnavailable) as caught:
        _read(client, fleet.now_s)
    for part in says:
        assert part in str(caught.value)


@pytest.mark.parametrize("auth", ["bearer", "basic"])
def test_a_rotated_secret_file_is_read_again(
    fleet: Fleet,
    auth_proxy: Callable[..., AuthProxy],
    certificates: Certificates,
    tmp_path: Path,
    auth: str,
) -> None:
    secret = _secret(tmp_path / "secret", TOKEN if auth == "bearer" else PASSWORD)
    if auth == "bearer":
        proxy = auth_proxy(tls=certificates, token=TOKEN)
        endpoint = PrometheusEndpoint(
            proxy.url, bearer_token_file=secret, ca_file=certificates.cert
        )
    else:
        proxy = auth_proxy(tls=certificates, basic=(USER, PASSWORD))
        endpoint = PrometheusEndpoint(
            proxy.url, basic_auth=BasicAuth(USER, secret), ca_file=certificates.cert
        )
    client = _client(endpoint)
    assert _read(client, fleet.now_s) == fleet.expected

    # The backend takes only the new secret: the old file is refused ...
    if auth == "bearer":
        proxy.token = "rotated-token"
    else:
        proxy.basic = (USER, "rotated-password")
    with pytest.raises(MetricsUnavailable, match="401"):
        _read(client, fleet.now_s)
    # ... and the same client, no restart, reads the new one from the file.
    _secret(secret, "rotated-token" if auth == "bearer" else "rotated-password")
    assert _read(client, fleet.now_s) == fleet.expected


# -- (b) an overloaded backend ------------------------------------------------


def test_overload_answers_are_retried_counted_and_logged_once(
    fleet: Fleet, auth_proxy: Callable[..., AuthProxy], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = auth_proxy()
    metrics = OperatorMetrics()
    client = _client(PrometheusEndpoint(proxy.url), metrics)
    queries = len(signal_specs(_policy().engine.kind, {}))
    # As many refusals of each kind as the step has queries: every query is
    # refused at least once, and the step still reads everything.
    proxy.overload(429, queries, retry_after="0.1")
    proxy.overload(503, queries)
    pool = QueryPool(8, metrics)
    try:
        with caplog.at_level(logging.WARNING, logger="batchpilot.operator.prometheus"):
            assert _read(client, fleet.now_s, pool) == fleet.expected
    finally:
        pool.shutdown()
    for cause in ("429", "503"):
        assert (
            _sample(
                metrics,
                "batchpilot_operator_prometheus_query_retries_total",
                endpoint="mimir",
                cause=cause,
            )
            == queries
        )
        # Once per cause, not once per query.
        lines = [r.getMessage() for r in caplog.records if f"answered {cause}" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "mimir" in lines[0]
    assert len(proxy.arrivals) == 3 * queries


def test_overload_longer_than_the_timeout_fails_the_read_within_it(
    fleet: Fleet, auth_proxy: Callable[..., AuthProxy]
) -> None:
    proxy = auth_proxy()
    metrics = OperatorMetrics()
    client = _client(PrometheusEndpoint(proxy.url), metrics)
    policy = _policy(timeout_s=1.5)

    # Retry-After past the timeout: no retry at all, the read fails at once.
    proxy.overload(429, 1, retry_after="30")
    started = time.monotonic()
    with pytest.raises(
        MetricsUnavailable, match=r"429 .*overloaded for longer than the query's 1\.5 s"
    ):
        _read(client, fleet.now_s, policy=policy)
    assert time.monotonic() - started < 1.0

    # 503 on and on: retried with backoff until the timeout, then the read fails.
    proxy.overload(503, 10_000)
    started = time.monotonic()
    with pytest.raises(MetricsUnavailable, match="503"):
        _read(client, fleet.now_s, policy=policy)
    assert time.monotonic() - started < 1.5 + 1.0
    assert (
        _sample(
            metrics,
            "batchpilot_operator_prometheus_query_retries_total",
            endpoint="mimir",
            cause="503",
        )
        >= 3
    )


# -- (c) concurrency and rate limits ---------------------------------------------


def test_queries_overlap_within_the_global_limit(
    fleet: Fleet, auth_proxy: Callable[..., AuthProxy]
) -> None:
    # Each answer held 0.2 s, so queries in flight together are seen together.
    proxy = auth_proxy(delay_s=0.2)
    metrics = OperatorMetrics()
    limit = 4
    pool = QueryPool(limit, metrics)
    client = _client(PrometheusEndpoint(proxy.url), metrics)
    queries = len(signal_specs(_policy().engine.kind, {}))
    try:
        started = time.monotonic()
        assert _read(client, fleet.now_s, pool) == fleet.expected
        one_step_s = time.monotonic() - started
        assert proxy.max_in_flight == limit  # they overlap, and never more than the pool
        assert one_step_s < queries * 0.2 / 2  # far from one query after another
        # Two policies' steps at once share the one pool: still `limit` at most.
        with ThreadPoolExecutor(2) as steps:
            windows = list(
                steps.map(lambda name: _read(client, fleet.now_s, pool, _policy(name)), ["a", "b"])
            )
    finally:
        pool.shutdown()
    assert [window.readings for window in windows] == [fleet.expected.readings] * 2
    assert proxy.max_in_flight == limit
    assert len(proxy.arrivals) == 3 * queries
    slot_waits = _sample(metrics, "batchpilot_operator_prometheus_query_slot_wait_seconds_sum")
    assert slot_waits > 0


def test_the_rate_limit_holds_over_a_burst(
    fleet: Fleet, auth_proxy: Callable[..., AuthProxy]
) -> None:
    proxy = auth_proxy()
    metrics = OperatorMetrics()
    per_second = 20.0
    pool = QueryPool(8, metrics)
    client = _client(PrometheusEndpoint(proxy.url), metrics, per_second=per_second)
    try:
        for _ in range(2):
            assert _read(client, fleet.now_s, pool) == fleet.expected
    finally:
        pool.shutdown()
    arrivals = sorted(proxy.arrivals)
    burst = int(per_second * BURST_S)
    # In every second of the burst, at most a second's worth and one burst;
    # one more for the scheduling of threads.
    busiest = max(sum(1 for t in arrivals if start <= t < start + 1.0) for start in arrivals)
    assert busiest <= per_second + burst + 1
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - burst) / per_second * 0.9
    assert (
        _sample(
            metrics, "batchpilot_operator_prometheus_rate_limit_wait_seconds_sum", endpoint="mimir"
        )
        > 0
    )


# -- the settings ----------------------------------------------------------------


def _endpoint_config(tmp_path: Path, entry: str) -> Path:
    path = tmp_path / "operator.yaml"
    path.write_text(f"prometheus:\n  default: {entry}\n")
    return path


@pytest.mark.parametrize(
    ("entry", "setting", "says"),
    [
        ("{tenant: a}", "prometheus.default.url", "missing"),
        ("{url: 'prom:9090'}", "prometheus.default.url", "http(s) URL"),
        ("{url: 'http://p:9090', token: x}", "prometheus.default.token", "unknown key"),
        ("{url: 'http://p:9090', tenant: 'a b'}", "prometheus.default.tenant", "visible ASCII"),
        (
            "{url: 'http://p:9090', tenant: a, tenant_header: 'X Org'}",
            "prometheus.default.tenant_header",
            "HTTP header name",
        ),
        (
            "{url: 'http://p:9090', bearer_token_file: token}",
            "prometheus.default.bearer_token_file",
            "absolute file path",
        ),
        (
            "{url: 'http://p:9090', bearer_token_file: /nonexistent/token}",
            "prometheus.default.bearer_token_file",
            "mount the Secret",
        ),
        (
            "{url: 'http://p:9090', basic_auth: {username: u}}",
            "prometheus.default.basic_auth",
            "password_file",
        ),
        (
            "{url: 'http://p:9090', basic_auth: {username: 'a:b', password_file: TOKEN}}",
            "prometheus.default.basic_auth.username",
            "without ':'",
        ),
        (
            "{url: 'http://p:9090', bearer_token_file: TOKEN, "
            "basic_auth: {username: u, password_file: TOKEN}}",
            "prometheus.default.basic_auth",
            "not both",
        ),
        ("{url: 'http://p:9090', ca_file: TOKEN}", "prometheus.default.ca_file", "https URLs only"),
        ("{url: 'https://p:9090', ca_file: TOKEN}", "prometheus.default.ca_file", "no PEM"),
        (
            "{url: 'https://p:9090', insecure_skip_verify: maybe}",
            "prometheus.default.insecure_skip_verify",
            "true or false",
        ),
        (
            "{url: 'http://p:9090', insecure_skip_verify: true}",
            "prometheus.default.insecure_skip_verify",
            "url is http",
        ),
    ],
)
def test_bad_endpoint_settings_are_named(
    tmp_path: Path, entry: str, setting: str, says: str
) -> None:
    token = _secret(tmp_path / "token", TOKEN)
    with pytest.raises(ConfigError) as caught:
        load_config(_endpoint_config(tmp_path, entry.replace("TOKEN", str(token))), {})
    assert caught.value.setting == setting
    assert says in str(caught.value)


def test_the_documented_example_is_accepted(certificates: Certificates, tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "operator-config.md").read_text()
    (example,) = re.findall(r"^```yml\n(.*?)^```", page, re.MULTILINE | re.DOTALL)
    # Its files are where the page says, under tmp_path: the chart's Secret mounts.
    mounts = "/var/run/secrets/batchpilot/prometheus/"
    for path in set(re.findall(re.escape(mounts) + r"\S+", example)):
        secret = tmp_path / path.removeprefix(mounts)
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(certificates.cert.read_bytes() if path.endswith(".crt") else b"x")
    config_file = tmp_path / "operator.yaml"
    config_file.write_text(example.replace(mounts, f"{tmp_path}/"))
    config = load_config(config_file, {})
    mimir, thanos = config.endpoint("mimir"), config.endpoint("thanos")
    assert mimir is not None and (mimir.tenant_header, mimir.tenant) == ("X-Scope-OrgID", "serving")
    assert thanos is not None and thanos.basic_auth is not None
    assert thanos.tenant_header == "THANOS-TENANT"
    assert config.endpoint_url("default") == "http://prometheus-operated.monitoring.svc:9090"


def test_query_limits_from_the_environment_are_not_endpoints() -> None:
    # Their variables share the endpoints' prefix only up to BATCHPILOT_OPERATOR_.
    config = load_config(
        None,
        {
            "BATCHPILOT_OPERATOR_MAX_CONCURRENT_QUERIES": "8",
            "BATCHPILOT_OPERATOR_MAX_QUERIES_PER_SECOND": "0",
            "BATCHPILOT_OPERATOR_PROMETHEUS_DEFAULT": "http://a:9090",
        },
    )
    assert (config.max_concurrent_queries, config.max_queries_per_second) == (8, 0.0)
    assert config.prometheus == {"default": "http://a:9090"}
    with pytest.raises(ConfigError, match="between"):
        load_config(None, {"BATCHPILOT_OPERATOR_MAX_CONCURRENT_QUERIES": "0"})
