"""The spec's `knobs` section: which knobs a policy steers, within which bounds.

Each numeric knob has its own range type, because each states its own limits
(contract.knobs.KNOB_LIMITS) and defaults; policy.py turns the listed ranges
into `KnobBounds`, taking each end not given from the engine and the SLO.
"""

# `wired` is dataclasses.field with a wire contract; ruff knows only `field` as safe.

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from batchpilot.contract.knobs import DISCIPLINES, KNOB_LIMITS, NUMERIC_KNOBS
from batchpilot.contract.schema import Rule, Wire, wired

# The CEL twin of KnobBounds' own check (policy.py).
_MIN_NOT_ABOVE_MAX: tuple[Rule, ...] = (
    Rule(
        "!has(self.min) || !has(self.max) || self.min <= self.max",
        "min must not exceed max",
        ".min",
    ),
)


def _limit(knob: str, description: str) -> Any:
    """A bound of a knob's range, within the knob's own limits."""
    floor, ceiling = KNOB_LIMITS[knob]
    return wired(description, default=None, minimum=floor, maximum=ceiling)


class KnobRange(Protocol):
    """A listed knob's range; an absent end takes the policy's default."""

    @property
    def min(self) -> int | None: ...

    @property
    def max(self) -> int | None: ...


class _Range:
    """The base of every numeric knob's range: the CEL rule all of them carry."""

    __slots__ = ()
    RULES: ClassVar[tuple[Rule, ...]] = _MIN_NOT_ABOVE_MAX


@dataclass(frozen=True, slots=True)
class ConcurrencyRange(_Range):
    min: int | None = _limit(
        "max_concurrency", "Lowest value (default min(4, engine.maxNumSeqs / 16), at least 1)."
    )
    max: int | None = _limit("max_concurrency", "Highest value (default engine.maxNumSeqs).")


@dataclass(frozen=True, slots=True)
class InflightTokensRange(_Range):
    min: int | None = _limit(
        "max_inflight_tokens",
        "Lowest value (default engine.maxNumBatchedTokens, one full prefill step).",
    )
    max: int | None = _limit(
        "max_inflight_tokens", 'Highest value (absent, the default, allows "no budget").'
    )


@dataclass(frozen=True, slots=True)
class QueueDeadlineRange(_Range):
    min: int | None = _limit("queue_deadline_ms", "Lowest value (default min(100, slo.ttftMs)).")
    max: int | None = _limit(
        "queue_deadline_ms", 'Highest value (absent, the default, allows "no deadline").'
    )


@dataclass(frozen=True, slots=True)
class AgingRange(_Range):
    min: int | None = _limit("aging_ms", "Lowest value (default 100).")
    max: int | None = _limit("aging_ms", "Highest value (default 60000).")


@dataclass(frozen=True, slots=True)
class BatchedTokensRange(_Range):
    min: int | None = _limit(
        "max_num_batched_tokens", "Lowest value (default min(512, engine.maxNumBatchedTokens))."
    )
    max: int | None = _limit(
        "max_num_batched_tokens", "Highest value (default engine.maxNumBatchedTokens)."
    )


@dataclass(frozen=True, slots=True)
class DisciplineChoice:
    allowed: tuple[str, ...] = wired(
        "Allowed disciplines (default all three).",
        default=DISCIPLINES,
        min_items=1,
        max_items=len(DISCIPLINES),
        item=Wire(enum=DISCIPLINES),
        fix=f"choose from {', '.join(DISCIPLINES)}",
        extra={"x-kubernetes-list-type": "set"},
    )


@dataclass(frozen=True, slots=True)
class KnobsSpec:
    """The knobs a policy lists, by their wire names (contract.knobs.WIRE_NAMES)."""

    max_concurrency: ConcurrencyRange | None = wired(
        "Batch cap, requests in flight to the engine at once.", default=None
    )
    max_inflight_tokens: InflightTokensRange | None = wired(
        "KV-token budget: prompt plus requested output tokens of the requests in flight.",
        default=None,
    )
    queue_deadline_ms: QueueDeadlineRange | None = wired(
        "A queued request that waited this long is shed (429) instead of missing its TTFT anyway.",
        default=None,
    )
    aging_ms: AgingRange | None = wired(
        "Wait that lifts a request one priority level (or 1,000 prompt tokens under "
        "shortest-prompt-first).",
        default=None,
    )
    max_num_batched_tokens: BatchedTokensRange | None = wired(
        "Engine prefill token budget per step; needs engine.runtimeTunable.", default=None
    )
    discipline: DisciplineChoice | None = wired(
        "Queue disciplines the controller may choose from.", default=None
    )

    def ranges(self) -> dict[str, KnobRange]:
        """Numeric knob -> the range listed for it, for the knobs listed."""
        listed = {knob: getattr(self, knob) for knob in NUMERIC_KNOBS}
        return {knob: bounds for knob, bounds in listed.items() if bounds is not None}
