"""docs/architecture.md stays true: the files it names exist and its layers are the enforced ones."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = (REPO / "docs" / "architecture.md").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_path_the_page_names_exists() -> None:
    named = set(re.findall(r"`((?:[a-z_]+/)+[a-z_.-]*)`", PAGE))
    named |= {
        f"{folder}/{name}"
        for folder, names in re.findall(r"`([a-z_]+)/([a-z_]+\.py(?: · [a-z_]+\.py)*)`", PAGE)
        for name in names.split(" · ")
    }
    assert len(named) > 30
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert missing == []


def test_every_package_is_on_the_page() -> None:
    packages = PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    assert sorted(p for p in packages if f"{p}/" not in PAGE) == []


def test_the_layer_table_is_the_enforced_layers() -> None:
    contracts = PYPROJECT["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    table = re.findall(r"^\| ((?:`[a-z]+`(?:, )?)+) \|", PAGE.split("## Layers")[1], re.M)
    stated = [" | ".join(re.findall(r"`([a-z]+)`", row)) for row in table]
    assert stated == layers
