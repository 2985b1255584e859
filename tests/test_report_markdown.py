"""`benchmark.md`: tables, ratios, the best baseline and the targets, from hand-built documents."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from batchpilot.cli.report import (
    BASELINES,
    GOODPUT_PLOT,
    MARKDOWN,
    ReportError,
    best_baseline,
    check_document,
    render_markdown,
    write_report,
)


def result(controller: str, good: int, slo_attainment: float = 0.9) -> dict:
    return {
        "controller": controller,
        "good": good,
        "goodput_rps": good / 100,
        "slo_attainment": slo_attainment,
        "ttft_p99_ms": 1234.4,
        "tpot_p99_ms": 41.27,
        "shed": 5,
        "config_changes": 17,
    }


def scenario(name: str, *results: dict, **extra) -> dict:
    return {"name": name, "duration_s": 100, "arrived": 1000, "results": list(results), **extra}


def section(markdown: str, title: str) -> str:
    """The text under the `## title` heading, up to the next heading of that level."""
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : None if end == -1 else end]


def row(text: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell` (bold or not)."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].strip("*") == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


SUMMARY_COLUMNS = (
    "scenario",
    "kind",
    "to_bound",
    "bound_met",
    "baseline",
    "to_baseline",
    "baseline_met",
    "slo_vs",
    "slo_met",
    "bound_holds",
)
SCENARIO_COLUMNS = (
    "controller",
    "good",
    "goodput",
    "slo",
    "ttft",
    "tpot",
    "shed",
    "changes",
    "to_bound",
    "to_baseline",
)


def summary_row(markdown: str, name: str) -> dict[str, str]:
    return dict(zip(SUMMARY_COLUMNS, row(section(markdown, "Summary"), name), strict=True))


def scenario_row(markdown: str, name: str, controller: str) -> dict[str, str]:
    return dict(zip(SCENARIO_COLUMNS, row(section(markdown, name), controller), strict=True))


def test_rows_carry_the_metrics_and_both_ratios() -> None:
    doc = {
        "scenarios": [
            scenario(
                "s",
                result("static-default", 600),
                result("aimd", 800),
                result("adaptive", 900, 0.95),
                result("oracle-full", 1000),
            )
        ]
    }
    markdown = render_markdown(doc)
    adaptive = scenario_row(markdown, "s", "adaptive")
    assert adaptive == {
        "controller": "adaptive",
        "good": "900",
        "goodput": "9.00",
        "slo": "95.00",
        "ttft": "1234",
        "tpot": "41.3",
        "shed": "5",
        "changes": "17",
        "to_bound": "0.900",  # 900 / 1000
        "to_baseline": "1.125",  # 900 / aimd's 800
    }
    assert scenario_row(markdown, "s", "static-default")["to_baseline"] == "0.750"
    assert scenario_row(markdown, "s", "oracle-full")["to_bound"] == "1.000"


def test_the_best_baseline_is_never_a_hindsight_controller_or_adaptive() -> None:
    # Every hindsight reference, adaptive and an unknown controller beat the baselines.
    bench = scenario(
        "s",
        result("static-best", 990),
        result("gradient2", 700),
        result("adaptive", 995),
        result("vegas", 720),
        result("oracle", 980),
        result("experimental", 999),
        result("oracle-full", 1000),
    )
    assert best_baseline(bench)["controller"] == "vegas"
    markdown = render_markdown({"scenarios": [bench]})
    bold = [line for line in section(markdown, "s").splitlines() if line.startswith("| **")]
    assert len(bold) == 1 and bold[0].startswith("| **vegas** |")
    assert summary_row(markdown, "s")["baseline"] == "vegas"
    assert summary_row(markdown, "s")["to_baseline"] == f"{995 / 720:.3f}"


def test_a_tie_between_baselines_goes_to_the_first_in_order() -> None:
    bench = scenario("s", result("vegas", 700), result("static-default", 700))
    assert best_baseline(bench)["controller"] == "static-default"
    assert BASELINES.index("static-default") < BASELINES.index("vegas")


def test_no_baseline_or_no_oracle_full_gives_dashes() -> None:
    markdown = render_markdown(
        {"scenarios": [scenario("s", result("adaptive", 900), result("oracle-full", 0))]}
    )
    summary = summary_row(markdown, "s")
    assert (summary["baseline"], summary["to_baseline"], summary["baseline_met"]) == ("-",) * 3
    assert (summary["to_bound"], summary["bound_met"]) == ("-", "-")  # oracle-full has 0 good
    assert not any(line.startswith("| **") for line in section(markdown, "s").splitlines())
    markdown = render_markdown({"scenarios": [scenario("s", result("adaptive", 900))]})
    assert summary_row(markdown, "s")["bound_holds"] == "-"
    assert scenario_row(markdown, "s", "adaptive")["to_bound"] == "-"


@pytest.mark.parametrize(
    ("phases", "kind", "met"),
    [
        # adaptive / best baseline = 1.05: short of the shift target, above the steady one.
        (3, "shift", "NO"),
        (1, "steady", "yes"),
        (None, "?", "?"),
    ],
)
def test_baseline_target_depends_on_shift_or_steady(phases, kind, met) -> None:
    extra = {} if phases is None else {"phases": phases}
    bench = scenario("s", result("aimd", 1000), result("adaptive", 1050), **extra)
    summary = summary_row(render_markdown({"scenarios": [bench]}), "s")
    assert (summary["kind"], summary["to_baseline"], summary["baseline_met"]) == (
        kind,
        "1.050",
        met,
    )


@pytest.mark.parametrize(
    ("adaptive_good", "phases", "met"),
    [(1100, 2, "yes"), (1099, 2, "NO"), (980, 1, "yes"), (979, 1, "NO")],
)
def test_baseline_target_edges(adaptive_good, phases, met) -> None:
    bench = scenario("s", result("aimd", 1000), result("adaptive", adaptive_good), phases=phases)
    assert summary_row(render_markdown({"scenarios": [bench]}), "s")["baseline_met"] == met


@pytest.mark.parametrize(("adaptive_good", "met"), [(900, "yes"), (899, "NO")])
def test_oracle_full_target(adaptive_good, met) -> None:
    bench = scenario("s", result("adaptive", adaptive_good), result("oracle-full", 1000))
    summary = summary_row(render_markdown({"scenarios": [bench]}), "s")
    assert summary["bound_met"] == met
    assert summary["to_bound"] == f"{adaptive_good / 1000:.3f}"


@pytest.mark.parametrize(
    ("adaptive_slo", "baseline_slo", "met"),
    [(0.995, 0.995, "yes"), (0.99, 0.995, "NO"), (0.5, 0.98, "n/a")],
)
def test_slo_target_applies_where_the_baseline_reaches_99_percent(
    adaptive_slo, baseline_slo, met
) -> None:
    bench = scenario("s", result("aimd", 1000, baseline_slo), result("adaptive", 900, adaptive_slo))
    summary = summary_row(render_markdown({"scenarios": [bench]}), "s")
    assert summary["slo_met"] == met
    assert summary["slo_vs"] == f"{adaptive_slo:.2%} vs {baseline_slo:.2%}"


def test_a_controller_beating_oracle_full_is_flagged() -> None:
    bench = scenario(
        "s",
        result("aimd", 1001),
        result("adaptive", 900),
        result("oracle", 1002),
        result("oracle-full", 1000),
    )
    markdown = render_markdown({"scenarios": [bench]})
    assert summary_row(markdown, "s")["bound_holds"] == "NO: aimd, oracle"
    assert scenario_row(markdown, "s", "aimd")["to_bound"] == "**1.001 beats its bound**"
    assert scenario_row(markdown, "s", "adaptive")["to_bound"] == "0.900"
    bench["results"][0]["good"] = 1000  # a tie does not beat the bound
    bench["results"][2]["good"] = 990
    assert summary_row(render_markdown({"scenarios": [bench]}), "s")["bound_holds"] == "yes"


def test_upper_bound_and_warnings_are_printed() -> None:
    bench = scenario(
        "s",
        result("adaptive", 700),
        result("oracle-full", 800),
        upper_bound={
            "arrived": 1000,
            "capacity_good": 1200,
            "good": 950,
            "goodput_rps": 9.5,
            "phases": [],
        },
        warnings=["aimd (900 good) beats oracle-full (800): its search is too weak"],
    )
    text = section(render_markdown({"scenarios": [bench]}), "s")
    assert "- upper bound: 950 good (capacity 1200, arrived 1000)\n" in text
    assert f"- oracle-full / upper bound: {800 / 950:.3f}\n" in text
    assert "- warning: aimd (900 good) beats oracle-full (800): its search is too weak\n" in text


def test_header_command_wall_time_plot_and_explanation() -> None:
    command = "batchpilot bench ../shared/scenarios/*.yaml --json b.json --report docs/"
    doc = {"command": command, "wall_s": 1830, "scenarios": [scenario("s", result("aimd", 1))]}
    markdown = render_markdown(doc)
    assert f"```sh\n{command}\n```" in markdown
    assert "30.5 min" in markdown
    assert f"![goodput per controller]({GOODPUT_PLOT})" in markdown
    explanation = markdown[markdown.index("## Controllers") :]
    for name in (*BASELINES, "adaptive", "static-best", "oracle", "oracle-full"):
        assert f"- `{name}`" in explanation
    assert "`batchpilot.sim.bound`" in section(markdown, "How the upper bound is derived")
    # The explanation follows every table.
    assert markdown.index("## Controllers") > markdown.rindex("| aimd |")


def test_optional_fields_may_be_absent() -> None:
    markdown = render_markdown({"scenarios": [{"name": "s", "results": [result("aimd", 1)]}]})
    assert "does not record the exact command" in markdown
    assert " min (wall time)" not in markdown
    assert "upper bound:" not in section(markdown, "s")
    assert summary_row(markdown, "s")["kind"] == "?"


def test_write_report_writes_the_markdown(tmp_path: Path) -> None:
    doc = {"scenarios": [scenario("s", result("aimd", 800), result("adaptive", 900), phases=2)]}
    written = write_report(doc, tmp_path / "out")
    assert [path.name for path in written] == [GOODPUT_PLOT, MARKDOWN]
    assert written[1].read_text() == render_markdown(doc)


GOOD_DOC = {
    "command": "batchpilot bench x.yaml",
    "wall_s": 12.5,
    "scenarios": [
        scenario(
            "s",
            result("aimd", 800),
            phases=2,
            warnings=["w"],
            upper_bound={"arrived": 1, "capacity_good": 1, "good": 1},
        )
    ],
}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda d: d["scenarios"][0]["results"][0].pop("good"),
            r"scenarios\[0\].results\[0\].good",
        ),
        (
            lambda d: d["scenarios"][0]["results"][0].update(slo_attainment=None),
            r"scenarios\[0\].results\[0\].slo_attainment",
        ),
        (lambda d: d.update(command=["bench"]), "command"),
        (lambda d: d.update(wall_s="long"), "wall_s"),
        (lambda d: d["scenarios"][0].update(phases="two"), r"scenarios\[0\].phases"),
        (lambda d: d["scenarios"][0].update(warnings="w"), r"scenarios\[0\].warnings"),
        (lambda d: d["scenarios"][0].update(upper_bound=3), r"scenarios\[0\].upper_bound"),
        (
            lambda d: d["scenarios"][0]["upper_bound"].pop("capacity_good"),
            r"scenarios\[0\].upper_bound.capacity_good",
        ),
    ],
)
def test_bad_fields_are_named(mutate, field) -> None:
    check_document(GOOD_DOC)
    broken = copy.deepcopy(GOOD_DOC)
    mutate(broken)
    with pytest.raises(ReportError, match=f"^{field}:"):
        check_document(broken)


def class_result(controller: str, interactive_good: int, batch_good: int, jain: float | None):
    outcome = result(controller, interactive_good + batch_good)
    outcome["classes"] = {
        name: {
            "arrived": 100,
            "good": good,
            "goodput_rps": good / 100,
            "slo_attainment": good / 100,
            "ttft_p99_ms": 812.0,
            "tpot_p99_ms": 44.44,
            "shed": 3,
            "served_tokens": 123456,
        }
        for name, good in (("interactive", interactive_good), ("batch", batch_good))
    }
    outcome["jain_index"] = jain
    return outcome


def test_class_scenarios_get_a_per_class_table_and_say_what_was_not_run():
    document = {
        "scenarios": [
            scenario(
                "classes-flood",
                class_result("static-default", 40, 90, None),
                class_result("strict-priority", 99, 80, 0.95),
                classes=[
                    {
                        "name": "interactive",
                        "priority": 1,
                        "weight": 1.0,
                        "slo": {"ttft_ms": 800, "tpot_ms": 60},
                        "max_concurrency": None,
                    },
                    {
                        "name": "batch",
                        "priority": 0,
                        "weight": 1.0,
                        "slo": {"ttft_ms": 20000, "tpot_ms": 100},
                        "max_concurrency": 96,
                    },
                ],
                skipped={"oracle-full": "no bound on class scenarios"},
            ),
            scenario("plain", result("static-default", 10)),
        ]
    }
    check_document(document)
    markdown = render_markdown(document)
    text = section(markdown, "classes-flood")
    assert "Per SLO class" in text
    lines = [line for line in text.splitlines() if line.startswith("| strict-priority | inter")]
    cells = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert cells[:8] == [
        "strict-priority",
        "interactive",
        "1",
        "800/60",
        "100",
        "99",
        "0.99",
        "99.00",
    ]
    assert cells[-1] == "0.950"
    assert "not run: oracle-full: no bound on class scenarios" in text
    assert "Per SLO class" not in section(markdown, "plain")


def test_a_malformed_classes_field_is_refused():
    document = {"scenarios": [scenario("x", {**result("a", 1), "classes": [1]})]}
    with pytest.raises(ReportError, match=r"results\[0\]\.classes"):
        check_document(document)
