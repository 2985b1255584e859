"""One builder for the InferencePolicy specs tests write: a valid spec, plus what the test changes.

Keys are the spec's own camelCase names; a value of None removes the field.

    policy_spec()                                      # app=chat pods, TTFT 2 s, TPOT 50 ms
    policy_spec(mode="Auto", actuation={...})          # top-level fields replaced
    policy_spec(selector=None, targetRef={...})        # a workload instead of a selector
    controller_spec(knobs={...})                       # the controller's part: no selector
    with_field(policy_spec(), "slo.percentile", 100)   # one nested value, on a copy
    policy_body("chat", policy_spec())                 # the whole InferencePolicy object
"""

from __future__ import annotations

import copy
from typing import Any

API_VERSION = "batchpilot.dev/v1alpha1"
SELECTOR = {"matchLabels": {"app": "chat"}}
SLO = {"ttftMs": 2000, "tpotMs": 50}


def controller_spec(**fields: Any) -> dict[str, Any]:
    """The controller's part of a spec (`Policy.from_spec`): an SLO, plus `fields`."""
    return _with_fields({"slo": SLO}, fields)


def policy_spec(**fields: Any) -> dict[str, Any]:
    """A whole spec the operator accepts: a selector and an SLO, plus `fields`."""
    return _with_fields({"selector": SELECTOR, "slo": SLO}, fields)


def with_field(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `spec` with the dotted `path` (`knobs.maxConcurrency.max`) set to `value`."""
    changed = copy.deepcopy(spec)
    node = changed
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return changed


def policy_body(name: str, spec: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    """The InferencePolicy object around `spec`, as the API server takes it."""
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {
        "apiVersion": API_VERSION,
        "kind": "InferencePolicy",
        "metadata": metadata,
        "spec": spec,
    }


def _with_fields(base: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(base)
    for key, value in fields.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = copy.deepcopy(value)
    return spec
