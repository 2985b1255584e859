"""Hypothesis against the controller's Prometheus parsing: hostile answers in, missing or valid out.

A fake PromQL client answers each of the controller's queries with a
generated result: NaN, +-Inf, negative, huge and unparsable values, stale
and garbage timestamps, missing `pod` / `le` / `knob` labels, bounds that are
not numbers, items that are not objects, whole answers of the wrong shape.
`observe()` must either raise `MetricsUnavailable` (the designed "hold"
signal) or return observations whose every number is finite or missing.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policyspec import controller_spec

from batchpilot.controller.observe import (
    MetricsUnavailable,
    Observation,
    PodObservation,
    WindowHistogram,
    observe,
)
from batchpilot.controller.policy import Policy
from batchpilot.controller.sources import PrometheusSource

NOW_S = 1_800_000_000.0
PODS = ("llm-0", "llm-1")
POLICY = Policy.from_spec(controller_spec(), name="props", namespace="serving")

numbers = st.one_of(
    st.floats(),  # NaN, +-inf, subnormals, +-1.8e308
    st.sampled_from([0.0, -0.0, -1.0, 1e308, -1e308, 5e-324]),
    st.floats(min_value=0, max_value=1e6),
)
value_texts = st.one_of(
    numbers.map(repr),
    numbers.map(str),
    st.sampled_from(["NaN", "+Inf", "-Inf", "Inf", "1e400", "-1e400", "", "abc", "0x10", " 1 "]),
    st.text(max_size=8),
)
stamps = st.one_of(
    st.just(NOW_S),
    st.just(NOW_S - 10_000),  # stale
    st.floats(),
    st.text(max_size=6),
    st.none(),
)
sample_values = st.one_of(
    st.tuples(stamps, value_texts).map(list),
    st.lists(value_texts, max_size=3),  # wrong arity
    st.none(),
    st.text(max_size=4),
    numbers,
)
bound_texts = st.one_of(
    st.sampled_from(["0.005", "0.1", "1", "2.5", "+Inf", "-Inf", "NaN", "sum", "1e309", "x", ""]),
    numbers.map(str),
)
label_sets = st.fixed_dictionaries(
    {},
    optional={
        "pod": st.sampled_from([*PODS, "other-pod", ""]),
        "le": bound_texts,
        "knob": st.sampled_from(
            [
                "max_concurrency",
                "max_inflight_tokens",
                "queue_deadline_ms",
                "aging_ms",
                "max_num_batched_tokens",
                "bogus",
            ]
        ),
        "discipline": st.sampled_from(["fcfs", "shortest-prompt-first", "priority", "lifo"]),
        "namespace": st.text(max_size=6),
    },
)
items = st.one_of(
    st.fixed_dictionaries(
        {"metric": label_sets, "value": sample_values},
    ),
    st.fixed_dictionaries(
        {}, optional={"metric": st.none() | st.text(max_size=3), "value": sample_values}
    ),
    st.none(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
answers = st.one_of(
    st.lists(items, max_size=12),
    st.lists(items, max_size=12),  # twice: most answers are vectors
    st.none(),
    st.text(max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


class ScriptedPrometheus:
    """A PromQL client whose answers are drawn by hypothesis, one per query."""

    def __init__(self, data: st.DataObject) -> None:
        self._data = data
        self.queries: list[str] = []

    def custom_query(
        self, query: str, params: dict[str, Any] | None = None, timeout: int | None = None
    ) -> Any:
        self.queries.append(query)
        return self._data.draw(answers, label=query[:40])


def _check_pod(observation: PodObservation) -> None:
    for name in PodObservation.__dataclass_fields__:
        value = getattr(observation, name)
        if isinstance(value, float):
            assert math.isfinite(value), (name, value)
        elif isinstance(value, WindowHistogram):
            assert all(math.isfinite(rate) for _, rate in value.buckets), (name, value)
            assert value.sum_rate is None or math.isfinite(value.sum_rate), (name, value)
    for key, number in observation.summary(POLICY.slo.quantile).items():
        assert number is None or math.isfinite(number), (key, number)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_any_prometheus_answer_is_missing_or_valid(data: st.DataObject) -> None:
    client = ScriptedPrometheus(data)
    try:
        result = observe(PrometheusSource(client, POLICY), POLICY, NOW_S, list(PODS))
    except MetricsUnavailable as unavailable:
        assert "Prometheus" in str(unavailable)
        return
    assert isinstance(result, Observation)
    assert set(result.pods) | set(result.silent) == set(PODS)
    for observation in [*result.pods.values(), result.pooled]:
        _check_pod(observation)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("+Inf", "-Inf"),  # math.fsum raises ValueError on inf + -inf
        ("1e308", "1e308"),  # math.fsum raises OverflowError on intermediate overflow
        ("NaN", "1"),
    ],
)
def test_pooling_extreme_values_of_two_pods_is_missing_not_an_error(
    first: str, second: str
) -> None:
    class TwoPods:
        def custom_query(self, query: str, params: Any = None, timeout: Any = None) -> Any:
            return [
                {"metric": {"pod": PODS[0]}, "value": [NOW_S, first]},
                {"metric": {"pod": PODS[1]}, "value": [NOW_S, second]},
            ]

    result = observe(PrometheusSource(TwoPods(), POLICY), POLICY, NOW_S, list(PODS))
    _check_pod(result.pooled)
