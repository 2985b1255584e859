"""Small waits and readings shared by the end-to-end tests (loopback and real node)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def eventually(
    check: Callable[[], tuple[bool, Any]], what: str, timeout_s: float, *, poll_s: float = 0.2
) -> Any:
    """Poll `check` -> (done, detail) until done; fail with the last detail seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, detail = check()
        if done:
            return detail
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout_s:.0f} s; last seen: {detail}")
        time.sleep(poll_s)


def metric_sum(page: str, name: str) -> float:
    """The sum of a metric's samples on a Prometheus text page."""
    return sum(
        float(line.rpartition(" ")[2]) for line in page.splitlines() if line.startswith(name)
    )


def condition_statuses(status: dict[str, Any]) -> dict[str, str]:
    """A policy status's conditions as type -> status."""
    return {c["type"]: c["status"] for c in status.get("conditions") or []}
