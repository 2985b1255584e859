"""The gate's admin port: live configuration, metrics and probes.

- `GET /config`: the applied knobs, their `version` (starts at 1, +1 on every
  change) and `source` (startup | api | file), the knobs the gate started
  with (`startup_knobs`, so that a controller that lost its own record can
  still restore them), and the last engine-native result.
- `PUT /config`: a JSON object of `Knobs` fields replacing the applied knobs
  (missing fields take their defaults, so `{}` clears every limit; the user
  doc is docs/gate.md). Needs `Authorization: Bearer
  <token>`, the token read from `token_file` (re-read on every write, so a
  rotated Secret applies without a restart) or `token`. With no token
  configured, writes are refused. A body that does not validate changes
  nothing and gets 400 naming the field. Two optional conditions, checked in
  the same step as the apply (Gate.apply): `X-Batchpilot-Fence: <n>`, the
  writer's fencing token (409 when lower than the highest accepted), and
  `If-Match: <version>` (412 when another version is applied). A header
  that does not parse gets 400 naming it. A write without a fence is taken
  even after fenced ones and leaves the fence as it is: it is a person's
  curl or an operator without leader election, never a deposed leader (with
  election on, the operator fences every write), and a person must always be
  able to put a setting right by hand.
- `GET /metrics`: Prometheus text format.
- `GET /livez`: the process answers. `GET /readyz`: the engine answered its
  last /health probe and the gate is not draining.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batchpilot.contract.gate_api import (
    CONFIG_PATH,
    FENCE_HEADER,
    MAX_FENCE,
    ConfigSource,
    GateConfig,
)
from batchpilot.contract.gate_metrics import ConfigRejectReason
from batchpilot.contract.knobs import KnobError, Knobs
from batchpilot.gate.runtime import Gate, WriteConditions, WriteRefused

log = logging.getLogger("batchpilot.gate")

_HOW_TO_CONFIGURE = (
    "mount a Secret and point BATCHPILOT_GATE_TOKEN_FILE at it (or set BATCHPILOT_GATE_TOKEN)"
)


def read_token(token_file: Path | None, token: str | None) -> tuple[str | None, str]:
    """(token, why writes are refused when it is None); the file wins over the value."""
    if token_file is not None:
        try:
            value = token_file.read_text().strip()
        except OSError as err:
            problem = f"the admin token file {token_file} cannot be read ({err.strerror})"
        else:
            if value:
                return value, ""
            problem = f"the admin token file {token_file} is empty"
    elif token:
        return token, ""
    else:
        problem = "no admin token is configured"
    return None, f"configuration writes are disabled: {problem}; {_HOW_TO_CONFIGURE}"


_REFUSAL_STATUS: Mapping[ConfigRejectReason, int] = {
    ConfigRejectReason.STALE_FENCE: 409,
    ConfigRejectReason.VERSION_MISMATCH: 412,
}

# Fences and versions in decimal digits only: int() would also take "+3",
# " 3", "3_000" and non-ASCII digits, which no writer means to send.
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
# Digits of the largest value either header may carry; checked before int()
# so that a huge header costs nothing to refuse.
_MAX_DIGITS = len(str(MAX_FENCE))


class _HeaderError(ValueError):
    def __init__(self, header: str, message: str) -> None:
        super().__init__(message)
        self.header = header


def _json_error(
    status: int,
    message: str,
    field: str | None = None,
    *,
    details: Mapping[str, int] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "field": field, **(details or {})}}
    return web.json_response(body, status=status, headers=headers)


def _config_response(config: GateConfig, **extra: Any) -> web.Response:
    """The /config document, with its version as the ETag that If-Match takes back."""
    return web.json_response(
        {**config.to_document(), **extra}, headers={hdrs.ETAG: f'"{config.version}"'}
    )


def _write_conditions(headers: Mapping[str, str]) -> WriteConditions:
    """The fence and If-Match of a write; `_HeaderError` naming the header that does not parse."""
    return WriteConditions(
        fence=_fence(headers.get(FENCE_HEADER)), versions=_if_match(headers.get(hdrs.IF_MATCH))
    )


def _fence(raw: str | None) -> int | None:
    if raw is None:
        return None
    value = raw.strip()
    if not (_DIGITS.fullmatch(value) and len(value) <= _MAX_DIGITS and int(value) <= MAX_FENCE):
        raise _HeaderError(
            FENCE_HEADER,
            f"{FENCE_HEADER}: must be a whole number from 0 to {MAX_FENCE} (the writer's "
            f"fencing token), got {raw!r}; send e.g. {FENCE_HEADER}: 3, or leave the header "
            "out for an unfenced write",
        )
    return int(value)


def _if_match(raw: str | None) -> frozenset[int] | None:
    """The versions named, or None for any: no header, or `*`.

    Takes RFC 9110's entity-tag list ("3", "4") as well as a bare
    version (3), so both a hand-written header and an ETag sent back work.
    """
    if raw is None or raw.strip() == "*":
        return None
    versions = set()
    for tag in raw.split(","):
        tag = tag.strip()
        bare = tag[1:-1] if len(tag) >= 2 and tag[0] == tag[-1] == '"' else tag
        if not (_DIGITS.fullmatch(bare) and len(bare) <= _MAX_DIGITS):
            raise _HeaderError(
                hdrs.IF_MATCH,
                f"{hdrs.IF_MATCH}: {tag!r} is not a configuration version; send the version "
                f'of GET /config (e.g. {hdrs.IF_MATCH}: 3, or its ETag "3"), or leave the '
                "header out to write whatever version is applied",
            )
        versions.add(int(bare))
    return frozenset(versions)


class Admin:
    """Request handlers of the admin port."""

    def __init__(
        self,
        gate: Gate,
        token_file: Path | None,
        token: str | None,
        readiness: Callable[[], tuple[bool, str]],
    ) -> None:
        self._gate = gate
        self._token_file = token_file
        self._token = token
        self._readiness = readiness

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(CONFIG_PATH, self.get_config),
            web.put(CONFIG_PATH, self.put_config),
            web.get("/metrics", self.metrics),
            web.get("/livez", self.livez),
            web.get("/readyz", self.readyz),
        ]

    async def get_config(self, request: web.Request) -> web.Response:
        return _config_response(self._gate.describe())

    async def put_config(self, request: web.Request) -> web.Response:
        refusal = self._authorize(request)
        if refusal is not None:
            # The peer and the answer only: what the caller sent as a token
            # must never reach a log.
            log.debug("refused a config write from %s: %d", request.remote, refusal.status)
            return refusal
        try:
            conditions = _write_conditions(request.headers)
        except _HeaderError as err:
            return _json_error(400, str(err), err.header)
        try:
            data = json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return _json_error(
                400, f"body is not valid JSON ({err}); send an object of knob settings", "<body>"
            )
        try:
            knobs = Knobs.from_mapping(data)
        except KnobError as err:
            return _json_error(400, str(err), err.field)
        try:
            changed = await self._gate.apply(knobs, ConfigSource.API, conditions)
        except WriteRefused as refused:
            log.warning("refused a config write from %s: %s", request.remote, refused)
            return _json_error(
                _REFUSAL_STATUS[refused.reason],
                str(refused),
                refused.field,
                details=refused.details,
                headers={hdrs.ETAG: f'"{self._gate.config.version}"'},
            )
        return _config_response(self._gate.describe(), changed=changed)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._gate.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        ready, why = self._readiness()
        return web.Response(status=200 if ready else 503, text=why + "\n")

    def _authorize(self, request: web.Request) -> web.Response | None:
        expected, why_none = read_token(self._token_file, self._token)
        if expected is None:
            return _json_error(403, why_none)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), expected.encode()
        ):
            return _json_error(
                401,
                "missing or wrong bearer token: send Authorization: Bearer <the admin token>",
                headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="batchpilot-gate"'},
            )
        return None
