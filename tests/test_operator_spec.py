"""InferencePolicy spec -> PolicySpec (operator/spec.py): the one conversion, table-driven."""

from __future__ import annotations

from typing import Any

import pytest
from policyspec import policy_spec, with_field

from batchpilot.controller.policy import EngineKind, Mode, PolicyError
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.spec import (
    LabelSelector,
    Requirement,
    SecretRef,
    WorkloadRef,
    parse_policy,
    parse_selector,
    parse_workload,
)

CONFIG = OperatorConfig(prometheus={"default": "http://prom:9090", "thanos": "http://thanos:9090"})


def parse(spec: dict[str, Any]) -> Any:
    return parse_policy(spec, name="chat", namespace="serving", config=CONFIG)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            policy_spec(),
            {
                "selector": LabelSelector({"app": "chat"}),
                "workload": None,
                "endpoint": "default",
                "url": "http://prom:9090",
                "mode": Mode.RECOMMEND,
                "admin_port": 9090,
                "token": None,
                "native": False,
                "engine": EngineKind.VLLM,
            },
            id="minimal-defaults",
        ),
        pytest.param(
            policy_spec(
                selector=None,
                targetRef={"kind": "StatefulSet", "name": "llama"},
                slo={"ttftMs": 800, "tpotMs": 30, "percentile": 95},
                engine={"kind": "sglang", "maxNumSeqs": 128, "runtimeTunable": True},
                actuation={"adminPort": 9999, "tokenSecretRef": {"name": "tok"}, "native": True},
                metrics={"endpoint": "thanos", "windowSeconds": 120},
                knobs={"maxNumBatchedTokens": {"min": 1024}},
                mode="Auto",
            ),
            {
                "selector": None,
                "workload": WorkloadRef("StatefulSet", "llama"),
                "endpoint": "thanos",
                "url": "http://thanos:9090",
                "mode": Mode.AUTO,
                "admin_port": 9999,
                "token": SecretRef("tok", "token"),
                "native": True,
                "engine": EngineKind.SGLANG,
            },
            id="workload-auto-native",
        ),
    ],
)
def test_valid_specs(spec: dict[str, Any], expected: dict[str, Any]) -> None:
    parsed = parse(spec)
    assert parsed.selector == expected["selector"]
    assert parsed.workload == expected["workload"]
    assert (parsed.endpoint, parsed.prometheus_url) == (expected["endpoint"], expected["url"])
    assert parsed.mode is expected["mode"]
    assert parsed.actuation.admin_port == expected["admin_port"]
    assert parsed.actuation.token_secret == expected["token"]
    assert parsed.actuation.native is expected["native"]
    assert parsed.policy.engine.kind is expected["engine"]
    # The controller's part reaches Policy unchanged (name and namespace too).
    assert (parsed.policy.name, parsed.policy.namespace) == ("chat", "serving")
    assert parsed.policy.slo.ttft_ms == spec["slo"]["ttftMs"]


