"""The gate's admin API document and the pod annotations that carry knobs.

`GET /config` answers a `GateConfig` document: the applied knobs with their
`version` and `source`, the knobs the gate started with (`startup_knobs`, so
that whoever steers the gate can always put them back) and the engine-native
adapter's last outcome. `PUT /config` answers the same document plus
`changed`. The gate writes it (`to_document`) and the operator reads it
(`from_document`): one declaration for both ends.

A write may carry two conditions, checked atomically with the apply:
`FENCE_HEADER`, the writer's fencing token (the leader's Lease
`leaseTransitions`: a token lower than the highest the gate accepted is
refused with 409, so a deposed leader cannot undo its successor's setting),
and `If-Match` with a `version` (refused with 412 when the gate moved on).

On the pod, `batchpilot.dev/knobs` holds the bare knobs (a gate that mounts
its pod's annotations through the Downward API starts from them after a
restart) and `batchpilot.dev/applied` the operator's record of what it applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from batchpilot.contract.errors import FieldError
from batchpilot.contract.knobs import KnobError, Knobs

KNOBS_ANNOTATION = "batchpilot.dev/knobs"
APPLIED_ANNOTATION = "batchpilot.dev/applied"
CONFIG_PATH = "/config"
FENCE_HEADER = "X-Batchpilot-Fence"
# The largest fencing token: a signed 64-bit integer, as Kubernetes' own
# integers (leaseTransitions is narrower still, int32).
MAX_FENCE = 2**63 - 1


class ConfigSource(StrEnum):
    """Where the gate's applied knobs came from."""

    STARTUP = "startup"
    API = "api"
    # The Downward API annotations file (KNOBS_ANNOTATION).
    FILE = "file"


@dataclass(frozen=True, slots=True)
class GateConfig:
    """A gate's answer to GET or PUT /config."""

    knobs: Knobs
    version: int
    source: str
    # Only PUT answers it: whether the knobs differ from what ran before.
    changed: bool = False
    # What the gate started with; None from a gate too old to say.
    startup: Knobs | None = None
    applied_unix_s: float | None = None
    # The engine-native adapter's last outcome ({"adapter", "status",
    # "detail", ...}); None when the gate has no adapter or has not called it.
    native: Mapping[str, Any] | None = None
    # The highest fencing token the gate accepted; None when it has accepted
    # none yet since its start, or is too old to know fencing.
    fence: int | None = None

    @property
    def native_status(self) -> str | None:
        """ "applied", "rejected", ... as the adapter reported it."""
        status = None if self.native is None else self.native.get("status")
        return None if status is None else str(status)

    @property
    def native_detail(self) -> str:
        return "" if self.native is None else str(self.native.get("detail", ""))

    def to_document(self) -> dict[str, Any]:
        """The GET document; a PUT answer adds `changed`."""
        return {
            "knobs": self.knobs.to_mapping(),
            "startup_knobs": None if self.startup is None else self.startup.to_mapping(),
            "version": self.version,
            "source": self.source,
            "applied_unix_s": self.applied_unix_s,
            "native": None if self.native is None else dict(self.native),
            "fence": self.fence,
        }

    @classmethod
    def from_document(cls, data: Any) -> GateConfig:
        """Raises `FieldError` (naming no field: the document as a whole) when unreadable."""
        try:
            startup = data.get("startup_knobs")
            native = data.get("native")
            applied = data.get("applied_unix_s")
            fence = data.get("fence")
            return cls(
                knobs=Knobs.from_mapping(data["knobs"]),
                version=int(data["version"]),
                source=str(data.get("source", "")),
                changed=bool(data.get("changed", False)),
                startup=None if startup is None else Knobs.from_mapping(startup),
                applied_unix_s=None if applied is None else float(applied),
                native=native if isinstance(native, Mapping) else None,
                fence=None if fence is None else int(fence),
            )
        except (AttributeError, KeyError, TypeError, ValueError, KnobError) as err:
            raise FieldError("", str(err)) from err
