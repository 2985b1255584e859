"""Typed documents whose fields carry their wire contract: the InferencePolicy spec's mechanism.

The InferencePolicy spec is declared once, as frozen dataclasses whose fields
carry `Wire` metadata (camelCase wire name, description, bounds, enum,
pattern, published default, CEL rules): the controller's part in
controller/spec.py, the Kubernetes-only part in operator/spec.py. From that
one declaration come

- the CRD's OpenAPI schema (contract/openapi.py; operator/crd.py adds the
  parts that are not about spec fields, scripts/gen-crd writes the file, and
  docs/api.md is generated from that file),
- the parsing of a spec (`parse`): unknown fields, required fields, types and
  bounds, every error a `PolicyError` naming the camelCase path
  (`spec.knobs.maxConcurrency.min`), and
- the checks of a value built directly in code (`check_fields`, from a
  `__post_init__`), with the same bounds and messages.

A document class may also carry `RULES` (its CEL rules), `WIRE_ORDER` (the
CRD's property order, where reading order differs from class order) and
`check_spec()` (the Python twin of its rules, run by `parse` only, for types
that code also builds from other sources).

Why dataclasses with field metadata and not pydantic: the controller parses
policies and runs in the simulator and the benchmark, and gains no runtime
dependency this way (this module needs only the standard library); the CRD
needs Kubernetes' structural-schema subset (no `$ref`, `x-kubernetes-*`
extensions, CEL `x-kubernetes-validations`), which pydantic's JSON Schema
would have to be rewritten into anyway; and the field-path messages users
already read (`spec.knobs.maxConcurrency: ...`) stay exactly as they are.

The API server prunes `null` from fields that are not nullable (none here is)
before it stores a spec, so `parse` reads `null` as absent too: the operator
accepts what the API server would have stored.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from enum import Enum
from typing import Any, TypeVar

from batchpilot.contract.errors import FieldError

T = TypeVar("T")

_METADATA_KEY = "batchpilot.wire"


class PolicyError(FieldError):
    """The policy is invalid; `field` is the spec path of the offending key."""


@dataclass(frozen=True, slots=True)
class Rule:
    """A CEL rule the API server checks (`x-kubernetes-validations`), with its answer."""

    rule: str
    message: str
    # Where the API server points the error, relative to the node (".min").
    field_path: str | None = None

    def schema(self) -> dict[str, str]:
        node = {"rule": self.rule, "message": self.message}
        if self.field_path:
            node["fieldPath"] = self.field_path
        return node


@dataclass(frozen=True, slots=True)
class Wire:
    """One field's contract; every constraint is also what `parse` enforces."""

    description: str = ""
    # camelCase name in the spec; None: the field name in camelCase.
    name: str | None = None
    # For a field without a default: the end of its "required: ..." message.
    required: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    min_length: int | None = None
    max_length: int | None = None
    # An ECMA regex, as the API server reads it (anchor it with ^ and $).
    pattern: str | None = None
    # Allowed values of a str field (an Enum-typed field lists its members).
    enum: tuple[str, ...] | None = None
    min_items: int | None = None
    max_items: int | None = None
    max_properties: int | None = None
    # The contract of a list's items or a map's values, when they are scalars.
    item: Wire | None = None
    # State the default in the CRD, so the API server stores it in every policy.
    publish_default: bool = False
    # The CRD's type where it is narrower than the Python type's: whole
    # seconds on the wire, fractions where the simulator builds the value.
    schema_type: str | None = None
    # Replaces the complaints about this field's type, range or pattern (not
    # its length): a format string of `value`.
    invalid: str | None = None
    # Appended to the standard complaints: how to find the right value.
    fix: str = ""
    # Further schema keys, as written (`x-kubernetes-list-type: set`).
    extra: Mapping[str, Any] = field(default_factory=dict)
    # CEL rules on this field's node; a callable where a rule needs names its
    # module cannot import when the class is defined.
    rules: tuple[Rule, ...] | Callable[[], tuple[Rule, ...]] = ()


