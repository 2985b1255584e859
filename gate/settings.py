"""The gate's startup configuration: one typed value, built once.

Sources, highest precedence first:

1. command-line options (`batchpilot gate --upstream ...`),
2. environment variables `BATCHPILOT_GATE_<SETTING>` (upper-case setting
   name, e.g. `BATCHPILOT_GATE_UPSTREAM`, `BATCHPILOT_GATE_TOKEN_FILE`),
3. an optional YAML config file (`--config` or `BATCHPILOT_GATE_CONFIG`) whose
   top-level keys are the setting names below, plus a `knobs:` mapping of
   startup `Knobs` (the env form of that is `BATCHPILOT_GATE_KNOBS`, JSON),
4. the defaults documented on `GateSettings`.

Every bad value is reported as `GateSettingsError` naming the setting and
where it came from, so a typo in a pod spec is found at start, not at the
first request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchpilot.contract.knobs import KnobError, Knobs
from batchpilot.contract.settings import (
    SettingError,
    build_settings,
    read_settings_file,
    settings_from_env,
)

ENV_PREFIX = "BATCHPILOT_GATE_"
NATIVE_ADAPTERS = ("off", "sglang", "vllm")


class GateSettingsError(SettingError):
    """A gate setting is invalid; `setting` names it."""


@dataclass(frozen=True, slots=True)
class GateSettings:
    # The engine's OpenAI-compatible base URL inside the pod.
    upstream: str = "http://127.0.0.1:8000"
    # Where clients connect (the Service targets this port).
    listen: str = "0.0.0.0:8080"
    # Admin API, /metrics and probes; keep it off the client-facing Service.
    admin: str = "0.0.0.0:9090"
    # Bearer token for `PUT /config`: a mounted Secret file (re-read on every
    # write, so a rotated Secret takes effect without a restart) or a value.
    token_file: Path | None = None
    token: str | None = field(default=None, repr=False)
    # Downward API file of pod annotations holding `batchpilot.dev/knobs`.
    annotations_file: Path | None = None
    # Knobs applied at startup, before any API or annotation change.
    knobs: Knobs = field(default_factory=Knobs)
    # Engine-native live tuning: off (default), sglang or vllm.
    native: str = "off"
    # Output-token estimate for requests that set no max_tokens. 256 is above
    # the p90 output of both public Azure traces (code 55, conversation 424 is
    # the exception), so the budget errs towards reserving too much KV.
    default_max_tokens: int = 256
    # SIGTERM: readiness turns false at once, but the gate keeps accepting for
    # this long, because the pod leaves the Service's endpoints (the
    # EndpointSlice, then kube-proxy on every node) a moment after the kubelet
    # signals it; a gate that stopped listening at once refuses connections
    # still routed to it. 0 stops accepting at once.
    shutdown_delay_s: float = 5.0
    # Then: stop accepting, let admitted and queued requests finish for up to
    # this long. 5 + 20 s stays under Kubernetes' default 30 s grace period.
    grace_period_s: float = 20.0
    # Upstream /health probe period; readiness follows the last answer.
    health_interval_s: float = 2.0
    # Annotation file poll period (the kubelet refreshes it within ~1 min).
    annotation_poll_s: float = 1.0
    # Largest request body accepted: 32 MiB fits a 128k-token prompt with
    # room for inline images; aiohttp's own default of 1 MiB does not.
    max_body_bytes: int = 32 << 20

    @property
    def upstream_url(self) -> str:
        return self.upstream.rstrip("/")


def parse_host_port(setting: str, value: str) -> tuple[str, int]:
    """`host:port`, `:port` (all interfaces) or `[v6addr]:port` -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise GateSettingsError(setting, f"expected HOST:PORT such as 0.0.0.0:8080, got {value!r}")
    port = int(port_text)
    if port > 65535:
        raise GateSettingsError(setting, f"port must be 0-65535, got {port}")
    host = host.strip("[]") or "0.0.0.0"
    return host, port


def load_settings(
    overrides: Mapping[str, Any],
    env: Mapping[str, str],
) -> GateSettings:
    """Merge command-line `overrides` (None = not given), `env` and the config file."""
    given = {key: value for key, value in overrides.items() if value is not None}
    config_path = given.pop("config", None) or env.get(ENV_PREFIX + "CONFIG")
    from_file = read_settings_file(Path(config_path), GateSettingsError) if config_path else {}
    from_env = settings_from_env(GateSettings, env, ENV_PREFIX, parsers={"knobs": _knobs_json})
    settings = build_settings(
        GateSettings, [from_file, from_env, given], _coerce, GateSettingsError
    )
    _validate(settings)
    return settings


def _knobs_json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise GateSettingsError(
            "knobs", f"{ENV_PREFIX}KNOBS is not valid JSON ({err.msg})"
        ) from err


def _coerce(name: str, raw: Any) -> Any:
    if name == "knobs":
        if isinstance(raw, Knobs):
            return raw
        try:
            return Knobs.from_mapping(raw)
        except KnobError as err:
            raise GateSettingsError(f"knobs.{err.field}", err.message) from err
    if name in ("token_file", "annotations_file"):
        return Path(raw) if raw else None
    if name in ("default_max_tokens", "max_body_bytes"):
        return _as_number(name, raw, int)
    if name in ("shutdown_delay_s", "grace_period_s", "health_interval_s", "annotation_poll_s"):
        return _as_number(name, raw, float)
    return str(raw) if raw is not None else None


def _as_number(name: str, raw: Any, kind: type[int] | type[float]) -> int | float:
    what = "an integer" if kind is int else "a number"
    # bool is an int subclass: `true` for a byte count is a mistake, not 1.
    if isinstance(raw, bool):
        raise GateSettingsError(name, f"must be {what}, got {raw!r}")
    try:
        return kind(raw)
    except (TypeError, ValueError) as err:
        raise GateSettingsError(name, f"must be {what}, got {raw!r}") from err


def _validate(settings: GateSettings) -> None:
    parts = urlsplit(settings.upstream)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GateSettingsError(
            "upstream",
            f"expected an http(s) URL such as http://127.0.0.1:8000, got {settings.upstream!r}",
        )
    parse_host_port("listen", settings.listen)
    parse_host_port("admin", settings.admin)
    if settings.native not in NATIVE_ADAPTERS:
        raise GateSettingsError(
            "native", f"{settings.native!r} is not one of {', '.join(NATIVE_ADAPTERS)}"
        )
    if settings.default_max_tokens < 1:
        raise GateSettingsError("default_max_tokens", "must be at least 1")
    if settings.max_body_bytes < 1024:
        raise GateSettingsError("max_body_bytes", "must be at least 1024")
    for name in ("grace_period_s", "health_interval_s", "annotation_poll_s"):
        value = getattr(settings, name)
        if not value > 0:
            raise GateSettingsError(name, f"must be positive, got {value}")
    if not settings.shutdown_delay_s >= 0:
        raise GateSettingsError(
            "shutdown_delay_s",
            f"must be 0 (stop accepting at once) or more, got {settings.shutdown_delay_s}",
        )
