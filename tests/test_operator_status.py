"""operator/status.py and conditions.py: the status document and the rule "write only when it changed"."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from batchpilot.contract.knobs import ClassMatch, Knobs, ServiceClass, knobs_document
from batchpilot.contract.reasons import ConditionReason, ConditionType
from batchpilot.controller.explain import ClassReport, Conditions, Decision, ModelQuality, Reason
from batchpilot.controller.policy import Mode
from batchpilot.operator.conditions import condition_map
from batchpilot.operator.status import (
    MAX_LAGGARDS,
    ActuationReport,
    CycleReport,
    HeldReport,
    Laggard,
    PodCounts,
    build_status,
    merge_patch,
)

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
PODS = ("chat-0", "chat-1")


def decision(
    cap: int | None = 64,
    *,
    slo_met: bool | None = True,
    metrics: bool = True,
    trusted: bool = True,
    error: float | None = 0.0812,
    per_pod: dict[str, Knobs] | None = None,
    reasons: tuple[Reason, ...] = (),
    classes: tuple[ClassReport, ...] = (),
) -> Decision:
    target = Knobs(max_concurrency=cap)
    return Decision(
        classes=classes,
        time_s=T0.timestamp(),
        target=target,
        per_pod=per_pod if per_pod is not None else dict.fromkeys(PODS, target),
        actuate=True,
        reasons=reasons or (Reason("decide", "predicted goodput is higher", "max_concurrency", 256, cap),),
        quality=ModelQuality(120, error, trusted),
        conditions=Conditions(metrics, trusted, slo_met),
        step_seconds={"observe": 0.01},
        signals={"reporting_pods": 2},
    )


def report(dec: Decision | None = None, **changes: Any) -> CycleReport:
    fields: dict[str, Any] = {
        "mode": Mode.AUTO,
        "pods": PodCounts(2, 2, 2),
        "decision": dec if dec is not None else decision(),
        "actuation": ActuationReport(Knobs(max_concurrency=64), up_to_date=2),
    }
    fields.update(changes)
    return CycleReport(**fields)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: dict(c) for kind, c in condition_map(status["conditions"]).items()}


def test_an_unchanged_cycle_writes_nothing() -> None:
    first = build_status(report(), {}, generation=3, now=T0)
    second = build_status(report(), first, generation=3, now=T0 + timedelta(seconds=30))
    assert merge_patch(first, second) is None
    assert second == first


def test_a_wobbling_held_out_error_does_not_cause_a_write() -> None:
    first = build_status(report(decision(error=0.0812)), {}, generation=1, now=T0)
    second = build_status(report(decision(error=0.0809)), first, generation=1, now=T0 + timedelta(seconds=30))
    assert merge_patch(first, second) is None
    third = build_status(report(decision(error=0.12)), second, generation=1, now=T0 + timedelta(seconds=60))
    assert merge_patch(second, third) == {"model": {"heldOutError": 0.12}, "conditions": third["conditions"]}


def test_transition_time_moves_only_with_the_status() -> None:
    later = T0 + timedelta(minutes=5)
    first = build_status(report(decision(slo_met=True)), {}, generation=1, now=T0)
    missed = build_status(report(decision(slo_met=False)), first, generation=1, now=later)
    before, after = conditions(first), conditions(missed)
    assert after["SLOMet"]["status"] == "False"
    assert after["SLOMet"]["lastTransitionTime"] == "2026-05-01T12:05:00Z"
    # Conditions that did not change keep their original time.
    assert after["Ready"]["lastTransitionTime"] == before["Ready"]["lastTransitionTime"] == "2026-05-01T12:00:00Z"
    patch = merge_patch(first, missed)
    assert patch is not None and set(patch) == {"conditions"}


def test_every_condition_is_reported_with_observed_generation() -> None:
    status = build_status(report(), {}, generation=7, now=T0)
    assert [c["type"] for c in status["conditions"]] == list(ConditionType)
    for condition in status["conditions"]:
        assert condition["observedGeneration"] == 7
        assert condition["status"] in ("True", "False", "Unknown")
        assert condition["reason"] and condition["message"]
    assert status["observedGeneration"] == 7


@pytest.mark.parametrize(
    ("cycle", "expected"),
    [
        pytest.param(
            report(),
            {"Ready": "True", "MetricsAvailable": "True", "ModelTrusted": "True", "SLOMet": "True",
             "Progressing": "False", "Degraded": "False"},
            id="healthy",
        ),
        pytest.param(
            report(decision(slo_met=None, metrics=False, trusted=False)),
            {"Ready": "True", "MetricsAvailable": "False", "ModelTrusted": "False", "SLOMet": "Unknown"},
            id="metrics-missing",
        ),
        pytest.param(
            report(decision=None, problem=(ConditionReason.METRICS_UNAVAILABLE, "connection refused"), actuation=None),
            {"Ready": "False", "MetricsAvailable": "False", "SLOMet": "Unknown"},
            id="prometheus-down",
        ),
        pytest.param(
            report(decision=None, problem=(ConditionReason.NO_READY_PODS, "none ready"), actuation=None),
            {"Ready": "False", "MetricsAvailable": "Unknown"},
            id="no-ready-pods",
        ),
        pytest.param(
            report(actuation=ActuationReport(Knobs(max_concurrency=64), 1, (Laggard("chat-1", "refused"),), ("chat-0",))),
            {"Ready": "True", "Progressing": "True", "Degraded": "True"},
            id="one-laggard",
        ),
        pytest.param(
            report(actuation=ActuationReport(Knobs(max_concurrency=64), 0, (Laggard("chat-0", "x"), Laggard("chat-1", "y")))),
            {"Ready": "False", "Degraded": "True"},
            id="all-laggards",
        ),
        pytest.param(
            report(decision(per_pod={"chat-0": Knobs(max_concurrency=32), "chat-1": Knobs(max_concurrency=64)})),
            {"Progressing": "True"},
            id="canary",
        ),
        pytest.param(
            report(pods=PodCounts(3, 3, 2)),
            {"Degraded": "True"},
            id="a-pod-not-reporting",
        ),
    ],
)
def test_conditions(cycle: CycleReport, expected: dict[str, str]) -> None:
    got = conditions(build_status(cycle, {}, generation=1, now=T0))
    assert {kind: got[kind]["status"] for kind in expected} == expected


def test_problem_reason_and_message_reach_ready() -> None:
    status = build_status(
        report(decision=None, problem=(ConditionReason.INVALID_SPEC, "spec.metrics.endpoint: 'x' is not ..."), actuation=None),
        {},
        generation=2,
        now=T0,
    )
    ready = conditions(status)["Ready"]
    assert ready["reason"] == "InvalidSpec"
    assert ready["message"].startswith("spec.metrics.endpoint")


def test_a_skipped_cycle_keeps_the_last_recommendation() -> None:
    good = build_status(report(), {}, generation=1, now=T0)
    skipped = build_status(
        report(decision=None, problem=(ConditionReason.METRICS_UNAVAILABLE, "down"), actuation=None),
        good,
        generation=1,
        now=T0 + timedelta(seconds=30),
    )
    assert skipped["recommendation"] == good["recommendation"]
    assert skipped["model"] == good["model"]
    assert skipped["applied"] == good["applied"]


def test_recommendation_time_moves_only_when_the_knobs_do() -> None:
    first = build_status(report(decision(cap=64)), {}, generation=1, now=T0)
    same = build_status(report(decision(cap=64)), first, generation=1, now=T0 + timedelta(minutes=1))
    moved = build_status(report(decision(cap=32)), same, generation=1, now=T0 + timedelta(minutes=2))
    assert same["recommendation"]["time"] == "2026-05-01T12:00:00Z"
    assert moved["recommendation"]["time"] == "2026-05-01T12:02:00Z"
    assert moved["recommendation"]["knobs"]["maxConcurrency"] == 32


def test_guard_reasons_say_wanted_and_allowed_never_an_arrow() -> None:
    """An arrow is "ran -> runs" in Events; a guard's pair is what was wanted and what it let through."""
    held = Reason("guard:stabilize", "recommendations in the last 20 s disagree: moving only as far as all agree",
                  "max_concurrency", 209, 512)
    status = build_status(report(decision(cap=512, reasons=(held,))), {}, generation=1, now=T0)
    (text,) = status["recommendation"]["reasons"]
    assert text == ("guard:stabilize: recommendations in the last 20 s disagree: moving only as far as all agree "
                    "(maxConcurrency: wanted 209, allowed 512)")
    assert "->" not in text


