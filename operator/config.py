"""The operator's configuration: one typed value, built once at startup.

Sources, highest precedence first:

1. environment variables `BATCHPILOT_OPERATOR_<SETTING>` (upper-case setting
   name, e.g. `BATCHPILOT_OPERATOR_TICK_SECONDS=5`); Prometheus endpoints as
   `BATCHPILOT_OPERATOR_PROMETHEUS_<NAME>=<url>` (`_` in NAME reads as `-`)
   and namespaces as a comma-separated `BATCHPILOT_OPERATOR_NAMESPACES`;
2. the YAML file given with `batchpilot operator --config FILE`, whose
   top-level keys are the setting names below, with `prometheus:` a mapping
   of endpoint name -> URL, or -> the URL and how to reach it
   (`PrometheusEndpoint`: a tenant, credentials and a CA from mounted files);
3. the defaults documented on `OperatorConfig`.

Policies name a Prometheus endpoint (`spec.metrics.endpoint`), never a URL:
which servers the operator queries is its owner's decision, not every
namespace's. Every bad value is reported as `ConfigError` naming the setting.
The environment names an endpoint's URL only; credentials need the file.
One module past 400 lines, so that every setting is checked in one place,
the endpoints' mapping form key by key.

```yaml
prometheus:
  default: http://prometheus-operated.monitoring:9090
  mimir:
    url: https://mimir-gateway.monitoring:443/prometheus
    tenant: serving
    bearer_token_file: /var/run/secrets/batchpilot/prometheus/mimir/token
    ca_file: /var/run/secrets/batchpilot/prometheus/mimir/ca.crt
namespaces: [serving-a, serving-b]    # empty: every namespace
tick_seconds: 5
```
"""

from __future__ import annotations

import ipaddress
import math
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchpilot.contract.settings import (
    SettingError,
    build_settings,
    read_settings_file,
    settings_from_env,
)
from batchpilot.operator.shard import parse_label_selector

ENV_PREFIX = "BATCHPILOT_OPERATOR_"
PROMETHEUS_ENV_PREFIX = ENV_PREFIX + "PROMETHEUS_"
# The CRD's pattern for spec.metrics.endpoint (a DNS label).
ENDPOINT_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class ConfigError(SettingError):
    """An operator setting is invalid; `setting` names it."""


@dataclass(frozen=True, slots=True)
class BasicAuth:
    username: str
    password_file: Path


