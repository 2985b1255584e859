"""`batchpilot report`: a benchmark document becomes goodput bars, a timeline and Markdown; bad documents are named."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
from stack.workloads import CALIBRATION
from typer.testing import CliRunner

from batchpilot.cli.demo import load_demo_scenario
from batchpilot.cli.main import app
from batchpilot.cli.report import (
    GOODPUT_PLOT,
    MARKDOWN,
    ReportError,
    _mean_cap,
    check_document,
    write_report,
)
from batchpilot.sim.bench import run_benchmark


@pytest.fixture(scope="module")
def document() -> dict:
    # The demo's built-in scenario: 22.5 s, ~500 requests, needs no ../shared.
    scenario = load_demo_scenario(None)
    return run_benchmark([scenario], ["static-default", "aimd"])


def test_report_writes_bars_timeline_and_markdown(tmp_path: Path, document: dict) -> None:
    written = write_report(document, tmp_path)
    assert [path.name for path in written] == [
        GOODPUT_PLOT,
        "bench-timeline-demo-shift.png",
        MARKDOWN,
    ]
    assert "| static-default |" in written[2].read_text()
    for path in written[:2]:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 500


def test_command_reads_the_json(tmp_path: Path, document: dict) -> None:
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps(document))
    result = CliRunner().invoke(app, ["report", str(bench_json), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / GOODPUT_PLOT).is_file()
    assert (tmp_path / "out" / MARKDOWN).is_file()


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("scenarios"), "scenarios"),
        (lambda d: d["scenarios"][0].pop("name"), r"scenarios\[0\].name"),
        (lambda d: d["scenarios"][0].update(results=[]), r"scenarios\[0\].results"),
        (
            lambda d: d["scenarios"][0]["results"][1].update(goodput_rps="fast"),
            r"scenarios\[0\].results\[1\].goodput_rps",
        ),
    ],
)
def test_bad_documents_name_the_field(document: dict, mutate, field) -> None:
    broken = json.loads(json.dumps(document))
    mutate(broken)
    with pytest.raises(ReportError, match=f"^{field}:"):
        check_document(broken)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "is not JSON"), ('{"scenarios": []}', "scenarios: the document needs")],
)
def test_command_exits_2_on_bad_files(tmp_path: Path, content: str, message: str) -> None:
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(content)
    result = CliRunner().invoke(app, ["report", str(bench_json), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert message in result.output


def test_unknown_scenario_is_named(tmp_path: Path, document: dict) -> None:
    with pytest.raises(ReportError, match=r"--scenario: no scenario named 'nope'.*demo-shift"):
        write_report(document, tmp_path, scenario="nope")


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({"replica-0": {"max_concurrency": 64}, "replica-1": {"max_concurrency": 32}}, 48.0),
        ({"replica-0": {"max_concurrency": 64}, "replica-1": {"max_concurrency": None}}, None),
        ({}, None),
    ],
)
def test_mean_cap(knobs, expected) -> None:
    value = _mean_cap(knobs)
    if expected is None:
        assert value != value  # NaN: a gap in the plotted line
    else:
        assert value == expected




@pytest.mark.skipif(
    not CALIBRATION.is_file(),
    reason="../shared is absent: `bench` reads the built-in scenario's calibration file from it",
)
def test_bench_report_option_writes_the_plots(tmp_path: Path) -> None:
    from batchpilot.cli.demo import builtin_scenario_path

    result = CliRunner().invoke(
        app,
        [
            *("bench", str(builtin_scenario_path()), "--controllers", "static-default"),
            *("--workers", "1", "--report", str(tmp_path)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / GOODPUT_PLOT).is_file()
    assert (tmp_path / "bench-timeline-demo-shift.png").is_file()
    assert (tmp_path / MARKDOWN).is_file()
