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
