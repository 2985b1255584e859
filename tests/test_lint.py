"""The codebase's own rules, enforced in CI: lint, strict types on the pure core, layering."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Every folder setuptools maps into the batchpilot namespace.
PACKAGES = ("cli", "contract", "controller", "gate", "operator", "sim")


def test_ruff_finds_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_package_is_strictly_typed(tmp_path):
    # mypy resolves `batchpilot.*` imports only through a batchpilot/ folder;
    # the repo maps its folders into that namespace at install time instead,
    # so the same mapping is rebuilt here with links.
    namespace = tmp_path / "batchpilot"
    namespace.mkdir()
    for folder in PACKAGES:
        (namespace / folder).symlink_to(REPO / folder)
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy",
            "--config-file", str(REPO / "pyproject.toml"),
            "--no-incremental", "--namespace-packages", "--explicit-package-bases",
            "-p", "batchpilot",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_imports_keep_to_the_declared_layers():
    # pyproject.toml's [tool.importlinter] contracts, direct and indirect imports
    # alike: each package imports only the layers below it; controller/, the pure
    # core, runs in the simulator, the benchmark and the demo with no cluster, so
    # no Kubernetes client or kopf; the gate image's code needs none of what that
    # image leaves out.
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "lint-imports")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
