"""The InferencePolicy CRD in a real API server: it installs, the examples apply,
and bad policies are refused with a message that names the field and the fix."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from policyspec import policy_body, policy_spec, with_field

from batchpilot.contract.knobs import ClassMatch, Knobs, ServiceClass
from batchpilot.controller.explain import ClassReport, Conditions, Decision, ModelQuality
from batchpilot.controller.policy import Mode
from batchpilot.operator.status import (
    ActuationReport,
    CycleReport,
    PodCounts,
    build_status,
    merge_patch,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("policy-*.yaml"))

pytestmark = pytest.mark.stack


def run_kubectl(kubectl: Path, kubeconfig: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(kubectl), f"--kubeconfig={kubeconfig}", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture(scope="module")
def crd_installed(kube_api: Any, inferencepolicy_crd: None) -> Path:
    """The kubeconfig of the API server, once `kubectl apply -f crds/` is served."""
    return kube_api.kubeconfig


def test_crd_is_accepted_without_schema_complaints(crd_installed: Path, kubectl: Path) -> None:
    shown = run_kubectl(kubectl, crd_installed, "get", "crd", "inferencepolicies.batchpilot.dev", "-o", "yaml")
    conditions = {c["type"]: c["status"] for c in yaml.safe_load(shown.stdout)["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    resources = run_kubectl(kubectl, crd_installed, "api-resources", "--api-group=batchpilot.dev")
    assert "infpol" in resources.stdout and "InferencePolicy" in resources.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_examples_apply(crd_installed: Path, kubectl: Path, namespace: str, example: Path) -> None:
    applied = run_kubectl(kubectl, crd_installed, "apply", "-n", namespace, "-f", str(example))
    assert applied.returncode == 0, applied.stderr
    for doc in yaml.safe_load_all(example.read_text()):
        if doc and doc["kind"] == "InferencePolicy":
            name = doc["metadata"]["name"]
            assert f"inferencepolicy.batchpilot.dev/{name} created" in applied.stdout
            stored = run_kubectl(kubectl, crd_installed, "get", "infpol", name, "-n", namespace, "-o", "yaml")
            spec = yaml.safe_load(stored.stdout)["spec"]
            # Defaults the schema fills in, so policies read the same everywhere.
            assert spec["mode"] == doc["spec"].get("mode", "Recommend")


def _policy(spec: dict[str, Any]) -> str:
    return yaml.safe_dump(policy_body("bad", spec))


INVALID = [
    pytest.param(
        policy_spec(knobs={"maxConcurrency": {"min": 64, "max": 8}}),
        ["spec.knobs.maxConcurrency.min", "min must not exceed max"],
        id="min-above-max",
    ),
    pytest.param(
        policy_spec(engine={"maxNumSeqs": 64}, knobs={"maxConcurrency": {"max": 512}}),
        ["spec.knobs.maxConcurrency.max", "above spec.engine.maxNumSeqs", "in the same edit"],
        id="cap-above-engine-ceiling",
    ),
    pytest.param(
        policy_spec(knobs={"maxConcurrency": {"min": 8, "max": 512}}),
        ["spec.knobs.maxConcurrency.max", "above spec.engine.maxNumSeqs (default"],
        id="cap-above-default-engine-ceiling",
    ),
    pytest.param(
        policy_spec(targetRef={"kind": "Deployment", "name": "chat"}),
        ["spec.selector", "spec.targetRef", "exactly one"],
        id="selector-and-targetRef",
    ),
    pytest.param(
        policy_spec(selector=None),
        ["exactly one of spec.selector", "spec.targetRef"],
        id="neither-selector-nor-targetRef",
    ),
    pytest.param(
        policy_spec(engine={"kind": "ollama"}),
        ["spec.engine.kind", 'Unsupported value: "ollama"', '"llamacpp"'],
        id="unknown-engine",
    ),
    pytest.param(
        with_field(policy_spec(), "slo.ttftMs", -5),
        ["spec.slo.ttftMs", "greater than or equal to 1"],
        id="negative-slo",
    ),
    pytest.param(
        with_field(policy_spec(), "slo.tpotMs", 0),
        ["spec.slo.tpotMs", "greater than or equal to 1"],
        id="zero-tpot",
    ),
    pytest.param(
        policy_spec(selector={}),
        ["spec.selector", "empty selector would select every pod"],
        id="empty-selector",
    ),
    pytest.param(
        policy_spec(mode="Auto"),
        ["spec.mode", "spec.actuation.tokenSecretRef is required when spec.mode is Auto"],
        id="auto-without-token",
    ),
    pytest.param(
        policy_spec(knobs={"maxNumBatchedTokens": {"min": 512}}),
        ["spec.knobs.maxNumBatchedTokens", "spec.engine.runtimeTunable"],
        id="prefill-budget-needs-runtime-tunable",
    ),
    pytest.param(
        policy_spec(metrics={"overrides": {"latency": {"metric": "x"}}}),
        ["spec.metrics.overrides", "unknown signal", "ttft"],
        id="unknown-signal",
    ),
    pytest.param(
        policy_spec(metrics={"endpoint": "http://prometheus:9090"}),
        ["spec.metrics.endpoint", "should match"],
        id="endpoint-url-instead-of-name",
    ),
    pytest.param(
        with_field(policy_spec(), "slo.p99", True),
        ['unknown field "spec.slo.p99"'],
        id="unknown-field",
    ),
    # SLO classes (spec.classes): each refusal names the field and says what to do.
    pytest.param(
        policy_spec(classes=[{"name": "chat"}, {"name": "batch"}, {"name": "chat"}]),
        ["spec.classes", "class name chat is used twice", "rename or merge"],
        id="class-names-twice",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "batch", "weight": 0}]),
        ["spec.classes[0].weight", "should be greater than 0"],
        id="class-weight-zero",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "batch", "weight": -2}]),
        ["spec.classes[0].weight", "should be greater than 0"],
        id="class-weight-negative",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "chat", "slo": {"ttftMs": 500, "tpotMs": 50}},
                             {"name": "batch", "slo": {"ttftMs": 9000, "tpotMs": 50}}]),
        ["spec.classes", "spec.classes[1].slo: class batch is looser than spec.slo",
         "tighten the class's slo, or loosen spec.slo"],
        id="class-ttft-looser-than-policy",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "chat", "slo": {"ttftMs": 500, "tpotMs": 80}}]),
        ["spec.classes[0].slo: class chat is looser than spec.slo"],
        id="class-tpot-looser-than-policy",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "chat", "slo": {"ttftMs": 500, "tpotMs": 20, "percentile": 95}}]),
        ["spec.classes[0].slo: class chat is looser than spec.slo", "percentile at least"],
        id="class-percentile-below-the-default-99",
    ),
    pytest.param(
        with_field(policy_spec(classes=[{"name": "chat", "slo": {"ttftMs": 500, "tpotMs": 20,
                                                                 "percentile": 99}}]),
                   "slo.percentile", 99.9),
        ["spec.classes[0].slo: class chat is looser than spec.slo"],
        id="class-percentile-below-the-policys",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "Interactive"}]),
        ["spec.classes[0].name", "should match"],
        id="class-name-not-a-label-value",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "a" * 33}]),
        ["spec.classes[0].name", "may not be more than 32"],
        id="class-name-too-long",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "default", "slo": {"ttftMs": 500, "tpotMs": 20}}]),
        ["spec.classes[0].slo", "the default class's objectives are spec.slo"],
        id="default-class-with-its-own-slo",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "chat", "match": {"header": "x-batchpilot-class",
                                                        "values": ["chat"]}}]),
        ["spec.classes[0].match.header", "already names the class itself"],
        id="match-on-the-class-header",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "chat", "match": {"header": "x-tenant"}}]),
        ["spec.classes[0].match", "values must be listed exactly when header is set"],
        id="match-header-without-values",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "chat", "match": {"header": "x-tenant", "values": ["a", "b"]}},
                             {"name": "batch", "match": {"header": "x-tenant", "values": ["b"]}}]),
        ["spec.classes", "two classes match the same value of the same header"],
        id="two-classes-match-one-header-value",
    ),
    pytest.param(
        policy_spec(classes=[{"name": "chat", "match": {"models": ["llama-8b"]}},
                             {"name": "batch", "match": {"models": ["llama-70b", "llama-8b"]}}]),
        ["spec.classes", "two classes match the same model", "list each model in one class"],
        id="two-classes-match-one-model",
    ),
    pytest.param(
        policy_spec(classes=[{"name": f"c{i}"} for i in range(17)]),
        ["spec.classes", "must have at most 16 items"],
        id="too-many-classes",
    ),
]


@pytest.mark.parametrize(("spec", "fragments"), INVALID)
def test_invalid_policies_are_rejected_naming_the_field(
    crd_installed: Path, kubectl: Path, namespace: str, spec: dict[str, Any], fragments: list[str]
) -> None:
    refused = run_kubectl(kubectl, crd_installed, "apply", "-n", namespace, "-f", "-", stdin=_policy(spec))
    assert refused.returncode != 0, f"accepted: {refused.stdout}"
    for fragment in fragments:
        assert fragment in refused.stderr, refused.stderr
    # Nothing half-created.
    listed = run_kubectl(kubectl, crd_installed, "get", "infpol", "-n", namespace, "-o", "name")
    assert listed.stdout.strip() == ""


@pytest.mark.parametrize(
    "spec",
    [
        {"engine": {"maxNumSeqs": 64}, "knobs": {"maxConcurrency": {"max": 64}}},
        {"knobs": {"maxConcurrency": {"max": 256}}},  # the default maxNumSeqs
        {"engine": {"maxNumSeqs": 512}, "knobs": {"maxConcurrency": {"min": 8}}},
    ],
    ids=["at-the-ceiling", "at-the-default-ceiling", "no-max"],
)
def test_a_cap_up_to_the_engine_ceiling_is_accepted(
    crd_installed: Path, kubectl: Path, namespace: str, spec: dict[str, Any]
) -> None:
    applied = run_kubectl(kubectl, crd_installed, "apply", "-n", namespace, "-f", "-",
                          stdin=_policy(policy_spec(**spec)))
    assert applied.returncode == 0, applied.stderr


def test_raising_the_engine_ceiling_and_the_cap_in_one_edit_is_accepted(
    crd_installed: Path, kubectl: Path, namespace: str
) -> None:
    """The engine restarted with more sequences: one apply raises both, as the rule's message says."""
    before = policy_spec(engine={"maxNumSeqs": 64}, knobs={"maxConcurrency": {"max": 64}})
    assert run_kubectl(kubectl, crd_installed, "apply", "-n", namespace, "-f", "-", stdin=_policy(before)).returncode == 0
    cap_only = {**before, "knobs": {"maxConcurrency": {"max": 512}}}
    refused = run_kubectl(kubectl, crd_installed, "apply", "-n", namespace, "-f", "-", stdin=_policy(cap_only))
    assert refused.returncode != 0 and "spec.engine.maxNumSeqs" in refused.stderr
    both = {**cap_only, "engine": {"maxNumSeqs": 512}}
    applied = run_kubectl(kubectl, crd_installed, "apply", "-n", namespace, "-f", "-", stdin=_policy(both))
    assert applied.returncode == 0, applied.stderr


