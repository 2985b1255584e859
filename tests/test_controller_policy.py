"""The policy: built from a CR spec, every error names the field and the fix."""

from __future__ import annotations

import math
from typing import Any

import pytest
from policyspec import controller_spec, with_field

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.policy import (
    Behavior,
    Canary,
    ClassSpec,
    EngineKind,
    EngineSpec,
    KnobBounds,
    MetricsSpec,
    Mode,
    Policy,
    PolicyError,
    Slo,
)


def test_full_spec() -> None:
    policy = Policy.from_spec(
        controller_spec(
            engine={"kind": "sglang", "maxNumSeqs": 256, "maxNumBatchedTokens": 4096, "runtimeTunable": True},
            slo={"ttftMs": 1500, "tpotMs": 40, "percentile": 95},
            knobs={
                "maxConcurrency": {"min": 8, "max": 128},
                "maxInflightTokens": {"min": 10_000},
                "discipline": {"allowed": ["fcfs", "shortest-prompt-first"]},
                "maxNumBatchedTokens": {"min": 512},
            },
            behavior={
                "intervalSeconds": 15,
                "stabilizationWindowSeconds": 60,
                "maxStepFactor": 2,
                "minChangePercent": 5,
                "canary": {"enabled": True, "intervals": 4},
            },
            mode="Auto",
            metrics={"windowSeconds": 30, "overrides": {"kvUsage": {"metric": "sglang:token_usage"}}},
        ),
        name="chat",
        namespace="serving",
    )
    assert policy.engine.kind is EngineKind.SGLANG
    assert policy.slo.quantile == pytest.approx(0.95)
    assert policy.bounds["max_concurrency"] == KnobBounds("max_concurrency", 8, 128)
    assert policy.bounds["max_inflight_tokens"].high is None
    # an unspecified max defaults to the engine ceiling
    assert policy.bounds["max_num_batched_tokens"] == KnobBounds("max_num_batched_tokens", 512, 4096)
    assert not policy.steers("queue_deadline_ms")
    assert policy.behavior.min_change_fraction == pytest.approx(0.05)
    assert policy.behavior.canary == Canary(enabled=True, intervals=4)
    assert policy.mode is Mode.AUTO
    assert policy.metrics.overrides["kvUsage"].metric == "sglang:token_usage"


def test_defaults_steer_what_the_gate_can_steer() -> None:
    policy = Policy.from_spec(controller_spec())
    assert set(policy.bounds) == {"max_concurrency", "max_inflight_tokens", "queue_deadline_ms"}
    assert policy.disciplines == ("fcfs", "shortest-prompt-first")
    assert policy.mode is Mode.RECOMMEND
    tunable = Policy.from_spec(controller_spec(engine={"runtimeTunable": True}))
    assert "max_num_batched_tokens" in tunable.bounds


def test_llamacpp_engine_with_its_kv_cache() -> None:
    policy = Policy.from_spec(
        controller_spec(engine={"kind": "llamacpp", "maxNumSeqs": 16, "maxNumBatchedTokens": 2048, "kvCacheTokens": 16384})
    )
    assert policy.engine.kind is EngineKind.LLAMACPP
    assert policy.engine.kv_cache_tokens == 16384
    # The gate steers the same knobs as for any engine, below --parallel,
    # down to one sequence (a sixteenth of the slots) and one prefill step.
    assert policy.bounds["max_concurrency"] == KnobBounds("max_concurrency", 1, 16)
    assert policy.bounds["max_inflight_tokens"] == KnobBounds("max_inflight_tokens", 2048, None)
    big = Policy.from_spec(controller_spec(engine={"maxNumSeqs": 512, "maxNumBatchedTokens": 4096}))
    assert big.bounds["max_concurrency"] == KnobBounds("max_concurrency", 4, 512)
    assert big.bounds["max_inflight_tokens"] == KnobBounds("max_inflight_tokens", 4096, None)
    assert "max_num_batched_tokens" not in policy.bounds
    assert Policy.from_spec(controller_spec()).engine.kv_cache_tokens is None


