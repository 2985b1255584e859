"""The chart's PrometheusRule: valid rules (promtool check) that fire when,
and only when, they should (promtool test, tests/data/alerts/)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchpilot.sim.sandbox.tools import SETUP_FIX, StackError, helm_path

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "batchpilot"
ALERT_TESTS = REPO / "tests" / "data" / "alerts" / "batchpilot-alerts-test.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(f"promtool not found on PATH: {SETUP_FIX} (installs Debian's prometheus)",
                    pytrace=False)
    return found


@pytest.fixture(scope="module")
def rule_groups() -> list[dict[str, Any]]:
    """spec.groups of the PrometheusRule, as release batchpilot in batchpilot-system
    with every option on (the alert tests' expected labels assume this)."""
    try:
        helm = helm_path()
    except StackError as error:
        pytest.fail(str(error), pytrace=False)
    result = subprocess.run(
        [str(helm), "template", "batchpilot", str(CHART), "--namespace", "batchpilot-system",
         "-f", str(CHART / "ci" / "all-on-values.yaml"), "--show-only", "templates/prometheusrule.yaml"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["spec"]["groups"]


@pytest.fixture
def rules_dir(rule_groups: list[dict[str, Any]], tmp_path: Path) -> Path:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    return tmp_path


def test_promtool_check_rules_passes(promtool: str, rules_dir: Path) -> None:
    result = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=rules_dir,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool: str, rules_dir: Path) -> None:
    result = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=rules_dir,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case(rule_groups: list[dict[str, Any]]) -> None:
    alerts = {rule["alert"] for group in rule_groups for rule in group["rules"]}
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    fires = {case["alertname"] for case in cases if case["exp_alerts"]}
    stays_silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alerts == {"BatchpilotOperatorDown", "BatchpilotNoLeader", "BatchpilotMetricsUnavailable",
                      "BatchpilotSLONotMet", "BatchpilotRepeatedRollbacks"}
    assert fires == alerts
    assert stays_silent == alerts


@pytest.mark.parametrize(
    ("threshold", "fires_at_25m"),
    [(2, True), (3, False)],
)
def test_rollback_threshold_is_honoured(
    promtool: str, rules_dir: Path, threshold: int, fires_at_25m: bool
) -> None:
    # The same two rollbacks in an hour, against two thresholds: shows the
    # value reaches the rule rather than being baked in.
    try:
        helm = helm_path()
    except StackError as error:
        pytest.fail(str(error), pytrace=False)
    rendered = subprocess.run(
        [str(helm), "template", "batchpilot", str(CHART), "--namespace", "batchpilot-system",
         "--set", "prometheusRule.enabled=true", "--set", f"prometheusRule.rollbackThreshold={threshold}",
         "--show-only", "templates/prometheusrule.yaml"],
        capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    groups = yaml.safe_load(rendered.stdout)["spec"]["groups"]
    (rollback_rule,) = [rule for group in groups for rule in group["rules"]
                        if rule["alert"] == "BatchpilotRepeatedRollbacks"]
    (rules_dir / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "r", "rules": [rollback_rule]}]}))
    series = ('batchpilot_policy_rollbacks_total{job="batchpilot-metrics", namespace="batchpilot-system", '
              'policy_namespace="serving-a", policy="chat"}')
    expected = [{"exp_labels": {"severity": "warning", "policy_namespace": "serving-a", "policy": "chat"},
                 "exp_annotations": rollback_rule["annotations"] | {
                     "summary": "InferencePolicy serving-a/chat rolled back 2 canary changes in 1h"}}]
    (rules_dir / "threshold-test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": series, "values": "0x10 1x10 2x20"}],
            "alert_rule_test": [{"eval_time": "25m", "alertname": "BatchpilotRepeatedRollbacks",
                                 "exp_alerts": expected if fires_at_25m else []}],
        }],
    }))
    result = subprocess.run([promtool, "test", "rules", "threshold-test.yaml"], cwd=rules_dir,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
