"""The CRD's OpenAPI schema of a typed document (contract/schema.py).

Kubernetes' structural-schema subset: every node typed, objects with
`properties` or `additionalProperties`, never both, no `$ref`; CEL rules as
`x-kubernetes-validations`, other extensions as each field states them.
"""

from __future__ import annotations

from dataclasses import MISSING
from enum import Enum
from typing import Any

from batchpilot.contract.schema import Rule, Shape, Wire, wire_fields

_TYPES = {
    "boolean": "boolean", "integer": "integer", "number": "number", "string": "string",
    "enum": "string", "array": "array", "map": "object", "pairs": "object",
}  # fmt: skip
# Wire attribute -> schema key, for the limits of a node.
_LIMITS = (
    ("minimum", "minimum"), ("exclusive_minimum", "exclusiveMinimum"),
    ("maximum", "maximum"), ("exclusive_maximum", "exclusiveMaximum"),
    ("min_length", "minLength"), ("max_length", "maxLength"), ("pattern", "pattern"),
    ("min_items", "minItems"), ("max_items", "maxItems"), ("max_properties", "maxProperties"),
)  # fmt: skip
# Key order of a node: what it is, its limits, then its children.
_KEY_ORDER = (
    "type", "description", "enum", *(key for _, key in _LIMITS), "default",
    "x-kubernetes-map-type", "x-kubernetes-list-type", "required", "x-kubernetes-validations",
    "properties", "additionalProperties", "items",
)  # fmt: skip


def object_schema(cls: type, description: str = "") -> dict[str, Any]:
    """The schema of a typed document, as the CRD states it."""
    spec_fields = list(wire_fields(cls))
    # A document may list its fields in reading order rather than class order.
    order: tuple[str, ...] = getattr(cls, "WIRE_ORDER", ())
    if order:
        spec_fields.sort(key=lambda spec_field: order.index(spec_field.name))
    node: dict[str, Any] = {"type": "object"}
    if description:
        node["description"] = description
    required = [spec_field.name for spec_field in spec_fields if spec_field.required]
    if required:
        node["required"] = required
    rules: tuple[Rule, ...] = getattr(cls, "RULES", ())
    if rules:
        node["x-kubernetes-validations"] = [rule.schema() for rule in rules]
    node["properties"] = {
        spec_field.name: _node(
            spec_field.shape,
            spec_field.wire,
            spec_field.default if spec_field.wire.publish_default else MISSING,
        )
        for spec_field in spec_fields
    }
    return node


def _node(shape: Shape, wire: Wire, default: Any = MISSING) -> dict[str, Any]:
    if shape.kind == "object":
        node = object_schema(shape.target, wire.description)
    else:
        node = {"type": wire.schema_type or _TYPES[shape.kind]}
        if wire.description:
            node["description"] = wire.description
    if shape.kind == "enum":
        node["enum"] = [member.value for member in shape.target]
    elif wire.enum is not None:
        node["enum"] = list(wire.enum)
    for attr, key in _LIMITS:
        value = getattr(wire, attr)
        if value is not None and value is not False:
            node[key] = _plain(value)
    if default is not MISSING:
        node["default"] = default.value if isinstance(default, Enum) else default
    node.update(wire.extra)
    rules = wire.rules() if callable(wire.rules) else wire.rules
    if rules:
        node["x-kubernetes-validations"] = [
            *node.get("x-kubernetes-validations", []),
            *(rule.schema() for rule in rules),
        ]
    if shape.item is not None:
        children = "items" if shape.kind == "array" else "additionalProperties"
        node[children] = _node(shape.item, wire.item or Wire())
    rank = {key: index for index, key in enumerate(_KEY_ORDER)}
    return {key: node[key] for key in sorted(node, key=lambda key: rank.get(key, len(rank)))}


def _plain(value: Any) -> Any:
    """1000, not 1000.0: limits read as the exact values they are."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