@dataclass(frozen=True, slots=True)
class PrometheusEndpoint:
    """A query endpoint and how to reach it: an entry of `prometheus:` in its mapping form.

    Secrets stay in their files (a mounted Secret): the client reads them
    again whenever they change, so a rotated token needs no restart.
    """

    url: str
    # Multi-tenant backends take the tenant from a header: Mimir and Cortex
    # read X-Scope-OrgID, Thanos' querier THANOS-TENANT.
    tenant: str = ""
    tenant_header: str = "X-Scope-OrgID"
    # At most one of the two.
    bearer_token_file: Path | None = None
    basic_auth: BasicAuth | None = None
    # The CA that signed an https endpoint's certificate; None: the system's.
    ca_file: Path | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    # Prometheus-compatible query endpoints (Prometheus, Thanos, Mimir) by
    # name: a URL, or a PrometheusEndpoint (the file's mapping form).
    prometheus: Mapping[str, str | PrometheusEndpoint] = field(
        default_factory=lambda: {"default": "http://prometheus-operated.monitoring.svc:9090"}
    )
    # Namespaces to watch; empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    # Every policy's timer fires this often and runs a control step when the
    # policy's own spec.behavior.intervalSeconds has passed; kopf timers have
    # one interval per handler, so per-policy intervals ride on a finer tick.
    # 5 s: a 30 s interval is kept to within 5 s.
    tick_seconds: float = 5.0
    # One admin-API request to a gate (connect + answer).
    gate_timeout_seconds: float = 5.0
    # Gate requests in flight at once for one policy: 16 pods are configured
    # in one round trip, larger policies in waves.
    actuation_concurrency: int = 16
    # PromQL queries in flight at once, over every policy and endpoint: a
    # step's ~22 queries go out together on a pool of this many threads.
    max_concurrent_queries: int = 32
    # Queries sent to each endpoint per second, retries included, in bursts
    # of up to a tenth of a second's worth; 0: no limit. 200/s admits 100
    # policies stepping every 11 s (22 queries a step); lower it for a small
    # or shared backend.
    max_queries_per_second: float = 200.0
    # Control steps (queries + model fit, in worker threads) running at once.
    # A step mostly waits on Prometheus: measured with its ~22 queries sent
    # one after another and 100 policies of 16 pods, 4 slots left steps
    # queueing for most of their 30 s interval while the operator used 41%
    # of one core; 16 keeps up (bench/operator_cost.py).
    max_parallel_steps: int = 16
    # The liveness probe fails when no policy timer has fired for this long
    # while policies exist (a wedged event loop or a dead watch).
    liveness_stall_seconds: float = 120.0
    # Where kopf serves the liveness probe (GET /healthz) and where the
    # operator's own /metrics is served; port 0 turns either off. Loopback by
    # default, so an operator run on a laptop exposes nothing; the Helm chart
    # sets 0.0.0.0 for the kubelet's probe and Prometheus's scrape.
    health_host: str = "127.0.0.1"
    health_port: int = 8081
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8080
    # Event reporting component name shown by `kubectl describe`.
    reporting_component: str = "batchpilot-operator"
    # High availability: replicas of one shard elect one leader through a
    # coordination.k8s.io Lease; only the leader steps and actuates, the
    # others keep their watches and indexes warm to take over. Off for a
    # single process (a laptop, the sandbox); the chart turns it on.
    leader_election: bool = False
    # The Lease's name; with several shards each shard has its own,
    # `<lease_name>-shard-<index>` (see `lease_for_shard`).
    lease_name: str = "batchpilot-operator"
    # The Lease's namespace; empty: the operator's own (POD_NAMESPACE, as the
    # chart sets it), else `default`.
    lease_namespace: str = ""
    # client-go's defaults: a leader that cannot renew for `lease_seconds`
    # loses the Lease; it renews every `lease_renew_seconds`, and stops
    # acting on its own after `lease_renew_deadline_seconds` without a renewal,
    # before any follower can take the Lease over.
    lease_seconds: float = 15.0
    lease_renew_seconds: float = 2.0
    lease_renew_deadline_seconds: float = 10.0
    # Sharding: this replica runs the policies whose `<namespace>/<name>`
    # hashes (CRC-32) to `shard_index` modulo `shard_count`, ...
    shard_count: int = 1
    shard_index: int = 0
    # ... and that carry these labels (a label selector, `team=a,tier!=batch`);
    # empty: every policy.
    policy_selector: str = ""

    @property
    def lease_for_shard(self) -> str:
        if self.shard_count == 1:
            return self.lease_name
        return f"{self.lease_name}-shard-{self.shard_index}"

    def endpoint(self, name: str) -> PrometheusEndpoint | None:
        entry = self.prometheus.get(name)
        return PrometheusEndpoint(entry) if isinstance(entry, str) else entry

    def endpoint_url(self, name: str) -> str | None:
        entry = self.endpoint(name)
        return None if entry is None else entry.url


def load_config(path: Path | None, env: Mapping[str, str]) -> OperatorConfig:
    """Merge the YAML file (if any) with `env` overrides and validate."""
    from_file = read_settings_file(path, ConfigError) if path is not None else {}
    config = build_settings(OperatorConfig, [from_file, _from_env(env)], _coerce, ConfigError)
    if config.shard_index >= config.shard_count:
        raise ConfigError(
            "shard_index",
            f"must be below shard_count ({config.shard_count}), got {config.shard_index}",
        )
    if not config.lease_renew_seconds < config.lease_renew_deadline_seconds < config.lease_seconds:
        raise ConfigError(
            "lease_renew_deadline_seconds",
            "must lie between lease_renew_seconds and lease_seconds "
            f"(got {config.lease_renew_seconds:g} < {config.lease_renew_deadline_seconds:g} "
            f"< {config.lease_seconds:g})",
        )
    return config


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    # Endpoints are one variable each, not one setting: PROMETHEUS_<NAME>.
    values = settings_from_env(
        OperatorConfig,
        env,
        ENV_PREFIX,
        parsers={"namespaces": _comma_list},
        skip=("prometheus",),
    )
    endpoints = {
        key[len(PROMETHEUS_ENV_PREFIX) :].lower().replace("_", "-"): url
        for key, url in env.items()
        if key.startswith(PROMETHEUS_ENV_PREFIX)
    }
    if endpoints:
        values["prometheus"] = endpoints
    return values


