"""crds/inferencepolicy.yaml, read as a file: generated from the typed spec,
structural, documented, and in step with the controller's Policy (the API
server must reject what Policy rejects).

The API server's own verdicts on the same CRD are in test_crd_apiserver.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from policyspec import policy_spec, with_field

from batchpilot.contract.knobs import (
    CLASS_NAME,
    CLASS_PRIORITY_LIMIT,
    DISCIPLINES,
    MAX_CLASS_WEIGHT,
    MAX_CLASSES,
    MAX_CONCURRENCY_LIMIT,
    MAX_DEADLINE_MS,
    MAX_MATCH_VALUES,
    MAX_TOKENS_LIMIT,
    WIRE_NAMES,
    ClassMatch,
    Knobs,
    ServiceClass,
)
from batchpilot.controller.explain import ClassReport, Conditions, Decision, ModelQuality, Reason
from batchpilot.controller.policy import EngineKind, Mode, PolicyError
from batchpilot.controller.signals import SIGNAL_NAMES
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.spec import parse_policy
from batchpilot.operator.status import (
    ActuationReport,
    CycleReport,
    HeldReport,
    Laggard,
    PodCounts,
    build_status,
)

ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = ROOT / "crds" / "inferencepolicy.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("policy-*.yaml"))


def test_crd_file_is_generated_from_the_typed_spec() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-crd"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    return only


@pytest.fixture(scope="module")
def spec_schema(version: dict[str, Any]) -> dict[str, Any]:
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def walk(schema: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every schema node below (and including) `schema`, with its dotted path."""
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), Mapping):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def at(schema: Mapping[str, Any], dotted: str) -> Mapping[str, Any]:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def test_names_scope_and_version(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "inferencepolicies.batchpilot.dev"
    assert crd["spec"]["group"] == "batchpilot.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        "InferencePolicy", "inferencepolicies", "inferencepolicy")
    assert names["shortNames"] == ["infpol"]
    assert names["categories"] == ["batchpilot"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_schema_is_structural(version: dict[str, Any]) -> None:
    """Every node has a type, no node mixes properties with additionalProperties,
    and nothing preserves unknown fields (the API server prunes and rejects them)."""
    for path, node in walk(version["schema"]["openAPIV3Schema"], "root"):
        assert "type" in node, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if node["type"] == "object" and path not in ("root.metadata",):
            assert "properties" in node or "additionalProperties" in node, f"{path}: an object with no schema"


def test_every_spec_and_status_field_is_described(version: dict[str, Any]) -> None:
    root = version["schema"]["openAPIV3Schema"]
    for top in ("spec", "status"):
        for path, node in walk(root["properties"][top], top):
            if path.endswith("[]") or path.endswith("{}"):
                continue  # list items and map values are described by their parent
            assert node.get("description", "").strip(), f"{path} has no description"


def test_status_has_observed_generation_and_conditions(version: dict[str, Any]) -> None:
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["observedGeneration"]["type"] == "integer"
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}
    assert "observedGeneration" in item["properties"]


def test_printer_columns_exist_and_point_into_the_schema(version: dict[str, Any]) -> None:
    columns = version["additionalPrinterColumns"]
    default_view = [c["name"] for c in columns if c.get("priority", 0) == 0]
    # Unchanged by SLO classes: their column is in the wide view, where a
    # policy without classes does not show an empty one.
    assert default_view == ["Mode", "Pods", "Batch Cap", "SLO Met", "Age"]
    wide = [c["name"] for c in columns if c.get("priority", 0) == 1]
    assert wide == ["Worst Class", "Applied", "Reason"]
    root = version["schema"]["openAPIV3Schema"]
    for column in columns:
        path = column["jsonPath"]
        if path == ".metadata.creationTimestamp":
            continue
        # `.status.conditions[?(@.type=="SLOMet")].status` -> status.conditions.status
        dotted = re.sub(r"\[\?\(.*?\)\]", "", path).lstrip(".")
        node = root
        for part in dotted.split("."):
            node = node["properties"][part] if "properties" in node else node["items"]["properties"][part]
        assert node["type"] == column["type"] or column["type"] == "string", column


def test_enums_match_the_controller(spec_schema: dict[str, Any]) -> None:
    assert at(spec_schema, "engine.kind")["enum"] == [kind.value for kind in EngineKind]
    assert at(spec_schema, "mode")["enum"] == [mode.value for mode in Mode]
    assert at(spec_schema, "knobs.discipline.allowed")["items"]["enum"] == list(DISCIPLINES)
    assert set(at(spec_schema, "knobs")["properties"]) == set(WIRE_NAMES.values())


def test_override_signal_list_matches_the_controller(spec_schema: dict[str, Any]) -> None:
    (rule,) = at(spec_schema, "metrics.overrides")["x-kubernetes-validations"]
    listed = set(re.findall(r"'([A-Za-z0-9]+)'", rule["rule"]))
    assert listed == set(SIGNAL_NAMES)


@pytest.mark.parametrize(
    ("camel", "limit"),
    [
        ("maxConcurrency", MAX_CONCURRENCY_LIMIT),
        ("maxInflightTokens", MAX_TOKENS_LIMIT),
        ("queueDeadlineMs", MAX_DEADLINE_MS),
        ("maxNumBatchedTokens", MAX_TOKENS_LIMIT),
    ],
)
def test_knob_maximum_is_the_knobs_limit(spec_schema: dict[str, Any], camel: str, limit: int) -> None:
    knob = at(spec_schema, f"knobs.{camel}")
    assert knob["properties"]["min"]["maximum"] == limit
    assert knob["properties"]["max"]["maximum"] == limit


CONFIG = OperatorConfig(prometheus={"default": "http://prometheus:9090"})
BASE_SPEC = policy_spec(
    engine={"kind": "vllm", "maxNumSeqs": 256, "maxNumBatchedTokens": 8192, "runtimeTunable": True},
    actuation={"native": True},
    knobs={},
    behavior={"canary": {}},
    metrics={},
)
# Every bounded integer/number field of the spec (its dotted path under spec).
BOUNDED_FIELDS = [
    "slo.ttftMs",
    "slo.tpotMs",
    "engine.maxNumSeqs",
    "engine.maxNumBatchedTokens",
    "engine.kvCacheTokens",
    "behavior.intervalSeconds",
    "behavior.stabilizationWindowSeconds",
    "behavior.maxStepFactor",
    "behavior.minChangePercent",
    "behavior.canary.intervals",
    "metrics.windowSeconds",
    "metrics.stalenessSeconds",
    "metrics.timeoutSeconds",
    "actuation.adminPort",
]


# Every bounded field of a class (its path under spec.classes[]), tested on one class.
BOUNDED_CLASS_FIELDS = ["slo.ttftMs", "slo.tpotMs", "priority", "weight", "maxConcurrency"]


def test_bounded_fields_are_every_bounded_field_of_the_schema(spec_schema: dict[str, Any]) -> None:
    """So that a new bounded field cannot miss the tests below (knob ranges have their own)."""
    bounded = {
        path.removeprefix("spec.")
        for path, node in walk(spec_schema, "spec")
        if "minimum" in node and "maximum" in node and not node.get("exclusiveMaximum")
    }
    assert {path for path in bounded if not path.startswith(("knobs.", "classes[]."))} == set(BOUNDED_FIELDS)
    assert {path.removeprefix("classes[].") for path in bounded if path.startswith("classes[].")} == set(
        BOUNDED_CLASS_FIELDS)


@pytest.mark.parametrize("path", BOUNDED_CLASS_FIELDS)
def test_crd_bounds_of_a_class_are_the_policy_bounds(spec_schema: dict[str, Any], path: str) -> None:
    """As for the fields above, on the one class of a policy whose own objectives are the loosest allowed."""
    field = spec_schema["properties"]["classes"]["items"]
    for part in path.split("."):
        field = field["properties"][part]
    low, high = field["minimum"], field["maximum"]
    step = 1 if field["type"] == "integer" else 0.01
    loosest = with_field(BASE_SPEC, "slo", {"ttftMs": 3_600_000, "tpotMs": 60_000, "percentile": 50})

    def spec_with(value: float) -> dict[str, Any]:
        return with_field(loosest, "classes", [with_field({"name": "c", "slo": {"ttftMs": 1, "tpotMs": 1}},
                                                          path, value)])

    inside = [high] if field.get("exclusiveMinimum") else [low, high]
    for value in inside:
        parse_policy(spec_with(value), name="p", namespace="ns", config=CONFIG)
    for outside in (low if field.get("exclusiveMinimum") else low - step, high + step):
        with pytest.raises(PolicyError) as caught:
            parse_policy(spec_with(outside), name="p", namespace="ns", config=CONFIG)
        assert caught.value.field == f"spec.classes[0].{path}"


def test_class_limits_are_the_gates(spec_schema: dict[str, Any]) -> None:
    """The spec cannot ask for a class the gate's knobs refuse (contract/knobs.py)."""
    classes = spec_schema["properties"]["classes"]
    item = classes["items"]["properties"]
    assert classes["maxItems"] == MAX_CLASSES
    assert item["name"]["pattern"] == f"^{CLASS_NAME.pattern}$"
    assert (item["priority"]["minimum"], item["priority"]["maximum"]) == (-CLASS_PRIORITY_LIMIT, CLASS_PRIORITY_LIMIT)
    assert item["weight"]["maximum"] == MAX_CLASS_WEIGHT and item["weight"]["exclusiveMinimum"]
    assert item["maxConcurrency"]["maximum"] == MAX_CONCURRENCY_LIMIT
    for key in ("values", "models"):
        assert item["match"]["properties"][key]["maxItems"] == MAX_MATCH_VALUES


def _unknown_keys(document: Any, schema: Mapping[str, Any], path: str) -> Iterator[str]:
    """Paths in `document` the schema does not state: the API server would prune them."""
    if isinstance(document, Mapping):
        properties = schema.get("properties") or {}
        for key, value in document.items():
            if key not in properties:
                yield f"{path}.{key}"
            else:
                yield from _unknown_keys(value, properties[key], f"{path}.{key}")
    elif isinstance(document, list):
        for index, item in enumerate(document):
            yield from _unknown_keys(item, schema.get("items") or {}, f"{path}[{index}]")


def test_every_status_key_the_operator_writes_is_in_the_schema(version: dict[str, Any]) -> None:
    """A key the schema lacks is pruned on write: the next cycle finds it missing and
    writes again, every cycle. So a status with classes in every place fits the schema."""
    status_schema = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    knobs = Knobs(max_concurrency=8, max_inflight_tokens=1000, queue_deadline_ms=500, max_num_batched_tokens=512,
                  classes=(ServiceClass("chat", priority=1, weight=2.0, queue_deadline_ms=800, max_concurrency=4,
                                        match=ClassMatch(models=("m",))),))
    decision = Decision(
        time_s=0.0, target=knobs, per_pod={"p": knobs}, actuate=True,
        reasons=(Reason("decide", "why", "max_concurrency", 4, 8),),
        quality=ModelQuality(10, 0.1, True), conditions=Conditions(True, True, False),
        step_seconds={}, signals={},
        classes=(ClassReport("chat", 1, 800, 40, 0.97, 700.0, 30.0, 5.0, 0.1, 800, 4),),
    )
    cycle = CycleReport(Mode.AUTO, PodCounts(1, 1, 1), decision,
                        ActuationReport(knobs, 0, (Laggard("p", "why"),), ("p",)), last_known_good=knobs)
    status = build_status(cycle, {}, generation=1, now=datetime(2026, 1, 1, tzinfo=UTC))
    assert {"classes", "worstClass", "applied", "lastKnownGood"} <= set(status)
    assert list(_unknown_keys(status, status_schema, "status")) == []
    held = build_status(CycleReport(Mode.RECOMMEND, held=HeldReport(knobs, 1)), {}, generation=1,
                        now=datetime(2026, 1, 1, tzinfo=UTC))
    assert list(_unknown_keys(held, status_schema, "status")) == []


@pytest.mark.parametrize("path", BOUNDED_FIELDS)
def test_crd_bounds_are_the_policy_bounds(spec_schema: dict[str, Any], path: str) -> None:
    """The operator accepts exactly the CRD's range: its ends pass, just outside fails."""
    field = at(spec_schema, path)
    low, high = field["minimum"], field["maximum"]
    step = 1 if field["type"] == "integer" else 0.01
    for inside in (low, high):
        parse_policy(with_field(BASE_SPEC, path, inside), name="p", namespace="ns", config=CONFIG)
    for outside in (low - step, high + step):
        with pytest.raises(PolicyError) as caught:
            parse_policy(with_field(BASE_SPEC, path, outside), name="p", namespace="ns", config=CONFIG)
        assert caught.value.field == f"spec.{path}"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_examples_parse_into_policies(example: Path) -> None:
    config = OperatorConfig(prometheus={"default": "http://p:9090", "thanos": "http://t:9090"})
    policies = [doc for doc in yaml.safe_load_all(example.read_text()) if doc and doc["kind"] == "InferencePolicy"]
    assert policies, f"{example.name} holds no InferencePolicy"
    for doc in policies:
        parsed = parse_policy(doc["spec"], name=doc["metadata"]["name"], namespace="ns", config=config)
        assert parsed.policy.slo.ttft_ms == doc["spec"]["slo"]["ttftMs"]
        assert parsed.mode.value == doc["spec"].get("mode", "Recommend")


def test_status_page_documents_every_status_field(version: dict[str, Any]) -> None:
    """docs/status-and-events.md names each top-level status field and each class field."""
    text = (ROOT / "docs" / "status-and-events.md").read_text()
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    class_fields = status["classes"]["items"]["properties"]
    missing = [name for name in [*status, *class_fields] if f"`{name}" not in text]
    assert missing == []
