"""`batchpilot explain` against the real API server, reading a status written the way the operator
writes it (operator/status.py `build_status`, through the status subresource) and the pods'
`batchpilot.dev/applied` annotations; plus the pure parts, table-driven."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from typer.testing import CliRunner

from batchpilot.cli.explain import (
    CLASS_COLUMNS,
    GROUP,
    PLURAL,
    VERSION,
    ExplainError,
    class_rows,
    parse_target,
    pod_rows,
)
from batchpilot.cli.main import app
from batchpilot.contract.gate_api import APPLIED_ANNOTATION
from batchpilot.contract.knobs import ClassMatch, Knobs, ServiceClass, knobs_document
from batchpilot.controller.explain import ClassReport, Conditions, Decision, ModelQuality, Reason
from batchpilot.controller.policy import Mode
from batchpilot.operator.gates import AppliedRecord
from batchpilot.operator.pods import PodInfo, pod_info
from batchpilot.operator.status import (
    ActuationReport,
    CycleReport,
    Laggard,
    PodCounts,
    build_status,
)

TARGET = Knobs(max_concurrency=64, queue_deadline_ms=1500, discipline="shortest-prompt-first")
OLD = Knobs(max_concurrency=256)
LAGGARD_WHY = "gate admin API at http://127.0.0.3:9090/config unreachable: connection refused"


@pytest.mark.parametrize(
    ("target", "ok"),
    [("llm/chat", True), ("chat", False), ("/chat", False), ("llm/", False), ("a/b/c", False)],
)
def test_parse_target(target: str, ok: bool) -> None:
    if ok:
        assert parse_target(target) == ("llm", "chat")
    else:
        with pytest.raises(ExplainError, match="NAMESPACE/NAME"):
            parse_target(target)


def pod(name: str, record: AppliedRecord | None, ready: bool = True) -> PodInfo:
    """A pod as the operator reads it (operator/pods.py), as explain reads it too."""
    annotations = {APPLIED_ANNOTATION: record.to_json()} if record is not None else {}
    status = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return pod_info(name, f"uid-{name}", {}, annotations, status, False)


def record(knobs: Knobs, policy: str = "chat") -> AppliedRecord:
    return AppliedRecord(policy, knobs, 3, "2026-11-22T23:00:00Z", Knobs())


@pytest.mark.parametrize(
    ("the_pod", "reported", "laggard"),
    [
        (pod("llm-0", record(TARGET)), [], None),
        (pod("llm-0", record(OLD)), [], "runs other settings than the target"),
        (pod("llm-0", None), [], "no batchpilot.dev/applied record"),
        (pod("llm-0", record(TARGET, policy="other")), [], "steered by InferencePolicy other"),
        (pod("llm-0", record(TARGET), ready=False), [], "not Ready"),
        (pod("llm-0", record(OLD)), [f"llm-0: {LAGGARD_WHY}"], LAGGARD_WHY),
    ],
)
def test_pod_rows_find_laggards(
    the_pod: PodInfo, reported: list[str], laggard: str | None
) -> None:
    status = {"applied": {"knobs": knobs_document(TARGET), "laggards": reported}}
    (row,) = pod_rows([the_pod], "chat", status)
    if laggard is None:
        assert row.laggard is None
    else:
        assert row.laggard is not None and row.laggard.startswith(laggard)


CLASS_TARGET = Knobs(max_concurrency=64, classes=(
    ServiceClass("interactive", priority=1, weight=3.0, queue_deadline_ms=800, max_concurrency=32,
                 match=ClassMatch(header="x-tenant", values=("chat", "ide"))),
    ServiceClass("batch", queue_deadline_ms=20000, match=ClassMatch(models=("llama-70b",))),
))
CLASS_SPEC = {
    "selector": {"matchLabels": {"app": "chat-llm"}},
    "slo": {"ttftMs": 2000, "tpotMs": 50},
    "classes": [
        {"name": "interactive", "priority": 1, "weight": 3, "maxConcurrency": 32,
         "slo": {"ttftMs": 800, "tpotMs": 40, "percentile": 99.5},
         "match": {"header": "x-tenant", "values": ["chat", "ide"]}},
        {"name": "batch", "match": {"models": ["llama-70b"]}},
    ],
}
CLASS_REPORTS = (
    ClassReport("interactive", 1, 800, 40, 0.9951, 612.0, 31.3, 12.3, 0.0, 800, 32),
    ClassReport("batch", 0, 2000, 50, 0.9712, 2480.0, 44.9, 3.07, 0.41, 20000),
    ClassReport("default", 0, 2000, 50),
)


def class_status() -> dict[str, Any]:
    """A status as the operator writes it for a policy with classes."""
    decision = Decision(
        time_s=0.0, target=CLASS_TARGET, per_pod={}, actuate=False, reasons=(),
        quality=ModelQuality(samples=24, heldout_error=0.08, trusted=True),
        conditions=Conditions(metrics_available=True, model_trusted=True, slo_met=False),
        step_seconds={}, classes=CLASS_REPORTS,
    )
    report = CycleReport(mode=Mode.RECOMMEND, pods=PodCounts(1, 1, 1), decision=decision)
    return build_status(report, {}, generation=1, now=datetime(2026, 11, 22, 23, 0, tzinfo=UTC))


def test_class_rows_show_each_class_against_its_own_objectives() -> None:
    rows = class_rows(CLASS_SPEC, class_status())
    assert [dict(zip([c for c, _ in CLASS_COLUMNS], row, strict=True)) for row in rows] == [
        {"class": "interactive", "priority": "1", "weight": "3", "met": "yes", "attainment": "99.5%",
         "TTFT ms (seen/objective)": "p99.5 610/800", "TPOT ms (seen/objective)": "p99.5 31/40",
         "arrivals/s": "12", "shed/s": "0", "deadline ms": "800", "cap": "32",
         "requests": "x-batchpilot-class: interactive; x-tenant: chat, ide"},
        {"class": "batch", "priority": "0", "weight": "1", "met": "[bold]no[/bold]", "attainment": "97.1%",
         "TTFT ms (seen/objective)": "p99 2500/2000", "TPOT ms (seen/objective)": "p99 45/50",
         "arrivals/s": "3.1", "shed/s": "0.41", "deadline ms": "20000", "cap": "-",
         "requests": "x-batchpilot-class: batch; model: llama-70b"},
        {"class": "default", "priority": "0", "weight": "1", "met": "-", "attainment": "-",
         "TTFT ms (seen/objective)": "p99 -/2000", "TPOT ms (seen/objective)": "p99 -/50",
         "arrivals/s": "-", "shed/s": "-", "deadline ms": "-", "cap": "-",
         "requests": "x-batchpilot-class: default; any other"},
    ]


def test_class_rows_are_none_without_classes() -> None:
    assert class_rows({"slo": {"ttftMs": 2000, "tpotMs": 50}}, operator_status()) == []


def test_a_pod_running_the_target_classes_is_no_laggard_and_its_classes_are_named() -> None:
    status = {"applied": {"knobs": knobs_document(CLASS_TARGET), "laggards": []}}
    (row,) = pod_rows([pod("llm-0", record(CLASS_TARGET))], "chat", status)
    assert row.laggard is None
    (other,) = pod_rows([pod("llm-0", record(Knobs(max_concurrency=64)))], "chat", status)
    assert other.laggard == "runs other settings than the target"


# -- against the API server ------------------------------------------------------------


def operator_status() -> dict[str, Any]:
    """A status as the operator writes it after an Auto cycle with a guard and a laggard."""
    decision = Decision(
        time_s=0.0,
        target=TARGET,
        per_pod={},
        actuate=True,
        reasons=(
            Reason(
                "decide",
                "largest admission limit whose predicted TPOT quantile meets the objective",
            ),
            Reason(
                "guard:max-step",
                "limited to x4 per interval",
                knob="max_concurrency",
                wanted=256,
                allowed=64,
            ),
        ),
        quality=ModelQuality(samples=24, heldout_error=0.08, trusted=True),
        conditions=Conditions(metrics_available=True, model_trusted=True, slo_met=False),
        step_seconds={"observe": 0.01},
    )
    report = CycleReport(
        mode=Mode.AUTO,
        pods=PodCounts(selected=3, ready=2, reporting=2),
        decision=decision,
        actuation=ActuationReport(
            TARGET, up_to_date=1, laggards=(Laggard("llm-1", LAGGARD_WHY),), changed=("llm-0",)
        ),
        last_known_good=Knobs(max_concurrency=128),
    )
    return build_status(report, {}, generation=1, now=datetime(2026, 11, 22, 23, 0, tzinfo=UTC))


def test_explain_reads_status_and_pods(
    inferencepolicy_crd: None, kube_api: Any, k8s_client: Any, namespace: str, make_serving_pod: Any
) -> None:
    policy = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePolicy",
        "metadata": {"name": "chat"},
        "spec": {
            "selector": {"matchLabels": {"app": "chat-llm"}},
            "slo": {"ttftMs": 2000, "tpotMs": 50},
            "actuation": {"tokenSecretRef": {"name": "chat-gate-token"}},
            "mode": "Auto",
        },
    }
    objects = client.CustomObjectsApi(k8s_client)
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, policy)
    objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "chat", {"status": operator_status()}
    )
    labels = {"app": "chat-llm"}
    make_serving_pod(namespace, "llm-0", pod_ip="127.0.0.2", ports={"http": 8080}, labels=labels,
                     annotations={APPLIED_ANNOTATION: record(TARGET).to_json()})  # fmt: skip
    make_serving_pod(namespace, "llm-1", pod_ip="127.0.0.3", ports={"http": 8080}, labels=labels,
                     annotations={APPLIED_ANNOTATION: record(OLD).to_json()})  # fmt: skip
    make_serving_pod(
        namespace, "llm-2", pod_ip="127.0.0.4", ports={"http": 8080}, labels=labels, ready=False
    )
    make_serving_pod(
        namespace, "other", pod_ip="127.0.0.5", ports={"http": 8080}, labels={"app": "else"}
    )

    result = CliRunner().invoke(
        app,
        ["explain", f"{namespace}/chat", "--kubeconfig", str(kube_api.kubeconfig)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "mode Auto" in out and "2/3" in out
    # Recommendation and last known good, per knob.
    assert "maxConcurrency" in out and "64" in out and "128" in out
    # The decision's reason and, separately, the guard that changed it.
    assert "largest admission limit" in out
    # What the step before wanted and what the guard let through: never an "old -> new" arrow.
    assert "guard:max-step" in out and "maxConcurrency: wanted 256, allowed 64" in out
    assert "256 -> 64" not in out
    assert "ObjectivesMissed" in out and "HeldOutErrorLow" in out
    # Pods: the up-to-date one, the laggard the operator reported, the not-ready one; not the unselected pod.
    assert LAGGARD_WHY in out
    assert "not Ready" in out
    assert "other" not in out.split("pods")[-1]


def test_explain_names_a_missing_policy(inferencepolicy_crd: None, kube_api: Any, namespace: str) -> None:
    result = CliRunner().invoke(
        app, ["explain", f"{namespace}/nope", "--kubeconfig", str(kube_api.kubeconfig)]
    )
    assert result.exit_code == 2
    assert "not found" in result.output and "kubectl get inferencepolicies" in result.output


def test_explain_names_a_missing_kubeconfig(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["explain", "llm/chat", "--kubeconfig", str(tmp_path / "none")]
    )
    assert result.exit_code == 2
    assert "--kubeconfig: no such file" in result.output


def test_explain_shows_the_class_table(
    inferencepolicy_crd: None, kube_api: Any, k8s_client: Any, namespace: str, make_serving_pod: Any
) -> None:
    objects = client.CustomObjectsApi(k8s_client)
    policy = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferencePolicy", "metadata": {"name": "classes"},
              "spec": CLASS_SPEC}
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, policy)
    objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "classes", {"status": class_status()}
    )
    make_serving_pod(namespace, "llm-0", pod_ip="127.0.0.2", ports={"http": 8080}, labels={"app": "chat-llm"},
                     annotations={APPLIED_ANNOTATION: record(CLASS_TARGET, policy="classes").to_json()})
    result = CliRunner().invoke(
        app, ["explain", f"{namespace}/classes", "--kubeconfig", str(kube_api.kubeconfig)],
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "SLO classes (last window; worst: batch 97.1%)" in out
    table = out.split("SLO classes")[1].split("why (the decision)")[0]
    for cell in ("interactive", "99.5%", "p99.5 610/800", "batch", "p99 2500/2000", "model: llama-70b",
                 "default", "any other"):
        assert cell in table, table
    # The settings table lists scalar knobs only; the pod's row names its classes.
    assert "classes=interactive/batch" in out
