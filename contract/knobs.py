"""The knobs batchpilot steers on a running serving pod, as one typed value.

The same `Knobs` value is what the controller recommends, what the gate
applies (its admin API body), what the simulator's gate model runs with, and
what the operator records in the pod annotation. Validation lives here once so
every entry point rejects bad settings with the same field-named message, and
so do the knobs' wire names (the InferencePolicy's camelCase) and limits, which
the CRD schema, the policy parser and the guards read from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
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

# SLO classes (docs/slo-classes.md). A request names its class in this
# header, or is matched by a tenant header or its body's `model`; one that
# matches nothing, or names a class the gate does not have, is served in
# DEFAULT_CLASS, which exists whether or not it is declared.
CLASS_HEADER = "x-batchpilot-class"
DEFAULT_CLASS = "default"
# Class names are metric label values: a bounded set, short and plain.
MAX_CLASSES = 16
CLASS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?", re.ASCII)
CLASS_PRIORITY_LIMIT = 1_000
MAX_CLASS_WEIGHT = 1_000.0
MAX_MATCH_VALUES = 64
# An HTTP field name (RFC 9110 token), lower-case as the gate compares it.
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}", re.ASCII)


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
    # SLO classes, each with its own queue (docs/slo-classes.md); empty: one
    # class for every request, as before classes existed. `discipline` orders
    # each class's own queue.
    classes: tuple[ServiceClass, ...] = ()

    def __post_init__(self) -> None:
        for name, (low, high) in KNOB_LIMITS.items():
            _check_optional_int(name, getattr(self, name), low, high)
        if self.discipline not in DISCIPLINES:
            raise KnobError(
                "discipline",
                f"{self.discipline!r} is not one of {', '.join(DISCIPLINES)}",
            )
        if not isinstance(self.classes, tuple):
            raise KnobError(
                "classes", f"must be a tuple of ServiceClass, got {type(self.classes).__name__}"
            )
        if len(self.classes) > MAX_CLASSES:
            raise KnobError("classes", f"at most {MAX_CLASSES} classes, got {len(self.classes)}")
        seen: set[str] = set()
        for index, service_class in enumerate(self.classes):
            where = f"classes[{index}]"
            if not isinstance(service_class, ServiceClass):
                raise KnobError(
                    where, f"must be a ServiceClass, got {type(service_class).__name__}"
                )
            service_class.check(where)
            if service_class.name in seen:
                raise KnobError(
                    f"{where}.name",
                    f"{service_class.name!r} is declared twice; class names must be unique",
                )
            seen.add(service_class.name)

    def service_class(self, name: str) -> ServiceClass:
        """The settings of class `name`: declared, or the implicit default class's."""
        for service_class in self.classes:
            if service_class.name == name:
                return service_class
        return ServiceClass(DEFAULT_CLASS)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Every class the gate serves, the default class included (last when implicit)."""
        names = tuple(c.name for c in self.classes)
        return names if DEFAULT_CLASS in names else (*names, DEFAULT_CLASS)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Knobs:
        """Build from a JSON-like mapping; unknown keys are errors, missing keys keep defaults."""
        if not isinstance(data, Mapping):
            raise KnobError(
                "<body>", f"expected an object of knob settings, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KnobError(unknown[0], f"unknown knob; known knobs are {', '.join(sorted(known))}")
        values = dict(data)
        if "classes" in values:
            values["classes"] = _classes_from(values["classes"])
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        """JSON-ready: the gate's PUT /config body; `classes` only when there are some."""
        mapping = asdict(self)
        if self.classes:
            mapping["classes"] = [_class_mapping(c) for c in self.classes]
        else:
            del mapping["classes"]
        return mapping

    def with_changes(self, **changes: Any) -> Knobs:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class ClassMatch:
    """Which requests belong to a class, besides those naming it in CLASS_HEADER.

    `header`/`values`: a request whose `header` (e.g. a tenant or API-key
    header an authenticating gateway sets) has one of `values`. `models`: a
    request whose body's `model` is one of them. Either rule suffices.
    """

    header: str | None = None
    values: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def check(self, where: str) -> None:
        if self.header is not None and not _HEADER_NAME.fullmatch(self.header):
            raise KnobError(
                f"{where}.header",
                f"must be a lower-case HTTP header name such as x-tenant, got {self.header!r}",
            )
        if self.values and self.header is None:
            raise KnobError(f"{where}.values", "needs `header`: the header whose values these are")
        if self.header is not None and not self.values:
            raise KnobError(
                f"{where}.values", f"list the values of {self.header} that select the class"
            )
        for key in ("values", "models"):
            items = getattr(self, key)
            if len(items) > MAX_MATCH_VALUES:
                raise KnobError(
                    f"{where}.{key}", f"at most {MAX_MATCH_VALUES} entries, got {len(items)}"
                )
            for index, item in enumerate(items):
                if not isinstance(item, str) or not item:
                    raise KnobError(
                        f"{where}.{key}[{index}]", f"must be a non-empty string, got {item!r}"
                    )

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> ClassMatch:
        _require_mapping(data, where)
        _reject_unknown(data, ("header", "values", "models"), where)
        return cls(
            header=data.get("header"),
            values=_string_tuple(data.get("values", ()), f"{where}.values"),
            models=_string_tuple(data.get("models", ()), f"{where}.models"),
        )