CLASSES = [
    {"name": "interactive", "priority": 1, "weight": 2.5, "maxConcurrency": 32,
     "slo": {"ttftMs": 800, "tpotMs": 40, "percentile": 99.5},
     "match": {"header": "x-tenant", "values": ["chat", "ide"], "models": ["llama-8b"]}},
    # Same header, other values; another model; the policy's own objectives.
    {"name": "batch", "match": {"header": "x-tenant", "values": ["reports"], "models": ["llama-70b"]}},
    # Equal to spec.slo is not looser; the default class without an slo of its own.
    {"name": "bulk", "slo": {"ttftMs": 2000, "tpotMs": 50, "percentile": 99}},
    {"name": "default", "priority": -1, "weight": 0.5},
]


def test_a_policy_with_classes_is_accepted_and_stored_as_written(
    crd_installed: Path, kubectl: Path, namespace: str
) -> None:
    applied = run_kubectl(kubectl, crd_installed, "apply", "-n", namespace, "-f", "-",
                          stdin=yaml.safe_dump(policy_body("classes", policy_spec(classes=CLASSES))))
    assert applied.returncode == 0, applied.stderr
    stored = run_kubectl(kubectl, crd_installed, "get", "infpol", "classes", "-n", namespace, "-o", "yaml")
    assert yaml.safe_load(stored.stdout)["spec"]["classes"] == CLASSES


