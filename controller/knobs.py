"""The knobs batchpilot steers on a running serving pod, as one typed value.

The same `Knobs` value is what the controller recommends, what the gate
applies (its admin API body), what the simulator's gate model runs with, and
what the operator records in the pod annotation. Validation lives here once so
every entry point rejects bad settings with the same field-named message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

DISCIPLINES = ("fcfs", "shortest-prompt-first", "priority")

# Upper bounds that no real deployment reaches; they exist to catch unit
# mistakes (tokens given as bytes, milliseconds as microseconds).
MAX_CONCURRENCY_LIMIT = 65_536
MAX_TOKENS_LIMIT = 1 << 31
MAX_DEADLINE_MS = 3_600_000
MAX_AGING_MS = 3_600_000


class KnobError(ValueError):
    """A knob setting is invalid; `field` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Knobs:
    """Batching and scheduling settings for one serving pod.

    `None` means "no limit from batchpilot": the engine's startup ceiling
    applies (for `max_num_batched_tokens`, the engine's own startup value).
    """

    # Requests in flight to the engine at once: the effective batch cap.
    max_concurrency: int | None = None
    # Prompt + requested output tokens of the requests in flight: a KV-cache
    # aware budget that keeps long contexts from triggering preemption storms.
    max_inflight_tokens: int | None = None
    # Order in which queued requests are admitted.
    discipline: str = "fcfs"
    # A queued request that has waited this long is shed (429) instead of
    # being admitted to miss its TTFT SLO anyway.
    queue_deadline_ms: int | None = None
    # Waiting this long lifts a request over one priority level (`priority`)
    # or over 1,000 prompt tokens (`shortest-prompt-first`), so that no
    # request starves behind a stream of higher-priority or shorter ones.
    aging_ms: int = 2_000
    # Engine prefill token budget per step; only actuated where the engine
    # accepts it live (native adapter), otherwise left at the startup value.
    max_num_batched_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_optional_int("max_concurrency", self.max_concurrency, 1, MAX_CONCURRENCY_LIMIT)
        _check_optional_int("max_inflight_tokens", self.max_inflight_tokens, 1, MAX_TOKENS_LIMIT)
        if self.discipline not in DISCIPLINES:
            raise KnobError(
                "discipline",
                f"{self.discipline!r} is not one of {', '.join(DISCIPLINES)}",
            )
        _check_optional_int("queue_deadline_ms", self.queue_deadline_ms, 1, MAX_DEADLINE_MS)
        _check_optional_int("aging_ms", self.aging_ms, 1, MAX_AGING_MS)
        _check_optional_int(
            "max_num_batched_tokens", self.max_num_batched_tokens, 16, MAX_TOKENS_LIMIT
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Knobs:
        """Build from a JSON-like mapping; unknown keys are errors, missing keys keep defaults."""
        if not isinstance(data, Mapping):
            raise KnobError("<body>", f"expected an object of knob settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KnobError(
                unknown[0], f"unknown knob; known knobs are {', '.join(sorted(known))}"
            )
        return cls(**data)

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)

    def with_changes(self, **changes: Any) -> Knobs:
        return replace(self, **changes)


def _check_optional_int(name: str, value: object, low: int, high: int) -> None:
    if value is None:
        return
    # bool is an int subclass; `true` for a token budget is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise KnobError(name, f"must be an integer or null, got {value!r}")
    if not low <= value <= high:
        raise KnobError(name, f"must be between {low} and {high}, got {value}")
