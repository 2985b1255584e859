"""Two operator replicas with leader election: the leader frozen mid-rollout (issue #19).

What runs, all real processes on loopback (sim/sandbox/fleet.py): the API
server; three serving pods, each `batchpilot sim serve` behind `batchpilot
gate`; Prometheus; light steady traffic through the gates; two `batchpilot
operator` processes with `leader_election` on, under the Helm chart's
ServiceAccount (whose Role grants the Leases).

The policy pins maxConcurrency to 24 while the gates start with no limit, so
the first Auto step changes every gate. The last gate is stalled (SIGSTOP)
so the rollout is caught half done; then the leader is frozen (SIGSTOP: a
paused VM, a stop-the-world pause, a partition; unlike SIGKILL it comes back
believing it leads). The standby must take the Lease over once it expires,
finish the rollout under its own, higher fencing token, and the frozen
leader, continued, must stand down. Throughout, a sampler reads every
gate's `/config` every 50 ms: no gate may ever go back to a lower fence,
and a write under the old leader's fence must be refused with 409.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from stack import KubeAPIServer, create_namespace, unique_name
from stack.chart import chart_identity_kubeconfig
from stack.checks import condition_statuses, eventually, metric_sum
from stack.workloads import CALIBRATION, steady_fleet_scenario

from batchpilot.contract.knobs import Knobs
from batchpilot.operator.election import _micro_us
from batchpilot.operator.gates import GateClient, StaleFence
from batchpilot.operator.kube import GROUP, PLURAL, VERSION
from batchpilot.sim.sandbox.fleet import GATE_TOKEN_SECRET, Fleet, GatedPod, start_fleet
from batchpilot.sim.sandbox.operator_process import OperatorProcess
from batchpilot.sim.sandbox.process import ManagedProcess, http_get
from batchpilot.sim.sandbox.tools import BATCHPILOT_CLI

pytestmark = [
    pytest.mark.stack,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CALIBRATION.exists(), reason=f"needs the shared calibration data at {CALIBRATION}"
    ),
]

POD_IPS = ("127.0.0.5", "127.0.0.6", "127.0.0.7")
LABELS = {"app": "failover-chat"}
STARTUP = Knobs()
TARGET = Knobs(max_concurrency=24)
INTERVAL_S = 2
POLICY = "failover"
LEASE = "batchpilot-failover"
# The chart's timings scaled down 3x (15 / 2 / 10 s there), so the test waits
# seconds, not a minute; the ratios, which decide the behaviour, are kept.
LEASE_S, RENEW_S, DEADLINE_S = 5.0, 0.7, 3.3
# Takeover needs the Lease to expire as the standby sees it (LEASE_S after it
# last saw the record change) plus one of its tries; then the new leader's
# next control step (one interval, or two when it lands just after a tick).
# The issue's target is 2 control intervals of 30 s with the chart's 15 s
# Lease; here: LEASE_S + RENEW_S + 2 intervals, plus scheduling slack.
FAILOVER_BUDGET_S = LEASE_S + RENEW_S + 2 * INTERVAL_S + 3.0
SETTLE_TIMEOUT_S = 45.0
POLL_S = 0.05
SCENARIO = steady_fleet_scenario("failover-steady", 12)
LEADER_GAUGE = "batchpilot_operator_leader"
STALE_REJECTIONS = "batchpilot_gate_config_writes_rejected_total"


@dataclass
class FailoverEnv:
    fleet: Fleet
    namespace: str
    kubeconfig: Path


@pytest.fixture(scope="module")
def failover_env(
    kube_api: KubeAPIServer,
    k8s_client: client.ApiClient,
    inferencepolicy_crd: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FailoverEnv]:
    workdir = tmp_path_factory.mktemp("operator-failover")
    namespace = unique_name("operator-failover")
    create_namespace(k8s_client, namespace)
    scenario = workdir / "scenario.yaml"
    scenario.write_text(SCENARIO)
    try:
        with start_fleet(
            k8s_client, namespace, scenario=scenario, ips=POD_IPS, labels=LABELS, workdir=workdir
        ) as fleet:
            load = ManagedProcess(
                "load",
                [*BATCHPILOT_CLI, "sim", "load", str(scenario),
                 *[arg for url in fleet.gate_urls for arg in ("--url", url)]],
                workdir / "load.log",
            )  # fmt: skip
            try:
                kubeconfig = chart_identity_kubeconfig(kube_api, k8s_client, namespace)
                yield FailoverEnv(fleet, namespace, kubeconfig)
            finally:
                load.stop()
    finally:
        client.CoreV1Api(k8s_client).delete_namespace(namespace)


@dataclass
class GateSampler:
    """Reads every gate's /config every POLL_S in a thread: (time, version, fence, knobs)."""

    pods: list[GatedPod]
    seen: dict[str, list[tuple[float, int, int | None, Knobs]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.seen = {pod.name: [] for pod in self.pods}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pod in self.pods:
                config = pod.read_config()
                if config is not None:
                    samples = self.seen[pod.name]
                    sample = (
                        time.monotonic(),
                        config["version"],
                        config.get("fence"),
                        Knobs.from_mapping(config["knobs"]),
                    )
                    if not samples or samples[-1][1:] != sample[1:]:
                        samples.append(sample)
            time.sleep(POLL_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def leading(operator: OperatorProcess) -> bool:
    """The replica's own gauge: 1 while it holds the Lease and acts."""
    reply = http_get(operator.metrics_url)
    if reply is None or reply[0] != 200:
        return False
    gauge = f'{LEADER_GAUGE}{{lease="{LEASE}"}} '
    return any(
        line.startswith(gauge) and float(line[len(gauge) :]) == 1.0
        for line in reply[1].decode().splitlines()
    )


def read_lease(api: client.ApiClient, namespace: str) -> Any:
    return client.CoordinationV1Api(api).read_namespaced_lease(LEASE, namespace)


def policy_body(admin_port: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePolicy",
        "metadata": {"name": POLICY},
        "spec": {
            "selector": {"matchLabels": LABELS},
            "mode": "Recommend",
            "engine": {"kind": "vllm", "maxNumSeqs": 256, "maxNumBatchedTokens": 8192},
            "knobs": {"maxConcurrency": {"min": TARGET.max_concurrency,
                                         "max": TARGET.max_concurrency}},
            "actuation": {"adminPort": admin_port, "tokenSecretRef": {"name": GATE_TOKEN_SECRET}},
            "metrics": {"windowSeconds": 6, "stalenessSeconds": 6},
            "slo": {"ttftMs": 5000, "tpotMs": 500},
            "behavior": {"intervalSeconds": INTERVAL_S, "stabilizationWindowSeconds": 0,
                         "canary": {"enabled": False}},
        },
    }  # fmt: skip


def gate_token(api: client.ApiClient, namespace: str) -> str:
    secret = client.CoreV1Api(api).read_namespaced_secret(GATE_TOKEN_SECRET, namespace)
    return base64.b64decode(secret.data["token"]).decode()


async def write_with_fence(pod: GatedPod, token: str, knobs: Knobs, fence: int) -> None:
    async with aiohttp.ClientSession() as session:
        await GateClient(session, 5.0).write(pod.ip, pod.admin_port, token, knobs, fence=fence)


def test_frozen_leader_is_replaced_and_fenced_off(
    failover_env: FailoverEnv, k8s_client: client.ApiClient, tmp_path: Path
) -> None:
    fleet, namespace = failover_env.fleet, failover_env.namespace
    custom = client.CustomObjectsApi(k8s_client)
    settings = {
        "leader_election": True,
        "lease_name": LEASE,
        "lease_namespace": namespace,
        "lease_seconds": LEASE_S,
        "lease_renew_seconds": RENEW_S,
        "lease_renew_deadline_seconds": DEADLINE_S,
    }
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replicas.append(
            OperatorProcess(
                workdir=tmp_path / name,
                kubeconfig=failover_env.kubeconfig,
                prometheus_url=fleet.prometheus_url,
                namespaces=[namespace],
                **settings,
            )
        )
    first, second = replicas
    sampler = GateSampler(fleet.pods)
    stalled = fleet.pods[-1]
    timeline: list[tuple[str, float]] = []
    try:
        first.start()
        eventually(lambda: (leading(first), None), "the first replica leading", 20)
        second.start()
        # The second replica follows: the Lease is held and renewed.
        time.sleep(LEASE_S)
        assert leading(first) and not leading(second)
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, policy_body(fleet.admin_port)
        )

        def observing() -> tuple[bool, Any]:
            status = (
                client.CustomObjectsApi(k8s_client)
                .get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, POLICY)
                .get("status")
                or {}
            )
            fresh = condition_statuses(status).get("MetricsAvailable") == "True"
            return fresh and (status.get("pods") or {}).get("reporting") == 3, status

        eventually(observing, "fresh metrics from every pod", SETTLE_TIMEOUT_S, poll_s=POLL_S)
        old_fence = _micro_us(read_lease(k8s_client, namespace).spec.acquire_time)

        # -- the rollout, caught half done, and the leader frozen ----------------------
        os.kill(stalled.gate.pid, signal.SIGSTOP)
        try:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, POLICY, {"spec": {"mode": "Auto"}}
            )

            def partly_changed() -> tuple[bool, Any]:
                knobs = {
                    pod.name: (pod.read_config() or {}).get("knobs") for pod in fleet.pods[:-1]
                }
                return any(
                    k is not None and Knobs.from_mapping(k) == TARGET for k in knobs.values()
                ), knobs

            eventually(partly_changed, "the rollout under way", SETTLE_TIMEOUT_S, poll_s=POLL_S)
            os.kill(first.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            timeline.append(("leader frozen (SIGSTOP)", 0.0))
        finally:
            os.kill(stalled.gate.pid, signal.SIGCONT)

        def taken_over() -> tuple[bool, Any]:
            lease = read_lease(k8s_client, namespace)
            return _micro_us(lease.spec.acquire_time) != old_fence, lease.spec

        lease = eventually(
            taken_over, "the standby taking the Lease", SETTLE_TIMEOUT_S, poll_s=POLL_S
        )
        timeline.append(("standby holds the Lease", time.monotonic() - frozen_at))
        new_fence = _micro_us(lease.acquire_time)
        assert new_fence is not None and old_fence is not None and new_fence > old_fence
        assert leading(second)

        def rolled_out_by_new_leader() -> tuple[bool, Any]:
            configs = {pod.name: pod.read_config() for pod in fleet.pods}
            done = all(
                c is not None
                and Knobs.from_mapping(c["knobs"]) == TARGET
                and c.get("fence") == new_fence
                for c in configs.values()
            )
            return done, configs

        # The new leader re-sends the target to every gate it reads as
        # already there only when its fence is newer; a gate left at the
        # target by the old leader is written again under the new fence.
        eventually(
            rolled_out_by_new_leader,
            "every gate on the target under the new fence",
            SETTLE_TIMEOUT_S,
            poll_s=POLL_S,
        )
        actuated_s = time.monotonic() - frozen_at
        timeline.append(("every gate on the target under the new leader's fence", actuated_s))
        assert actuated_s <= FAILOVER_BUDGET_S, timeline

        # -- a write under the old leader's fence is refused, and changes nothing ------
        token = gate_token(k8s_client, namespace)
        before = fleet.pods[0].gate_config()
        with pytest.raises(StaleFence):
            asyncio.run(write_with_fence(fleet.pods[0], token, STARTUP, old_fence))
        after = fleet.pods[0].gate_config()
        assert (after["version"], after["knobs"]) == (before["version"], before["knobs"])
        reply = http_get(f"http://{fleet.pods[0].ip}:{fleet.pods[0].admin_port}/metrics")
        assert reply is not None and metric_sum(reply[1].decode(), STALE_REJECTIONS) >= 1

        # -- the frozen leader comes back, sees the Lease lost, and stands down --------
        os.kill(first.pid, signal.SIGCONT)
        eventually(lambda: (not leading(first), None), "the old leader standing down", 20)
        timeline.append(("old leader continued and standing down", time.monotonic() - frozen_at))
        quiet_from = time.monotonic()
        time.sleep(3 * INTERVAL_S)
        for pod in fleet.pods:
            config = pod.gate_config()
            assert config.get("fence") == new_fence, (pod.name, config)
    finally:
        sampler.stop()
        for operator in replicas:
            if operator.running():
                os.kill(operator.pid, signal.SIGCONT)
        # The leader restores the pods on delete; the standby defers to it.
        with contextlib.suppress(ApiException):
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, POLICY)

    # -- no gate ever took an older fence after a newer one --------------------------
    for pod, samples in sampler.seen.items():
        fences = [fence for _, _, fence, _ in samples if fence is not None]
        assert fences == sorted(fences), (pod, samples)
        # Nothing the old leader sent after the quiet period began was taken.
        late = [s for s in samples if s[0] > quiet_from and s[2] != new_fence]
        assert not late, (pod, late)
    print("failover timeline (s after the leader froze):")
    for what, at in timeline:
        print(f"  {at:6.2f}  {what}")

    def deleted() -> tuple[bool, str]:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, POLICY)
        except ApiException as err:
            return err.status == 404, str(err.reason)
        return False, "still there"

    eventually(deleted, "the policy deleted (finalizer done)", SETTLE_TIMEOUT_S, poll_s=POLL_S)
    for pod in fleet.pods:
        assert Knobs.from_mapping(pod.gate_config()["knobs"]) == STARTUP
    for operator in replicas:
        operator.stop()
