"""The pod index, and the pod ledger: which indexed pods the API server no longer has.

The end-to-end case (an API server restart, a pod deleted while the pod
watch could not resume, kopf's re-list) is in tests/test_faults_kube_api.py.
"""

from __future__ import annotations

from batchpilot.operator.podledger import AUDIT_RETRY_S, PodLedger
from batchpilot.operator.pods import PodIndex, PodInfo, pod_info

READY = {"podIP": "127.0.0.2", "conditions": [{"type": "Ready", "status": "True"}]}


def pod(name: str, uid: str) -> PodInfo:
    return pod_info(name, uid, {"app": "llm"}, {}, READY, False)


def test_a_pod_missing_from_the_list_is_set_aside() -> None:
    ledger, gone, kept = PodLedger(), pod("llm-0", "u0"), pod("llm-1", "u1")
    ledger.seen("u0", 1.0)
    ledger.seen("u1", 2.0)
    assert ledger.set_aside([gone, kept], live_uids={"u1"}, listed_s=10.0) == [gone]
    assert list(ledger.live([gone, kept])) == [kept]
    # Once: a later audit finds nothing new to report.
    assert ledger.set_aside([gone, kept], live_uids={"u1"}, listed_s=20.0) == []
    assert list(ledger.live([gone, kept])) == [kept]


def test_a_pod_seen_after_the_list_began_stays() -> None:
    # Created after the list's snapshot: the list lacks it, the index has it.
    ledger, new = PodLedger(), pod("llm-2", "u2")
    ledger.seen("u2", 10.5)
    assert ledger.set_aside([new], live_uids=set(), listed_s=10.0) == []
    assert list(ledger.live([new])) == [new]


def test_a_pod_recreated_under_its_name_is_another_pod() -> None:
    # A StatefulSet's llm-0, deleted during the outage and created again.
    ledger, old, new = PodLedger(), pod("llm-0", "old"), pod("llm-0", "new")
    ledger.seen("old", 1.0)
    ledger.seen("new", 5.0)
    assert ledger.set_aside([old, new], live_uids={"new"}, listed_s=10.0) == [old]
    assert list(ledger.live([old, new])) == [new]


def test_an_audit_is_due_after_each_listing_and_once() -> None:
    ledger = PodLedger()
    assert ledger.start_audit("ns", 1.0)  # nothing checked yet
    assert not ledger.start_audit("ns", 1.5)  # one at a time
    ledger.relisted("ns", 0.9)  # listed before that audit began: covered by it
    assert not ledger.start_audit("ns", 2.0)
    ledger.relisted("ns", 3.0)
    assert ledger.start_audit("ns", 3.5)
    assert not ledger.start_audit("ns", 4.0)
    # Namespaces are audited each on its own.
    assert ledger.start_audit("other", 4.0)


def test_a_failed_audit_is_due_again_after_the_retry_pause() -> None:
    ledger = PodLedger()
    assert ledger.start_audit("ns", 1.0)
    ledger.audit_again("ns", 1.2)
    assert not ledger.start_audit("ns", 1.2 + AUDIT_RETRY_S - 0.1)
    assert ledger.start_audit("ns", 1.2 + AUDIT_RETRY_S)


def test_a_pod_deleted_through_its_watch_is_forgotten() -> None:
    # The ledger drops its time with the DELETED event; were the index to
    # offer the pod again, an audit would judge it from scratch.
    ledger, gone = PodLedger(), pod("llm-0", "u0")
    ledger.seen("u0", 50.0)
    ledger.deleted("u0")
    assert ledger.set_aside([gone], live_uids=set(), listed_s=10.0) == [gone]


def test_pod_index_is_listed_once_every_listed_pod_arrived_or_went() -> None:
    index = PodIndex()
    index.store("ns", pod("llm-0", "u0"))
    assert not index.listed("ns")  # no list of its own yet: nothing to compare with
    index.expect("ns", {"u0", "u1", "u2"})
    assert not index.listed("ns")
    index.store("ns", pod("llm-1", "u1"))
    assert not index.listed("ns")
    index.drop("ns", "u2")  # deleted before its listing event reached the index
    assert index.listed("ns")
    assert [p.uid for p in index.in_namespace("ns")] == ["u0", "u1"]
    # Listed once, listed for good: a re-list does not hold the steps back.
    index.expect("ns", {"u9"})
    assert index.listed("ns")
    assert not index.listed("other")


def test_pod_index_keeps_the_latest_event_per_pod() -> None:
    index = PodIndex()
    index.store("ns", pod("llm-0", "u0"))
    index.store("ns", PodInfo("llm-0", "u0", (), "10.0.0.1", True))
    index.expect("ns", {"u0"})
    assert index.listed("ns")
    assert index.in_namespace("ns") == [PodInfo("llm-0", "u0", (), "10.0.0.1", True)]
    index.drop("ns", "u0")
    assert index.in_namespace("ns") == []
