"""The policy: built from a CR spec, every error names the field and the fix."""

from __future__ import annotations

import math
from typing import Any

import pytest

from batchpilot.controller.knobs import Knobs
from batchpilot.controller.policy import EngineKind, KnobBounds, Mode, Policy, PolicyError

SLO = {"ttftMs": 2000, "tpotMs": 50}


def test_full_spec() -> None:
    policy = Policy.from_spec(
        {
            "engine": {"kind": "sglang", "maxNumSeqs": 256, "maxNumBatchedTokens": 4096, "runtimeTunable": True},
            "slo": {"ttftMs": 1500, "tpotMs": 40, "percentile": 95},
            "knobs": {
                "maxConcurrency": {"min": 8, "max": 128},
                "maxInflightTokens": {"min": 10_000},
                "discipline": {"allowed": ["fcfs", "shortest-prompt-first"]},
                "maxNumBatchedTokens": {"min": 512},
            },
            "behavior": {
                "intervalSeconds": 15,
                "stabilizationWindowSeconds": 60,
                "maxStepFactor": 2,
                "minChangePercent": 5,
                "canary": {"enabled": True, "intervals": 4},
            },
            "mode": "Auto",
            "metrics": {"windowSeconds": 30, "overrides": {"kvUsage": {"metric": "sglang:token_usage"}}},
        },
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
    assert policy.behavior.canary and policy.behavior.canary_intervals == 4
    assert policy.mode is Mode.AUTO
    assert policy.metrics.overrides["kvUsage"].metric == "sglang:token_usage"


def test_defaults_steer_what_the_gate_can_steer() -> None:
    policy = Policy.from_spec({"slo": SLO})
    assert set(policy.bounds) == {"max_concurrency", "max_inflight_tokens", "queue_deadline_ms"}
    assert policy.disciplines == ("fcfs", "shortest-prompt-first")
    assert policy.mode is Mode.RECOMMEND
    tunable = Policy.from_spec({"slo": SLO, "engine": {"runtimeTunable": True}})
    assert "max_num_batched_tokens" in tunable.bounds


def test_llamacpp_engine_with_its_kv_cache() -> None:
    policy = Policy.from_spec(
        {"slo": SLO, "engine": {"kind": "llamacpp", "maxNumSeqs": 16, "maxNumBatchedTokens": 2048, "kvCacheTokens": 16384}}
    )
    assert policy.engine.kind is EngineKind.LLAMACPP
    assert policy.engine.kv_cache_tokens == 16384
    # The gate steers the same knobs as for any engine, below --parallel,
    # down to one sequence (a sixteenth of the slots) and one prefill step.
    assert policy.bounds["max_concurrency"] == KnobBounds("max_concurrency", 1, 16)
    assert policy.bounds["max_inflight_tokens"] == KnobBounds("max_inflight_tokens", 2048, None)
    big = Policy.from_spec({"slo": SLO, "engine": {"maxNumSeqs": 512, "maxNumBatchedTokens": 4096}})
    assert big.bounds["max_concurrency"] == KnobBounds("max_concurrency", 4, 512)
    assert big.bounds["max_inflight_tokens"] == KnobBounds("max_inflight_tokens", 4096, None)
    assert "max_num_batched_tokens" not in policy.bounds
    assert Policy.from_spec({"slo": SLO}).engine.kv_cache_tokens is None


@pytest.mark.parametrize(
    ("spec", "field", "fix"),
    [
        ({}, "spec.slo", "required"),
        ({"slo": {"ttftMs": 2000}}, "spec.slo.tpotMs", "required"),
        ({"slo": {"ttftMs": -1, "tpotMs": 50}}, "spec.slo.ttftMs", "between 1 and"),
        ({"slo": {"ttftMs": 2000.5, "tpotMs": 50}}, "spec.slo.ttftMs", "integer"),
        ({"slo": {"ttftMs": 2000, "tpotMs": True}}, "spec.slo.tpotMs", "integer"),
        ({"slo": {**SLO, "percentile": 100}}, "spec.slo.percentile", "[50, 100)"),
        ({"slo": {**SLO, "p": 1}}, "spec.slo.p", "unknown field"),
        ({"slo": SLO, "engine": {"kind": "ollama"}}, "spec.engine.kind", "llamacpp"),
        ({"slo": SLO, "engine": {"kvCacheTokens": 8}}, "spec.engine.kvCacheTokens", "between 16 and"),
        ({"slo": SLO, "engine": {"kvCacheTokens": 2**31 + 1}}, "spec.engine.kvCacheTokens", "--ctx-size"),
        ({"slo": SLO, "engine": {"kvCacheTokens": "16k"}}, "spec.engine.kvCacheTokens", "KV-cache size in tokens"),
        ({"slo": SLO, "engine": {"kvCacheTokens": True}}, "spec.engine.kvCacheTokens", "integer"),
        ({"slo": SLO, "engine": {"kind": "llamacpp", "runtimeTunable": True}}, "spec.engine.runtimeTunable", "--batch-size"),
        ({"slo": SLO, "engine": {"maxNumSeqs": 0}}, "spec.engine.maxNumSeqs", "between"),
        ({"slo": SLO, "knobs": {"maxConcurrency": {"min": 10, "max": 5}}}, "spec.knobs.maxConcurrency.max", "at least min"),
        ({"slo": SLO, "knobs": {"batchSize": {}}}, "spec.knobs.batchSize", "unknown field"),
        ({"slo": SLO, "knobs": {"discipline": {"allowed": ["lifo"]}}}, "spec.knobs.discipline.allowed", "fcfs"),
        ({"slo": SLO, "knobs": {"discipline": {"allowed": []}}}, "spec.knobs.discipline.allowed", "non-empty"),
        ({"slo": SLO, "knobs": {"maxNumBatchedTokens": {}}}, "spec.knobs.maxNumBatchedTokens", "runtimeTunable"),
        ({"slo": SLO, "behavior": {"maxStepFactor": 1}}, "spec.behavior.maxStepFactor", "between"),
        ({"slo": SLO, "behavior": {"minChangePercent": 150}}, "spec.behavior.minChangePercent", "between"),
        ({"slo": SLO, "behavior": {"canary": {"enabled": "yes"}}}, "spec.behavior.canary.enabled", "true or false"),
        ({"slo": SLO, "mode": "Manual"}, "spec.mode", "Recommend"),
        ({"slo": SLO, "metrics": {"windowSeconds": 0}}, "spec.metrics.windowSeconds", "between"),
        ({"slo": SLO, "metrics": {"podLabel": "pod-name"}}, "spec.metrics.podLabel", "label name"),
        ({"slo": SLO, "metrics": {"overrides": {"latency": {"metric": "x"}}}}, "spec.metrics.overrides.latency", "signals are"),
        ({"slo": SLO, "metrics": {"overrides": {"running": {}}}}, "spec.metrics.overrides.running.metric", "required"),
        ({"slo": SLO, "metrics": {"overrides": {"running": {"metric": "a{b}"}}}}, "spec.metrics.overrides.running.metric", "metric name"),
        ({"slo": SLO, "metrics": {"overrides": {"running": {"metric": "m", "scale": 0}}}}, "spec.metrics.overrides.running.scale", "positive"),
        ({"slo": SLO, "metrics": "60s"}, "spec.metrics", "expected an object"),
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
    policy = Policy.from_spec({"slo": SLO, "engine": {"maxNumSeqs": 512}})
    assert policy.effective(knob, value) == expected


def test_clamp_touches_steered_knobs_only() -> None:
    policy = Policy.from_spec({"slo": SLO, "knobs": {"maxConcurrency": {"min": 8, "max": 64}}})
    knobs = Knobs(max_concurrency=1000, queue_deadline_ms=5, discipline="priority")
    clamped = policy.clamp(knobs)
    assert clamped.max_concurrency == 64
    # not steered by this policy: left as they are
    assert clamped.queue_deadline_ms == 5
    assert clamped.discipline == "priority"
