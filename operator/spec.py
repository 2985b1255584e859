"""InferencePolicy spec -> typed values, in ONE function: `parse_policy`.

The spec is the controller's `Policy` spec (controller/policy.py,
`Policy.from_spec`) plus what only the operator needs: which pods
(`selector` or `targetRef`), how to reach their gates (`actuation`) and which
configured Prometheus to ask (`metrics.endpoint`). `parse_policy` splits the
two, hands the controller's part to `Policy.from_spec` unchanged and checks
the operator's part here, so there is one validation path per field and
every error is a `PolicyError` naming the spec path.

The CRD schema and its CEL rules reject almost every bad spec before the
operator sees it; the checks here still run because a spec can come from an
older CRD, or from a test, and because some facts (which endpoints exist)
only the operator knows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchpilot.controller.policy import Mode, Policy, PolicyError
from batchpilot.operator.config import OperatorConfig

# The spec fields only the operator reads; the rest is the controller's.
_OPERATOR_FIELDS = ("selector", "targetRef", "actuation")
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
DEFAULT_ADMIN_PORT = 9090
DEFAULT_TOKEN_KEY = "token"
DEFAULT_ENDPOINT = "default"


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        present = self.key in labels and labels[self.key] in self.values
        return present if self.operator == "In" else not present


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A Kubernetes label selector, evaluated as the API server does."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.requirements
        )

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.requirements


@dataclass(frozen=True, slots=True)
class WorkloadRef:
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class SecretRef:
    name: str
    key: str = DEFAULT_TOKEN_KEY


@dataclass(frozen=True, slots=True)
class Actuation:
    admin_port: int = DEFAULT_ADMIN_PORT
    token_secret: SecretRef | None = None
    # The gates run an engine-native adapter: engine-internal knobs reach the engine.
    native: bool = False


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """Everything one InferencePolicy asks of the operator."""

    policy: Policy
    # Exactly one of selector / workload.
    selector: LabelSelector | None
    workload: WorkloadRef | None
    actuation: Actuation
    endpoint: str
    prometheus_url: str

    @property
    def mode(self) -> Mode:
        return self.policy.mode


def parse_policy(
    spec: Mapping[str, Any], *, name: str, namespace: str, config: OperatorConfig
) -> PolicySpec:
    """The one spec -> typed conversion; raises PolicyError naming the spec path."""
    if not isinstance(spec, Mapping):
        raise PolicyError("spec", f"expected an object, got {type(spec).__name__}")
    controller_spec = {key: value for key, value in spec.items() if key not in _OPERATOR_FIELDS}
    metrics = dict(spec.get("metrics") or {})
    endpoint = metrics.pop("endpoint", DEFAULT_ENDPOINT)
    if "metrics" in spec:
        controller_spec["metrics"] = metrics
    policy = Policy.from_spec(controller_spec, name=name, namespace=namespace)

    url = config.endpoint_url(endpoint) if isinstance(endpoint, str) else None
    if url is None:
        raise PolicyError(
            "spec.metrics.endpoint",
            f"{endpoint!r} is not a Prometheus endpoint of this operator; "
            f"configured endpoints: {', '.join(sorted(config.prometheus))}",
        )
    has_selector, has_target = "selector" in spec, "targetRef" in spec
    if has_selector == has_target:
        raise PolicyError("spec", "set exactly one of spec.selector or spec.targetRef")
    selector = _selector(spec["selector"]) if has_selector else None
    workload = _workload(spec["targetRef"]) if has_target else None
    actuation = _actuation(spec.get("actuation") or {})
    if policy.mode is Mode.AUTO and actuation.token_secret is None:
        raise PolicyError(
            "spec.actuation.tokenSecretRef",
            "required when spec.mode is Auto: the gate refuses configuration writes without its admin token",
        )
    cap = policy.bounds.get("max_concurrency")
    if cap is not None and cap.high is not None and cap.high > policy.engine.max_num_seqs:
        # A bound above the engine's declared ceiling would have the gate
        # admit what the engine can only queue; the CRD's CEL rule says so
        # on apply, this catches policies stored before that rule.
        raise PolicyError(
            "spec.knobs.maxConcurrency.max",
            f"{cap.high} is above spec.engine.maxNumSeqs ({policy.engine.max_num_seqs}), "
            "which the engine cannot run; after restarting the engine with more sequences, "
            "raise spec.engine.maxNumSeqs in the same edit",
        )
    if policy.steers("max_num_batched_tokens") and not actuation.native:
        raise PolicyError(
            "spec.knobs.maxNumBatchedTokens",
            "needs spec.actuation.native: true; only the gate's native adapter passes the "
            "prefill budget on to the engine",
        )
    return PolicySpec(policy, selector, workload, actuation, endpoint, url)


def _selector(raw: Any) -> LabelSelector:
    where = "spec.selector"
    _expect_mapping(where, raw)
    labels = raw.get("matchLabels") or {}
    _expect_mapping(f"{where}.matchLabels", labels)
    requirements = []
    for index, entry in enumerate(raw.get("matchExpressions") or []):
        item = f"{where}.matchExpressions[{index}]"
        _expect_mapping(item, entry)
        operator = entry.get("operator")
        if operator not in _SELECTOR_OPERATORS:
            raise PolicyError(
                f"{item}.operator", f"{operator!r} is not one of {', '.join(_SELECTOR_OPERATORS)}"
            )
        values = frozenset(entry.get("values") or ())
        if (operator in ("In", "NotIn")) != bool(values):
            raise PolicyError(
                f"{item}.values",
                "must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
            )
        requirements.append(Requirement(str(entry.get("key", "")), operator, values))
    selector = LabelSelector({str(k): str(v) for k, v in labels.items()}, tuple(requirements))
    if selector.empty:
        raise PolicyError(
            where,
            "must have matchLabels or matchExpressions; an empty selector would select every pod",
        )
    return selector


def _workload(raw: Any) -> WorkloadRef:
    _expect_mapping("spec.targetRef", raw)
    kind, name = raw.get("kind"), raw.get("name")
    if kind not in WORKLOAD_KINDS:
        raise PolicyError(
            "spec.targetRef.kind", f"{kind!r} is not one of {', '.join(WORKLOAD_KINDS)}"
        )
    if not isinstance(name, str) or not name:
        raise PolicyError("spec.targetRef.name", "required: the name of the workload")
    return WorkloadRef(kind, name)


def _actuation(raw: Any) -> Actuation:
    _expect_mapping("spec.actuation", raw)
    port = raw.get("adminPort", DEFAULT_ADMIN_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PolicyError(
            "spec.actuation.adminPort", f"must be a port number 1-65535, got {port!r}"
        )
    secret = None
    if "tokenSecretRef" in raw:
        ref = raw["tokenSecretRef"]
        _expect_mapping("spec.actuation.tokenSecretRef", ref)
        if not isinstance(ref.get("name"), str) or not ref["name"]:
            raise PolicyError(
                "spec.actuation.tokenSecretRef.name", "required: the name of the Secret"
            )
        secret = SecretRef(ref["name"], str(ref.get("key") or DEFAULT_TOKEN_KEY))
    native = raw.get("native", False)
    if not isinstance(native, bool):
        raise PolicyError("spec.actuation.native", f"must be true or false, got {native!r}")
    return Actuation(port, secret, native)


def _expect_mapping(where: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise PolicyError(where, f"expected an object, got {type(value).__name__}")