def _comma_list(raw: str) -> list[str]:
    return [name.strip() for name in raw.split(",") if name.strip()]


_FLOAT_SETTINGS = {
    # setting: (lowest, highest)
    "tick_seconds": (0.1, 3600.0),
    "gate_timeout_seconds": (0.1, 600.0),
    "liveness_stall_seconds": (1.0, 86_400.0),
    "max_queries_per_second": (0.0, 100_000.0),
    "lease_seconds": (1.0, 3600.0),
    "lease_renew_seconds": (0.1, 3600.0),
    "lease_renew_deadline_seconds": (0.5, 3600.0),
}
_INT_SETTINGS = {
    "actuation_concurrency": (1, 1024),
    "max_parallel_steps": (1, 256),
    "max_concurrent_queries": (1, 1024),
    "health_port": (0, 65535),
    "metrics_port": (0, 65535),
    "shard_count": (1, 1024),
    "shard_index": (0, 1023),
}


def _coerce(name: str, raw: Any) -> Any:
    if name == "prometheus":
        return _endpoints(raw)
    if name == "namespaces":
        return _namespaces(raw)
    if name in _FLOAT_SETTINGS:
        return _number(name, raw, float, *_FLOAT_SETTINGS[name])
    if name in _INT_SETTINGS:
        return _number(name, raw, int, *_INT_SETTINGS[name])
    if name in ("health_host", "metrics_host"):
        return _address(name, raw)
    if name == "leader_election":
        return _flag(name, raw)
    if name == "policy_selector":
        return _selector(raw)
    if name == "lease_namespace":
        if raw != "" and (not isinstance(raw, str) or not NAMESPACE_RE.fullmatch(raw)):
            raise ConfigError(name, f"{raw!r} is not a namespace name")
        return raw
    if not isinstance(raw, str) or not raw:
        raise ConfigError(name, f"must be a non-empty string, got {raw!r}")
    return raw


def _flag(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    raise ConfigError(name, f"must be true or false, got {raw!r}")


def _selector(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ConfigError("policy_selector", f"must be a label selector string, got {raw!r}")
    try:
        parse_label_selector(raw)
    except ValueError as err:
        raise ConfigError("policy_selector", str(err)) from err
    return raw


def _address(name: str, raw: Any) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError as error:
        raise ConfigError(
            name, f"expected an IP address to listen on (127.0.0.1 or 0.0.0.0), got {raw!r}"
        ) from error


def _endpoints(raw: Any) -> dict[str, str | PrometheusEndpoint]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            "prometheus",
            "must map at least one endpoint name to a URL, e.g. {default: http://prometheus:9090}",
        )
    endpoints: dict[str, str | PrometheusEndpoint] = {}
    for name, entry in raw.items():
        where = f"prometheus.{name}"
        if not isinstance(name, str) or not ENDPOINT_NAME_RE.fullmatch(name) or len(name) > 63:
            raise ConfigError(
                where, "endpoint names are DNS labels (a-z, 0-9, -), as spec.metrics.endpoint"
            )
        endpoints[name] = (
            _endpoint(where, entry) if isinstance(entry, Mapping) else _url(where, entry)
        )
    return endpoints


def _url(where: str, raw: Any) -> str:
    parts = urlsplit(raw) if isinstance(raw, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            where, f"expected an http(s) URL such as http://prometheus:9090, got {raw!r}"
        )
    return str(raw).rstrip("/")


_ENDPOINT_KEYS = (
    "url",
    "tenant",
    "tenant_header",
    "bearer_token_file",
    "basic_auth",
    "ca_file",
    "insecure_skip_verify",
)
# RFC 9110's token: what an HTTP header name may be.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Visible ASCII: a header value that cannot end the header or start another.
_TENANT_RE = re.compile(r"[!-~]{1,1024}")


def _endpoint(where: str, raw: Mapping[Any, Any]) -> PrometheusEndpoint:
    """The mapping form: {url, tenant, tenant_header, bearer_token_file,
    basic_auth: {username, password_file}, ca_file, insecure_skip_verify}."""
    for key in raw:
        if key not in _ENDPOINT_KEYS:
            raise ConfigError(
                f"{where}.{key}", f"unknown key; an endpoint takes {', '.join(_ENDPOINT_KEYS)}"
            )
    if "url" not in raw:
        raise ConfigError(f"{where}.url", "missing: the endpoint's http(s) URL")
    url = _url(f"{where}.url", raw["url"])
    https = urlsplit(url).scheme == "https"
    tenant = raw.get("tenant", "")
    if tenant != "" and (not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant)):
        raise ConfigError(
            f"{where}.tenant",
            f"expected a tenant ID of visible ASCII characters (no spaces), got {tenant!r}",
        )
    header = raw.get("tenant_header", "X-Scope-OrgID")
    if not isinstance(header, str) or not _HEADER_NAME_RE.fullmatch(header):
        raise ConfigError(
            f"{where}.tenant_header",
            f"expected an HTTP header name such as X-Scope-OrgID or THANOS-TENANT, got {header!r}",
        )
    token_file = _optional_file(raw, "bearer_token_file", where)
    basic_auth = None if raw.get("basic_auth") is None else _basic_auth(where, raw["basic_auth"])
    if token_file is not None and basic_auth is not None:
        raise ConfigError(f"{where}.basic_auth", "set bearer_token_file or basic_auth, not both")
    ca_file = _optional_file(raw, "ca_file", where)
    if ca_file is not None:
        if not https:
            raise ConfigError(f"{where}.ca_file", f"applies to https URLs only; url is {url}")
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except ssl.SSLError as err:
            raise ConfigError(
                f"{where}.ca_file", f"{ca_file} holds no PEM certificate a CA bundle can use: {err}"
            ) from err
    skip_verify = _flag(f"{where}.insecure_skip_verify", raw.get("insecure_skip_verify", False))
    if skip_verify and (not https or ca_file is not None):
        raise ConfigError(
            f"{where}.insecure_skip_verify",
            "applies to https URLs without ca_file only: "
            + ("url is http" if not https else "set ca_file or insecure_skip_verify, not both"),
        )
    return PrometheusEndpoint(
        url,
        tenant=tenant,
        tenant_header=header,
        bearer_token_file=token_file,
        basic_auth=basic_auth,
        ca_file=ca_file,
        insecure_skip_verify=skip_verify,
    )