def test_prometheus_down_names_the_failed_query_in_every_condition() -> None:
    """B2: not "no completed requests" nor "Healthy" while the query fails."""
    down = "Prometheus query for admitted failed: connection refused"
    status = build_status(report(decision=None, problem=(ConditionReason.METRICS_UNAVAILABLE, down), actuation=None),
                          {}, generation=1, now=T0)
    got = conditions(status)
    assert (got["SLOMet"]["status"], got["SLOMet"]["reason"]) == ("Unknown", "QueryFailed")
    assert down in got["SLOMet"]["message"]
    assert (got["Degraded"]["status"], got["Degraded"]["reason"]) == ("True", "MetricsUnavailable")
    assert down in got["Degraded"]["message"]
    # Metrics missing for the pods (Prometheus answered): that, not "no completed requests".
    missing = conditions(build_status(report(decision(slo_met=None, metrics=False)), {}, generation=1, now=T0))
    assert (missing["SLOMet"]["status"], missing["SLOMet"]["reason"]) == ("Unknown", "MissingOrStale")
    idle = conditions(build_status(report(decision(slo_met=None)), {}, generation=1, now=T0))
    assert idle["SLOMet"]["reason"] == "NoCompletedRequests"
    assert idle["Degraded"]["reason"] == "Healthy"