def wired(
    description: str, *, default: Any = MISSING, default_factory: Any = MISSING, **contract: Any
) -> Any:
    """A dataclass field with its wire contract (see `Wire`)."""
    metadata = {_METADATA_KEY: Wire(description, **contract)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


# -- the shape of a field, read from its type ---------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """What a field holds, read from its type annotation."""

    # boolean | integer | number | string | enum | object | array | map | pairs
    kind: str
    # The Enum or dataclass (enum, object); the collection type (array).
    target: Any = None
    item: Shape | None = None
    optional: bool = False


_SCALARS: Mapping[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def shape_of(hint: Any) -> Shape:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in args if arg is not type(None)]
        return replace(shape_of(inner), optional=True)
    if hint in _SCALARS:
        return Shape(_SCALARS[hint])
    if isinstance(hint, type) and issubclass(hint, Enum):
        return Shape("enum", hint)
    if isinstance(hint, type) and is_dataclass(hint):
        return Shape("object", hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        # tuple[tuple[str, str], ...]: a map kept as sorted pairs, so that the
        # value stays hashable.
        if typing.get_origin(args[0]) is tuple:
            return Shape("pairs", item=Shape("string"))
        return Shape("array", tuple, shape_of(args[0]))
    if origin is frozenset:
        return Shape("array", frozenset, shape_of(args[0]))
    if origin in (Mapping, dict):
        return Shape("map", item=shape_of(args[1]))
    raise TypeError(f"no wire form for {hint!r}")


@dataclass(frozen=True, slots=True)
class WireField:
    """One wired field of a typed document: attribute, wire name, contract, shape."""

    attr: str
    name: str
    wire: Wire
    shape: Shape
    required: bool
    default: Any


_WIRE_FIELDS: dict[type, tuple[WireField, ...]] = {}


def wire_fields(cls: type) -> tuple[WireField, ...]:
    """The wired fields of a typed document, in class order (read once per class)."""
    if cls not in _WIRE_FIELDS:
        _WIRE_FIELDS[cls] = _read_wire_fields(cls)
    return _WIRE_FIELDS[cls]


def _read_wire_fields(cls: type) -> tuple[WireField, ...]:
    hints = typing.get_type_hints(cls)
    found = []
    for spec_field in fields(cls):
        wire = spec_field.metadata.get(_METADATA_KEY)
        if wire is None:
            continue
        required = spec_field.default is MISSING and spec_field.default_factory is MISSING
        found.append(
            WireField(
                spec_field.name,
                wire.name or camel(spec_field.name),
                wire,
                shape_of(hints[spec_field.name]),
                required,
                spec_field.default,
            )
        )
    return tuple(found)


# -- checking and parsing -----------------------------------------------------


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _scalar_problem(shape: Shape, wire: Wire, value: Any) -> str | None:
    """What is wrong with a scalar, in the words of its contract; None when nothing is."""
    kind = shape.kind
    allowed = [member.value for member in shape.target] if kind == "enum" else wire.enum
    problem = None
    if kind == "boolean" and not isinstance(value, bool):
        problem = f"must be true or false, got {value!r}"
    # bool is an int subclass; `true` for a token count is a mistake, not 1.
    elif kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        problem = f"must be an integer, got {value!r}"
    elif kind == "number" and (
        isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
    ):
        problem = f"must be a number, got {value!r}"
    elif kind == "string" and not isinstance(value, str):
        problem = f"must be a string, got {value!r}"
    elif allowed is not None and value not in allowed:
        problem = f"{value!r} is not one of {', '.join(allowed)}"
    elif kind in ("integer", "number"):
        problem = _range_problem(wire, value)
    elif kind == "string":
        # About size, not form: the field's own complaint (`invalid`) would mislead.
        if wire.min_length is not None and len(value) < wire.min_length:
            return (
                "must not be empty"
                if wire.min_length == 1
                else f"must be at least {wire.min_length} characters"
            )
        if wire.max_length is not None and len(value) > wire.max_length:
            return f"must be at most {wire.max_length} characters, got {len(value)}"
        # ECMA's `$` matches only at the very end; Python's also before a final newline.
        if wire.pattern is not None and not re.search(re.sub(r"\$$", r"\\Z", wire.pattern), value):
            problem = f"{value!r} does not match {wire.pattern}"
    return None if problem is None else _complaint(wire, value, problem)


def _range_problem(wire: Wire, value: float) -> str | None:
    low, high = wire.minimum, wire.maximum
    below = low is not None and (value <= low if wire.exclusive_minimum else value < low)
    above = high is not None and (value >= high if wire.exclusive_maximum else value > high)
    if not (below or above):
        return None
    if low is not None and high is not None:
        return f"must be between {_number(low)} and {_number(high)}, got {_number(value)}"
    if low is not None:
        return f"must be {'above' if wire.exclusive_minimum else 'at least'} {_number(low)}, got {_number(value)}"
    assert high is not None
    return f"must be {'below' if wire.exclusive_maximum else 'at most'} {_number(high)}, got {_number(value)}"


def _complaint(wire: Wire, value: Any, problem: str) -> str:
    if wire.invalid is not None:
        return wire.invalid.format(value=value)
    return f"{problem}; {wire.fix}" if wire.fix else problem


def _convert(shape: Shape, wire: Wire, value: Any, where: str, *, parse_objects: bool) -> Any:
    """`value` checked against its contract; objects parsed (or, built in code, type-checked)."""
    kind = shape.kind
    if kind == "object":
        if parse_objects:
            return parse(shape.target, value, where)
        if not isinstance(value, shape.target):
            raise PolicyError(
                where, f"expected {shape.target.__name__}, got {type(value).__name__}"
            )
        return value
    if kind in ("array", "map", "pairs"):
        return _convert_collection(shape, wire, value, where, parse_objects=parse_objects)
    problem = _scalar_problem(shape, wire, value)
    if problem is not None:
        raise PolicyError(where, problem)
    return shape.target(value) if kind == "enum" else value


def _convert_collection(
    shape: Shape, wire: Wire, value: Any, where: str, *, parse_objects: bool
) -> Any:
    assert shape.item is not None
    item_wire = wire.item or Wire()
    if shape.kind == "array":
        if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
            problem = f"must be a list, got {type(value).__name__}"
        elif wire.min_items is not None and len(value) < wire.min_items:
            problem = (
                "must be a non-empty list"
                if wire.min_items == 1
                else f"must have at least {wire.min_items} items"
            )
        elif wire.max_items is not None and len(value) > wire.max_items:
            problem = f"must have at most {wire.max_items} items, got {len(value)}"
        else:
            # An object item is named by its index; a bad scalar is named in the message.
            nested = shape.item.kind == "object"
            return shape.target(
                _convert(
                    shape.item,
                    item_wire,
                    item,
                    f"{where}[{index}]" if nested else where,
                    parse_objects=parse_objects,
                )
                for index, item in enumerate(value)
            )
        raise PolicyError(where, _complaint(wire, value, problem))
    # A map, or a map kept as pairs (already pairs when built in code).
    entries: Iterable[tuple[Any, Any]]
    if isinstance(value, Mapping):
        entries = value.items()
    elif shape.kind == "pairs" and isinstance(value, tuple):
        entries = value
    else:
        raise PolicyError(where, f"expected an object, got {type(value).__name__}")
    if wire.max_properties is not None and len(value) > wire.max_properties:
        raise PolicyError(where, f"must have at most {wire.max_properties} keys, got {len(value)}")
    converted = {
        key: _convert(shape.item, item_wire, item, f"{where}.{key}", parse_objects=parse_objects)
        for key, item in entries
    }
    return tuple(sorted(converted.items())) if shape.kind == "pairs" else converted


def parse(cls: type[T], raw: Any, path: str) -> T:
    """The typed document `cls` from its wire form; errors name the path under `path`."""
    if not isinstance(raw, Mapping):
        raise PolicyError(path, f"expected an object, got {type(raw).__name__}")
    spec_fields = wire_fields(cls)
    known = sorted(spec_field.name for spec_field in spec_fields)
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        raise PolicyError(
            f"{path}.{unknown[0]}", f"unknown field; known fields are {', '.join(known)}"
        )
    values: dict[str, Any] = {}
    for spec_field in spec_fields:
        where = f"{path}.{spec_field.name}"
        value = raw.get(spec_field.name)
        # An empty name is no name: "required" says what to write.
        missing = value is None or (value == "" and bool(spec_field.wire.min_length))
        if missing and spec_field.required:
            hint = spec_field.wire.required
            raise PolicyError(where, f"required: {hint}" if hint else "required")
        if value is not None:
            values[spec_field.attr] = _convert(
                spec_field.shape, spec_field.wire, value, where, parse_objects=True
            )
    document = prefixed(path, lambda: cls(**values))
    check_spec = getattr(document, "check_spec", None)
    if check_spec is not None:
        prefixed(path, check_spec)
    return document


def check_fields(document: Any) -> None:
    """Check a document built in code as `parse` checks a spec; call from `__post_init__`.

    Errors name the field relative to the document (`ttftMs`); `parse` puts
    the path in front. An Enum field given as its value becomes the member.
    """
    for spec_field in wire_fields(type(document)):
        value = getattr(document, spec_field.attr)
        if value is None and spec_field.shape.optional:
            continue
        converted = _convert(
            spec_field.shape, spec_field.wire, value, spec_field.name, parse_objects=False
        )
        if spec_field.shape.kind == "enum" and converted is not value:
            object.__setattr__(document, spec_field.attr, converted)


def prefixed(path: str, build: Callable[[], T]) -> T:
    """Run a constructor or check; put `path` in front of the field its PolicyError names."""
    try:
        return build()
    except PolicyError as err:
        raise PolicyError(f"{path}.{err.field}" if err.field else path, err.message) from None
