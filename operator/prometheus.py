"""The operator's Prometheus client: one per endpoint, shared by that endpoint's policies.

prometheus-api-client's `PrometheusConnect` sends each query; around it:

- access to Prometheus-compatible backends (Thanos, Mimir, a proxy in front
  of Prometheus): a tenant header, a bearer token or basic auth read from
  mounted files and read again when they change (a rotated Secret), a CA
  bundle, or no certificate check at all (config.py's `PrometheusEndpoint`);
- a rate limit per endpoint (`max_queries_per_second`), so that many
  policies stepping at once cannot flood a Prometheus they share;
- retries of an overloaded endpoint's answers (429, 502, 503, 504), after
  Retry-After or a jittered backoff, always within the query's own timeout
  (`spec.metrics.timeoutSeconds`), and one of a connection dropped as it was
  reused: each is counted by cause, and logged once a minute per cause and
  endpoint, never per query;
- `QueryPool`, the operator's query slots: every policy's step fans its
  queries out on this one pool of `max_concurrent_queries` threads.

One module past 400 lines: each part serves that one client and nothing else.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase, HTTPBasicAuth

from batchpilot.controller.sources import PromQueryClient
from batchpilot.operator.config import PrometheusEndpoint
from batchpilot.operator.metrics import CountingQueryClient, OperatorMetrics

log = logging.getLogger("batchpilot.operator.prometheus")

# An overloaded or restarting endpoint's answers, or a gateway's in front of
# one: the same query may well be answered a moment later.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Answers that say the operator's own access is wrong: retrying cannot help,
# and the error names the settings to check.
ACCESS_STATUSES = frozenset({401, 403})
# Without Retry-After: 0.1 s, doubled per retry up to 2 s, each drawn between
# half and all of that, so that a step's concurrent queries turned away
# together do not all come back together.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
# A query is sent (or sent again) only with this much of its timeout left
# for the answer; less would turn an overload answer into a timeout.
MIN_ANSWER_S = 0.2
# As the operator's log holds back every repeated trouble (logs.py).
RETRY_LOG_INTERVAL_S = 60.0
# A rate limit lets a tenth of a second's worth of queries out at once: at
# 200/s, a step's 22 queries go out together.
BURST_S = 0.1
# PromQueryClient lets a caller leave the timeout out (PrometheusSource never
# does): spec.metrics.timeoutSeconds' default.
DEFAULT_TIMEOUT_S = 10.0

_P = ParamSpec("_P")
_T = TypeVar("_T")


class SecretUnreadable(OSError):
    """A credential file could not be read at query time; the message names its setting."""


class SecretFile:
    """A mounted secret's text, read again whenever the file changes.

    The kubelet updates a Secret volume by pointing a symlink at a new
    directory: the path stays, the file behind it (inode, mtime) changes.
    One stat() per query notices that; the file is read only then.
    """

    def __init__(self, path: Path, setting: str) -> None:
        self._path = path
        self._setting = setting
        self._lock = threading.Lock()
        self._version: tuple[int, int, int] | None = None
        self._text = ""

    def read(self) -> str:
        try:
            status = os.stat(self._path)
            version = (status.st_ino, status.st_mtime_ns, status.st_size)
            with self._lock:
                if version != self._version:
                    # Prometheus trims its own credential files the same way.
                    self._text = self._path.read_text().strip()
                    self._version = version
                text = self._text
        except OSError as err:
            raise SecretUnreadable(
                f"{self._setting}: cannot read {self._path}: {err.strerror}"
            ) from err
        if not text:
            raise SecretUnreadable(f"{self._setting}: {self._path} is empty")
        return text


class BearerTokenFile(AuthBase):
    def __init__(self, token: SecretFile, setting: str) -> None:
        self._token = token
        self._setting = setting

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self._token.read()
        # A header carries visible ASCII only; anything else would fail
        # inside http.client with an error that names no setting.
        if not token.isascii() or not token.isprintable() or " " in token:
            raise SecretUnreadable(f"{self._setting}: not a bearer token (visible ASCII only)")
        request.headers["Authorization"] = f"Bearer {token}"
        return request


class BasicAuthFile(AuthBase):
    def __init__(self, username: str, password: SecretFile) -> None:
        self._username = username
        self._password = password

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        # As bytes: requests would encode a str password as Latin-1 and fail on anything else.
        auth = HTTPBasicAuth(self._username.encode(), self._password.read().encode())
        prepared: requests.PreparedRequest = auth(request)
        return prepared


class Overloaded(Exception):
    """An answer worth sending the query again for (RETRY_STATUSES).

    Raised by the client's response hook: prometheus-api-client turns any
    answer but 200 into an exception that keeps neither the status nor the
    Retry-After header.
    """

    def __init__(self, response: requests.Response) -> None:
        super().__init__(response.status_code)
        self.status = response.status_code
        self.reason = response.reason
        self.retry_after_s = _retry_after_s(response.headers.get("Retry-After"))
        self.body = response.content[:200]


class RateLimit:
    """At most `per_second` sends a second, in bursts of up to BURST_S' worth.

    GCRA, a token bucket kept as the time the next send is due: each send
    reserves its slot, so waiters go in their order and none polls.
    """

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self._interval_s = 1.0 / per_second
        burst = max(1, math.floor(per_second * BURST_S))
        self._tolerance_s = (burst - 1) * self._interval_s
        self._lock = threading.Lock()
        self._due_s = -math.inf

    def reserve(self, latest_s: float) -> float | None:
        """Seconds to wait before this send, reserved; None, and nothing
        reserved, when it could not go by `latest_s`."""
        with self._lock:
            now = time.monotonic()
            due = max(self._due_s, now)
            start = max(due - self._tolerance_s, now)
            if start > latest_s:
                return None
            self._due_s = due + self._interval_s
            return start - now


class RetryLog:
    """One WARNING per cause a minute for one endpoint, with the count of retries since the last."""

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._lock = threading.Lock()
        self._logged_s: dict[str, float] = {}
        self._retries: dict[str, int] = {}

    def note(self, cause: str, what: str) -> None:
        with self._lock:
            now = time.monotonic()
            retries = self._retries.get(cause, 0) + 1
            logged_s = self._logged_s.get(cause)
            if logged_s is not None and now - logged_s < RETRY_LOG_INTERVAL_S:
                self._retries[cause] = retries
                return
            self._logged_s[cause] = now
            self._retries[cause] = 0
        since = (
            "; this line repeats at most once a minute"
            if logged_s is None
            else f"; {retries} retries for this cause since the last such line"
        )
        log.warning(
            "Prometheus endpoint %s %s: its queries are sent again after Retry-After or a "
            "backoff, within their timeout%s",
            self._endpoint,
            what,
            since,
        )


class EndpointClient:
    """The PromQueryClient of one endpoint, shared by its policies' steps across threads."""

    def __init__(
        self,
        name: str,
        endpoint: PrometheusEndpoint,
        *,
        connections: int,
        max_per_second: float,
        metrics: OperatorMetrics,
    ) -> None:
        self._name = name
        self._metrics = metrics
        self._rate_limit = RateLimit(max_per_second) if max_per_second > 0 else None
        self._retry_log = RetryLog(name)
        session = requests.Session()
        # Proxy variables and .netrc are not consulted (kopf's own default,
        # settings.networking.trust_env): looking them up again for every
        # query cost ~30 ms of CPU per control step (22 queries).
        session.trust_env = False
        session.auth = _auth(name, endpoint)
        if endpoint.tenant:
            session.headers[endpoint.tenant_header] = endpoint.tenant
        if endpoint.ca_file is not None:
            session.verify = str(endpoint.ca_file)
        elif endpoint.insecure_skip_verify:
            session.verify = False
            log.warning(
                "Prometheus endpoint %s: its TLS certificate is not checked "
                "(prometheus.%s.insecure_skip_verify); set ca_file instead",
                name,
                name,
            )
        session.hooks["response"].append(self._check_answer)
        self._connect = PrometheusConnect(url=endpoint.url, session=session)
        # PrometheusConnect mounts an adapter of its own on the URL (three
        # retries 1 s apart, overload answers included) that could outlast
        # the query's timeout. This one replaces it: no retries of its own
        # (custom_query retries, within the timeout), and a pooled connection
        # for each query slot.
        session.mount(endpoint.url, HTTPAdapter(pool_maxsize=connections))

    def custom_query(
        self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        budget_s = DEFAULT_TIMEOUT_S if timeout is None else timeout
        deadline = time.monotonic() + budget_s
        retries = 0
        reconnected = False
        while True:
            self._wait_for_rate_limit(deadline, budget_s)
            failure: Exception
            try:
                with self._metrics.queries_in_flight.labels(self._name).track_inprogress():
                    return self._connect.custom_query(
                        query,
                        params=params,
                        timeout=max(deadline - time.monotonic(), MIN_ANSWER_S),
                    )
            except Overloaded as answer:
                cause, what = str(answer.status), f"answered {answer.status} ({answer.reason})"
                wait_s = (
                    _backoff_s(retries) if answer.retry_after_s is None else answer.retry_after_s
                )
                failure = PrometheusApiClientException(
                    f"HTTP Status Code {answer.status} ({answer.reason}) from Prometheus "
                    f"endpoint {self._name}, overloaded for longer than the query's "
                    f"{budget_s:g} s timeout ({answer.body!r})"
                )
            except requests.exceptions.Timeout as err:
                # Spent: no time is left to send it again. requests' own message
                # quotes the attempt's timeout, the rest of the budget, which
                # differs on every step: the status would change at each one.
                what = (
                    "could not be reached"
                    if isinstance(err, requests.exceptions.ConnectTimeout)
                    else "did not answer"
                )
                raise TimeoutError(
                    f"Prometheus endpoint {self._name} {what} within the query's {budget_s:g} s "
                    "timeout (spec.metrics.timeoutSeconds)"
                ) from err
            except requests.exceptions.SSLError as err:
                # Sending again cannot help; the CA setting is the likely fix.
                reason = getattr(err.args[0], "reason", err) if err.args else err
                raise requests.exceptions.SSLError(
                    f"TLS with Prometheus endpoint {self._name} failed: {reason}; check "
                    f"prometheus.{self._name}.ca_file (the CA that signed its certificate)"
                ) from err
            except requests.exceptions.ConnectionError as err:
                # A pooled keep-alive connection the server closed as it was
                # reused: sent again at once, on a new one. A second failure
                # is an outage (refused, reset), for the next step to retry.
                if reconnected:
                    raise
                reconnected = True
                cause, what, wait_s, failure = "connection", "dropped a connection", 0.0, err
            if time.monotonic() + wait_s + MIN_ANSWER_S > deadline:
                raise failure
            retries += 1
            self._metrics.query_retries.labels(self._name, cause).inc()
            self._retry_log.note(cause, what)
            time.sleep(wait_s)

    def _wait_for_rate_limit(self, deadline: float, budget_s: float) -> None:
        if self._rate_limit is None:
            return
        wait_s = self._rate_limit.reserve(deadline - MIN_ANSWER_S)
        if wait_s is None:
            # A TimeoutError is an OSError: the step reports metrics unavailable.
            raise TimeoutError(
                f"Prometheus endpoint {self._name} is at its rate limit of "
                f"{self._rate_limit.per_second:g} queries/s (max_queries_per_second): the "
                f"query would wait past its {budget_s:g} s timeout"
            )
        self._metrics.rate_limit_wait_seconds.labels(self._name).observe(wait_s)
        if wait_s > 0:
            time.sleep(wait_s)

    def _check_answer(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        """The session's response hook, run on every answer before prometheus-api-client sees it."""
        if response.status_code in RETRY_STATUSES:
            raise Overloaded(response)
        if response.status_code in ACCESS_STATUSES:
            raise PrometheusApiClientException(
                f"HTTP Status Code {response.status_code} ({response.reason}) from Prometheus "
                f"endpoint {self._name}: check its tenant and credentials (prometheus."
                f"{self._name}: tenant, bearer_token_file, basic_auth) ({response.content[:200]!r})"
            )


def open_query_client(
    name: str,
    endpoint: PrometheusEndpoint,
    *,
    connections: int,
    max_per_second: float,
    metrics: OperatorMetrics,
) -> PromQueryClient:
    """The operator's client for one endpoint: counted and timed (metrics.py) around
    the rate limit and the retries of `EndpointClient`."""
    client = EndpointClient(
        name, endpoint, connections=connections, max_per_second=max_per_second, metrics=metrics
    )
    return CountingQueryClient(client, name, metrics)


class QueryPool(Executor):
    """The operator's query slots: one thread pool that every policy's step
    fans its queries out on (controller/sources.py's `PrometheusSource`).

    Its size is the global limit on queries in flight; a query's wait for a
    free thread is measured here, where it happens.
    """

    def __init__(self, size: int, metrics: OperatorMetrics) -> None:
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="prometheus-query")
        self._slot_wait = metrics.query_slot_wait_seconds

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        queued = time.perf_counter()

        def run() -> _T:
            self._slot_wait.observe(time.perf_counter() - queued)
            return fn(*args, **kwargs)

        return self._threads.submit(run)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._threads.shutdown(wait=wait, cancel_futures=cancel_futures)


def _auth(name: str, endpoint: PrometheusEndpoint) -> AuthBase | None:
    where = f"prometheus.{name}"
    if endpoint.bearer_token_file is not None:
        setting = f"{where}.bearer_token_file"
        return BearerTokenFile(SecretFile(endpoint.bearer_token_file, setting), setting)
    if endpoint.basic_auth is not None:
        password = SecretFile(
            endpoint.basic_auth.password_file, f"{where}.basic_auth.password_file"
        )
        return BasicAuthFile(endpoint.basic_auth.username, password)
    return None


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds, from either form (seconds, an HTTP date); None if absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return seconds if seconds > 0 else 0.0


def _backoff_s(retries: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0**retries) * random.uniform(0.5, 1.0)