def test_recommend_after_auto_shows_the_settings_the_pods_still_run() -> None:
    """B3: leaving Auto changes no pod, and the status says what they run, never "not applied"."""
    cap15 = Knobs(max_concurrency=15)
    held = report(mode=Mode.RECOMMEND, actuation=None, held=HeldReport(cap15, 1, (Laggard("chat-1", "runs cap=none"),)))
    status = build_status(held, {}, generation=2, now=T0)
    assert status["applied"] == {
        "knobs": {"maxConcurrency": 15, "agingMs": 2000, "discipline": "fcfs"},
        "upToDate": 1,
        "laggards": ["chat-1: runs cap=none"],
        "summary": "1/2 still cap=15 tokens=none fcfs deadline=none from Auto (mode Recommend)",
    }
    ready = conditions(status)["Ready"]
    assert "keep the settings Auto last applied" in ready["message"]
    never = build_status(report(mode=Mode.RECOMMEND, actuation=None), {}, generation=2, now=T0)
    assert never["applied"] == {"summary": "not applied (mode Recommend)"}


def test_last_change_time_set_by_changes_only() -> None:
    changed = report(actuation=ActuationReport(Knobs(max_concurrency=64), 2, (), ("chat-0", "chat-1")))
    first = build_status(changed, {}, generation=1, now=T0)
    quiet = build_status(report(), first, generation=1, now=T0 + timedelta(minutes=3))
    assert first["lastChangeTime"] == quiet["lastChangeTime"] == "2026-05-01T12:00:00Z"


def test_last_known_good_keeps_its_time_while_unchanged() -> None:
    first = build_status(report(last_known_good=Knobs(max_concurrency=64)), {}, generation=1, now=T0)
    later = build_status(report(last_known_good=Knobs(max_concurrency=64)), first, generation=1,
                         now=T0 + timedelta(minutes=1))
    moved = build_status(report(last_known_good=Knobs(max_concurrency=32)), later, generation=1,
                         now=T0 + timedelta(minutes=2))
    assert later["lastKnownGood"] == first["lastKnownGood"]
    assert moved["lastKnownGood"] == {"knobs": {"maxConcurrency": 32, "discipline": "fcfs", "agingMs": 2000},
                                      "time": "2026-05-01T12:02:00Z"}


def test_laggards_are_capped() -> None:
    many = tuple(Laggard(f"pod-{i}", "unreachable") for i in range(25))
    status = build_status(report(pods=PodCounts(25, 25, 25), actuation=ActuationReport(Knobs(), 0, many)),
                          {}, generation=1, now=T0)
    laggards = status["applied"]["laggards"]
    assert len(laggards) == MAX_LAGGARDS + 1
    assert laggards[-1] == f"... and {25 - MAX_LAGGARDS} more"


def test_a_laggard_line_reads_back_as_written() -> None:
    """`batchpilot explain` parses what the status wrote, with Laggard's own parser."""
    laggard = Laggard("chat-1", "gate admin API at http://10.0.0.7:9090/config unreachable: refused")
    actuation = ActuationReport(Knobs(max_concurrency=64), 1, (laggard,))
    (line,) = build_status(report(actuation=actuation), {}, generation=1, now=T0)["applied"]["laggards"]
    assert line == "chat-1: gate admin API at http://10.0.0.7:9090/config unreachable: refused"
    assert Laggard.parse(line) == laggard
    assert Laggard.parse("... and 3 more") is None


@pytest.mark.parametrize(("mode", "summary"), [(Mode.RECOMMEND, "not applied (mode Recommend)"),
                                               (Mode.OFF, "not applied (mode Off)")])
