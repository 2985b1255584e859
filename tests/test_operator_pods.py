"""operator/pods.py: reading pods, which pods a policy selects, the setting a policy left them on."""

from __future__ import annotations

from typing import Any

import pytest

from batchpilot.contract.gate_api import APPLIED_ANNOTATION
from batchpilot.contract.knobs import Knobs
from batchpilot.controller.policy import PolicyError
from batchpilot.operator.gates import AppliedRecord
from batchpilot.operator.pods import (
    PodInfo,
    fleet_setting,
    pod_from_body,
    pod_info,
    policy_selection,
    selector_query,
)
from batchpilot.operator.spec import LabelSelector, WorkloadRef


def status(ready: str, ip: str | None = "127.0.0.2") -> dict[str, Any]:
    return {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}


@pytest.mark.parametrize(
    ("pod_status", "deleting", "ready"),
    [
        (status("True"), False, True),
        (status("False"), False, False),
        (status("True"), True, False),  # terminating pods take no new settings
        ({"podIP": "127.0.0.2"}, False, False),
        ({}, False, False),
    ],
)
def test_pod_readiness(pod_status: dict[str, Any], deleting: bool, ready: bool) -> None:
    assert pod_info("p", "uid-p", {}, {}, pod_status, deleting).ready is ready


def test_pod_info_keeps_what_selection_and_actuation_need() -> None:
    info = pod_info(
        "chat-0",
        "uid-chat-0",
        {"b": "2", "a": "1"},
        {APPLIED_ANNOTATION: "{}", "other": "x"},
        status("True"),
        False,
    )
    assert info.label_map == {"a": "1", "b": "2"}
    assert info.ip == "127.0.0.2"
    assert info.applied == "{}"
    assert info.record is None  # unreadable record reads as absent
    same = pod_info(
        "chat-0",
        "uid-chat-0",
        {"a": "1", "b": "2"},
        {APPLIED_ANNOTATION: "{}"},
        status("True"),
        False,
    )
    assert hash(info) == hash(same)


def test_a_listed_pod_body_reads_as_the_index_reads_it() -> None:
    body = {
        "metadata": {
            "name": "chat-0",
            "uid": "uid-chat-0",
            "labels": {"app": "chat"},
            "annotations": {APPLIED_ANNOTATION: "{}"},
            "deletionTimestamp": "2026-05-01T12:00:00Z",
        },
        "status": status("True"),
    }
    expected = pod_info(
        "chat-0", "uid-chat-0", {"app": "chat"}, {APPLIED_ANNOTATION: "{}"}, status("True"), True
    )
    assert pod_from_body(body) == expected
    assert not expected.ready


@pytest.mark.parametrize(
    ("selector", "query"),
    [
        ({"matchLabels": {"tier": "a", "app": "llm"}}, "app=llm,tier=a"),
        (
            {"matchExpressions": [{"key": "app", "operator": "In", "values": ["b", "a"]}]},
            "app in (a,b)",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]},
            "app notin (x)",
        ),
        (
            {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "gpu", "operator": "Exists"}]},
            "a=1,gpu",
        ),
        ({"matchExpressions": [{"key": "spot", "operator": "DoesNotExist"}]}, "!spot"),
    ],
)
def test_a_policy_selector_as_the_api_servers_query(selector: dict[str, Any], query: str) -> None:
    selection = policy_selection({"selector": selector})
    assert isinstance(selection, LabelSelector)
    assert selector_query(selection) == query


def test_a_target_ref_selects_through_its_workload() -> None:
    selection = policy_selection({"targetRef": {"kind": "StatefulSet", "name": "chat"}})
    assert selection == WorkloadRef("StatefulSet", "chat")
    with pytest.raises(PolicyError, match="every pod"):
        policy_selection({"selector": {}})


FLEET, CANARY = Knobs(max_concurrency=32), Knobs(max_concurrency=48)


def recorded(
    name: str, knobs: Knobs, at: str, policy: str = "chat", canary: bool = False
) -> PodInfo:
    record = AppliedRecord(policy, knobs, 2, at, startup=FLEET, canary=canary)
    return pod_info(
        name, f"uid-{name}", {}, {APPLIED_ANNOTATION: record.to_json()}, status("True"), False
    )


def unrecorded(name: str) -> PodInfo:
    return pod_info(name, f"uid-{name}", {}, {}, status("True"), False)


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        # Two pods, one mid-canary: the older setting is the fleet's, whichever pod comes first.
        (
            [
                recorded("a", CANARY, "2026-11-23T01:10:00Z"),
                recorded("b", FLEET, "2026-11-23T01:00:00Z"),
            ],
            FLEET,
        ),
        (
            [
                recorded("a", FLEET, "2026-11-23T01:00:00Z"),
                recorded("b", CANARY, "2026-11-23T01:10:00Z"),
            ],
            FLEET,
        ),
        # Written in the same second: the canary's record says which is which.
        (
            [
                recorded("a", CANARY, "2026-11-23T01:00:00Z", canary=True),
                recorded("b", FLEET, "2026-11-23T01:00:00Z"),
            ],
            FLEET,
        ),
        # Only the canary has a record: the other pod still runs the startup settings it keeps.
        ([recorded("a", CANARY, "2026-11-23T01:00:00Z", canary=True), unrecorded("b")], FLEET),
        # A majority is the fleet's setting, however recent.
        (
            [
                recorded("a", CANARY, "2026-11-23T01:10:00Z"),
                recorded("b", CANARY, "2026-11-23T01:10:00Z"),
                recorded("c", FLEET, "2026-11-23T01:00:00Z"),
            ],
            CANARY,
        ),
        # Another policy's records and pods without one say nothing.
        ([recorded("a", CANARY, "2026-11-23T01:10:00Z", policy="other"), unrecorded("b")], None),
    ],
)
def test_the_setting_a_policy_left_its_pods_on(pods: list[PodInfo], expected: Knobs | None) -> None:
    assert fleet_setting(pods, "chat") == expected