def _optional_file(raw: Mapping[Any, Any], key: str, where: str) -> Path | None:
    return None if raw.get(key) is None else _secret_file(f"{where}.{key}", raw[key])


def _basic_auth(endpoint: str, raw: Any) -> BasicAuth:
    where = f"{endpoint}.basic_auth"
    if not isinstance(raw, Mapping) or set(raw) != {"username", "password_file"}:
        raise ConfigError(where, f"expected {{username: ..., password_file: /path}}, got {raw!r}")
    username = raw["username"]
    if not isinstance(username, str) or not username or ":" in username:
        raise ConfigError(
            f"{where}.username", f"expected a non-empty user name without ':', got {username!r}"
        )
    return BasicAuth(username, _secret_file(f"{where}.password_file", raw["password_file"]))


def _secret_file(where: str, raw: Any) -> Path:
    """A file the operator must be able to read now; the client reads it again when it changes."""
    if not isinstance(raw, str) or not raw.startswith("/"):
        raise ConfigError(where, f"expected an absolute file path, got {raw!r}")
    try:
        with open(raw, "rb"):
            pass
    except OSError as err:
        raise ConfigError(
            where,
            f"cannot read {raw}: {err.strerror}; mount the Secret that holds it there, "
            "or fix the path",
        ) from err
    return Path(raw)


def _namespaces(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list | tuple):
        raise ConfigError("namespaces", f"must be a list of namespace names, got {raw!r}")
    for name in raw:
        if not isinstance(name, str) or not NAMESPACE_RE.fullmatch(name):
            raise ConfigError("namespaces", f"{name!r} is not a namespace name")
    return tuple(raw)


def _number(name: str, raw: Any, kind: type, low: float, high: float) -> Any:
    if isinstance(raw, bool):
        raise ConfigError(name, f"must be a number, got {raw!r}")
    if kind is int and isinstance(raw, float) and not raw.is_integer():
        raise ConfigError(name, f"must be an integer, got {raw!r}")
    try:
        value = kind(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            name, f"must be a{'n integer' if kind is int else ' number'}, got {raw!r}"
        ) from err
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise ConfigError(name, f"must be between {low:g} and {high:g}, got {raw!r}")
    return value
