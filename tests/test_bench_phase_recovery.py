"""bench/phase_recovery.py: which interval counts as the first after a change, and when one is 'back'."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "phase_recovery", Path(__file__).resolve().parents[1] / "bench" / "phase_recovery.py"
)
assert _SPEC is not None and _SPEC.loader is not None
phase_recovery = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(phase_recovery)


def timeline(goodputs: list[float], interval_s: float = 30.0) -> list[dict[str, Any]]:
    return [
        {"t_s": index * interval_s, "goodput_rps": rps, "good": round(rps * interval_s)}
        for index, rps in enumerate(goodputs)
    ]


def test_phase_changes_are_the_starts_of_every_phase_but_the_first() -> None:
    assert phase_recovery.phase_changes([600, 900, 600]) == [600, 1500]
    assert phase_recovery.phase_changes([1800]) == []


@pytest.mark.parametrize(
    ("mine", "change_s", "expected"),
    [
        # Change at 60 s: interval 1 is [60, 90). Back at 95% in the third.
        ([10, 10, 5, 8, 9.6, 10], 60.0, 3),
        # A change inside an interval (75 s): that interval is interval 1.
        ([10, 10, 9.5, 10, 10, 10], 75.0, 1),
        # Never within 5% before the phase ends.
        ([10, 10, 5, 5, 5, 5], 60.0, None),
    ],
)
def test_intervals_to_recover(mine: list[float], change_s: float, expected: int | None) -> None:
    oracle = timeline([10.0] * 6)
    result = phase_recovery.recovery(timeline(mine), oracle, change_s, 180.0, 30.0, 0.95)
    assert result["intervals_to_recover"] == expected
    assert result["met"] is (expected is not None and expected <= 3)
