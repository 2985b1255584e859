"""Knobs from the pod's annotations, as the kubelet writes them to a Downward API volume.

The operator records what it applied in the pod annotation
`batchpilot.dev/knobs` (JSON). Mounted as a Downward API file, that
annotation is also a fallback way to reach the gate when its admin API is
not reachable. The file holds one `key="value"` line per annotation, the
value quoted like a Go string literal; JSON string syntax reads it for
every value this annotation can hold (printable text, `\\"`, `\\\\`, `\\n`).
"""

from __future__ import annotations

import json

from batchpilot.contract.gate_api import KNOBS_ANNOTATION
from batchpilot.contract.knobs import KnobError, Knobs


class AnnotationError(ValueError):
    """The annotations file or the knobs annotation in it is malformed."""


def parse_annotations(text: str) -> dict[str, str]:
    """Parse a Downward API annotations file into {key: value}."""
    annotations: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, quoted = line.partition("=")
        if not sep or len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
            raise AnnotationError(f'line {number}: expected key="value", got {line[:80]!r}')
        try:
            annotations[key] = json.loads(quoted)
        except json.JSONDecodeError as err:
            raise AnnotationError(
                f"line {number}: value of {key} is not a quoted string ({err.msg})"
            ) from err
    return annotations


def knobs_from_annotations(text: str) -> Knobs | None:
    """The knobs in the `batchpilot.dev/knobs` annotation; None when it is absent."""
    raw = parse_annotations(text).get(KNOBS_ANNOTATION)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{KNOBS_ANNOTATION} is not valid JSON ({err.msg})") from err
    try:
        return Knobs.from_mapping(data)
    except KnobError as err:
        raise AnnotationError(f"{KNOBS_ANNOTATION}: {err}") from err
