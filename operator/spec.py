"""InferencePolicy spec -> typed values, in ONE function: `parse_policy`.

The spec is declared once, as typed documents (contract/schema.py): the
controller's part in controller/spec.py (`ControllerSpec`), and here what
only the operator needs: which pods (`selector` or `targetRef`) and how to
reach their gates (`actuation`). `InferencePolicySpec` is the whole spec: the
CRD's schema is generated from it (operator/crd.py, scripts/gen-crd) and
`parse_policy` parses with it, so each field has one contract and every error
is a `PolicyError` naming the spec path.

The CRD schema and its CEL rules reject almost every bad spec before the
operator sees it; the checks here still run because a spec can come from an
older CRD, or from a test, and because some facts (which endpoints exist)
only the operator knows. CEL does not run here, so each rule has a Python
twin: a document's `check_spec` next to the rule, or in `parse_policy` where
it needs the derived `Policy`.
"""

# `wired` is dataclasses.field with a wire contract; ruff knows only `field` as safe.

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from batchpilot.contract.schema import PolicyError, Rule, Wire, parse, wired
from batchpilot.controller.policy import Mode, Policy
from batchpilot.controller.spec import CLASS_SLO_RULES, ControllerSpec, EngineSpec

if TYPE_CHECKING:
    # Type-only: config.py reads label selectors through shard.py, which imports this module.
    from batchpilot.operator.config import OperatorConfig

_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
DEFAULT_ADMIN_PORT = 9090
DEFAULT_TOKEN_KEY = "token"
_VALUES_RULE = "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist"