def test_a_policy_without_classes_still_reads_as_one_class(
    crd_installed: Path, kubectl: Path, namespace: str
) -> None:
    """v1alpha1 stays compatible: a policy written before classes existed applies unchanged."""
    applied = run_kubectl(kubectl, crd_installed, "apply", "-n", namespace, "-f", "-",
                          stdin=_policy(policy_spec()))
    assert applied.returncode == 0, applied.stderr
    stored = run_kubectl(kubectl, crd_installed, "get", "infpol", "bad", "-n", namespace, "-o", "yaml")
    assert "classes" not in yaml.safe_load(stored.stdout)["spec"]


def test_a_status_with_classes_is_stored_whole_and_shown_in_the_worst_class_column(
    crd_installed: Path, kubectl: Path, namespace: str
) -> None:
    """Nothing the operator writes is pruned (else it would write again every cycle),
    and `kubectl get` shows the worst class."""
    applied = run_kubectl(kubectl, crd_installed, "apply", "-n", namespace, "-f", "-",
                          stdin=yaml.safe_dump(policy_body("classes", policy_spec(classes=CLASSES))))
    assert applied.returncode == 0, applied.stderr
    knobs = Knobs(max_concurrency=64, classes=(
        ServiceClass("interactive", priority=1, weight=2.5, queue_deadline_ms=800, max_concurrency=32,
                     match=ClassMatch(header="x-tenant", values=("chat",))),
        ServiceClass("batch", queue_deadline_ms=20000),
    ))
    decision = Decision(
        time_s=0.0, target=knobs, per_pod={"chat-0": knobs}, actuate=True, reasons=(),
        quality=ModelQuality(10, 0.1, True), conditions=Conditions(True, True, False), step_seconds={}, signals={},
        classes=(ClassReport("interactive", 1, 800, 40, 0.9934, 612.0, 31.3, 12.3, 0.0, 800, 32),
                 ClassReport("batch", 0, 2000, 50, 0.9712, 2480.0, 44.9, 3.07, 0.41, 20000),
                 ClassReport("default", 0, 2000, 50)),
    )
    status = build_status(CycleReport(Mode.AUTO, PodCounts(1, 1, 1), decision, ActuationReport(knobs, 1)),
                          {}, generation=1, now=datetime(2026, 5, 1, tzinfo=UTC))
    patched = run_kubectl(kubectl, crd_installed, "patch", "infpol", "classes", "-n", namespace,
                          "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))
    assert patched.returncode == 0, patched.stderr
    stored = run_kubectl(kubectl, crd_installed, "get", "infpol", "classes", "-n", namespace, "-o", "json")
    # As the operator compares them: no patch means nothing was pruned or changed.
    assert merge_patch(json.loads(stored.stdout)["status"], status) is None
    shown = run_kubectl(kubectl, crd_installed, "get", "infpol", "classes", "-n", namespace, "-o", "wide")
    header, row = shown.stdout.splitlines()
    assert "WORST CLASS" in header and "batch 97.1%" in row, shown.stdout
