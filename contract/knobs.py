"""The knobs batchpilot steers on a running serving pod, as one typed value.

The same `Knobs` value is what the controller recommends, what the gate
applies (its admin API body), what the simulator's gate model runs with, and
what the operator records in the pod annotation. Validation lives here once so
every entry point rejects bad settings with the same field-named message, and
so do the knobs' wire names (the InferencePolicy's camelCase) and limits, which
the CRD schema, the policy parser and the guards read from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from batchpilot.contract.errors import FieldError

DISCIPLINES = ("fcfs", "shortest-prompt-first", "priority")

# Upper bounds that no real deployment reaches; they exist to catch unit
# mistakes (tokens given as bytes, milliseconds as microseconds).
MAX_CONCURRENCY_LIMIT = 65_536
MAX_TOKENS_LIMIT = 1 << 31
MAX_DEADLINE_MS = 3_600_000
MAX_AGING_MS = 3_600_000

# Hard limits of each numeric knob, in field order: what `Knobs` validates,
# what a policy's bounds must stay within and what the CRD schema states.
# The engine's prefill budget starts at 16 tokens: below that no engine
# schedules a useful step.
KNOB_LIMITS: Mapping[str, tuple[int, int]] = {
    "max_concurrency": (1, MAX_CONCURRENCY_LIMIT),
    "max_inflight_tokens": (1, MAX_TOKENS_LIMIT),
    "queue_deadline_ms": (1, MAX_DEADLINE_MS),
    "aging_ms": (1, MAX_AGING_MS),
    "max_num_batched_tokens": (16, MAX_TOKENS_LIMIT),
}
# Knobs the controller can steer by a number, then the one it steers by name.
NUMERIC_KNOBS = tuple(KNOB_LIMITS)
STEERABLE_KNOBS = (*NUMERIC_KNOBS, "discipline")
# The InferencePolicy's (and its status') camelCase spelling of each knob.
WIRE_NAMES: Mapping[str, str] = {
    "max_concurrency": "maxConcurrency",
    "max_inflight_tokens": "maxInflightTokens",
    "queue_deadline_ms": "queueDeadlineMs",
    "aging_ms": "agingMs",
    "max_num_batched_tokens": "maxNumBatchedTokens",
    "discipline": "discipline",
}
FROM_WIRE_NAMES: Mapping[str, str] = {wire: name for name, wire in WIRE_NAMES.items()}


class KnobError(FieldError):
    """A knob setting is invalid; `field` names the offending key."""


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
        for name, (low, high) in KNOB_LIMITS.items():
            _check_optional_int(name, getattr(self, name), low, high)
        if self.discipline not in DISCIPLINES:
            raise KnobError(
                "discipline",
                f"{self.discipline!r} is not one of {', '.join(DISCIPLINES)}",
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


def knobs_document(knobs: Knobs) -> dict[str, Any]:
    """camelCase knob settings; an unset limit (None) is left out: absent means no limit."""
    return {WIRE_NAMES[name]: value for name, value in knobs.to_mapping().items() if value is not None}


def knobs_summary(knobs: Knobs) -> str:
    """`cap=64 tokens=200000 fcfs deadline=none` for one-line displays."""
    return (
        f"cap={value_text(knobs.max_concurrency)} tokens={value_text(knobs.max_inflight_tokens)} "
        f"{knobs.discipline} deadline={value_text(knobs.queue_deadline_ms)}"
    )


def knobs_text(knobs: Knobs) -> str:
    """Every knob by its wire name, `maxConcurrency=64, ..., discipline=fcfs`, for Event messages."""
    return ", ".join(f"{WIRE_NAMES[name]}={value_text(value)}" for name, value in knobs.to_mapping().items())


def knobs_change_text(before: Knobs, after: Knobs) -> str:
    """The knobs that differ, `maxConcurrency 8 -> 16, ...`, for Event messages."""
    return ", ".join(
        f"{WIRE_NAMES[name]} {value_text(getattr(before, name))} -> {value_text(getattr(after, name))}"
        for name in WIRE_NAMES
        if getattr(before, name) != getattr(after, name)
    )


def value_text(value: object) -> str:
    """One knob value for display: an unset limit (None) reads `none`."""
    return "none" if value is None else str(value)