@dataclass(frozen=True, slots=True)
class ServiceClass:
    """One SLO class's admission settings at the gate.

    Higher `priority` is served first (with aging: see `Knobs.aging_ms`);
    classes of equal priority share admissions in proportion to `weight`,
    counted in tokens (prompt + requested output), so a class sending long
    prompts does not crowd out one sending short ones.
    `queue_deadline_ms` (None: the knobs' own) sheds the class's requests
    that waited longer; `max_concurrency` (None: no class limit) caps the
    class's requests in flight, leaving the rest of the batch to others.
    """

    name: str
    priority: int = 0
    weight: float = 1.0
    queue_deadline_ms: int | None = None
    max_concurrency: int | None = None
    match: ClassMatch = field(default_factory=ClassMatch)

    def check(self, where: str) -> None:
        if not isinstance(self.name, str) or not CLASS_NAME.fullmatch(self.name):
            raise KnobError(
                f"{where}.name",
                "must be 1-32 lower-case letters, digits and dashes, starting and ending with a "
                f"letter or digit (it becomes a metric label value), got {self.name!r}",
            )
        _check_optional_int(
            f"{where}.priority", self.priority, -CLASS_PRIORITY_LIMIT, CLASS_PRIORITY_LIMIT
        )
        weight = self.weight
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not 0 < weight <= MAX_CLASS_WEIGHT
        ):
            raise KnobError(
                f"{where}.weight",
                f"must be a number above 0 and at most {MAX_CLASS_WEIGHT:g}, got {weight!r}",
            )
        _check_optional_int(
            f"{where}.queue_deadline_ms", self.queue_deadline_ms, 1, MAX_DEADLINE_MS
        )
        _check_optional_int(
            f"{where}.max_concurrency", self.max_concurrency, 1, MAX_CONCURRENCY_LIMIT
        )
        if not isinstance(self.match, ClassMatch):
            raise KnobError(f"{where}.match", "must be a ClassMatch")
        self.match.check(f"{where}.match")

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> ServiceClass:
        _require_mapping(data, where)
        known = tuple(f.name for f in fields(cls))
        _reject_unknown(data, known, where)
        values = dict(data)
        if "match" in values:
            values["match"] = ClassMatch.from_mapping(values["match"], f"{where}.match")
        if isinstance(values.get("weight"), int) and not isinstance(values.get("weight"), bool):
            values["weight"] = float(values["weight"])
        if "name" not in values:
            raise KnobError(f"{where}.name", "is required")
        return cls(**values)


# Every knob but the classes, in field order (the order displays list them).
SCALAR_KNOBS = tuple(f.name for f in fields(Knobs) if f.name != "classes")


