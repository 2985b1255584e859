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
  nothing and gets 400 naming the field.
- `GET /metrics`: Prometheus text format.
- `GET /livez`: the process answers. `GET /readyz`: the engine answered its
  last /health probe and the gate is not draining.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batchpilot.contract.gate_api import CONFIG_PATH, ConfigSource
from batchpilot.contract.knobs import KnobError, Knobs
from batchpilot.gate.runtime import Gate

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


def _json_error(
    status: int, message: str, field: str | None = None, **headers: str
) -> web.Response:
    body = {"error": {"message": message, "field": field}}
    return web.json_response(body, status=status, headers=headers or None)


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
        return web.json_response(self._gate.describe().to_document())

    async def put_config(self, request: web.Request) -> web.Response:
        refusal = self._authorize(request)
        if refusal is not None:
            # The peer and the answer only: what the caller sent as a token
            # must never reach a log.
            log.debug("refused a config write from %s: %d", request.remote, refusal.status)
            return refusal
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
        changed = await self._gate.apply(knobs, ConfigSource.API)
        return web.json_response({**self._gate.describe().to_document(), "changed": changed})

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
                **{"WWW-Authenticate": 'Bearer realm="batchpilot-gate"'},
            )
        return None
