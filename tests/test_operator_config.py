"""The operator's configuration (operator/config.py): file + environment, every error named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchpilot.operator.config import ConfigError, OperatorConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "operator.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment() -> None:
    config = load_config(None, {})
    assert config == OperatorConfig()
    assert config.namespaces == ()


def test_file_then_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "prometheus: {default: 'http://prom:9090/', thanos: 'https://thanos:443'}\n"
                           "namespaces: [serving]\ntick_seconds: 2\n")
    config = load_config(path, {"BATCHPILOT_OPERATOR_TICK_SECONDS": "0.5"})
    assert config.prometheus == {"default": "http://prom:9090", "thanos": "https://thanos:443"}
    assert config.namespaces == ("serving",)
    assert config.tick_seconds == 0.5  # the environment wins


def test_environment_names_endpoints_and_namespaces() -> None:
    config = load_config(None, {
        "BATCHPILOT_OPERATOR_PROMETHEUS_DEFAULT": "http://a:9090",
        "BATCHPILOT_OPERATOR_PROMETHEUS_LONG_TERM": "http://b:9090",
        "BATCHPILOT_OPERATOR_NAMESPACES": "serving-a, serving-b",
        "BATCHPILOT_OPERATOR_METRICS_PORT": "0",
    })
    assert config.prometheus == {"default": "http://a:9090", "long-term": "http://b:9090"}
    assert config.namespaces == ("serving-a", "serving-b")
    assert config.metrics_port == 0
    assert config.endpoint_url("long-term") == "http://b:9090"
    assert config.endpoint_url("missing") is None


@pytest.mark.parametrize(
    ("text", "env", "setting", "says"),
    [
        ("tick: 5\n", {}, "tick", "unknown setting"),
        ("tick_seconds: fast\n", {}, "tick_seconds", "must be a number"),
        ("tick_seconds: 0\n", {}, "tick_seconds", "between"),
        ("", {"BATCHPILOT_OPERATOR_HEALTH_PORT": "70000"}, "health_port", "between"),
        ("actuation_concurrency: 2.5\n", {}, "actuation_concurrency", "integer"),
        ("prometheus: {}\n", {}, "prometheus", "at least one endpoint"),
        ("prometheus: {default: 'prom:9090'}\n", {}, "prometheus.default", "http(s) URL"),
        ("prometheus: {Default: 'http://p:9090'}\n", {}, "prometheus.Default", "DNS labels"),
        ("namespaces: [Serving]\n", {}, "namespaces", "not a namespace name"),
        ("- a\n- b\n", {}, "config", "mapping"),
        ("tick_seconds: [\n", {}, "config", "not valid YAML"),
        ("max_parallel_steps: true\n", {}, "max_parallel_steps", "number"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, env: dict[str, Any], setting: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env)
    assert caught.value.setting == setting
    assert says in str(caught.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml", {})
    assert caught.value.setting == "config" and "absent.yaml" in str(caught.value)
