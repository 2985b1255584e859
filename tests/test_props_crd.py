"""Hypothesis-generated InferencePolicy specs against the REAL API server, then the operator.

Each generated spec is created (server-side dry run: validated, defaulted,
not stored) in the real API server with the CRD installed. Properties:

- refused: 422 Invalid, the message names a `spec.` field path;
- accepted: the operator's one spec -> typed function `parse_policy` either
  builds a `PolicySpec` or raises `PolicyError` naming a `spec` path (a spec
  valid for the schema but not for the operator must be a clear error,
  never an unhandled exception).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from policyspec import policy_body, policy_spec

from batchpilot.controller.policy import PolicyError
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.spec import PolicySpec, parse_policy

pytestmark = pytest.mark.stack

GROUP, VERSION, PLURAL = "batchpilot.dev", "v1alpha1", "inferencepolicies"
CONFIG = OperatorConfig(
    prometheus={"default": "http://prometheus:9090", "thanos": "http://thanos:9090"}
)

# Values around each field's limits plus the wrong types a hand-written YAML
# gets wrong: strings for numbers, floats for integers, null, nested objects.
wrong_types = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)


def ints(low: int, high: int) -> st.SearchStrategy[Any]:
    edges = st.sampled_from([low - 1, low, high, high + 1, 0, -1])
    return st.one_of(st.integers(min_value=low, max_value=high), edges, wrong_types)


def numbers(low: float, high: float) -> st.SearchStrategy[Any]:
    edges = st.sampled_from([low, high, low - 0.001, high * 2, 0, -1.5])
    return st.one_of(st.floats(min_value=low, max_value=high), edges, wrong_types)


def objects(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.fixed_dictionaries({}, optional=fields),
        st.fixed_dictionaries({}, optional=fields),
        wrong_types,
    )


label_values = st.one_of(st.sampled_from(["chat", "", "a" * 64, "x y"]), st.text(max_size=5))
bounds = lambda low, high: objects({"min": ints(low, high), "max": ints(low, high)})  # noqa: E731
specs = st.fixed_dictionaries(
    {
        "slo": objects(
            {
                "ttftMs": ints(1, 3_600_000),
                "tpotMs": ints(1, 60_000),
                "percentile": numbers(50, 100),
            }
        )
    },
    optional={
        "selector": objects(
            {
                "matchLabels": st.dictionaries(
                    st.sampled_from(["app", "tier", "bad key!"]), label_values, max_size=2
                ),
                "matchExpressions": st.lists(
                    objects(
                        {
                            "key": st.sampled_from(["app", "tier", ""]),
                            "operator": st.sampled_from(
                                ["In", "NotIn", "Exists", "DoesNotExist", "Like"]
                            ),
                            "values": st.lists(label_values, max_size=2),
                        }
                    ),
                    max_size=2,
                ),
            }
        ),
        "targetRef": objects(
            {
                "kind": st.sampled_from(["Deployment", "StatefulSet", "Pod"]),
                "name": st.sampled_from(["llm", ""]),
            }
        ),
        "engine": objects(
            {
                "kind": st.sampled_from(["vllm", "sglang", "tgi", "triton", "llamacpp", "generic", "ollama"]),
                "maxNumSeqs": ints(1, 65_536),
                "maxNumBatchedTokens": ints(16, 2**31),
                "kvCacheTokens": ints(16, 2**31),
                "runtimeTunable": st.booleans() | wrong_types,
            }
        ),
        "actuation": objects(
            {
                "adminPort": ints(1, 65_535),
                "tokenSecretRef": objects(
                    {
                        "name": st.sampled_from(["gate-token", ""]),
                        "key": st.sampled_from(["token", ""]),
                    }
                ),
                "native": st.booleans() | wrong_types,
            }
        ),
        "metrics": objects(
            {
                "endpoint": st.sampled_from(["default", "thanos", "mimir", "http://x:9090", "UP"]),
                "windowSeconds": ints(1, 86_400),
                "stalenessSeconds": ints(1, 86_400),
                "timeoutSeconds": numbers(0.1, 600),
                "podLabel": st.sampled_from(["pod", "pod-name", "_p"]),
                "overrides": st.dictionaries(
                    st.sampled_from(["running", "kvUsage", "ttft", "nonsense"]),
                    objects(
                        {
                            "metric": st.sampled_from(
                                ["vllm:num_requests_running", "bad metric", ""]
                            ),
                            "labels": st.dictionaries(
                                st.sampled_from(["a", "b"]), st.text(max_size=4), max_size=2
                            ),
                            "scale": numbers(0, 1000),
                        }
                    ),
                    max_size=2,
                ),
            }
        ),
        "knobs": objects(
            {
                "maxConcurrency": bounds(1, 65_536),
                "maxInflightTokens": bounds(1, 2**31),
                "queueDeadlineMs": bounds(1, 3_600_000),
                "agingMs": bounds(1, 3_600_000),
                "maxNumBatchedTokens": bounds(16, 2**31),
                "discipline": objects(
                    {
                        "allowed": st.lists(
                            st.sampled_from(["fcfs", "shortest-prompt-first", "priority", "lifo"]),
                            max_size=4,
                        )
                    }
                ),
            }
        ),
        "behavior": objects(
            {
                "intervalSeconds": ints(1, 3600),
                "stabilizationWindowSeconds": ints(0, 86_400),
                "maxStepFactor": numbers(1.01, 1000),
                "minChangePercent": numbers(0, 100),
                "canary": objects(
                    {"enabled": st.booleans() | wrong_types, "intervals": ints(1, 100)}
                ),
            }
        ),
        "mode": st.sampled_from(["Off", "Recommend", "Auto", "auto"]),
    },
)


def in_range_bounds(low: int, high: int) -> st.SearchStrategy[dict[str, int]]:
    return st.tuples(st.integers(low, high), st.integers(low, high)).map(
        lambda pair: {"min": min(pair), "max": max(pair)}
    )


# Specs the schema should accept: they reach the operator's parser, where
# some (an unconfigured endpoint, Auto without a token, a prefill knob
# without a tunable engine) are still its to refuse.
schema_valid_specs = st.fixed_dictionaries(
    {
        "slo": st.fixed_dictionaries(
            {"ttftMs": st.integers(1, 3_600_000), "tpotMs": st.integers(1, 60_000)},
            optional={"percentile": st.floats(50, 100)},
        ),
        "selector": st.just({"matchLabels": {"app": "chat"}}),
        "mode": st.sampled_from(["Off", "Recommend", "Auto"]),
    },
    optional={
        "engine": st.fixed_dictionaries(
            {},
            optional={
                "kind": st.sampled_from(["vllm", "sglang", "tgi", "triton", "llamacpp", "generic"]),
                "maxNumSeqs": st.integers(1, 65_536),
                "kvCacheTokens": st.integers(16, 2**31),
                "runtimeTunable": st.booleans(),
            },
        ),
        "actuation": st.fixed_dictionaries(
            {},
            optional={
                "adminPort": st.integers(1, 65_535),
                "tokenSecretRef": st.just({"name": "gate-token"}),
                "native": st.booleans(),
            },
        ),
        "metrics": st.fixed_dictionaries(
            {},
            optional={
                "endpoint": st.sampled_from(["default", "thanos", "mimir"]),
                "windowSeconds": st.integers(1, 86_400),
                "timeoutSeconds": st.floats(0.1, 600),
                "overrides": st.dictionaries(
                    st.sampled_from(["running", "kvUsage"]),
                    st.fixed_dictionaries(
                        {"metric": st.just("vllm:num_requests_running")},
                        optional={"scale": st.floats(0, 1000)},
                    ),
                    max_size=1,
                ),
            },
        ),
        "knobs": st.fixed_dictionaries(
            {},
            optional={
                "maxConcurrency": in_range_bounds(1, 65_536),
                "queueDeadlineMs": in_range_bounds(1, 3_600_000),
                "maxNumBatchedTokens": in_range_bounds(16, 2**31),
                "discipline": st.fixed_dictionaries(
                    {
                        "allowed": st.lists(
                            st.sampled_from(["fcfs", "shortest-prompt-first", "priority"]),
                            min_size=1,
                            max_size=3,
                            unique=True,
                        )
                    }
                ),
            },
        ),
        "behavior": st.fixed_dictionaries(
            {},
            optional={
                "intervalSeconds": st.integers(1, 3600),
                "maxStepFactor": st.floats(1.01, 1000),
                "minChangePercent": st.floats(0, 100),
            },
        ),
    },
)


outcomes: dict[str, int] = {"refused": 0, "valid": 0, "operator-refused": 0}


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=st.one_of(schema_valid_specs, specs))
def test_generated_specs_are_refused_clearly_or_parsed_without_crashing(
    inferencepolicy_crd: None, k8s_client: client.ApiClient, namespace: str, spec: dict[str, Any]
) -> None:
    body = policy_body("generated", spec)
    try:
        stored = client.CustomObjectsApi(k8s_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, dry_run="All"
        )
    except ApiException as refused:
        assert refused.status == 422, (refused.status, refused.body)
        message = json.loads(refused.body)["message"]
        assert "spec" in message, message
        outcomes["refused"] += 1
        return
    try:
        parsed = parse_policy(stored["spec"], name="generated", namespace=namespace, config=CONFIG)
    except PolicyError as err:
        assert err.field.startswith("spec") and err.message, err
        outcomes["operator-refused"] += 1
        return
    assert isinstance(parsed, PolicySpec)
    outcomes["valid"] += 1


def test_generated_specs_reached_every_outcome() -> None:
    """Runs after the property above (file order): it must have exercised both sides."""
    if sum(outcomes.values()) == 0:
        pytest.skip("the property test did not run in this session")
    print(f"generated spec outcomes: {outcomes}")
    assert outcomes["refused"] > 0 and outcomes["valid"] > 0, outcomes


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        # Which endpoints exist only the operator knows.
        ({"metrics": {"endpoint": "mimir"}}, "spec.metrics.endpoint"),
        ({"metrics": {"endpoint": "prometheus-eu"}}, "spec.metrics.endpoint"),
    ],
)
def test_specs_only_the_operator_can_refuse_get_a_named_error(
    inferencepolicy_crd: None, k8s_client: client.ApiClient, namespace: str, extra: dict[str, Any], field: str
) -> None:
    body = policy_body("operator-refuses", policy_spec(**extra))
    stored = client.CustomObjectsApi(k8s_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, dry_run="All"
    )
    with pytest.raises(PolicyError) as refused:
        parse_policy(stored["spec"], name="operator-refuses", namespace=namespace, config=CONFIG)
    assert refused.value.field.startswith(field), refused.value


# -- SLO classes: the CRD's rules and their Python twins agree -------------------------

# Small pools, so that duplicates, collisions and looser objectives are common.
class_slos = st.fixed_dictionaries(
    {"ttftMs": st.sampled_from([1, 500, 2000, 2001]), "tpotMs": st.sampled_from([1, 50, 51])},
    optional={"percentile": st.sampled_from([50, 98.5, 99, 99.9])},
)
class_matches = st.fixed_dictionaries(
    {},
    optional={
        "header": st.sampled_from(["x-tenant", "x-api-tier", "x-batchpilot-class", "X-Tenant"]),
        "values": st.lists(st.sampled_from(["a", "b", "c"]), max_size=2),
        "models": st.lists(st.sampled_from(["m1", "m2", "m3"]), max_size=2),
    },
)
class_items = st.fixed_dictionaries(
    {"name": st.sampled_from(["chat", "batch", "bulk", "default", "Chat", "a" * 33])},
    optional={
        "slo": class_slos,
        "priority": st.sampled_from([-1001, -1, 0, 5, 1000]),
        "weight": st.sampled_from([-1, 0, 0.001, 1, 2.5, 1000, 1000.5]),
        "maxConcurrency": st.sampled_from([0, 1, 64, 65_537]),
        "match": class_matches,
    },
)
class_specs = st.builds(
    lambda classes, percentile: policy_spec(
        classes=classes, slo={"ttftMs": 2000, "tpotMs": 50, **percentile}
    ),
    st.lists(class_items, max_size=4),
    st.sampled_from([{}, {"percentile": 99.5}]),
)
class_outcomes: dict[str, int] = {"both-refused": 0, "both-accepted": 0}


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=class_specs)
def test_the_api_server_and_the_operator_agree_on_classes(
    inferencepolicy_crd: None, k8s_client: client.ApiClient, namespace: str, spec: dict[str, Any]
) -> None:
    """Every class rule has a Python twin and no twin is stricter than its rule:
    a spec stored before a rule existed is refused by the operator just as the
    API server now refuses it, and nothing the API server accepts is refused."""
    body = policy_body("classes", spec)
    try:
        stored = client.CustomObjectsApi(k8s_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, dry_run="All"
        )
    except ApiException as refused:
        assert refused.status == 422, (refused.status, refused.body)
        message = json.loads(refused.body)["message"]
        assert "spec.classes" in message, message
        with pytest.raises(PolicyError) as twin:
            parse_policy(spec, name="classes", namespace=namespace, config=CONFIG)
        assert twin.value.field.startswith("spec.classes"), (twin.value, message)
        class_outcomes["both-refused"] += 1
        return
    parsed = parse_policy(stored["spec"], name="classes", namespace=namespace, config=CONFIG)
    assert [c.name for c in parsed.policy.classes] == [c["name"] for c in spec["classes"]]
    class_outcomes["both-accepted"] += 1


def test_the_class_property_reached_both_outcomes() -> None:
    if sum(class_outcomes.values()) == 0:
        pytest.skip("the class property did not run in this session")
    print(f"class spec outcomes: {class_outcomes}")
    assert class_outcomes["both-refused"] > 0 and class_outcomes["both-accepted"] > 0, class_outcomes
