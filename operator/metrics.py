"""The operator's own Prometheus metrics, and the query client that feeds three of them.

Served on `metrics_port` (/metrics) from a registry of its own, so a test
or a second operator in one process never sees another's series.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from batchpilot.controller.sources import PromQueryClient

# Control steps take milliseconds (decide, guard) to seconds (a model fit
# over many pods, a slow Prometheus): 1 ms .. 30 s, about 1.5x apart between
# 10 ms and 1 s where steps usually fall, so a quantile read from the buckets
# is within ~25% of the true value.
STEP_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# One PromQL instant query: 1 ms (local, cached) .. 10 s (the default timeout).
CONDITION_STATUSES = ("True", "False", "Unknown")
QUERY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.cycle_seconds = Histogram(
            "batchpilot_operator_control_step_duration_seconds",
            "Wall time of one policy's control step (select pods, observe, fit, decide, guard, act), "
            "not counting the wait for a step slot.",
            registry=self.registry,
            buckets=STEP_BUCKETS_S,
        )
        self.slot_wait_seconds = Histogram(
            "batchpilot_operator_step_slot_wait_seconds",
            "Time a due control step waited for one of the max_parallel_steps slots.",
            registry=self.registry,
            buckets=STEP_BUCKETS_S,
        )
        self.step_seconds = Histogram(
            "batchpilot_operator_step_phase_duration_seconds",
            "Wall time of each named phase of a control step.",
            ["phase"],
            registry=self.registry,
            buckets=STEP_BUCKETS_S,
        )
        self.queries = Counter(
            "batchpilot_operator_prometheus_queries_total",
            "PromQL queries sent, by endpoint name and result.",
            ["endpoint", "result"],
            registry=self.registry,
        )
        self.query_seconds = Histogram(
            "batchpilot_operator_prometheus_query_duration_seconds",
            "Duration of one PromQL query, its waits and retries included.",
            ["endpoint"],
            registry=self.registry,
            buckets=QUERY_BUCKETS_S,
        )
        self.query_samples = Counter(
            "batchpilot_operator_prometheus_samples_total",
            "Result elements (series) PromQL queries returned, by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self.query_retries = Counter(
            "batchpilot_operator_prometheus_query_retries_total",
            "Queries sent again, by endpoint and cause: the HTTP status of an overloaded "
            "endpoint's answer (429, 502, 503, 504) or connection (a dropped connection).",
            ["endpoint", "cause"],
            registry=self.registry,
        )
        self.queries_in_flight = Gauge(
            "batchpilot_operator_prometheus_queries_in_flight",
            "PromQL queries sent and not yet answered, by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self.query_slot_wait_seconds = Histogram(
            "batchpilot_operator_prometheus_query_slot_wait_seconds",
            "Time a query waited for one of the max_concurrent_queries slots "
            "every policy and endpoint share.",
            registry=self.registry,
            buckets=QUERY_BUCKETS_S,
        )
        self.rate_limit_wait_seconds = Histogram(
            "batchpilot_operator_prometheus_rate_limit_wait_seconds",
            "Time a query or retry waited for its endpoint's max_queries_per_second.",
            ["endpoint"],
            registry=self.registry,
            buckets=QUERY_BUCKETS_S,
        )
        self.errors = Counter(
            "batchpilot_operator_errors_total",
            "Control cycles that stopped early, by reason (the Ready condition's reason).",
            ["reason"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "batchpilot_operator_decisions_total",
            "Control steps that produced a decision, by policy mode.",
            ["mode"],
            registry=self.registry,
        )
        self.actuations = Counter(
            "batchpilot_operator_actuations_total",
            "Gates brought to their target, by result (changed; unchanged: found at the target, "
            "not written; failed; restored).",
            ["result"],
            registry=self.registry,
        )
        self.status_writes = Counter(
            "batchpilot_operator_status_writes_total",
            "Status patches written (cycles whose status did not change write none).",
            registry=self.registry,
        )
        self.status_write_failures = Counter(
            "batchpilot_operator_status_write_failures_total",
            "Status patches the API server refused or never answered; each is tried again later.",
            ["code"],
            registry=self.registry,
        )
        self.policies = Gauge(
            "batchpilot_operator_policies",
            "InferencePolicies this operator runs.",
            registry=self.registry,
        )
        self.last_tick = Gauge(
            "batchpilot_operator_last_timer_tick_timestamp_seconds",
            "Unix time a policy timer last fired; the liveness probe fails when it stalls.",
            registry=self.registry,
        )
        # Per policy, for the chart's alerts (MetricsAvailable / SLOMet False
        # for N minutes, repeated rollbacks). `policy_namespace`, not
        # `namespace`: the scrape already sets `namespace` to the operator's.
        self.policy_condition = Gauge(
            "batchpilot_policy_condition",
            "1 for each policy condition's current status, 0 for its other statuses.",
            ["policy_namespace", "policy", "condition", "status"],
            registry=self.registry,
        )
        self.policy_rollbacks = Counter(
            "batchpilot_policy_rollbacks",
            "Canary rollbacks, per policy.",
            ["policy_namespace", "policy"],
            registry=self.registry,
        )
        # Condition types exported per policy, so a deleted policy's series go too.
        self._conditions_seen: dict[tuple[str, str], set[str]] = {}

    def start_policy(self, namespace: str, name: str) -> None:
        # Created at 0, so that increase() sees the first rollback.
        self.policy_rollbacks.labels(namespace, name)
        self._conditions_seen.setdefault((namespace, name), set())

    def record_conditions(
        self, namespace: str, name: str, conditions: Iterable[Mapping[str, Any]]
    ) -> None:
        self.start_policy(namespace, name)
        seen = self._conditions_seen[(namespace, name)]
        for condition in conditions:
            seen.add(condition["type"])
            for status in CONDITION_STATUSES:
                self.policy_condition.labels(namespace, name, condition["type"], status).set(
                    1.0 if condition.get("status") == status else 0.0
                )

    def forget_policy(self, namespace: str, name: str) -> None:
        conditions = self._conditions_seen.pop((namespace, name), None)
        if conditions is None:
            return
        for condition in conditions:
            for status in CONDITION_STATUSES:
                self.policy_condition.remove(namespace, name, condition, status)
        self.policy_rollbacks.remove(namespace, name)


class CountingQueryClient:
    """A PromQueryClient that counts and times each query for one endpoint,
    and counts the series its answers hold (the load each query put on Prometheus)."""

    def __init__(self, inner: PromQueryClient, endpoint: str, metrics: OperatorMetrics) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._metrics = metrics

    def custom_query(
        self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        started = time.perf_counter()
        result = "error"
        try:
            answer = self._inner.custom_query(query, params=params, timeout=timeout)
            result = "ok"
            if isinstance(answer, list):
                self._metrics.query_samples.labels(self._endpoint).inc(len(answer))
            return answer
        finally:
            self._metrics.queries.labels(self._endpoint, result).inc()
            self._metrics.query_seconds.labels(self._endpoint).observe(
                time.perf_counter() - started
            )
