"""SLO classes in the controller: per-class signals, deadlines, reserve caps, reports.

A policy with classes reads the gate's per-class series by their `class`
label (both sources alike), gives each class a queue deadline from its own
TTFT objective, decides the shared limit against the tightest TPOT
objective with traffic, caps lower classes while a higher one misses, and
reports every class; a policy without classes is untouched by all of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any

import pytest
from test_controller_decide import around, trained_model, window
from test_controller_observe import PODS, TIMES, FakePrometheus, assert_same, cumulative

from batchpilot.contract.knobs import DEFAULT_CLASS, ClassMatch, Knobs, ServiceClass
from batchpilot.controller.decide import DecideMemory, initial_knobs, recommend
from batchpilot.controller.explain import Recommendation
from batchpilot.controller.guards import GuardState, run_chain
from batchpilot.controller.loop import PolicyController
from batchpilot.controller.model import WorkloadModel
from batchpilot.controller.observe import (
    ByLabel,
    ClassObservation,
    Observation,
    WindowHistogram,
    observe,
)
from batchpilot.controller.physics import running_limit
from batchpilot.controller.policy import (
    Behavior,
    ClassSpec,
    EngineSpec,
    MetricsSpec,
    Policy,
    Slo,
)
from batchpilot.controller.promql import QueryBuilder
from batchpilot.controller.samples import LengthMix
from batchpilot.controller.signals import CLASS_METRICS, Kind, Signal, signal_specs
from batchpilot.controller.sources import PrometheusSource, SnapshotSource, parse_sample_name
from batchpilot.controller.spec import ClassMatchSpec

INF = math.inf
INTERACTIVE = ClassSpec(
    name="interactive",
    slo=Slo(500, 30),
    priority=1,
    match=ClassMatchSpec(header="x-tenant", values=("web",)),
)
BATCH = ClassSpec(name="batch", slo=Slo(20_000, 100), priority=0, weight=2.0, max_concurrency=40)
CLASSES = (INTERACTIVE, BATCH)
BASE = Policy.default_for(
    Slo(2000, 50),
    EngineSpec(max_num_seqs=512),
    metrics=MetricsSpec(window_s=60.0, staleness_s=90.0),
    namespace="ns",
)
POLICY = dataclasses.replace(BASE, classes=CLASSES)


# -- signals -------------------------------------------------------------------

CLASS_TTFT_LE = ("0.1", "0.5", "1.0", "+Inf")


def class_series(pod_index: int, t: float) -> dict[str, float]:
    """The gate's per-class series on top of the one-class ones."""
    k = pod_index + 1
    n = t / 30.0 + 2.0
    snap = cumulative(pod_index, t)
    for name, rate, shed, shares in (
        ("interactive", 4.0, 0.1, (0.5, 0.98, 1.0, 1.0)),
        ("batch", 2.0, 0.5, (0.0, 0.2, 0.6, 1.0)),
        ("default", 1.0, 0.0, (0.3, 0.9, 1.0, 1.0)),
    ):
        label = f'class="{name}"'
        snap[f"batchpilot_gate_class_admitted_total{{{label}}}"] = 30.0 * rate * k * n
        snap[f"batchpilot_gate_class_shed_total{{{label}}}"] = 30.0 * shed * k * n
        snap[f"batchpilot_gate_class_inflight_requests{{{label}}}"] = 3.0 * rate * k + t / 30.0
        count = 30.0 * rate * k * n
        for family, mean in (
            ("batchpilot_gate_class_time_to_first_token_seconds", 0.3),
            ("batchpilot_gate_class_time_per_output_token_seconds", 0.02),
        ):
            bounds = CLASS_TTFT_LE if "first_token" in family else ("0.01", "0.03", "0.1", "+Inf")
            for le, share in zip(bounds, shares, strict=True):
                snap[f'{family}_bucket{{{label},le="{le}"}}'] = count * share
            snap[f"{family}_sum{{{label}}}"] = count * mean
    return snap