def test_applied_says_nothing_is_applied_outside_auto(mode: Mode, summary: str) -> None:
    status = build_status(report(mode=mode, actuation=None), {}, generation=1, now=T0)
    assert status["applied"] == {"summary": summary}


def test_knobs_document_leaves_out_unset_limits() -> None:
    assert knobs_document(Knobs(max_concurrency=8, queue_deadline_ms=None)) == {
        "maxConcurrency": 8, "discipline": "fcfs", "agingMs": 2000}


@pytest.mark.parametrize(
    ("current", "desired", "patch"),
    [
        ({"a": 1}, {"a": 1}, None),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({}, {"a": {"b": 1}}, {"a": {"b": 1}}),
        ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}, {"a": {"c": None}}),
        ({"a": {"b": 1}}, {"a": {"b": 1}}, None),
        ({"a": [1, 2]}, {"a": [1]}, {"a": [1]}),
        ({"a": None}, {"a": None}, None),
        ({}, {"a": None}, {"a": None}),
        ({"a": 1}, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ],
)
def test_merge_patch(current: dict[str, Any], desired: dict[str, Any], patch: dict[str, Any] | None) -> None:
    assert merge_patch(current, desired) == patch


def test_merge_patch_applied_gives_the_desired_document() -> None:
    def apply(doc: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        out = dict(doc)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = apply(out[key], value)
            else:
                out[key] = value
        return out

    first = build_status(report(), {}, generation=1, now=T0)
    second = build_status(report(decision=None, problem=(ConditionReason.NO_PODS_SELECTED, "none"), actuation=None, pods=PodCounts()),
                          first, generation=2, now=T0 + timedelta(minutes=1))
    patch = merge_patch(first, second)
    assert patch is not None
    assert apply(first, patch) == second


def test_policy_metrics_follow_conditions_and_vanish_with_the_policy():
    from batchpilot.operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    metrics.start_policy("team-a", "chat")
    metrics.record_conditions(
        "team-a", "chat", [{"type": "SLOMet", "status": "False"}, {"type": "Ready", "status": "True"}]
    )
    metrics.policy_rollbacks.labels("team-a", "chat").inc()

    def sample(name, **labels):
        return metrics.registry.get_sample_value(name, {"policy_namespace": "team-a", "policy": "chat", **labels})

    assert sample("batchpilot_policy_condition", condition="SLOMet", status="False") == 1.0
    assert sample("batchpilot_policy_condition", condition="SLOMet", status="True") == 0.0
    assert sample("batchpilot_policy_rollbacks_total") == 1.0
    metrics.forget_policy("team-a", "chat")
    assert sample("batchpilot_policy_condition", condition="SLOMet", status="False") is None
    assert sample("batchpilot_policy_rollbacks_total") is None



# -- SLO classes ------------------------------------------------------------------

INTERACTIVE = ClassReport(
    "interactive", 1, 800, 40, attainment=0.9934, ttft_q_ms=612.4, tpot_q_ms=31.27,
    arrival_rps=12.34, shed_rps=0.0, queue_deadline_ms=800, max_concurrency=32,
)
BATCH = ClassReport(
    "batch", 0, 2000, 50, attainment=0.9712, ttft_q_ms=2480.0, tpot_q_ms=44.9,
    arrival_rps=3.07, shed_rps=0.41, queue_deadline_ms=20000,
)
# No traffic in the window: nothing judged.
IDLE = ClassReport("default", 0, 2000, 50)


def with_classes(*classes: ClassReport) -> CycleReport:
    return report(decision(classes=classes))


def test_class_status_publishes_each_class_and_the_worst() -> None:
    status = build_status(with_classes(INTERACTIVE, BATCH, IDLE), {}, generation=1, now=T0)
    assert status["classes"] == [
        {"name": "interactive", "priority": 1, "objective": {"ttftMs": 800, "tpotMs": 40},
         "observed": {"ttftMs": 610, "tpotMs": 31}, "sloMet": True, "attainment": 0.993,
         "arrivalRps": 12, "shedRps": 0, "queueDeadlineMs": 800, "maxConcurrency": 32},
        {"name": "batch", "priority": 0, "objective": {"ttftMs": 2000, "tpotMs": 50},
         "observed": {"ttftMs": 2500, "tpotMs": 45}, "sloMet": False, "attainment": 0.971,
         "arrivalRps": 3.1, "shedRps": 0.41, "queueDeadlineMs": 20000},
        {"name": "default", "priority": 0, "objective": {"ttftMs": 2000, "tpotMs": 50}, "observed": {}},
    ]
    assert status["worstClass"] == "batch 97.1%"
    assert "classes missing their own: batch" in conditions(status)["SLOMet"]["message"]


def test_a_policy_without_classes_publishes_no_class_status() -> None:
    status = build_status(report(), {}, generation=1, now=T0)
    assert "classes" not in status and "worstClass" not in status
    assert "classes" not in conditions(status)["SLOMet"]["message"]


def test_class_numbers_wobbling_inside_their_dead_band_cause_no_write() -> None:
    first = build_status(with_classes(INTERACTIVE, BATCH), {}, generation=1, now=T0)
    wobbled = (
        replace(INTERACTIVE, attainment=0.9921, ttft_q_ms=660.0, tpot_q_ms=29.0, arrival_rps=13.1),
        replace(BATCH, attainment=0.9725, ttft_q_ms=2300.0, arrival_rps=2.9, shed_rps=0.38),
    )
    second = build_status(with_classes(*wobbled), first, generation=1, now=T0 + timedelta(seconds=30))
    assert merge_patch(first, second) is None


@pytest.mark.parametrize(
    ("start", "change", "field", "published"),
    [
        pytest.param(INTERACTIVE, {"ttft_q_ms": 700.0}, ("observed", "ttftMs"), 700, id="ttft-up-14pct"),
        pytest.param(INTERACTIVE, {"arrival_rps": 20.0}, ("arrivalRps",), 20, id="arrivals-up"),
        pytest.param(INTERACTIVE, {"attainment": 0.985}, ("attainment",), 0.985, id="attainment-down"),
        # Inside the 10% band, but across the objective: always shown, and never
        # rounded back onto the other side of it (801, not 800).
        pytest.param(replace(INTERACTIVE, ttft_q_ms=760.0), {"ttft_q_ms": 801.0}, ("observed", "ttftMs"),
                     801, id="across-the-objective"),
    ],
)
def test_class_numbers_past_their_band_or_across_the_objective_are_written(
    start: ClassReport, change: dict[str, Any], field: tuple[str, ...], published: Any
) -> None:
    first = build_status(with_classes(start), {}, generation=1, now=T0)
    second = build_status(with_classes(replace(start, **change)), first, generation=1,
                          now=T0 + timedelta(seconds=30))
    assert merge_patch(first, second) is not None
    node: Any = second["classes"][0]
    for key in field:
        node = node[key]
    assert node == published


def test_crossing_the_objective_flips_slo_met_with_the_numbers() -> None:
    first = build_status(with_classes(replace(INTERACTIVE, ttft_q_ms=790.0)), {}, generation=1, now=T0)
    second = build_status(with_classes(replace(INTERACTIVE, ttft_q_ms=810.0)), first, generation=1,
                          now=T0 + timedelta(seconds=30))
    (before,), (after,) = first["classes"], second["classes"]
    assert (before["sloMet"], before["observed"]["ttftMs"]) == (True, 790)
    assert (after["sloMet"], after["observed"]["ttftMs"]) == (False, 810)


def test_a_skipped_cycle_keeps_the_class_status() -> None:
    good = build_status(with_classes(INTERACTIVE, BATCH), {}, generation=1, now=T0)
    skipped = build_status(
        report(decision=None, problem=(ConditionReason.METRICS_UNAVAILABLE, "down"), actuation=None),
        good, generation=1, now=T0 + timedelta(seconds=30),
    )
    assert skipped["classes"] == good["classes"]
    assert skipped["worstClass"] == good["worstClass"]


def test_classes_removed_from_the_spec_leave_the_status() -> None:
    first = build_status(with_classes(INTERACTIVE, BATCH), {}, generation=1, now=T0)
    second = build_status(report(), first, generation=2, now=T0 + timedelta(seconds=30))
    patch = merge_patch(first, second)
    assert patch is not None and patch["classes"] is None and patch["worstClass"] is None


def test_the_knobs_in_status_carry_the_classes_the_gate_runs() -> None:
    knobs = Knobs(max_concurrency=64, classes=(
        ServiceClass("interactive", priority=1, weight=2.0, queue_deadline_ms=800,
                     match=ClassMatch(header="x-tenant", values=("chat",))),
        ServiceClass("batch"),
    ))
    status = build_status(report(actuation=ActuationReport(knobs, up_to_date=2)), {}, generation=1, now=T0)
    assert status["applied"]["knobs"]["classes"] == [
        {"name": "interactive", "priority": 1, "weight": 2.0, "queueDeadlineMs": 800},
        {"name": "batch", "priority": 0, "weight": 1.0},
    ]
