"""The operator's configuration: one typed value, built once at startup.

Sources, highest precedence first:

1. environment variables `BATCHPILOT_OPERATOR_<SETTING>` (upper-case setting
   name, e.g. `BATCHPILOT_OPERATOR_TICK_SECONDS=5`); Prometheus endpoints as
   `BATCHPILOT_OPERATOR_PROMETHEUS_<NAME>=<url>` (`_` in NAME reads as `-`)
   and namespaces as a comma-separated `BATCHPILOT_OPERATOR_NAMESPACES`;
2. the YAML file given with `batchpilot operator --config FILE`, whose
   top-level keys are the setting names below, with `prometheus:` a mapping
   of endpoint name -> URL;
3. the defaults documented on `OperatorConfig`.

Policies name a Prometheus endpoint (`spec.metrics.endpoint`), never a URL:
which servers the operator queries is its owner's decision, not every
namespace's. Every bad value is reported as `ConfigError` naming the setting.

```yaml
prometheus:
  default: http://prometheus-operated.monitoring:9090
  thanos: http://thanos-query.monitoring:9090
namespaces: [serving-a, serving-b]    # empty: every namespace
tick_seconds: 5
```
"""

from __future__ import annotations

import ipaddress
import math
import re
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

ENV_PREFIX = "BATCHPILOT_OPERATOR_"
PROMETHEUS_ENV_PREFIX = ENV_PREFIX + "PROMETHEUS_"
# The CRD's pattern for spec.metrics.endpoint (a DNS label).
ENDPOINT_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class ConfigError(SettingError):
    """An operator setting is invalid; `setting` names it."""


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    # Prometheus-compatible query endpoints (Prometheus, Thanos, Mimir) by name.
    prometheus: Mapping[str, str] = field(
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
    # Control steps (queries + model fit, in worker threads) running at once.
    # A step mostly waits on Prometheus (~22 sequential queries): measured
    # with 100 policies of 16 pods, 4 slots left steps queueing for most of
    # their 30 s interval while the operator used 41% of one core; 16 keeps
    # up (bench/operator_cost.py).
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

    def endpoint_url(self, name: str) -> str | None:
        return self.prometheus.get(name)


def load_config(path: Path | None, env: Mapping[str, str]) -> OperatorConfig:
    """Merge the YAML file (if any) with `env` overrides and validate."""
    from_file = read_settings_file(path, ConfigError) if path is not None else {}
    return build_settings(OperatorConfig, [from_file, _from_env(env)], _coerce, ConfigError)


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
}
_INT_SETTINGS = {
    "actuation_concurrency": (1, 1024),
    "max_parallel_steps": (1, 256),
    "health_port": (0, 65535),
    "metrics_port": (0, 65535),
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
    if not isinstance(raw, str) or not raw:
        raise ConfigError(name, f"must be a non-empty string, got {raw!r}")
    return raw


def _address(name: str, raw: Any) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError as error:
        raise ConfigError(
            name, f"expected an IP address to listen on (127.0.0.1 or 0.0.0.0), got {raw!r}"
        ) from error


def _endpoints(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            "prometheus",
            "must map at least one endpoint name to a URL, e.g. {default: http://prometheus:9090}",
        )
    endpoints: dict[str, str] = {}
    for name, url in raw.items():
        where = f"prometheus.{name}"
        if not isinstance(name, str) or not ENDPOINT_NAME_RE.fullmatch(name) or len(name) > 63:
            raise ConfigError(
                where, "endpoint names are DNS labels (a-z, 0-9, -), as spec.metrics.endpoint"
            )
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                where, f"expected an http(s) URL such as http://prometheus:9090, got {url!r}"
            )
        endpoints[name] = url.rstrip("/")
    return endpoints


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
