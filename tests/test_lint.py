"""The codebase's own rules, enforced in CI: lint, strict types on the pure core, layering."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# controller/ is the pure core (docs/design.md): it must run in the simulator,
# the benchmark and the demo with no cluster, so no Kubernetes client or kopf.
CONTROLLER_FORBIDDEN = ("kopf", "kubernetes", "batchpilot.operator", "batchpilot.sim", "batchpilot.cli")


def test_ruff_finds_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_controller_is_strictly_typed(tmp_path):
    # mypy resolves `batchpilot.*` imports only through a batchpilot/ folder;
    # the repo maps its folders into that namespace at install time instead,
    # so the same mapping is rebuilt here with links.
    namespace = tmp_path / "batchpilot"
    namespace.mkdir()
    for folder in ("controller", "gate", "sim"):
        (namespace / folder).symlink_to(REPO / folder)
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy",
            "--config-file", str(REPO / "pyproject.toml"),
            "--no-incremental", "--namespace-packages", "--explicit-package-bases",
            "-p", "batchpilot.controller",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", sorted((REPO / "controller").glob("*.py")), ids=lambda p: p.name)
def test_controller_imports_no_cluster_code(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    offending = sorted(
        name
        for name in imported
        if any(name == banned or name.startswith(banned + ".") for banned in CONTROLLER_FORBIDDEN)
    )
    assert not offending, f"{path.name} imports {offending}: controller/ must stay pure"


def test_operator_folder_never_shadows_the_standard_library():
    assert not (REPO / "operator" / "__init__.py").exists()
    result = subprocess.run(
        [sys.executable, "-c", "import operator, json; print(operator.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "site-packages" not in result.stdout and str(REPO / "operator") not in result.stdout