def answers_for(policy: Policy, stamp: float = 90.0) -> dict[str, list[dict[str, Any]]]:
    """What Prometheus answers at t=90 over [60s] for class_series (see
    test_controller_observe.FakePrometheus), grouped by pod and class."""
    builder = QueryBuilder(policy.metrics, policy.namespace)
    answers: dict[str, list[dict[str, Any]]] = {}
    for spec in signal_specs(policy.engine.kind, policy.metrics.overrides, classes=True).values():
        name = spec.metric.metric
        rows: list[dict[str, Any]] = []
        for i, pod in enumerate(PODS):
            before, after = class_series(i, 60.0), class_series(i, 90.0)
            keys = [
                k
                for k in after
                if parse_sample_name(k)[0] in (name, f"{name}_bucket", f"{name}_sum")
            ]
            groups: dict[tuple[str, ...], float] = {}
            for key in keys:
                metric, labels = parse_sample_name(key)
                group: tuple[str, ...] = ()
                if spec.grouped:
                    group += (labels["class"],)
                if spec.kind is Kind.HISTOGRAM:
                    group += (labels["le"] if metric.endswith("_bucket") else "sum",)
                if spec.kind is Kind.LABELLED:
                    group += (labels[spec.by_label or ""],)
                if spec.kind in (Kind.COUNTER, Kind.HISTOGRAM):
                    value = (after[key] - before[key]) / 30.0
                elif spec.kind is Kind.LABELLED:
                    value = after[key]
                else:
                    value = (after[key] + before[key]) / 2.0
                groups[group] = groups.get(group, 0.0) + value
            for group, value in groups.items():
                labels = {"pod": pod}
                rest = list(group)
                if spec.grouped:
                    labels["class"] = rest.pop(0)
                if spec.kind is Kind.HISTOGRAM:
                    labels["le"] = rest.pop(0)
                if spec.kind is Kind.LABELLED:
                    labels[spec.by_label or ""] = rest.pop(0)
                text = repr(value) if math.isfinite(value) else ("+Inf" if value > 0 else "NaN")
                rows.append({"metric": labels, "value": [stamp, text]})
        answers[builder.query(spec, PODS)] = rows
    return answers


def class_snapshot_observation(policy: Policy) -> Observation:
    source = SnapshotSource(policy)
    for t in TIMES:
        source.ingest(t, {pod: class_series(i, t) for i, pod in enumerate(PODS)})
    return observe(source, policy, TIMES[-1], PODS)