def _classes_from(raw: Any) -> tuple[ServiceClass, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
        raise KnobError("classes", f"expected a list of class objects, got {type(raw).__name__}")
    return tuple(ServiceClass.from_mapping(item, f"classes[{i}]") for i, item in enumerate(raw))


def _class_mapping(service_class: ServiceClass) -> dict[str, Any]:
    mapping = asdict(service_class)
    match = mapping["match"]
    mapping["match"] = {
        key: list(value) if isinstance(value, tuple) else value for key, value in match.items()
    }
    return mapping


def _require_mapping(data: Any, where: str) -> None:
    if not isinstance(data, Mapping):
        raise KnobError(where, f"expected an object, got {type(data).__name__}")


def _reject_unknown(data: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise KnobError(f"{where}.{unknown[0]}", f"unknown key; known keys are {', '.join(known)}")


def _string_tuple(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, str) or not isinstance(raw, Sequence):
        raise KnobError(where, f"expected a list of strings, got {raw!r}")
    return tuple(raw)


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
    document: dict[str, Any] = {
        WIRE_NAMES[name]: getattr(knobs, name)
        for name in SCALAR_KNOBS
        if getattr(knobs, name) is not None
    }
    if knobs.classes:
        document["classes"] = [class_document(c) for c in knobs.classes]
    return document


def class_document(service_class: ServiceClass) -> dict[str, Any]:
    """One class's gate settings in camelCase, unset limits left out."""
    document: dict[str, Any] = {
        "name": service_class.name,
        "priority": service_class.priority,
        "weight": service_class.weight,
    }
    if service_class.queue_deadline_ms is not None:
        document["queueDeadlineMs"] = service_class.queue_deadline_ms
    if service_class.max_concurrency is not None:
        document["maxConcurrency"] = service_class.max_concurrency
    return document


def knobs_summary(knobs: Knobs) -> str:
    """`cap=64 tokens=200000 fcfs deadline=none` for one-line displays."""
    return (
        f"cap={value_text(knobs.max_concurrency)} tokens={value_text(knobs.max_inflight_tokens)} "
        f"{knobs.discipline} deadline={value_text(knobs.queue_deadline_ms)}"
    )


def knobs_text(knobs: Knobs) -> str:
    """Every knob by its wire name, `maxConcurrency=64, ..., discipline=fcfs`, for Event messages."""
    text = ", ".join(
        f"{wire}={value_text(getattr(knobs, name))}" for name, wire in WIRE_NAMES.items()
    )
    return text + "".join(f", {class_text(c)}" for c in knobs.classes)


def class_text(service_class: ServiceClass) -> str:
    """`class interactive: priority=1 weight=1 queueDeadlineMs=800 maxConcurrency=none`."""
    return (
        f"class {service_class.name}: priority={service_class.priority} weight={service_class.weight:g} "
        f"queueDeadlineMs={value_text(service_class.queue_deadline_ms)} "
        f"maxConcurrency={value_text(service_class.max_concurrency)}"
    )


def knobs_change_text(before: Knobs, after: Knobs) -> str:
    """The knobs that differ, `maxConcurrency 8 -> 16, ...`, for Event messages."""
    changes = [
        f"{WIRE_NAMES[name]} {value_text(getattr(before, name))} -> {value_text(getattr(after, name))}"
        for name in WIRE_NAMES
        if getattr(before, name) != getattr(after, name)
    ]
    old = {c.name: c for c in before.classes}
    new = {c.name: c for c in after.classes}
    for name in (*old, *(n for n in new if n not in old)):
        if old.get(name) == new.get(name):
            continue
        changes.append(
            f"class {name} "
            + ("removed" if name not in new else "added" if name not in old else "changed")
            + ("" if name not in new else f" ({class_text(new[name]).split(': ', 1)[1]})")
        )
    return ", ".join(changes)


def value_text(value: object) -> str:
    """One knob value for display: an unset limit (None) reads `none`."""
    return "none" if value is None else str(value)
