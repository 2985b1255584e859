"""Talking to the pods' gates: the admin API client and the applied-settings record.

The gate's admin API and its `/config` document are declared in
contract/gate_api.py. A PUT of the same knobs changes nothing and keeps the
version, which is what makes re-sending the target every interval safe.
A leader's write carries its fencing token; a gate that has accepted a higher
one refuses it (409, `StaleFence`): another replica has become the leader.

What the operator applied is recorded on the pod as the annotation
`batchpilot.dev/applied` (`AppliedRecord`, JSON), including the settings the
gate ran before batchpilot first changed it (`startup`), so that deleting the
policy or switching it Off can put exactly those back. The same write keeps
`batchpilot.dev/knobs` (the bare knobs) in step: a gate that mounts its pod's
annotations through the Downward API starts from it after a restart instead of
waiting for the operator's next step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from batchpilot.contract.errors import FieldError
from batchpilot.contract.gate_api import (
    APPLIED_ANNOTATION,
    CONFIG_PATH,
    FENCE_HEADER,
    KNOBS_ANNOTATION,
    GateConfig,
)
from batchpilot.contract.knobs import KnobError, Knobs

# The annotation patch that removes batchpilot's record from a pod.
CLEARED_ANNOTATIONS: Mapping[str, str | None] = {APPLIED_ANNOTATION: None, KNOBS_ANNOTATION: None}


class GateError(Exception):
    """A gate did not take a request; the message says why, for status and Events."""


class StaleFence(GateError):
    """A gate refused a fenced write: it accepted a higher fence, from a newer leader.

    This replica is no longer the leader and must stop writing. `highest` is
    the gate's highest accepted fence, None if its answer did not say.
    """

    def __init__(self, message: str, fence: int, highest: int | None) -> None:
        super().__init__(message)
        self.fence = fence
        self.highest = highest


class GateClient:
    """Admin-API calls with one shared aiohttp session and a per-request timeout."""

    def __init__(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def read(self, address: str, port: int) -> GateConfig:
        return await self._call("GET", address, port, None, None)

    async def write(
        self, address: str, port: int, token: str, knobs: Knobs, *, fence: int | None = None
    ) -> GateConfig:
        """PUT `knobs`; with `fence`, as the leader holding that fencing token.

        Raises `StaleFence` when the gate has accepted a higher fence, and
        `GateError` for every other failure.
        """
        return await self._call("PUT", address, port, token, knobs.to_mapping(), fence)

    async def _call(
        self,
        method: str,
        address: str,
        port: int,
        token: str | None,
        body: Mapping[str, Any] | None,
        fence: int | None = None,
    ) -> GateConfig:
        url = f"http://{_host(address)}:{port}{CONFIG_PATH}"
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if fence is not None:
            headers[FENCE_HEADER] = str(fence)
        try:
            async with self._session.request(
                method, url, json=body, headers=headers, timeout=self._timeout
            ) as response:
                text = await response.text()
                status = response.status
        except TimeoutError as err:
            raise GateError(
                f"gate admin API at {url} did not answer within {self._timeout.total:g} s"
            ) from err
        except aiohttp.ClientError as err:
            raise GateError(f"gate admin API at {url} unreachable: {err}") from err
        if status in (401, 403):
            raise GateError(
                f"gate at {url} refused the admin token ({status}): {_error_message(text)}"
            )
        if status == 409 and fence is not None:
            highest = _error_detail(text, "highest_fence")
            newer = "a higher fence" if highest is None else f"fence {highest}"
            raise StaleFence(
                f"gate at {url} refused this replica's write under fence {fence}: it accepted "
                f"{newer} from another leader, so this replica stopped being the leader and "
                "must not write again (409)",
                fence,
                highest,
            )
        if status != 200:
            raise GateError(f"gate at {url} answered {status}: {_error_message(text)}")
        return parse_gate_config(text, url)


def parse_gate_config(text: str, where: str) -> GateConfig:
    try:
        return GateConfig.from_document(json.loads(text))
    except (json.JSONDecodeError, FieldError) as err:
        raise GateError(
            f"gate at {where} answered a document batchpilot cannot read: {err}"
        ) from err


@dataclass(frozen=True, slots=True)
class AppliedRecord:
    """The `batchpilot.dev/applied` pod annotation."""

    policy: str
    knobs: Knobs
    version: int
    time: str
    # What the gate ran before batchpilot changed it; restored on delete / Off.
    startup: Knobs | None = None
    # Written while this pod ran a canary: its knobs are a candidate, not yet
    # the fleet's setting (what a restarted operator resumes from).
    canary: bool = False

    def to_json(self) -> str:
        document: dict[str, Any] = {
            "policy": self.policy,
            "knobs": self.knobs.to_mapping(),
            "version": self.version,
            "time": self.time,
        }
        if self.startup is not None:
            document["startup"] = self.startup.to_mapping()
        if self.canary:
            document["canary"] = True
        # Compact and key-sorted: the same record is the same bytes, so an
        # unchanged record is never patched again.
        return json.dumps(document, sort_keys=True, separators=(",", ":"))

    def annotations(self) -> dict[str, str | None]:
        """The pod annotations that carry this record."""
        knobs = json.dumps(self.knobs.to_mapping(), sort_keys=True, separators=(",", ":"))
        return {APPLIED_ANNOTATION: self.to_json(), KNOBS_ANNOTATION: knobs}

    @classmethod
    def from_json(cls, text: str | None) -> AppliedRecord | None:
        """The record, or None when absent or unreadable (then it is simply rewritten)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            startup = data.get("startup")
            version = data["version"]
            if isinstance(version, bool) or not isinstance(version, int):
                return None
            return cls(
                policy=str(data["policy"]),
                knobs=Knobs.from_mapping(data["knobs"]),
                version=version,
                time=str(data["time"]),
                startup=None if startup is None else Knobs.from_mapping(startup),
                canary=data.get("canary") is True,
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, KnobError):
            return None


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _error_detail(text: str, key: str) -> int | None:
    """An integer the gate put beside its error message (`highest_fence`), or None."""
    try:
        value = json.loads(text)["error"][key]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_message(text: str) -> str:
    """The gate's `{"error": {"message": ...}}`, or the start of whatever it sent."""
    try:
        data = json.loads(text)
        return str(data["error"]["message"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return text.strip()[:200]
