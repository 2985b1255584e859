"""docs/slo-classes.md: its offline commands run as shown and print what the page says they do.

The page's demo command is run by tests/test_demo_plan.py (slow), with the
same flags and its output directory in a temporary one.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "slo-classes.md"


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    return [block.replace("\\\n", " ").strip() for block in blocks]


def test_the_page_shows_the_demo_recommend_bench_and_kubectl_commands() -> None:
    programs = [shlex.split(command)[:2] for command in _commands()]
    assert programs == [
        ["kubectl", "get"],
        ["batchpilot", "demo"],
        ["batchpilot", "recommend"],
        ["batchpilot", "bench"],
    ]


@pytest.mark.parametrize(
    "command",
    [c for c in _commands() if c.startswith(("batchpilot recommend", "batchpilot bench"))],
)
def test_offline_commands_run_with_a_row_per_class(command: str) -> None:
    argv = [sys.executable, "-m", "batchpilot.cli.main", *shlex.split(command)[1:]]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for service_class in ("interactive", "batch"):
        assert re.search(rf"│ [^│]*{service_class}\s", done.stdout), done.stdout[-3000:]
