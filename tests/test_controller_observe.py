"""Both metric sources give the same typed observations; bad values are missing, never zero."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import pytest

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.observe import (
    MetricsUnavailable,
    Observation,
    WindowHistogram,
    observe,
)
from batchpilot.controller.policy import EngineKind, EngineSpec, MetricsSpec, Policy, Slo
from batchpilot.controller.promql import QueryBuilder
from batchpilot.controller.signals import ENGINE_PRESETS, GATE_METRICS, Kind, Signal, signal_specs
from batchpilot.controller.sources import PrometheusSource, SnapshotSource, parse_sample_name

POLICY = Policy.default_for(
    Slo(2000, 50), EngineSpec(), metrics=MetricsSpec(window_s=60.0, staleness_s=90.0), namespace="ns"
)
PODS = ("pod-a", "pod-b")
TIMES = (30.0, 60.0, 90.0)
TTFT_LE = ("0.1", "0.5", "1.0", "2.5", "+Inf")
TOKEN_LE = ("10.0", "100.0", "1000.0", "10000.0", "+Inf")


def cumulative(pod_index: int, t: float) -> dict[str, float]:
    """Counters that grow linearly (and start high enough that Prometheus'
    zero-point rule never clips the extrapolation), gauges that vary."""
    k = pod_index + 1
    n = t / 30.0 + 2.0  # intervals so far, plus history before t=30
    snap: dict[str, float] = {
        "batchpilot_gate_admitted_total": 300.0 * k * n,
        'batchpilot_gate_shed_total{reason="queue_deadline"}': 6.0 * k * n,
        "vllm:prompt_tokens_total": 30_000.0 * k * n,
        "vllm:generation_tokens_total": 9_000.0 * k * n,
        "vllm:num_preemptions_total": 3.0 * n,
        "vllm:num_requests_running": 10.0 * k + t / 30.0,
        "vllm:num_requests_waiting": float(k),
        "vllm:kv_cache_usage_perc": 0.1 * k + t / 900.0,
        "batchpilot_gate_queue_length": 2.0 * k,
        "batchpilot_gate_inflight_requests": 12.0 * k,
        "batchpilot_gate_inflight_tokens": 20_000.0 * k,
        'batchpilot_gate_discipline{discipline="fcfs"}': 0.0,
        'batchpilot_gate_discipline{discipline="shortest-prompt-first"}': 1.0,
        'batchpilot_gate_discipline{discipline="priority"}': 0.0,
        'batchpilot_gate_knob{knob="max_concurrency"}': 64.0,
        'batchpilot_gate_knob{knob="max_inflight_tokens"}': math.inf,
        'batchpilot_gate_knob{knob="queue_deadline_ms"}': 1800.0,
        'batchpilot_gate_knob{knob="aging_ms"}': 2000.0,
        'batchpilot_gate_knob{knob="max_num_batched_tokens"}': 8192.0,
    }
    for name, bounds, shares, mean in (
        ("batchpilot_gate_time_to_first_token_seconds", TTFT_LE, (0.3, 0.7, 0.9, 0.99, 1.0), 0.4),
        ("vllm:time_to_first_token_seconds", TTFT_LE, (0.5, 0.8, 0.95, 1.0, 1.0), 0.2),
        ("vllm:request_prompt_tokens", TOKEN_LE, (0.0, 0.1, 0.6, 1.0, 1.0), 900.0),
        ("vllm:request_generation_tokens", TOKEN_LE, (0.1, 0.5, 1.0, 1.0, 1.0), 150.0),
    ):
        count = 290.0 * k * n
        for le, share in zip(bounds, shares, strict=True):
            snap[f'{name}_bucket{{le="{le}"}}'] = count * share
        snap[f"{name}_sum"] = count * mean
        snap[f"{name}_count"] = count
    return snap


def snapshot_observation() -> Observation:
    source = SnapshotSource(POLICY)
    for t in TIMES:
        source.ingest(t, {pod: cumulative(i, t) for i, pod in enumerate(PODS)})
    return observe(source, POLICY, TIMES[-1], PODS)


class FakePrometheus:
    """Answers each of the policy's queries with what Prometheus returns for
    the samples above at t=90 over [60s]: the range (30, 90] holds the
    samples at 60 and 90, so rate() = (v90 - v60) / 30 (the 30 s gap to the
    range start is within 1.1 sample intervals: extrapolated all the way),
    avg_over_time() = (v60 + v90) / 2, last_over_time() = v90."""

    def __init__(self, answers: Mapping[str, list[dict[str, Any]]]) -> None:
        self.answers = answers
        self.queries: list[str] = []

    def custom_query(self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        self.queries.append(query)
        return self.answers.get(query, [])


def prometheus_answers(now: float = 90.0, stamp: float = 90.0) -> dict[str, list[dict[str, Any]]]:
    builder = QueryBuilder(POLICY.metrics, POLICY.namespace)
    specs = signal_specs(POLICY.engine.kind, POLICY.metrics.overrides)
    answers: dict[str, list[dict[str, Any]]] = {}
    for spec in specs.values():
        name = spec.metric.metric
        rows: list[dict[str, Any]] = []
        for i, pod in enumerate(PODS):
            before, after = cumulative(i, 60.0), cumulative(i, 90.0)

            def row(value: float, pod: str = pod, **labels: str) -> dict[str, Any]:
                return {"metric": {"pod": pod, **labels}, "value": [stamp, repr(value) if math.isfinite(value) else ("+Inf" if value > 0 else "NaN")]}

            keys = [k for k in after if parse_sample_name(k)[0] in (name, f"{name}_bucket", f"{name}_sum")]
            if not keys:
                continue
            if spec.kind is Kind.COUNTER:
                rows.append(row(sum((after[k] - before[k]) / 30.0 for k in keys)))
            elif spec.kind in (Kind.GAUGE_SUM, Kind.GAUGE_MAX):
                rows.append(row(sum((after[k] + before[k]) / 2.0 for k in keys)))
            elif spec.kind is Kind.LABELLED:
                for k in keys:
                    rows.append(row(after[k], **{spec.by_label or "": parse_sample_name(k)[1][spec.by_label or ""]}))
            else:
                for k in keys:
                    metric, labels = parse_sample_name(k)
                    le = labels["le"] if metric.endswith("_bucket") else "sum"
                    rows.append(row((after[k] - before[k]) / 30.0, le=le))
        answers[builder.query(spec, PODS)] = rows
    return answers


def flatten(observation: Observation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pod, pod_obs in {**observation.pods, "pooled": observation.pooled}.items():
        for field in fields(pod_obs):
            item = getattr(pod_obs, field.name)
            if isinstance(item, WindowHistogram):
                out[f"{pod}.{field.name}.buckets"] = item.buckets
                out[f"{pod}.{field.name}.sum"] = item.sum_rate
            else:
                out[f"{pod}.{field.name}"] = item
    return out


def assert_same(actual: Any, expected: Any, key: str) -> None:
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-9), key
    elif isinstance(expected, tuple) and expected and isinstance(expected[0], tuple):
        assert len(actual) == len(expected), key
        for got, want in zip(actual, expected, strict=True):
            assert got == pytest.approx(want, rel=1e-9), key
    else:
        assert actual == expected, key


def test_snapshot_and_prometheus_sources_agree() -> None:
    from_snapshots = flatten(snapshot_observation())
    client = FakePrometheus(prometheus_answers())
    from_prometheus = flatten(observe(PrometheusSource(client, POLICY), POLICY, 90.0, PODS))
    assert from_snapshots.keys() == from_prometheus.keys()
    for key, value in from_snapshots.items():
        assert_same(from_prometheus[key], value, key)
    # one query per signal, whatever the number of pods
    assert len(client.queries) == len(signal_specs(POLICY.engine.kind, {}))


def test_hand_computed_values() -> None:
    obs = snapshot_observation()
    pod = obs.pods["pod-a"]
    # admitted 300/interval, shed 6/interval over 30 s intervals
    assert pod.admitted_rps == pytest.approx(10.0)
    assert pod.arrival_rps == pytest.approx(10.2)
    assert pod.running == pytest.approx((12.0 + 13.0) / 2)
    assert pod.applied == Knobs(64, None, "shortest-prompt-first", 1800, 2000, 8192)
    assert pod.ttft_from_gate
    # gate TTFT: 30% <= 0.1 s, 70% <= 0.5 s: the median is 0.1 + 0.4 * 0.2/0.4
    assert pod.ttft is not None and pod.ttft.quantile(0.5) == pytest.approx(0.3)
    assert pod.prompt_tokens is not None and pod.prompt_tokens.mean == pytest.approx(900.0)
    # pooled = one average replica: pod-b has twice pod-a's load
    assert obs.pooled.admitted_rps == pytest.approx(15.0)
    assert obs.pooled.kv_usage == pytest.approx((0.1 + 0.2 + 2 * (60 + 90) / 2 / 900) / 2)


@pytest.mark.parametrize(
    ("value", "stamp"),
    [("NaN", 90.0), ("1.0", 90.0 - 500.0)],  # NaN, and a stale sample
)
def test_nan_and_stale_prometheus_values_are_missing(value: str, stamp: float) -> None:
    answers = prometheus_answers()
    builder = QueryBuilder(POLICY.metrics, POLICY.namespace)
    running_query = builder.query(signal_specs(POLICY.engine.kind, {})[Signal.RUNNING], PODS)
    answers[running_query] = [{"metric": {"pod": pod}, "value": [stamp, value]} for pod in PODS]
    obs = observe(PrometheusSource(FakePrometheus(answers), POLICY), POLICY, 90.0, PODS)
    assert obs.pods["pod-a"].running is None
    assert Signal.RUNNING.value in obs.pods["pod-a"].missing


def test_empty_answers_mean_missing_not_zero() -> None:
    obs = observe(PrometheusSource(FakePrometheus({}), POLICY), POLICY, 90.0, PODS)
    assert obs.pods == {}
    assert obs.silent == PODS
    assert obs.pooled.arrival_rps is None


def test_nan_in_a_snapshot_is_missing() -> None:
    source = SnapshotSource(POLICY)
    for t in TIMES:
        snaps = {pod: cumulative(i, t) for i, pod in enumerate(PODS)}
        snaps["pod-a"]["vllm:num_requests_running"] = math.nan
        source.ingest(t, snaps)
    obs = observe(source, POLICY, 90.0, PODS)
    assert obs.pods["pod-a"].running is None
    assert obs.pods["pod-b"].running == pytest.approx(22.5)


def test_a_pod_without_fresh_samples_is_silent() -> None:
    source = SnapshotSource(POLICY)
    for t in TIMES:
        source.ingest(t, {"pod-a": cumulative(0, t)})
    source.ingest(200.0, {"pod-b": cumulative(1, 200.0)})
    obs = observe(source, POLICY, 200.0, PODS)
    assert obs.silent == ("pod-a",)  # its newest sample is 110 s old
    # pod-b: gauges read from its one sample; rates need two
    assert obs.pods["pod-b"].running == pytest.approx(20.0 + 200.0 / 30.0)
    assert obs.pods["pod-b"].arrival_rps is None


def test_absent_shed_series_counts_no_sheds() -> None:
    source = SnapshotSource(POLICY)
    for t in TIMES:
        snap = cumulative(0, t)
        del snap['batchpilot_gate_shed_total{reason="queue_deadline"}']
        source.ingest(t, {"pod-a": snap})
    pod = observe(source, POLICY, 90.0, ["pod-a"]).pods["pod-a"]
    assert pod.shed_rps is None
    assert pod.arrival_rps == pytest.approx(10.0)


@pytest.mark.parametrize("error", [OSError("connection refused"), TimeoutError("read timed out")])
def test_unreachable_prometheus_raises_metrics_unavailable(error: Exception) -> None:
    class Failing:
        def custom_query(self, query: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
            raise error

    with pytest.raises(MetricsUnavailable, match="failed"):
        PrometheusSource(Failing(), POLICY).read(90.0, PODS)


@pytest.mark.parametrize(
    ("key", "name", "labels"),
    [
        ("vllm:num_requests_running", "vllm:num_requests_running", {}),
        ('x_bucket{le="+Inf"}', "x_bucket", {"le": "+Inf"}),
        ('m{a="1",b="two words"}', "m", {"a": "1", "b": "two words"}),
        ('m{a="q\\"uote",b="back\\\\slash",c="new\\nline"}', "m", {"a": 'q"uote', "b": "back\\slash", "c": "new\nline"}),
    ],
)
def test_parse_sample_name(key: str, name: str, labels: dict[str, str]) -> None:
    assert parse_sample_name(key) == (name, labels)


@pytest.mark.parametrize("key", ["1bad", 'm{a="unterminated}', "m{=}", 'm{a="1"'])
def test_parse_sample_name_rejects_malformed(key: str) -> None:
    with pytest.raises(ValueError):
        parse_sample_name(key)


def test_the_gate_and_the_simulator_export_every_gate_series_the_controller_reads() -> None:
    from prometheus_client import generate_latest

    from batchpilot.gate.admission import AdmissionQueue
    from batchpilot.gate.metrics import GateMetrics
    from batchpilot.sim.metrics import ReplicaGauges, ReplicaMetrics

    queue = AdmissionQueue(Knobs(max_concurrency=8))
    gate_text = generate_latest(GateMetrics(lambda: queue, lambda: 1).registry).decode()
    sim_text = ReplicaMetrics(block_size=16, num_gpu_blocks=64).render_text(
        ReplicaGauges(0, 0, 0.0, 0, 0, 0, Knobs(max_concurrency=8), 1)
    )
    for exposition in (gate_text, sim_text):
        typed = {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE")}
        assert {str(name) for name in GATE_METRICS.values()} <= typed


def test_reads_the_simulators_series() -> None:
    from pathlib import Path

    from batchpilot.sim.calibration import fit_file
    from batchpilot.sim.engine import EngineConfig, Replica

    calibration = Path(__file__).resolve().parents[2] / "shared/data/calibration/llama3.1-8b_vllm_step_latency.csv"
    if not calibration.exists():
        pytest.skip(f"shared calibration data not found at {calibration}")
    cost = fit_file(calibration, "meta-llama/Meta-Llama-3.1-8B", "h100_sxm").cost
    replica = Replica(EngineConfig(cost, 100_000, 64, 8192), Knobs(max_concurrency=8), name="r0")
    source = SnapshotSource(POLICY)
    for step in range(1, 4):
        for i in range(40):
            replica.submit(step * 30.0 - 30.0 + i * 0.7, 500 + 10 * i, 50)
        source.ingest(step * 30.0, {"r0": replica.snapshot(step * 30.0)})
    pod = observe(source, POLICY, 90.0, ["r0"]).pods["r0"]
    assert pod.arrival_rps == pytest.approx(40 / 30, rel=0.05)
    assert pod.applied is not None and pod.applied.max_concurrency == 8
    for field in ("running", "kv_usage", "prompt_tps", "generation_tps"):
        assert getattr(pod, field) is not None, field
    for field in ("ttft", "itl", "prompt_tokens", "output_tokens", "e2e"):
        assert getattr(pod, field) is not None, field


LLAMACPP_METRICS = {
    Signal.PROMPT_TOKENS_PROCESSED: "llamacpp:prompt_tokens_total",
    Signal.GENERATION_TOKENS: "llamacpp:tokens_predicted_total",
    Signal.RUNNING: "llamacpp:requests_processing",
    Signal.WAITING: "llamacpp:requests_deferred",
    # llama-server has no latency or length histograms: the gate measures
    # TPOT and the lengths per request.
    Signal.TPOT: "batchpilot_gate_time_per_output_token_seconds",
    Signal.PROMPT_TOKENS: "batchpilot_gate_prompt_tokens",
    Signal.OUTPUT_TOKENS: "batchpilot_gate_output_tokens",
}


def test_llamacpp_preset_names_exactly_its_metrics() -> None:
    preset = ENGINE_PRESETS[EngineKind.LLAMACPP]
    assert {signal: metric.metric for signal, metric in preset.items()} == LLAMACPP_METRICS
    assert all(metric.labels == () and metric.scale == 1.0 for metric in preset.values())
    # With the gate's metrics, that is every series the controller reads from such a pod.
    specs = signal_specs(EngineKind.LLAMACPP, {})
    assert {s: spec.metric.metric for s, spec in specs.items()} == {**GATE_METRICS, **LLAMACPP_METRICS}


def test_llamacpp_ttft_and_tpot_come_from_the_gate() -> None:
    policy = Policy.default_for(Slo(2000, 50), EngineSpec(kind=EngineKind.LLAMACPP, max_num_seqs=16))
    source = SnapshotSource(policy)
    for t in TIMES:
        n = t / 30.0 + 2.0
        snap = {
            **{k: v for k, v in cumulative(0, t).items() if not k.startswith("vllm:")},
            "llamacpp:prompt_tokens_total": 30_000.0 * n,
            "llamacpp:tokens_predicted_total": 9_000.0 * n,
            "llamacpp:requests_processing": 12.0,
            "llamacpp:requests_deferred": 3.0,
        }
        for le, share in zip(TTFT_LE, (0.6, 1.0, 1.0, 1.0, 1.0), strict=True):
            snap[f'batchpilot_gate_time_per_output_token_seconds_bucket{{le="{le}"}}'] = 290.0 * n * share
        snap["batchpilot_gate_time_per_output_token_seconds_sum"] = 290.0 * n * 0.05
        snap["batchpilot_gate_time_per_output_token_seconds_count"] = 290.0 * n
        source.ingest(t, {"pod-a": snap})
    pod = observe(source, policy, TIMES[-1], ["pod-a"]).pods["pod-a"]
    assert pod.ttft_from_gate
    # the gate's TTFT (median 0.3 s, see test_hand_computed_values), not an engine's
    assert pod.ttft is not None and pod.ttft.quantile(0.5) == pytest.approx(0.3)
    assert pod.tpot is not None and pod.tpot.mean == pytest.approx(0.05)
    assert (pod.running, pod.waiting) == (12.0, 3.0)
    assert pod.prompt_tps == pytest.approx(1000.0)
    assert pod.kv_usage is None and Signal.KV_USAGE.value in pod.missing
    assert Signal.TTFT.value not in pod.missing