def class_fields(observation: Observation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pod, pod_obs in {**observation.pods, "pooled": observation.pooled}.items():
        for name, obs in pod_obs.classes.items():
            for field in dataclasses.fields(obs):
                item = getattr(obs, field.name)
                if isinstance(item, WindowHistogram):
                    out[f"{pod}.{name}.{field.name}.buckets"] = item.buckets
                    out[f"{pod}.{name}.{field.name}.sum"] = item.sum_rate
                else:
                    out[f"{pod}.{name}.{field.name}"] = item
    return out


def test_class_queries_group_by_pod_and_class() -> None:
    builder = QueryBuilder(POLICY.metrics, POLICY.namespace)
    specs = signal_specs(POLICY.engine.kind, {}, classes=True)
    sel = '{namespace="ns",pod=~"pod-a|pod-b"}'
    assert builder.query(specs[Signal.CLASS_ADMITTED], PODS) == (
        f"sum by (pod, class) (rate(batchpilot_gate_class_admitted_total{sel}[60s]))"
    )
    assert builder.query(specs[Signal.CLASS_INFLIGHT], PODS) == (
        f"sum by (pod, class) (avg_over_time(batchpilot_gate_class_inflight_requests{sel}[60s]))"
    )
    ttft = "batchpilot_gate_class_time_to_first_token_seconds"
    assert builder.query(specs[Signal.CLASS_TTFT], PODS) == (
        f"sum by (pod, class, le) (rate({ttft}_bucket{sel}[60s]))"
        f' or label_replace(sum by (pod, class) (rate({ttft}_sum{sel}[60s])), "le", "sum", "", "")'
    )


def test_a_policy_without_classes_reads_no_class_series() -> None:
    plain = signal_specs(BASE.engine.kind, BASE.metrics.overrides)
    assert len(plain) == 22 and not set(plain) & set(CLASS_METRICS)
    # ... even where an override names a per-class signal.
    overridden = signal_specs(
        BASE.engine.kind,
        {
            "classTtft": dict(signal_specs(BASE.engine.kind, {}, classes=True))[
                Signal.CLASS_TTFT
            ].metric
        },
    )
    assert overridden.keys() == plain.keys()
    with_classes = signal_specs(POLICY.engine.kind, POLICY.metrics.overrides, classes=True)
    assert set(with_classes) == set(plain) | set(CLASS_METRICS)
    client = FakePrometheus(answers_for(POLICY))
    observe(PrometheusSource(client, BASE), BASE, 90.0, PODS)
    assert len(client.queries) == 22 and not any("class" in q for q in client.queries)
    assert class_snapshot_observation(BASE).pooled.classes == {}


def test_snapshot_and_prometheus_class_readings_agree() -> None:
    from_snapshots = class_fields(class_snapshot_observation(POLICY))
    client = FakePrometheus(answers_for(POLICY))
    from_prometheus = class_fields(observe(PrometheusSource(client, POLICY), POLICY, 90.0, PODS))
    assert len(client.queries) == 27
    assert from_snapshots.keys() == from_prometheus.keys()
    assert "pooled.batch.ttft.buckets" in from_snapshots
    for key, value in from_snapshots.items():
        assert_same(from_prometheus[key], value, key)


def test_class_readings_by_hand() -> None:
    obs = class_snapshot_observation(POLICY)
    # pod-a (k=1): 30 x 4 admitted and 30 x 0.1 shed per 30 s.
    interactive = obs.pods["pod-a"].classes["interactive"]
    assert interactive.admitted_rps == pytest.approx(4.0)
    assert interactive.shed_rps == pytest.approx(0.1)
    assert interactive.arrival_rps == pytest.approx(4.1)
    assert interactive.inflight == pytest.approx(12.0 + 2.5)  # avg of 12 + 2 and 12 + 3
    assert interactive.ttft is not None and interactive.ttft.count_rate == pytest.approx(4.0)
    assert interactive.ttft.mean == pytest.approx(0.3)
    # Pooled: one average replica (pod-b has twice pod-a's traffic).
    pooled = obs.pooled.classes["batch"]
    assert pooled.admitted_rps == pytest.approx((2.0 + 4.0) / 2)
    assert pooled.ttft is not None and pooled.ttft.fraction_below(0.5) == pytest.approx(0.2)


def test_pooling_counts_a_pod_without_a_class_as_none_of_its_traffic() -> None:
    from batchpilot.controller.observe import _pool

    readings = {Signal.CLASS_ADMITTED: {"a": ByLabel({"x": 4.0}), "b": ByLabel({"y": 2.0})}}
    pooled = _pool(readings, ["a", "b"])[Signal.CLASS_ADMITTED]
    assert isinstance(pooled, ByLabel) and pooled.values == {"x": 2.0, "y": 1.0}


# -- the decision ----------------------------------------------------------------


def hist(value_s: float, rate: float) -> WindowHistogram:
    return around(value_s, rate)


def with_classes(observation: Observation, classes: Mapping[str, ClassObservation]) -> Observation:
    pod = dataclasses.replace(observation.pooled, classes=dict(classes))
    return dataclasses.replace(observation, pods={"p0": pod}, pooled=pod)


def class_obs(
    arrival: float, ttft_s: float, *, shed: float = 0.0, inflight: float = 4.0, tpot_s: float = 0.02
) -> ClassObservation:
    return ClassObservation(
        arrival_rps=arrival,
        admitted_rps=arrival - shed,
        shed_rps=shed,
        inflight=inflight,
        ttft=hist(ttft_s, arrival),
        tpot=hist(tpot_s, arrival),
    )


APPLIED = Knobs(
    max_inflight_tokens=120_000, queue_deadline_ms=1800, discipline="shortest-prompt-first"
)


def healthy_window(applied: Knobs = APPLIED, **overrides: ClassObservation) -> Observation:
    classes = {
        "interactive": class_obs(8.0, 0.2),
        "batch": class_obs(10.0, 3.0, inflight=30.0),
        "default": class_obs(2.0, 0.4),
    }
    classes.update(overrides)
    return with_classes(window(1000, 200, applied=applied), classes)


def test_each_class_gets_a_deadline_from_its_own_objective() -> None:
    rec = recommend(POLICY, healthy_window(), WorkloadModel(POLICY), APPLIED, DecideMemory(), None)
    target = rec.target
    # The knobs' own deadline is the default class's: 2000 ms less the p90 prefill.
    assert target.queue_deadline_ms is not None
    prefill_ms = 2000 - target.queue_deadline_ms
    interactive = target.service_class("interactive")
    assert interactive.queue_deadline_ms == pytest.approx(500 - prefill_ms, abs=1)
    assert target.service_class("batch").queue_deadline_ms == 19_000  # 95% of 20 s
    # The class settings come from the policy's classes.
    assert interactive.priority == 1 and interactive.match == ClassMatch("x-tenant", ("web",))
    batch = target.service_class("batch")
    assert batch.weight == 2.0 and batch.max_concurrency == 40  # the user's cap
    # The default class is the gate's implicit one, carried here for its
    # standing cap alone (interactive has traffic: see the standing reserve).
    assert [c.name for c in target.classes] == ["interactive", "batch", DEFAULT_CLASS]
    default = target.service_class(DEFAULT_CLASS)
    assert default.queue_deadline_ms is None and default.max_concurrency is not None
    # Aging x priority gap covers the lower class's deadline: a batch head
    # is shed before it could go ahead of an interactive one.
    assert target.aging_ms == 19_000


@pytest.mark.parametrize(("batch_ttft_ms", "aging_ms"), [(20_000, 9_500), (2_000, 2_000)])
def test_aging_x_priority_gap_covers_the_lower_classes_deadlines(
    batch_ttft_ms: int, aging_ms: int
) -> None:
    # interactive at priority 2 over batch and the default class at 0.
    high = dataclasses.replace(INTERACTIVE, priority=2)
    low = dataclasses.replace(BATCH, slo=Slo(batch_ttft_ms, 100))
    policy = dataclasses.replace(POLICY, classes=(high, low))
    rec = recommend(policy, healthy_window(), WorkloadModel(policy), APPLIED, DecideMemory(), None)
    batch_deadline = rec.target.service_class("batch").queue_deadline_ms
    assert batch_deadline is not None and rec.target.queue_deadline_ms is not None
    # 19 s / 2 with a 20 s batch objective; with a 2 s one, every deadline
    # is covered by the 2 s aging already there: never lowered.
    assert rec.target.aging_ms == aging_ms
    assert rec.target.aging_ms * 2 >= max(batch_deadline, rec.target.queue_deadline_ms)


def test_the_shared_limit_meets_the_tightest_tpot_objective_with_traffic() -> None:
    model = trained_model()
    observation = healthy_window()
    with_classes_rec = recommend(POLICY, observation, model, APPLIED, DecideMemory(), 0.02)
    tight = dataclasses.replace(BASE, slo=Slo(2000, 30))
    plain_rec = recommend(tight, observation, model, APPLIED, DecideMemory(), 0.02)
    assert with_classes_rec.target.max_inflight_tokens == plain_rec.target.max_inflight_tokens
    # Without interactive traffic the 50 ms default objective is the tightest.
    idle = healthy_window(interactive=ClassObservation(arrival_rps=0.0, admitted_rps=0.0))
    idle_rec = recommend(POLICY, idle, model, APPLIED, DecideMemory(), 0.02)
    assert (
        idle_rec.target.max_inflight_tokens
        == recommend(BASE, idle, model, APPLIED, DecideMemory(), 0.02).target.max_inflight_tokens
    )


def test_a_policy_without_classes_decides_exactly_as_before() -> None:
    model = trained_model()
    plain = window(1000, 200, applied=APPLIED)
    annotated = healthy_window()  # the same window with per-class readings
    for tpot_q_s in (None, 0.02, 0.1):
        before = recommend(BASE, plain, model, APPLIED, DecideMemory(), tpot_q_s)
        after = recommend(BASE, annotated, model, APPLIED, DecideMemory(), tpot_q_s)
        assert after == before
        assert after.target.classes == ()
    assert initial_knobs(BASE).classes == ()
    assert initial_knobs(BASE) == dataclasses.replace(
        initial_knobs(POLICY), classes=(), aging_ms=initial_knobs(BASE).aging_ms
    )


# Batch without a cap of its own: the reserve cap alone.
UNCAPPED = dataclasses.replace(
    POLICY, classes=(INTERACTIVE, dataclasses.replace(BATCH, max_concurrency=None))
)


def test_a_higher_class_missing_while_a_lower_one_is_busy_caps_it_until_healthy() -> None:
    model = WorkloadModel(UNCAPPED)
    memory = DecideMemory()
    missed = healthy_window(interactive=class_obs(8.0, 1.2))  # p99 TTFT 1.2 s > 500 ms
    rec = recommend(UNCAPPED, missed, model, APPLIED, memory, None)
    assert rec.urgent
    mix = LengthMix.from_histograms(around(1000, 1), around(200, 1))
    assert mix is not None
    limit = running_limit(POLICY, rec.target, mix)
    batch_cap = rec.target.service_class("batch").max_concurrency
    default_cap = rec.target.service_class(DEFAULT_CLASS).max_concurrency
    assert batch_cap is not None and default_cap is not None
    # Both lower classes leave room for interactive: the limit less the
    # reserve, by weight (batch 2, default 1).
    assert batch_cap + default_cap < limit
    assert batch_cap == pytest.approx(2 * default_cap, abs=1)
    assert rec.target.service_class("interactive").max_concurrency is None
    assert DEFAULT_CLASS in rec.target.class_names and any(
        c.name == DEFAULT_CLASS for c in rec.target.classes
    )
    # Still missing: 30% lower.
    again = recommend(UNCAPPED, missed, model, rec.target, memory, None)
    again_cap = again.target.service_class("batch").max_concurrency
    assert again_cap is not None and again_cap <= 0.7 * batch_cap + 1
    # Healthy again while batch still presses on its cap (sheds): the cap
    # grows 25% per interval, to at most 80% of the cap that failed.
    current = again.target
    pressing = healthy_window(batch=class_obs(10.0, 3.0, shed=1.0, inflight=30.0))
    caps = []
    for _ in range(6):
        healthy = recommend(UNCAPPED, pressing, model, current, memory, None)
        assert not healthy.urgent
        current = healthy.target
        caps.append(current.service_class("batch").max_concurrency)
    ceiling = 0.8 * (batch_cap + 1)  # the first cap, before its floor
    assert all(
        c is not None and again_cap < c <= min(1.25 * (again_cap + 1), ceiling) for c in caps
    )
    assert caps[-1] == pytest.approx(0.8 * batch_cap, abs=1)
    # Its flood over (no sheds, few in flight): the cap doubles each
    # interval and goes once that reaches the shared limit; what stays is
    # the standing cap (interactive still has traffic), far above it.
    quiet = healthy_window(batch=class_obs(2.0, 0.4, inflight=3.0))
    caps = []
    for _ in range(12):
        healthy = recommend(UNCAPPED, quiet, model, current, memory, None)
        assert not healthy.urgent
        current = healthy.target
        caps.append(current.service_class("batch").max_concurrency)
        if not memory.class_caps:
            break
    assert len(caps) <= 3  # released
    assert not memory.class_caps and not memory.class_caps_failed
    assert caps[-1] == math.floor(standing_cap(healthy, "batch"))
    assert caps[-1] is not None and caps[-1] > again_cap
    # With the user's own cap, the reserve cap is bounded by it.
    capped = recommend(POLICY, missed, model, APPLIED, DecideMemory(), None)
    assert capped.target.service_class("batch").max_concurrency == min(40, batch_cap)


def test_no_cap_when_the_lower_classes_hold_no_slots() -> None:
    idle_lower = healthy_window(
        interactive=class_obs(8.0, 1.2),
        batch=class_obs(0.0001, 3.0, inflight=0.0),
        default=class_obs(0.0001, 0.4, inflight=0.0),
    )
    memory = DecideMemory()
    rec = recommend(POLICY, idle_lower, WorkloadModel(POLICY), APPLIED, memory, None)
    assert rec.target.service_class("batch").max_concurrency == 40
    # No reserve cap; the default class's cap is its standing one.
    assert not memory.class_caps
    default_cap = rec.target.service_class(DEFAULT_CLASS).max_concurrency
    assert default_cap == math.floor(standing_cap(rec, DEFAULT_CLASS))


def test_a_class_shedding_beyond_its_percentile_misses() -> None:
    shedding = healthy_window(interactive=class_obs(8.0, 0.2, shed=0.5))
    rec = recommend(UNCAPPED, shedding, WorkloadModel(UNCAPPED), APPLIED, DecideMemory(), None)
    assert rec.target.service_class("batch").max_concurrency is not None
    assert rec.urgent


# -- guards ---------------------------------------------------------------------


def guarded(policy: Policy, current: Knobs, target: Knobs, *, urgent: bool = False) -> Knobs:
    state = GuardState(now_s=600.0, pods=("p0",), current=current, last_known_good=current)
    return run_chain(policy, state, Recommendation(target, urgent=urgent)).target


def classes_knobs(deadline: int, cap: int | None) -> Knobs:
    return dataclasses.replace(
        APPLIED,
        classes=(
            ServiceClass("interactive", priority=1, queue_deadline_ms=deadline),
            ServiceClass("batch", max_concurrency=cap),
        ),
    )


def test_guards_keep_a_class_deadline_within_the_minimum_change() -> None:
    policy = dataclasses.replace(POLICY, behavior=Behavior(stabilization_window_s=0))
    current = classes_knobs(300, 40)
    # 3% is not worth a reconfiguration; 30% is.
    assert (
        guarded(policy, current, classes_knobs(309, 40))
        .service_class("interactive")
        .queue_deadline_ms
        == 300
    )
    assert (
        guarded(policy, current, classes_knobs(390, 40))
        .service_class("interactive")
        .queue_deadline_ms
        == 390
    )


def test_guards_limit_a_class_caps_step() -> None:
    policy = dataclasses.replace(
        POLICY, behavior=Behavior(stabilization_window_s=0, max_step_factor=2.0)
    )
    current = classes_knobs(300, 40)
    assert (
        guarded(policy, current, classes_knobs(300, 5)).service_class("batch").max_concurrency == 20
    )
    assert (
        guarded(policy, current, classes_knobs(300, 5), urgent=True)
        .service_class("batch")
        .max_concurrency
        == 10
    )
    # A cap where there was none is no step from anything; the user's cap bounds it.
    uncapped = classes_knobs(300, None)
    assert (
        guarded(policy, uncapped, classes_knobs(300, 5)).service_class("batch").max_concurrency == 5
    )
    assert (
        guarded(policy, current, classes_knobs(300, 60)).service_class("batch").max_concurrency
        == 40
    )


def test_stabilization_holds_a_class_deadline_the_window_disputes() -> None:
    policy = dataclasses.replace(POLICY, behavior=Behavior(stabilization_window_s=120))
    current = classes_knobs(300, 40)
    state = GuardState(
        now_s=600.0,
        pods=("p0",),
        current=current,
        last_known_good=current,
        history=((540.0, classes_knobs(300, 40)),),
    )
    rec = run_chain(policy, state, Recommendation(classes_knobs(400, 40)))
    assert rec.target.service_class("interactive").queue_deadline_ms == 300
    assert any(r.knob == "classes.interactive.queueDeadlineMs" for r in rec.reasons)


# -- the loop and its report ---------------------------------------------------------


def test_decision_reports_every_class_highest_priority_first() -> None:
    source = SnapshotSource(POLICY)
    for t in TIMES:
        source.ingest(t, {pod: class_series(i, t) for i, pod in enumerate(PODS)})
    decision = PolicyController(POLICY, source).run_once(TIMES[-1], PODS)
    reports = {r.name: r for r in decision.classes}
    assert [r.name for r in decision.classes] == ["interactive", "batch", "default"]
    interactive = reports["interactive"]
    assert (interactive.slo_ttft_ms, interactive.slo_tpot_ms, interactive.priority) == (500, 30, 1)
    # Pooled over the two pods: 6 admitted + 0.15 shed per replica.
    assert interactive.arrival_rps == pytest.approx(6.15)
    assert interactive.shed_rps == pytest.approx(0.15)
    # admitted share x TTFT within 500 ms (0.98) x TPOT within 30 ms (0.98)
    assert interactive.attainment == pytest.approx(6.0 / 6.15 * 0.98 * 0.98)
    assert interactive.ttft_q_ms is not None and 500 < interactive.ttft_q_ms < 1000
    assert (
        interactive.queue_deadline_ms
        == decision.target.service_class("interactive").queue_deadline_ms
    )
    batch = reports["batch"]
    assert batch.max_concurrency is not None and batch.max_concurrency <= 40
    default = reports["default"]
    assert (default.slo_ttft_ms, default.slo_tpot_ms) == (2000, 50)
    assert default.queue_deadline_ms == decision.target.queue_deadline_ms
    # Without classes: no reports.
    plain_source = SnapshotSource(BASE)
    for t in TIMES:
        plain_source.ingest(t, {pod: class_series(i, t) for i, pod in enumerate(PODS)})
    assert PolicyController(BASE, plain_source).run_once(TIMES[-1], PODS).classes == ()


def test_the_classes_survive_the_gates_reporting_scalar_knobs_only() -> None:
    source = SnapshotSource(POLICY)
    for t in TIMES:
        source.ingest(t, {pod: class_series(i, t) for i, pod in enumerate(PODS)})
    controller = PolicyController(POLICY, source)
    assert controller.current.classes  # the initial knobs carry the classes
    decision = controller.run_once(TIMES[-1], PODS)
    assert {c.name for c in decision.target.classes} >= {"interactive", "batch"}


def test_a_miss_while_the_capped_class_still_drains_does_not_cut_again() -> None:
    model = WorkloadModel(UNCAPPED)
    memory = DecideMemory()
    missed = healthy_window(interactive=class_obs(8.0, 1.2))
    first = recommend(UNCAPPED, missed, model, APPLIED, memory, None)
    cap = first.target.service_class("batch").max_concurrency
    assert cap is not None
    # Batch still holds twice its cap (admitted before it): the cap has not
    # bitten yet, so the next miss holds it rather than cutting 30%.
    draining = healthy_window(
        interactive=class_obs(8.0, 1.2), batch=class_obs(10.0, 3.0, inflight=2.0 * cap)
    )
    held = recommend(UNCAPPED, draining, model, first.target, memory, None)
    assert held.target.service_class("batch").max_concurrency == cap


def test_the_reserve_uses_each_higher_classs_own_time_in_flight() -> None:
    # Interactive: 8 requests/s, 4 in flight -> 0.5 s each (Little's law), far
    # less than the pooled mix's 200-token outputs suggest; twice as many in
    # flight per request -> a reserve about twice as large.
    def reserve(inflight: float) -> float:
        memory = DecideMemory()
        observation = healthy_window(interactive=class_obs(8.0, 1.2, inflight=inflight))
        rec = recommend(UNCAPPED, observation, WorkloadModel(UNCAPPED), APPLIED, memory, None)
        (reason,) = [
            r for r in rec.reasons if r.data.get("class") == "batch" and "reserveSeqs" in r.data
        ]
        value = reason.data["reserveSeqs"]
        assert isinstance(value, float)
        return value

    assert reserve(4.0) == pytest.approx(1.5 * 8.0 * 0.5, rel=0.01)
    assert reserve(8.0) == pytest.approx(2 * reserve(4.0), rel=0.01)


# -- the standing reserve -------------------------------------------------------------


def standing_cap(rec: Recommendation, name: str) -> float:
    (reason,) = [r for r in rec.reasons if r.data.get("class") == name and "roomTokens" in r.data]
    value = reason.data["capSeqs"]
    assert isinstance(value, float)
    return value


def flood_window(lower_inflight: float, interactive: ClassObservation | None = None) -> Observation:
    """Batch's long requests in flight (9,000 tokens each) beside a few short
    interactive ones, the gate's in-flight token counter counting both."""
    observation = healthy_window(
        interactive=interactive or class_obs(1.0, 0.2, inflight=2.0),
        batch=class_obs(2.0, 3.0, inflight=lower_inflight),
        default=ClassObservation(arrival_rps=0.0, admitted_rps=0.0),
    )
    pod = dataclasses.replace(
        observation.pooled,
        gate_inflight=lower_inflight + 2.0,
        gate_inflight_tokens=lower_inflight * 9000.0 + 2.0 * 600.0,
    )
    return dataclasses.replace(observation, pods={"p0": pod}, pooled=pod)


def test_a_higher_class_with_traffic_gets_a_standing_reserve_before_any_miss() -> None:
    memory = DecideMemory()
    rec = recommend(UNCAPPED, flood_window(10.0), WorkloadModel(UNCAPPED), APPLIED, memory, None)
    # Interactive meets its objective: no reserve cap, a standing one.
    assert not memory.class_caps
    cap = rec.target.service_class("batch").max_concurrency
    assert cap is not None
    (reason,) = [
        r for r in rec.reasons if r.data.get("class") == "batch" and "roomTokens" in r.data
    ]
    room, reserve = reason.data["roomTokens"], reason.data["reserveTokens"]
    assert isinstance(room, float) and isinstance(reserve, float)
    assert reserve > 0.0
    # Sized by batch's own requests (every in-flight token counted as
    # batch's: 9,120 a request), so batch filled to its cap leaves the
    # reserve free inside the room; the pooled mix's 1,200 tokens a
    # request would have let batch take the whole budget 7x over.
    assert reason.data["seqTokens"] == pytest.approx((10 * 9000 + 1200) / 10)
    assert cap * 9000.0 <= room - reserve
    assert (cap + 1) * 9120.0 > room - reserve
    # The room is the token budget in force (no KV reading smaller).
    assert room == pytest.approx(APPLIED.max_inflight_tokens or 0)


def test_without_recent_higher_traffic_there_is_no_standing_cap() -> None:
    idle = ClassObservation(arrival_rps=0.0, admitted_rps=0.0)
    memory = DecideMemory()
    rec = recommend(
        UNCAPPED,
        flood_window(10.0, interactive=idle),
        WorkloadModel(UNCAPPED),
        APPLIED,
        memory,
        None,
    )
    assert rec.target.service_class("batch").max_concurrency is None
    assert not any("roomTokens" in r.data for r in rec.reasons)


def test_the_standing_reserve_remembers_a_past_burst_and_decays() -> None:
    model = WorkloadModel(UNCAPPED)
    memory = DecideMemory()
    burst = flood_window(10.0, interactive=class_obs(8.0, 0.2, inflight=8.0))
    reserves = []
    rec = recommend(UNCAPPED, burst, model, APPLIED, memory, None)
    reserves.append(rec)
    for _ in range(3):
        rec = recommend(UNCAPPED, flood_window(10.0), model, rec.target, memory, None)
        reserves.append(rec)

    def reserve_of(r: Recommendation) -> float:
        (reason,) = [
            x for x in r.reasons if x.data.get("class") == "batch" and "roomTokens" in x.data
        ]
        value = reason.data["reserveTokens"]
        assert isinstance(value, float)
        return value

    values = [reserve_of(r) for r in reserves]
    # After the burst (8 in flight) the trickle (2 in flight) would need a
    # quarter of the reserve; the remembered peak decays 10% per interval.
    for before, after in itertools.pairwise(values):
        assert after == pytest.approx(before * 0.9)
    assert values[-1] > 2 * reserve_of(
        recommend(UNCAPPED, flood_window(10.0), model, APPLIED, DecideMemory(), None)
    )


def test_a_standing_cut_that_bites_is_urgent() -> None:
    model = WorkloadModel(UNCAPPED)
    # Batch holds 40 long requests, far over what the budget has room for.
    rec = recommend(UNCAPPED, flood_window(40.0), model, APPLIED, DecideMemory(), None)
    cap = rec.target.service_class("batch").max_concurrency
    assert cap is not None and cap < 40
    assert rec.urgent
    # Holding less than the cap: nothing to cut now, no urgency.
    calm = recommend(UNCAPPED, flood_window(5.0), model, APPLIED, DecideMemory(), None)
    calm_cap = calm.target.service_class("batch").max_concurrency
    assert calm_cap is not None and calm_cap > 5
    assert not calm.urgent


def test_the_kv_cache_is_read_from_the_in_flight_counter_with_classes() -> None:
    # 10 batch requests of 9,000 charged tokens (8,000 prompt + 1,000
    # output) hold ~8,500 each; the completions' mix (1,000 + 200) says
    # 1,100: the one-class estimate reads the cache ~8x small.
    observation = flood_window(10.0)
    pod = dataclasses.replace(observation.pooled, running=12.0, kv_usage=0.3, waiting=0.0)
    observation = dataclasses.replace(observation, pods={"p0": pod}, pooled=pod)
    memory = DecideMemory()
    recommend(UNCAPPED, observation, WorkloadModel(UNCAPPED), APPLIED, memory, None)
    mix = LengthMix.from_histograms(around(1000, 1), around(200, 1))
    assert mix is not None
    per_seq = (10 * 9000 + 1200) / 12 - mix.output_sq_mean / mix.output_mean / 2
    assert memory.kv_capacity_tokens == pytest.approx(12 * per_seq / 0.3, rel=0.01)
    # Without classes: the one-class estimate, from the completions' mix.
    plain = DecideMemory()
    recommend(BASE, observation, WorkloadModel(BASE), APPLIED, plain, None)
    assert plain.kv_capacity_tokens == pytest.approx(12 * mix.context_per_seq / 0.3, rel=0.01)
    # The engine queueing (what the gate admitted is not all running): no reading.
    waiting = dataclasses.replace(pod, waiting=3.0)
    held = DecideMemory()
    recommend(
        UNCAPPED,
        dataclasses.replace(observation, pods={"p0": waiting}, pooled=waiting),
        WorkloadModel(UNCAPPED),
        APPLIED,
        held,
        None,
    )
    assert held.kv_capacity_tokens is None
