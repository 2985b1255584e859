"""Leader election over a real Lease, and the shard split (operator/election.py, shard.py).

The electors run in this process against the test API server; each round
(`try_once`) is called by the test, so the order of events is the test's.
The whole operator with two replicas is tests/test_faults_operator_failover.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.config import new_client_from_config
from prometheus_client import CollectorRegistry
from stack import KubeAPIServer
from stack.kube_fault_proxy import KubeFaultProxy

from batchpilot.operator.config import ConfigError, load_config
from batchpilot.operator.election import LeaseElector, _micro_us
from batchpilot.operator.shard import Shard, parse_label_selector, shard_of

LEASE = "shard-0"


def elector(
    api: client.ApiClient,
    namespace: str,
    identity: str,
    *,
    lease_s: float = 2.0,
    deadline_s: float = 1.5,
) -> LeaseElector:
    return LeaseElector(
        api,
        name=LEASE,
        namespace=namespace,
        identity=identity,
        lease_s=lease_s,
        renew_s=0.2,
        renew_deadline_s=deadline_s,
        registry=CollectorRegistry(),
    )


def holder(api: client.ApiClient, namespace: str) -> client.V1LeaseSpec:
    return client.CoordinationV1Api(api).read_namespaced_lease(LEASE, namespace).spec


def test_first_replica_leads_the_second_follows(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    a, b = elector(k8s_client, namespace, "a"), elector(k8s_client, namespace, "b")
    a.try_once()
    b.try_once()
    now = time.monotonic()
    assert a.acting(now) and not b.acting(now)
    assert a.fence is not None and b.fence is None
    spec = holder(k8s_client, namespace)
    assert spec.holder_identity == "a"
    assert _micro_us(spec.acquire_time) == a.fence
    # Renewing keeps the leader and its fence; the follower keeps following.
    fence = a.fence
    for _ in range(3):
        a.try_once()
        b.try_once()
    assert a.fence == fence and b.fence is None
    assert holder(k8s_client, namespace).holder_identity == "a"


def test_an_unrenewed_lease_is_taken_over_with_a_higher_fence(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    a, b = elector(k8s_client, namespace, "a"), elector(k8s_client, namespace, "b")
    a.try_once()
    old_fence = a.fence
    b.try_once()
    # The leader stops renewing (dead). The follower judges expiry by its own
    # clock from when it first saw this record: not before lease_s.
    seen_at = time.monotonic()
    while holder(k8s_client, namespace).holder_identity == "a":
        b.try_once()
        time.sleep(0.1)
        assert time.monotonic() - seen_at < 10, "no takeover"
    took_s = time.monotonic() - seen_at
    assert took_s >= 2.0 - 0.15, took_s
    assert b.acting(time.monotonic()) and b.fence is not None and old_fence is not None
    assert b.fence > old_fence
    spec = holder(k8s_client, namespace)
    assert (spec.holder_identity, spec.lease_transitions) == ("b", 1)
    # The old leader, back, reads the Lease and follows: no more acting.
    a.try_once()
    assert not a.acting(time.monotonic()) and a.fence is None


def test_a_leader_that_cannot_renew_stops_acting_before_the_lease_expires(
    kube_api: KubeAPIServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with KubeFaultProxy(kube_api) as proxy:
        api = new_client_from_config(str(proxy.kubeconfig_for(kube_api.token, "leader")))
        a = elector(api, namespace, "a", lease_s=3.0, deadline_s=1.0)
        a.try_once()
        assert a.acting(time.monotonic())
        # API Priority and Fairness turns the replica's Lease requests away.
        rule = proxy.inject(429, path=r"/leases", fraction=1.0)
        caplog.set_level(logging.WARNING, "batchpilot.operator.election")
        # The campaign tries in its own thread, as run() does; a try may
        # block in the client's Retry-After waits, acting() must not.
        stop = threading.Event()

        def campaign() -> None:
            while not stop.is_set():
                a.try_once()
                time.sleep(0.2)

        trying = threading.Thread(target=campaign)
        started = time.monotonic()
        trying.start()
        try:
            while a.acting(time.monotonic()):
                time.sleep(0.02)
            stopped_s = time.monotonic() - started
        finally:
            stop.set()
            trying.join()
        assert rule.injected >= 1
    # It stops on its own at the renew deadline, well before a follower could
    # take the Lease (lease_s after the last renewal it saw).
    assert stopped_s < 3.0, stopped_s
    # One warning for the whole outage, not one per try.
    warnings = [r.getMessage() for r in caplog.records if "429" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_racing_followers_cannot_both_win_an_expired_lease(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    dead = elector(k8s_client, namespace, "dead", lease_s=1.0, deadline_s=0.5)
    dead.try_once()
    racers = [
        elector(k8s_client, namespace, f"r{i}", lease_s=1.0, deadline_s=0.5) for i in range(4)
    ]
    for racer in racers:
        racer.try_once()  # each sees the record now
    time.sleep(1.2)
    barrier = threading.Barrier(len(racers))

    def race(racer: LeaseElector) -> None:
        barrier.wait()
        racer.try_once()

    threads = [threading.Thread(target=race, args=(r,)) for r in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    now = time.monotonic()
    winners = [r.identity for r in racers if r.acting(now)]
    assert len(winners) == 1, winners
    assert holder(k8s_client, namespace).holder_identity == winners[0]


def test_released_lease_is_taken_at_the_next_try(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    a, b = (
        elector(k8s_client, namespace, "a", lease_s=30.0, deadline_s=20.0),
        elector(k8s_client, namespace, "b", lease_s=30.0, deadline_s=20.0),
    )
    a.try_once()
    b.try_once()
    asyncio.run(a.release())
    assert not a.acting(time.monotonic())
    b.try_once()  # no 30 s wait: the Lease has no holder
    assert b.acting(time.monotonic())
    assert b.fence is not None


# -- shards -------------------------------------------------------------------------


def test_every_policy_belongs_to_exactly_one_shard_and_shards_are_balanced() -> None:
    names = [(f"ns-{i % 7}", f"policy-{i}") for i in range(4000)]
    shards = [Shard.from_settings(index, 4, "") for index in range(4)]
    owners = [[s.index for s in shards if s.owns(ns, name, {})] for ns, name in names]
    assert all(len(owner) == 1 for owner in owners)
    counts = Counter(owner[0] for owner in owners)
    assert min(counts.values()) > 0.9 * 1000, counts
    # The same answer in every replica and after a restart: a pure function.
    assert [shard_of(ns, name, 4) for ns, name in names[:50]] == [o[0] for o in owners[:50]]


@pytest.mark.parametrize(
    ("selector", "labels", "owned"),
    [
        ("team=a", {"team": "a"}, True),
        ("team=a", {"team": "b"}, False),
        ("team==a,tier!=batch", {"team": "a", "tier": "online"}, True),
        ("team==a,tier!=batch", {"team": "a", "tier": "batch"}, False),
        ("env in (prod, staging)", {"env": "staging"}, True),
        ("env notin (prod)", {"env": "prod"}, False),
        ("!legacy", {"legacy": "yes"}, False),
        ("canary", {"canary": ""}, True),
        ("", {}, True),
    ],
)
def test_policy_selector_follows_kubectl_syntax(
    selector: str, labels: dict[str, str], owned: bool
) -> None:
    assert Shard.from_settings(0, 1, selector).owns("ns", "p", labels) is owned


@pytest.mark.parametrize("bad", ["a=b=c", "env in (", "=a", "env in ()", "team=a b"])
def test_a_bad_policy_selector_is_named_with_the_syntax(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label"):
        parse_label_selector(bad)
    with pytest.raises(ConfigError) as error:
        load_config(None, {"BATCHPILOT_OPERATOR_POLICY_SELECTOR": bad})
    assert error.value.setting == "policy_selector"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        (
            {"BATCHPILOT_OPERATOR_SHARD_COUNT": "2", "BATCHPILOT_OPERATOR_SHARD_INDEX": "2"},
            "shard_index",
        ),
        (
            {"BATCHPILOT_OPERATOR_LEASE_RENEW_DEADLINE_SECONDS": "20"},
            "lease_renew_deadline_seconds",
        ),
        ({"BATCHPILOT_OPERATOR_LEADER_ELECTION": "maybe"}, "leader_election"),
    ],
)
def test_contradictory_election_settings_are_refused(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, env)
    assert error.value.setting == setting