@dataclass(frozen=True, slots=True)
class Requirement:
    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : "
            "(!has(self.values) || size(self.values) == 0)",
            _VALUES_RULE,
        ),
    )

    key: str = wired("The label key.", required="the label key", min_length=1, max_length=317)
    operator: str = wired(
        "How the key relates to the values.",
        required=f"one of {', '.join(_SELECTOR_OPERATORS)}",
        enum=_SELECTOR_OPERATORS,
    )
    values: frozenset[str] = wired(
        "Label values (for In and NotIn).",
        default=frozenset(),
        max_items=64,
        item=Wire(max_length=63),
    )

    def check_spec(self) -> None:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise PolicyError("values", _VALUES_RULE.removeprefix("values "))

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        present = self.key in labels and labels[self.key] in self.values
        return present if self.operator == "In" else not present


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A Kubernetes label selector, evaluated as the API server does.

    Built from a spec (checked) or from a workload's own selector (kube.py,
    which the API server checked).
    """

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "(has(self.matchLabels) && size(self.matchLabels) > 0) || "
            "(has(self.matchExpressions) && size(self.matchExpressions) > 0)",
            "spec.selector must have matchLabels or matchExpressions; an empty selector would "
            "select every pod in the namespace",
        ),
    )

    match_labels: Mapping[str, str] = wired(
        "Labels every selected pod carries (key equals value).",
        default_factory=dict,
        max_properties=32,
        item=Wire(max_length=63),
    )
    requirements: tuple[Requirement, ...] = wired(
        "Label requirements, all of which a selected pod meets.",
        name="matchExpressions",
        default=(),
        max_items=16,
    )

    def check_spec(self) -> None:
        if self.empty:
            raise PolicyError(
                "",
                "must have matchLabels or matchExpressions; an empty selector would select every pod",
            )

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.requirements
        )

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.requirements


@dataclass(frozen=True, slots=True)
class WorkloadRef:
    kind: str = wired(
        "Kind of the workload.", required=" or ".join(WORKLOAD_KINDS), enum=WORKLOAD_KINDS
    )
    name: str = wired(
        "Name of the workload.", required="the name of the workload", min_length=1, max_length=253
    )


@dataclass(frozen=True, slots=True)
class SecretRef:
    name: str = wired(
        "Name of the Secret.", required="the name of the Secret", min_length=1, max_length=253
    )
    key: str = wired(
        "Key in the Secret's data that holds the token.",
        default=DEFAULT_TOKEN_KEY,
        min_length=1,
        max_length=253,
        publish_default=True,
    )


@dataclass(frozen=True, slots=True)
class Actuation:
    admin_port: int = wired(
        "The gate's admin port on the pod (PUT/GET /config).",
        default=DEFAULT_ADMIN_PORT,
        minimum=1,
        maximum=65535,
        publish_default=True,
        invalid="must be a port number 1-65535, got {value!r}",
    )
    token_secret: SecretRef | None = wired(
        "Secret in this namespace holding the gate's admin bearer token; read only for this policy.",
        name="tokenSecretRef",
        default=None,
    )
    # The gates run an engine-native adapter: engine-internal knobs reach the engine.
    native: bool = wired(
        "The pods' gates run an engine-native adapter (batchpilot gate --native), so "
        "engine-internal knobs such as the prefill budget are steered too; default false.",
        default=False,
    )


_ENGINE_SEQS = EngineSpec().max_num_seqs
_AUTO_NEEDS_TOKEN = (
    "required when spec.mode is Auto: the gate refuses configuration writes without its admin token"
)


@dataclass(frozen=True, slots=True)
class InferencePolicySpec(ControllerSpec):
    """An InferencePolicy's whole `spec`: the controller's part, which pods, how to reach their gates."""

    # The CRD (and docs/api.md) list what to steer first, then how.
    WIRE_ORDER: ClassVar[tuple[str, ...]] = (
        "selector", "targetRef", "engine", "actuation", "metrics", "slo", "classes", "knobs",
        "behavior", "mode",
    )  # fmt: skip
    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "has(self.selector) != has(self.targetRef)",
            "set exactly one of spec.selector (a label selector of the serving pods) or "
            "spec.targetRef (the Deployment or StatefulSet that runs them)",
        ),
        Rule(
            "!has(self.knobs) || !has(self.knobs.maxNumBatchedTokens) || (has(self.engine) && "
            "has(self.engine.runtimeTunable) && self.engine.runtimeTunable)",
            "spec.knobs.maxNumBatchedTokens needs spec.engine.runtimeTunable: true; engines without "
            "a live prefill-budget API keep their startup value",
            ".knobs.maxNumBatchedTokens",
        ),
        Rule(
            "!has(self.knobs) || !has(self.knobs.maxNumBatchedTokens) || (has(self.actuation) && "
            "has(self.actuation.native) && self.actuation.native)",
            "spec.knobs.maxNumBatchedTokens needs spec.actuation.native: true; only the gate's "
            "native adapter passes the prefill budget on to the engine",
            ".knobs.maxNumBatchedTokens",
        ),
        Rule(
            "!has(self.knobs) || !has(self.knobs.maxConcurrency) || "
            "!has(self.knobs.maxConcurrency.max) || self.knobs.maxConcurrency.max <= "
            f"(has(self.engine) && has(self.engine.maxNumSeqs) ? self.engine.maxNumSeqs : {_ENGINE_SEQS})",
            f"spec.knobs.maxConcurrency.max is above spec.engine.maxNumSeqs (default {_ENGINE_SEQS}), "
            "which the engine cannot run; after restarting the engine with more sequences, raise "
            "spec.engine.maxNumSeqs in the same edit",
            ".knobs.maxConcurrency.max",
        ),
        Rule(
            "self.mode != 'Auto' || (has(self.actuation) && has(self.actuation.tokenSecretRef))",
            f"spec.actuation.tokenSecretRef is {_AUTO_NEEDS_TOKEN}",
            ".mode",
        ),
        # spec.classes' rules that read spec.slo (controller/spec.py).
        *CLASS_SLO_RULES,
    )

    selector: LabelSelector | None = wired(
        "Label selector of the serving pods, in this namespace. Set this or targetRef, not both.",
        default=None,
        extra={"x-kubernetes-map-type": "atomic"},
    )
    target_ref: WorkloadRef | None = wired(
        "The Deployment or StatefulSet whose pod selector picks the serving pods, in this "
        "namespace. batchpilot reads it and never edits it.",
        name="targetRef",
        default=None,
    )
    actuation: Actuation = wired(
        "How settings reach each pod's gate (mode Auto only).", default_factory=Actuation
    )

    def check_spec(self) -> None:
        """The Python twins of the CEL rules above that read the spec alone."""
        # Dataclasses with slots take no zero-argument super().
        ControllerSpec.check_spec(self)
        if (self.selector is None) == (self.target_ref is None):
            raise PolicyError("", "set exactly one of spec.selector or spec.targetRef")
        if self.mode is Mode.AUTO and self.actuation.token_secret is None:
            raise PolicyError("actuation.tokenSecretRef", _AUTO_NEEDS_TOKEN)
        cap = self.knobs.max_concurrency if self.knobs is not None else None
        if cap is not None and cap.max is not None and cap.max > self.engine.max_num_seqs:
            # A bound above the engine's declared ceiling would have the gate
            # admit what the engine can only queue; the CRD's CEL rule says so
            # on apply, this catches policies stored before that rule.
            raise PolicyError(
                "knobs.maxConcurrency.max",
                f"{cap.max} is above spec.engine.maxNumSeqs ({self.engine.max_num_seqs}), "
                "which the engine cannot run; after restarting the engine with more sequences, "
                "raise spec.engine.maxNumSeqs in the same edit",
            )


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


ENDPOINT_FIELD = "spec.metrics.endpoint"


def parse_policy(
    spec: Mapping[str, Any], *, name: str, namespace: str, config: OperatorConfig
) -> PolicySpec:
    """The one spec -> typed conversion; raises PolicyError naming the spec path."""
    configured = f"configured endpoints: {', '.join(sorted(config.prometheus))}"
    try:
        document = parse(InferencePolicySpec, spec, "spec")
    except PolicyError as err:
        # Only the operator knows which endpoint names exist: the fix is one of them.
        if err.field == ENDPOINT_FIELD:
            raise PolicyError(err.field, f"{err.message}; {configured}") from err
        raise
    policy = Policy.from_document(document, name=name, namespace=namespace)
    endpoint = document.metrics.endpoint
    url = config.endpoint_url(endpoint)
    if url is None:
        raise PolicyError(
            ENDPOINT_FIELD,
            f"{endpoint!r} is not a Prometheus endpoint of this operator; {configured}",
        )
    # Stricter than its CEL twin: without `knobs`, a runtimeTunable engine's
    # prefill budget is steered by default too.
    if policy.steers("max_num_batched_tokens") and not document.actuation.native:
        raise PolicyError(
            "spec.knobs.maxNumBatchedTokens",
            "needs spec.actuation.native: true; only the gate's native adapter passes the "
            "prefill budget on to the engine",
        )
    return PolicySpec(
        policy, document.selector, document.target_ref, document.actuation, endpoint, url
    )


def parse_selector(raw: Any) -> LabelSelector:
    """`spec.selector` alone, read as parse_policy reads it."""
    return parse(LabelSelector, raw, "spec.selector")


def parse_workload(raw: Any) -> WorkloadRef:
    """`spec.targetRef` alone, read as parse_policy reads it."""
    return parse(WorkloadRef, raw, "spec.targetRef")