@pytest.mark.parametrize(
    ("spec", "field", "fix"),
    [
        (controller_spec(slo=None), "spec.slo", "required"),
        (controller_spec(slo={"ttftMs": 2000}), "spec.slo.tpotMs", "required"),
        (with_field(controller_spec(), "slo.ttftMs", -1), "spec.slo.ttftMs", "between 1 and"),
        (with_field(controller_spec(), "slo.ttftMs", 2000.5), "spec.slo.ttftMs", "integer"),
        (with_field(controller_spec(), "slo.tpotMs", True), "spec.slo.tpotMs", "integer"),
        (with_field(controller_spec(), "slo.percentile", 100), "spec.slo.percentile", "[50, 100)"),
        (with_field(controller_spec(), "slo.p", 1), "spec.slo.p", "unknown field"),
        (controller_spec(engine={"kind": "ollama"}), "spec.engine.kind", "llamacpp"),
        (controller_spec(engine={"kvCacheTokens": 8}), "spec.engine.kvCacheTokens", "between 16 and"),
        (controller_spec(engine={"kvCacheTokens": 2**31 + 1}), "spec.engine.kvCacheTokens", "--ctx-size"),
        (controller_spec(engine={"kvCacheTokens": "16k"}), "spec.engine.kvCacheTokens", "KV-cache size in tokens"),
        (controller_spec(engine={"kvCacheTokens": True}), "spec.engine.kvCacheTokens", "integer"),
        (controller_spec(engine={"kind": "llamacpp", "runtimeTunable": True}), "spec.engine.runtimeTunable", "--batch-size"),
        (controller_spec(engine={"maxNumSeqs": 0}), "spec.engine.maxNumSeqs", "between"),
        (controller_spec(knobs={"maxConcurrency": {"min": 10, "max": 5}}), "spec.knobs.maxConcurrency.max", "at least min"),
        (controller_spec(knobs={"batchSize": {}}), "spec.knobs.batchSize", "unknown field"),
        (controller_spec(knobs={"discipline": {"allowed": ["lifo"]}}), "spec.knobs.discipline.allowed", "fcfs"),
        (controller_spec(knobs={"discipline": {"allowed": []}}), "spec.knobs.discipline.allowed", "non-empty"),
        (controller_spec(knobs={"maxNumBatchedTokens": {}}), "spec.knobs.maxNumBatchedTokens", "runtimeTunable"),
        (controller_spec(behavior={"maxStepFactor": 1}), "spec.behavior.maxStepFactor", "between"),
        (controller_spec(behavior={"minChangePercent": 150}), "spec.behavior.minChangePercent", "between"),
        (controller_spec(behavior={"canary": {"enabled": "yes"}}), "spec.behavior.canary.enabled", "true or false"),
        (controller_spec(mode="Manual"), "spec.mode", "Recommend"),
        (controller_spec(metrics={"windowSeconds": 0}), "spec.metrics.windowSeconds", "between"),
        (controller_spec(metrics={"podLabel": "pod-name"}), "spec.metrics.podLabel", "label name"),
        (controller_spec(metrics={"overrides": {"latency": {"metric": "x"}}}), "spec.metrics.overrides.latency", "signals are"),
        (controller_spec(metrics={"overrides": {"running": {}}}), "spec.metrics.overrides.running.metric", "required"),
        (controller_spec(metrics={"overrides": {"running": {"metric": "a{b}"}}}), "spec.metrics.overrides.running.metric", "metric name"),
        (controller_spec(metrics={"overrides": {"running": {"metric": "m", "scale": 0}}}), "spec.metrics.overrides.running.scale", "positive"),
        (controller_spec(metrics="60s"), "spec.metrics", "expected an object"),
    ],
)
def test_invalid_specs_name_the_field_and_the_fix(spec: dict[str, Any], field: str, fix: str) -> None:
    with pytest.raises(PolicyError) as error:
        Policy.from_spec(spec)
    assert error.value.field == field
    assert fix in error.value.message


