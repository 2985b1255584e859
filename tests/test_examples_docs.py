"""The user docs cannot drift from the code they describe.

docs/api.md is generated from the CRD (scripts/gen-api-docs); the other pages
are written by hand, so these tests read the names users look up (condition
and Event reasons from contract/reasons.py, metric names from the operator's
and the gate's source) and fail when a page misses one. Links between pages
must resolve.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from batchpilot.contract.gate_metrics import GateMetric
from batchpilot.contract.reasons import ConditionReason, ConditionType, EventReason

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
CRD = REPO / "crds" / "inferencepolicy.yaml"


def _gen_api_docs() -> ModuleType:
    path = REPO / "scripts" / "gen-api-docs"
    loader = importlib.machinery.SourceFileLoader("gen_api_docs", str(path))
    spec = importlib.util.spec_from_loader("gen_api_docs", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_api_reference_is_generated_from_the_current_crd() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-api-docs"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _field_paths(schema: dict[str, Any], path: str) -> list[str]:
    paths = [path]
    for name, child in schema.get("properties", {}).items():
        paths += _field_paths(child, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        for name, child in schema["additionalProperties"].get("properties", {}).items():
            paths += _field_paths(child, f"{path}{{key}}.{name}")
    if schema.get("type") == "array":
        for name, child in schema.get("items", {}).get("properties", {}).items():
            paths += _field_paths(child, f"{path}[].{name}")
    return paths


def test_api_reference_lists_every_crd_field() -> None:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    root = version["schema"]["openAPIV3Schema"]["properties"]
    text = (DOCS / "api.md").read_text()
    fields = _field_paths(root["spec"], "spec") + _field_paths(root["status"], "status")
    missing = [field for field in fields if f"`{field}`" not in text]
    assert missing == []
    assert len(fields) > 50


@pytest.mark.parametrize(
    ("extra", "expected_row"),
    [
        ({"type": "integer", "description": "A new knob.", "minimum": 2, "maximum": 9},
         "| `spec.newField` | integer | ≥ 2; ≤ 9 | A new knob. |"),
        ({"type": "string", "enum": ["a", "b"], "default": "a", "description": "Pick one."},
         "| `spec.newField` | string | one of `a`, `b`; default `a` | Pick one. |"),
        ({"type": "array", "items": {"type": "string"}, "maxItems": 3, "description": "Some | bars."},
         "| `spec.newField` | list of string | items ≤ 3 | Some \\| bars. |"),
    ],
)
def test_api_generator_documents_a_new_field(extra: dict[str, Any], expected_row: str) -> None:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["newField"] = extra
    assert expected_row in _gen_api_docs().render(crd).splitlines()


# --- names users look up ----------------------------------------------------------------


def _tree(relative: str) -> ast.Module:
    return ast.parse((REPO / relative).read_text())


def test_troubleshooting_covers_every_condition_reason() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    assert sorted(r for r in ConditionReason if f"`{r}`" not in text) == []


def test_status_page_covers_every_condition_and_event_reason() -> None:
    text = (DOCS / "status-and-events.md").read_text()
    for words in (ConditionType, ConditionReason, EventReason):
        assert sorted(w for w in words if f"`{w}`" not in text) == [], words.__name__


def _metric_names(relative: str, prefix: str) -> set[str]:
    return {node.value for node in ast.walk(_tree(relative))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and re.fullmatch(prefix + r"[a-z_]+", node.value)}


def test_metrics_page_lists_every_operator_and_gate_metric() -> None:
    text = (DOCS / "metrics-and-alerts.md").read_text()
    operator_metrics = _metric_names("operator/metrics.py", "batchpilot_operator_")
    gate_metrics = {str(metric) for metric in GateMetric}
    assert len(operator_metrics) >= 5 and len(gate_metrics) == 26
    assert sorted(m for m in operator_metrics | gate_metrics if f"`{m}" not in text) == []


# --- links -------------------------------------------------------------------------------


def _anchor(heading: str) -> str:
    # GitHub's slug: lower case, punctuation dropped, spaces to hyphens.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_links_between_docs_resolve(page: str) -> None:
    # Inline code (regex patterns in api.md) holds brackets that are not links.
    text = re.sub(r"`[^`]*`", "", (DOCS / page).read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (DOCS / file_part) if file_part else DOCS / page
        if not linked.is_file():
            broken.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    assert broken == []
