"""The demo's summary: requests split at the shift by arrival, goodput per fleet and window,
batch caps from the gates' reports, deadlines shown in scenario time."""

from __future__ import annotations

import pytest

from batchpilot.cli.demo import DemoState, FleetState, load_demo_scenario, plan_demo
from batchpilot.cli.demo_fleet import ReplicaAddress
from batchpilot.cli.demo_view import knobs_text, summarize
from batchpilot.contract.knobs import Knobs
from batchpilot.sim.load import OK, SHED, RequestRecord

REPLICAS = (
    ReplicaAddress("replica-0", "http://127.0.0.1:1", 2, "http://127.0.0.1:3"),
    ReplicaAddress("replica-1", "http://127.0.0.1:4", 5, "http://127.0.0.1:6"),
)


def request(index: int, arrival_s: float, ttft_s: float, status: str = OK) -> RequestRecord:
    url = REPLICAS[index % 2].proxy_url
    if status != OK:
        return RequestRecord(index, url, arrival_s, 500, 10, status=status, http_status=429)
    # Ten tokens 20 ms apart: TPOT 20 ms, within the built-in 50 ms SLO.
    times = [ttft_s + 0.02 * k for k in range(10)]
    return RequestRecord(
        index,
        url,
        arrival_s,
        500,
        10,
        status=OK,
        ttft_s=ttft_s,
        token_times_s=times,
        completion_tokens=10,
    )


@pytest.fixture(scope="module")
def plan():
    return plan_demo(load_demo_scenario(None), time_scale=0.25, duration_s=90.0)


def fleet(name: str, records: list[RequestRecord], plan) -> FleetState:
    state = FleetState(name, REPLICAS, source=None)
    for record in records:
        state.windows.setdefault(int(record.arrival_s // plan.interval_s), []).append(record)
    return state


def test_summary_splits_at_the_shift(plan) -> None:
    shift = plan.shift_s  # 10 scenario s
    arrivals = [0.5 * k for k in range(45)]  # 0 .. 22 s, 20 before the shift, 25 after
    adaptive = [request(i, t, 0.2) for i, t in enumerate(arrivals)]
    # Static: after the shift every other request waits 3 s for its first token (over the 2 s SLO)
    # and every fifth is shed.
    static = []
    for i, t in enumerate(arrivals):
        if t >= shift and i % 5 == 0:
            static.append(request(i, t, 0.0, status=SHED))
        else:
            static.append(request(i, t, 3.0 if t >= shift and i % 2 else 0.2))
    state = DemoState(
        plan,
        policy=None,
        fleets={
            "adaptive": fleet("adaptive", adaptive, plan),
            "static": fleet("static", static, plan),
        },
    )
    state.fleets["adaptive"].applied_log = [
        (0.0, "replica-0", Knobs(max_concurrency=256)),
        (0.0, "replica-1", Knobs(max_concurrency=256)),
        (12.0, "replica-0", Knobs(max_concurrency=16)),
        (12.0, "replica-1", Knobs(max_concurrency=32)),
    ]
    summary = summarize(state)
    a, s = summary["fleets"]["adaptive"], summary["fleets"]["static"]
    assert a["before_shift"]["arrived"] == s["before_shift"]["arrived"] == 20
    assert a["after_shift"]["arrived"] == s["after_shift"]["arrived"] == 25
    assert a["before_shift"]["goodput_rps"] == pytest.approx(20 / shift)
    assert a["after_shift"]["goodput_rps"] == pytest.approx(25 / (plan.scenario.duration_s - shift))
    after = [i for i, t in enumerate(arrivals) if t >= shift]
    good_static = [i for i in after if i % 5 and not i % 2]
    assert s["after_shift"]["good"] == len(good_static)
    assert s["after_shift"]["shed"] == len([i for i in after if i % 5 == 0])
    assert [p["arrived"] for p in a["phases"]] == [20, 25]
    caps = [entry["adaptive"]["batch_cap"] for entry in summary["timeline"]]
    # Each window shows the caps the gates reported by its end: 256 until 12 s, then (16 + 32) / 2.
    assert caps[0] == 256 and caps[-1] == 24
    assert len(summary["timeline"]) == plan.windows


@pytest.mark.parametrize(
    ("knobs", "time_scale", "text"),
    [
        (Knobs(max_concurrency=16, queue_deadline_ms=7600), 0.25, "cap 16, deadline 1900 ms, fcfs"),
        (Knobs(max_concurrency=None), 1.0, "cap none, fcfs"),
        (
            Knobs(max_concurrency=8, max_inflight_tokens=9000, discipline="shortest-prompt-first"),
            0.5,
            "cap 8, tokens 9000, shortest-prompt-first",
        ),
        (None, 0.25, "-"),
    ],
)
def test_knobs_text_shows_the_deadline_in_scenario_time(knobs, time_scale, text) -> None:
    assert knobs_text(knobs, time_scale) == text