@pytest.mark.parametrize(
    ("knob", "value", "expected"),
    [
        ("max_concurrency", None, 512.0),  # the engine ceiling
        ("max_num_batched_tokens", None, 8192.0),
        ("max_inflight_tokens", None, math.inf),  # no ceiling at all
        ("queue_deadline_ms", 1500, 1500.0),
    ],
)
def test_effective_value_of_an_unset_knob(knob: str, value: int | None, expected: float) -> None:
    policy = Policy.from_spec(controller_spec(engine={"maxNumSeqs": 512}))
    assert policy.effective(knob, value) == expected


def test_clamp_touches_steered_knobs_only() -> None:
    policy = Policy.from_spec(controller_spec(knobs={"maxConcurrency": {"min": 8, "max": 64}}))
    knobs = Knobs(max_concurrency=1000, queue_deadline_ms=5, discipline="priority")
    clamped = policy.clamp(knobs)
    assert clamped.max_concurrency == 64
    # not steered by this policy: left as they are
    assert clamped.queue_deadline_ms == 5
    assert clamped.discipline == "priority"


def test_null_reads_as_absent_as_the_api_server_stores_it() -> None:
    with_nulls = {**controller_spec(), "engine": None, "knobs": None, "behavior": {"canary": None}}
    assert Policy.from_spec(with_nulls) == Policy.from_spec(controller_spec())


@pytest.mark.parametrize(
    ("build", "field", "says"),
    [
        (lambda: Slo(0, 50), "ttftMs", "between 1 and 3600000"),
        (lambda: EngineSpec(kind="ollama"), "kind", "'ollama' is not one of vllm"),
        (lambda: EngineSpec(max_num_batched_tokens=8), "maxNumBatchedTokens", "between 16 and"),
        (lambda: Behavior(canary=True), "canary", "expected Canary"),
        (lambda: MetricsSpec(window_s=0.5), "windowSeconds", "between 1 and 86400"),
        (lambda: ClassSpec("Chat"), "name", "'Chat' is not a class name"),
        (lambda: ClassSpec("batch", weight=0), "weight", "above 0"),
        (lambda: ClassSpec("batch", slo=(800, 40)), "slo", "expected Slo"),
    ],
)
def test_values_built_in_code_keep_the_specs_contract(build: Any, field: str, says: str) -> None:
    with pytest.raises(PolicyError) as error:
        build()
    assert error.value.field == field
    assert says in error.value.message


def test_an_engine_kind_given_by_name_becomes_the_member() -> None:
    assert EngineSpec(kind="sglang").kind is EngineKind.SGLANG  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("classes", "field", "says"),
    [
        ([{"name": "a"}, {"name": "a"}], "spec.classes[1].name", "'a' is also classes[0].name"),
        ([{"name": "a", "slo": {"ttftMs": 2001, "tpotMs": 50}}], "spec.classes[0].slo",
         "class a is looser than spec.slo"),
        ([{"name": "a", "match": {"models": ["m"]}}, {"name": "b", "match": {"models": ["m"]}}],
         "spec.classes[1].match.models", "'m' is also matched by classes[0]"),
    ],
)
def test_the_controllers_part_refuses_classes_as_the_crd_does(
    classes: list[dict[str, Any]], field: str, says: str
) -> None:
    """Policy.from_spec (simulator, benchmark) runs the same twins as the operator's parse."""
    with pytest.raises(PolicyError) as error:
        Policy.from_spec(controller_spec(classes=classes))
    assert error.value.field == field
    assert says in error.value.message


def test_class_objectives_equal_to_the_policys_are_not_looser() -> None:
    policy = Policy.from_spec(controller_spec(
        slo={"ttftMs": 2000, "tpotMs": 50, "percentile": 99},
        classes=[{"name": "same", "slo": {"ttftMs": 2000, "tpotMs": 50}},
                 {"name": "tight", "slo": {"ttftMs": 300, "tpotMs": 20, "percentile": 99.9}}],
    ))
    assert [c.name for c in policy.classes] == ["same", "tight"]
