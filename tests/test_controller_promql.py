"""PromQL built from hostile names cannot change the query."""

from __future__ import annotations

import re

import pytest

from batchpilot.controller.policy import EngineKind, MetricOverride, MetricsSpec, PolicyError
from batchpilot.controller.promql import (
    QueryBuilder,
    duration,
    escape_regex,
    escape_string,
    selector,
)
from batchpilot.controller.signals import Kind, Signal, signal_specs

_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"', "'": "'"}


def split_literals(query: str) -> tuple[str, list[str]]:
    """(query with every "..." literal replaced by "$", the literals unescaped as PromQL reads them)."""
    skeleton: list[str] = []
    literals: list[str] = []
    index = 0
    while index < len(query):
        char = query[index]
        if char != '"':
            skeleton.append(char)
            index += 1
            continue
        index += 1
        value: list[str] = []
        while query[index] != '"':
            if query[index] == "\\":
                code = query[index + 1]
                if code == "x":
                    value.append(chr(int(query[index + 2 : index + 4], 16)))
                    index += 4
                    continue
                value.append(_GO_ESCAPES[code])
                index += 2
                continue
            assert query[index] != "\n", "a raw newline inside a string literal"
            value.append(query[index])
            index += 1
        index += 1
        skeleton.append('"$"')
        literals.append("".join(value))
    return "".join(skeleton), literals


HOSTILE = [
    'a"}',
    'x", namespace="other',
    "back\\slash",
    "trailing\\",
    ".*",
    "a|b",
    "(group)+[set]{2}^$",
    "new\nline",
    "tab\tand\x00nul",
    "} or vector(1) #",
    "ünïcödé-pod",
]


@pytest.mark.parametrize("kind", [Signal.ADMITTED, Signal.RUNNING, Signal.KV_USAGE, Signal.TTFT, Signal.GATE_KNOB])
@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_pod_and_namespace_cannot_change_the_query(kind: Signal, hostile: str) -> None:
    specs = signal_specs(EngineKind.VLLM, {})
    benign = QueryBuilder(MetricsSpec(), "ns").query(specs[kind], ["pod-a", "pod-b"])
    query = QueryBuilder(MetricsSpec(), hostile).query(specs[kind], [hostile, "pod-b"])
    benign_skeleton, _ = split_literals(benign)
    skeleton, literals = split_literals(query)
    assert skeleton == benign_skeleton
    namespace, pod_pattern = literals[0], literals[1]
    assert namespace == hostile
    pattern = re.compile(pod_pattern)
    assert pattern.fullmatch(hostile)
    assert pattern.fullmatch("pod-b")
    for other in ("pod-a", hostile + "x", "x" + hostile, "anything"):
        assert not pattern.fullmatch(other)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_override_label_values_are_escaped(hostile: str) -> None:
    override = MetricOverride("nv_trt_llm_request_metrics", (("request_type", hostile),))
    specs = signal_specs(EngineKind.TRITON, {Signal.WAITING.value: override})
    query = QueryBuilder(MetricsSpec(), "ns").query(specs[Signal.WAITING], ["p"])
    _, literals = split_literals(query)
    assert hostile in literals


@pytest.mark.parametrize(
    "name",
    ['pod"', "1abc", "a-b", "a b", "", "le}", "a\nb"],
)
def test_label_names_are_validated_not_escaped(name: str) -> None:
    with pytest.raises(PolicyError):
        selector([(name, "x")])


@pytest.mark.parametrize("name", ['vllm:x"}', "1metric", "a b", "a{b}"])
def test_metric_names_are_validated(name: str) -> None:
    with pytest.raises(PolicyError):
        MetricOverride(name)


@pytest.mark.parametrize(
    ("signal", "expected"),
    [
        (Signal.ADMITTED, 'sum by (pod) (rate(batchpilot_gate_admitted_total{namespace="ns",pod=~"a|b"}[60s]))'),
        (Signal.RUNNING, 'sum by (pod) (avg_over_time(vllm:num_requests_running{namespace="ns",pod=~"a|b"}[60s]))'),
        (Signal.KV_USAGE, 'max by (pod) (avg_over_time(vllm:kv_cache_usage_perc{namespace="ns",pod=~"a|b"}[60s]))'),
        (
            Signal.GATE_KNOB,
            'max by (pod, knob) (last_over_time(batchpilot_gate_knob{namespace="ns",pod=~"a|b"}[60s]))',
        ),
        (
            Signal.PROMPT_TOKENS,
            'sum by (pod, le) (rate(vllm:request_prompt_tokens_bucket{namespace="ns",pod=~"a|b"}[60s]))'
            ' or label_replace(sum by (pod) (rate(vllm:request_prompt_tokens_sum{namespace="ns",pod=~"a|b"}[60s])),'
            ' "le", "sum", "", "")',
        ),
    ],
)
def test_one_query_per_signal_aggregated_by_pod(signal: Signal, expected: str) -> None:
    specs = signal_specs(EngineKind.VLLM, {})
    assert QueryBuilder(MetricsSpec(), "ns").query(specs[signal], ["b", "a", "a"]) == expected


def test_override_replaces_preset_and_keeps_kind() -> None:
    override = MetricOverride("vllm:gpu_cache_usage_perc")
    specs = signal_specs(EngineKind.VLLM, {Signal.KV_USAGE.value: override})
    assert specs[Signal.KV_USAGE].metric == override
    assert specs[Signal.KV_USAGE].kind is Kind.GAUGE_MAX


@pytest.mark.parametrize(("seconds", "text"), [(60.0, "60s"), (0.5, "500ms"), (90.25, "90250ms")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize("value", HOSTILE)
def test_escapes_round_trip(value: str) -> None:
    _, literals = split_literals(f'"{escape_string(value)}"')
    assert literals == [value]
    assert re.fullmatch(escape_regex(value), value)
