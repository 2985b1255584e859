"""The InferencePolicy CRD in a real API server: it installs, the examples apply,
and bad policies are refused with a message that names the field and the fix."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from policyspec import policy_body, policy_spec, with_field

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "crds"
EXAMPLES = sorted((ROOT / "examples").glob("policy-*.yaml"))

pytestmark = pytest.mark.stack


def run_kubectl(kubectl: Path, kubeconfig: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(kubectl), f"--kubeconfig={kubeconfig}", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture(scope="module")
def crd_installed(kube_api: Any, kubectl: Path) -> Path:
    """`kubectl apply -f crds/` and wait until the API server serves the kind."""
    applied = run_kubectl(kubectl, kube_api.kubeconfig, "apply", "-f", str(CRD_DIR))
    assert applied.returncode == 0, applied.stderr
    assert "inferencepolicies.batchpilot.dev" in applied.stdout
    established = run_kubectl(
        kubectl, kube_api.kubeconfig, "wait", "--for=condition=Established", "--timeout=30s",
        "crd/inferencepolicies.batchpilot.dev",
    )
    assert established.returncode == 0, established.stderr
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