def test_metrics_fields_other_than_endpoint_reach_the_policy() -> None:
    parsed = parse(policy_spec(metrics={"endpoint": "thanos", "windowSeconds": 120,
                                        "overrides": {"ttft": {"metric": "ttft_ms", "scale": 0.001}}}))
    assert parsed.policy.metrics.window_s == 120
    assert parsed.policy.metrics.overrides["ttft"].scale == 0.001


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        (policy_spec(selector=None), "spec", "exactly one"),
        (policy_spec(targetRef={"kind": "Deployment", "name": "x"}), "spec", "exactly one"),
        (policy_spec(selector={}), "spec.selector", "empty selector"),
        (
            policy_spec(selector={"matchExpressions": [{"key": "a", "operator": "Near"}]}),
            "spec.selector.matchExpressions[0].operator", "'Near'",
        ),
        (
            policy_spec(selector={"matchExpressions": [{"key": "a", "operator": "In"}]}),
            "spec.selector.matchExpressions[0].values", "non-empty",
        ),
        (policy_spec(selector=None, targetRef={"kind": "DaemonSet", "name": "x"}), "spec.targetRef.kind", "Deployment"),
        (policy_spec(selector=None, targetRef={"kind": "Deployment", "name": ""}), "spec.targetRef.name", "required"),
        (policy_spec(metrics={"endpoint": "mimir"}), "spec.metrics.endpoint", "default, thanos"),
        (policy_spec(metrics={"endpoint": "http://prom:9090"}), "spec.metrics.endpoint", "not an endpoint name"),
        (policy_spec(mode="Auto"), "spec.actuation.tokenSecretRef", "required when spec.mode is Auto"),
        (policy_spec(mode="Auto", actuation={"tokenSecretRef": {}}), "spec.actuation.tokenSecretRef.name", "required"),
        (
            policy_spec(engine={"runtimeTunable": True}, knobs={"maxNumBatchedTokens": {"min": 1024}}),
            "spec.knobs.maxNumBatchedTokens", "actuation.native",
        ),
        # Without `knobs`, a tunable engine's prefill budget is steered by default: the same rule.
        (policy_spec(engine={"runtimeTunable": True}), "spec.knobs.maxNumBatchedTokens", "actuation.native"),
        (policy_spec(actuation={"adminPort": 70000}), "spec.actuation.adminPort", "1-65535"),
        (policy_spec(actuation={"native": "yes"}), "spec.actuation.native", "true or false"),
        # The controller's own checks come through with their spec path.
        (policy_spec(slo={"ttftMs": -5, "tpotMs": 50}), "spec.slo.ttftMs", "between"),
        (policy_spec(engine={"kind": "ollama"}), "spec.engine.kind", "llamacpp"),
        (policy_spec(engine={"kvCacheTokens": 0}), "spec.engine.kvCacheTokens", "--ctx-size"),
        (policy_spec(knobs={"maxConcurrency": {"min": 64, "max": 8}}), "spec.knobs.maxConcurrency.max", "at least min"),
        (with_field(policy_spec(), "surprise", 1), "spec.surprise", "unknown field"),
        (with_field(policy_spec(), "selector.matchLabels.app", "a" * 64), "spec.selector.matchLabels.app", "at most 63"),
        # Stored before the CRD's rule: the gate would admit what the engine can only queue.
        (policy_spec(engine={"maxNumSeqs": 64}, knobs={"maxConcurrency": {"max": 512}}),
         "spec.knobs.maxConcurrency.max", "512 is above spec.engine.maxNumSeqs (64)"),
    ],
)
def test_invalid_specs_name_the_field(spec: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse(spec)
    assert caught.value.field == field
    assert says in caught.value.message


def classes(*items: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return policy_spec(classes=list(items), **fields)


# The Python twins of the CRD's class rules (the API server's answers to the
# same specs are in test_crd_apiserver.py): a spec stored before a rule
# existed is refused by the operator with the same field named.
@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        pytest.param(classes({"name": "chat"}, {"name": "batch"}, {"name": "chat"}),
                     "spec.classes[2].name", "'chat' is also classes[0].name; class names must be unique",
                     id="names-twice"),
        pytest.param(classes({"name": "batch", "weight": 0}), "spec.classes[0].weight", "above 0",
                     id="weight-zero"),
        pytest.param(classes({"name": "batch", "weight": -1.5}), "spec.classes[0].weight", "above 0",
                     id="weight-negative"),
        pytest.param(classes({"name": "chat", "slo": {"ttftMs": 500, "tpotMs": 50}},
                             {"name": "batch", "slo": {"ttftMs": 9000, "tpotMs": 50}}),
                     "spec.classes[1].slo", "class batch is looser than spec.slo", id="ttft-looser"),
        pytest.param(classes({"name": "chat", "slo": {"ttftMs": 500, "tpotMs": 51}}),
                     "spec.classes[0].slo", "tpotMs 51, percentile 99; spec.slo: ttftMs 2000, tpotMs 50",
                     id="tpot-looser"),
        pytest.param(classes({"name": "chat", "slo": {"ttftMs": 500, "tpotMs": 20, "percentile": 95}}),
                     "spec.classes[0].slo", "tighten the class's slo, or loosen spec.slo",
                     id="percentile-lower"),
        pytest.param(with_field(classes({"name": "chat", "slo": {"ttftMs": 500, "tpotMs": 20}}),
                                "slo.percentile", 99.9),
                     "spec.classes[0].slo", "percentile 99; spec.slo: ttftMs 2000, tpotMs 50, percentile 99.9",
                     id="percentile-below-the-policys"),
        pytest.param(classes({"name": "Interactive"}), "spec.classes[0].name", "not a class name",
                     id="name-upper-case"),
        pytest.param(classes({"name": "a" * 33}), "spec.classes[0].name", "at most 32 characters",
                     id="name-too-long"),
        pytest.param(classes({"name": "default", "slo": {"ttftMs": 500, "tpotMs": 20}}),
                     "spec.classes[0].slo", "the default class's objectives are spec.slo",
                     id="default-with-slo"),
        pytest.param(classes({"name": "chat", "match": {"header": "x-batchpilot-class", "values": ["chat"]}}),
                     "spec.classes[0].match.header", "already names the class itself",
                     id="match-on-the-class-header"),
        pytest.param(classes({"name": "chat", "match": {"header": "x-tenant"}}),
                     "spec.classes[0].match.values", "must be listed exactly when header is set",
                     id="header-without-values"),
        pytest.param(classes({"name": "chat", "match": {"header": "x-tenant", "values": ["a", "b"]}},
                             {"name": "batch", "match": {"header": "x-tenant", "values": ["b"]}}),
                     "spec.classes[1].match.values", "x-tenant: 'b' is also matched by classes[0]",
                     id="one-header-value-twice"),
        pytest.param(classes({"name": "chat", "match": {"models": ["llama-8b"]}},
                             {"name": "batch", "match": {"models": ["llama-70b", "llama-8b"]}}),
                     "spec.classes[1].match.models", "'llama-8b' is also matched by classes[0]",
                     id="one-model-twice"),
        pytest.param(classes(*({"name": f"c{i}"} for i in range(17))), "spec.classes", "at most 16 items",
                     id="too-many"),
    ],
)
def test_invalid_classes_name_the_field(spec: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse(spec)
    assert caught.value.field == field
    assert says in caught.value.message


def test_classes_reach_the_policy_and_the_same_value_on_two_headers_is_allowed() -> None:
    spec = classes(
        {"name": "interactive", "priority": 2, "weight": 3, "maxConcurrency": 16,
         "slo": {"ttftMs": 2000, "tpotMs": 50, "percentile": 99.5},
         "match": {"header": "x-tenant", "values": ["chat"], "models": ["llama-8b"]}},
        # Another header may carry the same value: which one a request sends decides.
        {"name": "batch", "match": {"header": "x-api-key-tier", "values": ["chat"]}},
        {"name": "default", "priority": -1},
    )
    policy = parse(spec).policy
    assert [c.name for c in policy.classes] == ["interactive", "batch", "default"]
    interactive = policy.classes[0]
    assert (interactive.priority, interactive.weight, interactive.max_concurrency) == (2, 3, 16)
    assert interactive.slo is not None and interactive.slo.percentile == 99.5
    assert interactive.match.gate_match().models == ("llama-8b",)
    assert policy.classes[1].slo is None


def test_a_policy_without_classes_has_none() -> None:
    assert parse(policy_spec()).policy.classes == ()


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        (LabelSelector({"app": "chat"}), {"app": "chat", "tier": "gpu"}, True),
        (LabelSelector({"app": "chat"}), {"app": "code"}, False),
        (LabelSelector({"app": "chat"}), {}, False),
        (LabelSelector({}, (Requirement("tier", "In", frozenset({"gpu", "tpu"})),)), {"tier": "tpu"}, True),
        (LabelSelector({}, (Requirement("tier", "In", frozenset({"gpu"})),)), {}, False),
        (LabelSelector({}, (Requirement("tier", "NotIn", frozenset({"cpu"})),)), {}, True),
        (LabelSelector({}, (Requirement("tier", "NotIn", frozenset({"cpu"})),)), {"tier": "cpu"}, False),
        (LabelSelector({}, (Requirement("canary", "Exists"),)), {"canary": ""}, True),
        (LabelSelector({}, (Requirement("opt-out", "DoesNotExist"),)), {"opt-out": "1"}, False),
        (
            LabelSelector({"app": "chat"}, (Requirement("opt-out", "DoesNotExist"),)),
            {"app": "chat"},
            True,
        ),
    ],
)
def test_label_selector_matches_as_kubernetes_does(selector: LabelSelector, labels: dict[str, str], matches: bool) -> None:
    assert selector.matches(labels) is matches


def test_parse_selector_reads_spec_selector_as_parse_policy_does() -> None:
    assert parse_selector({"matchLabels": {"app": "chat"}}) == LabelSelector({"app": "chat"})
    with pytest.raises(PolicyError) as caught:
        parse_selector({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]})
    assert caught.value.field == "spec.selector.matchExpressions[0].values"
    assert parse_workload({"kind": "Deployment", "name": "llm"}) == WorkloadRef("Deployment", "llm")
