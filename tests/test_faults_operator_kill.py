"""`batchpilot operator` SIGKILLed mid-canary and mid-rollout, then started again (issue #9).

What runs, all real processes on loopback (sim/sandbox/fleet.py): the API
server; three serving pods, each `batchpilot sim serve` behind `batchpilot
gate`; Prometheus scraping gates and engines; `batchpilot sim load` sending
light, steady traffic through the gates for the whole module; the operator
process under the Helm chart's ServiceAccount.

The policy pins maxConcurrency to 24 (min = max) while the gates start with
no limit, so the real controller's clamp guard wants that change at its
first step in Auto, whatever the traffic says. The policy starts in
Recommend until the operator reports fresh metrics from every selected pod,
so that the first Auto step decides from what the gates run (a step without
metrics would put the controller's initial settings on every pod at once).

- mid-canary: the canary pod changes first and the others keep their
  settings for CANARY_INTERVALS intervals; the operator is killed as soon
  as the canary gate runs the new setting.
- mid-rollout (no canary): every pod gets the target in one step; the last
  pod's gate is stopped (SIGSTOP: a gate that does not answer), so the
  operator is killed while its write to that gate is in flight and the other
  gates already run the target. The gate is continued before the restart.

Then the operator starts again with the same configuration and identity and
must bring every selected pod to ONE setting (the target, or the startup one
had the canary been rolled back), with the pods' records, the status and the
Events to match, and stay there; a canary must run its course again rather
than be promoted by the restart. Deleting the policy afterwards must restore
the startup settings that the records kept across the kill.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from stack import KubeAPIServer, create_namespace, unique_name
from stack.chart import chart_identity_kubeconfig
from stack.checks import condition_statuses, eventually, metric_sum
from stack.workloads import CALIBRATION, steady_fleet_scenario

from batchpilot.contract.gate_api import APPLIED_ANNOTATION
from batchpilot.contract.knobs import Knobs, knobs_summary
from batchpilot.operator.gates import AppliedRecord
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

POD_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
LABELS = {"app": "kill-chat"}
# Each pod also carries its index, so that a policy can select the first n.
INDEX_LABEL = "kill-test/index"
# The gates start with Knobs(): no concurrency limit. The policy allows 24 only.
STARTUP = Knobs()
TARGET = Knobs(max_concurrency=24)
INTERVAL_S = 2
CANARY_INTERVALS = 2
# The canary pod scores like the others under this load and is rolled out.
SCENARIO = steady_fleet_scenario("kill-steady", 11)
# A restarted operator is live within ~5 s and steps within one interval; a
# canary then takes CANARY_INTERVALS more. 45 s covers that on two busy cores.
# Fast enough to catch the moment some but not all gates have changed.
POLL_S = 0.05
SETTLE_TIMEOUT_S = 45.0
# Events one policy may get, by reason: the switch to Auto, and one
# SettingsApplied per step that changed a gate. Such steps: the canary start
# and the rollout (mid-canary), the killed step and the restarted operator's
# completion (mid-rollout). A kill may lose an Event not yet posted, never
# add one; no Warning has a cause here.
EVENT_BOUND = {"ModeChanged": 1, "SettingsApplied": 2}
# Steps watched after convergence: each re-sends the target to every gate
# (apply_decision is idempotent), so a record, version or Event that churns
# shows within two.
QUIET_STEPS = 2
DECISIONS = "batchpilot_operator_decisions_total"


@dataclass(frozen=True)
class Case:
    policy: str
    # The policy selects the fleet's first `pods` pods.
    pods: int
    canary: bool
    # SIGSTOP the last selected pod's gate during the first Auto step.
    stall_last: bool = False


CASES = [
    pytest.param(Case("kill-canary", 3, canary=True), id="mid-canary"),
    pytest.param(Case("kill-rollout", 3, canary=False, stall_last=True), id="mid-rollout"),
    # One canary and one baseline pod: the restarted operator must tell them
    # apart from their records (pods.fleet_setting), not by a 1:1 count.
    pytest.param(Case("kill-canary-pair", 2, canary=True), id="mid-canary-two-pods"),
]


@dataclass
class KillEnv:
    fleet: Fleet
    namespace: str
    kubeconfig: Path
    load: ManagedProcess


@pytest.fixture(scope="module")
def kill_env(
    kube_api: KubeAPIServer,
    k8s_client: client.ApiClient,
    inferencepolicy_crd: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[KillEnv]:
    """Three gated pods and steady traffic, shared by every case (they start in ~15 s)."""
    workdir = tmp_path_factory.mktemp("operator-kill")
    namespace = unique_name("operator-kill")
    create_namespace(k8s_client, namespace)
    scenario = workdir / "scenario.yaml"
    scenario.write_text(SCENARIO)
    core = client.CoreV1Api(k8s_client)
    try:
        with start_fleet(
            k8s_client, namespace, scenario=scenario, ips=POD_IPS, labels=LABELS, workdir=workdir
        ) as fleet:
            for index, pod in enumerate(fleet.pods):
                core.patch_namespaced_pod(
                    pod.name, namespace, {"metadata": {"labels": {INDEX_LABEL: str(index)}}}
                )
            load = ManagedProcess(
                "load",
                [*BATCHPILOT_CLI, "sim", "load", str(scenario),
                 "--json", str(workdir / "load.json"),
                 *[arg for url in fleet.gate_urls for arg in ("--url", url)]],
                workdir / "load.log",
            )  # fmt: skip
            try:
                kubeconfig = chart_identity_kubeconfig(kube_api, k8s_client, namespace)
                yield KillEnv(fleet, namespace, kubeconfig, load)
            finally:
                load.stop()
    finally:
        core.delete_namespace(namespace)


def policy_body(case: Case, admin_port: int) -> dict[str, Any]:
    indices = [str(index) for index in range(case.pods)]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePolicy",
        "metadata": {"name": case.policy},
        "spec": {
            "selector": {
                "matchLabels": LABELS,
                "matchExpressions": [{"key": INDEX_LABEL, "operator": "In", "values": indices}],
            },
            "mode": "Recommend",
            "engine": {"kind": "vllm", "maxNumSeqs": 256, "maxNumBatchedTokens": 8192},
            "knobs": {"maxConcurrency": {"min": TARGET.max_concurrency,
                                         "max": TARGET.max_concurrency}},
            "actuation": {"adminPort": admin_port, "tokenSecretRef": {"name": GATE_TOKEN_SECRET}},
            "metrics": {"windowSeconds": 6, "stalenessSeconds": 6},
            "slo": {"ttftMs": 5000, "tpotMs": 500},
            "behavior": {
                "intervalSeconds": INTERVAL_S,
                "stabilizationWindowSeconds": 0,
                "canary": {"enabled": case.canary, "intervals": CANARY_INTERVALS},
            },
        },
    }  # fmt: skip


def metric_total(url: str, name: str) -> float:
    """The sum of a metric's samples on a /metrics page (0 when it does not answer)."""
    reply = http_get(url)
    if reply is None or reply[0] != 200:
        return 0.0
    return metric_sum(reply[1].decode(), name)


@dataclass
class View:
    """What the gates, the pods' records, the policy and its Events say, read on demand."""

    api: client.ApiClient
    namespace: str
    policy: str
    pods: list[GatedPod]

    def gates(self) -> dict[str, dict[str, Any] | None]:
        return {pod.name: pod.read_config() for pod in self.pods}

    def versions(self) -> dict[str, int]:
        return {pod.name: pod.gate_config()["version"] for pod in self.pods}

    def records(self) -> dict[str, AppliedRecord | None]:
        core = client.CoreV1Api(self.api)
        return {
            pod.name: AppliedRecord.from_json(
                (core.read_namespaced_pod(pod.name, self.namespace).metadata.annotations or {}).get(
                    APPLIED_ANNOTATION
                )
            )
            for pod in self.pods
        }

    def read_policy(self) -> dict[str, Any]:
        return client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.policy
        )

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.read_policy().get("status") or {}
        return status

    def events(self, uid: str) -> list[client.CoreV1Event]:
        listed = client.CoreV1Api(self.api).list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={self.policy}"
        )
        return [event for event in listed.items if event.involved_object.uid == uid]


@pytest.mark.parametrize("case", CASES)
def test_operator_sigkilled_mid_change_restarts_into_one_setting(
    kill_env: KillEnv, k8s_client: client.ApiClient, tmp_path: Path, case: Case
) -> None:
    fleet, namespace = kill_env.fleet, kill_env.namespace
    custom = client.CustomObjectsApi(k8s_client)
    selected = fleet.pods[: case.pods]
    view = View(k8s_client, namespace, case.policy, selected)
    before = view.gates()
    assert all(c and Knobs.from_mapping(c["knobs"]) == STARTUP for c in before.values()), before
    operator = OperatorProcess(
        workdir=tmp_path,
        kubeconfig=kill_env.kubeconfig,
        prometheus_url=fleet.prometheus_url,
        namespaces=[namespace],
    )
    try:
        operator.start()
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, policy_body(case, fleet.admin_port)
        )

        def observing() -> tuple[bool, dict[str, Any]]:
            status = view.status()
            reporting = (status.get("pods") or {}).get("reporting")
            fresh = condition_statuses(status).get("MetricsAvailable") == "True"
            return fresh and reporting == len(selected), status

        eventually(
            observing,
            "fresh metrics from every pod (mode Recommend)",
            SETTLE_TIMEOUT_S,
            poll_s=POLL_S,
        )
        unchanged = {pod: config["version"] for pod, config in before.items()}
        assert view.versions() == unchanged, "mode Recommend changed a gate"

        # -- Auto, and the kill at the first moment some but not all gates changed --------
        stalled = selected[-1] if case.stall_last else None
        watched = [pod for pod in selected if pod is not stalled]
        if stalled is not None:
            os.kill(stalled.gate.pid, signal.SIGSTOP)
        try:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, case.policy, {"spec": {"mode": "Auto"}}
            )

            def partly_changed() -> tuple[bool, dict[str, Any]]:
                configs = {pod.name: pod.read_config() for pod in watched}
                moved = [
                    pod
                    for pod, config in configs.items()
                    if config is not None and config["version"] > before[pod]["version"]
                ]
                return 0 < len(moved) < len(selected), configs

            at_kill = eventually(
                partly_changed, "some but not all gates changed", SETTLE_TIMEOUT_S, poll_s=POLL_S
            )
            operator.kill()
            records_at_kill = view.records()
        finally:
            if stalled is not None:
                os.kill(stalled.gate.pid, signal.SIGCONT)
        changed_at_kill = sorted(
            pod for pod, config in at_kill.items() if config["version"] > before[pod]["version"]
        )
        # Right then: the changed gates run the target, the others their startup
        # settings (the stalled gate could not take its write while stopped).
        for pod, config in at_kill.items():
            expected = TARGET if pod in changed_at_kill else STARTUP
            assert Knobs.from_mapping(config["knobs"]) == expected, (pod, at_kill)
        if case.canary:
            assert changed_at_kill == [selected[0].name], at_kill
        print(
            f"{case.policy}: SIGKILL with {changed_at_kill} changed, records then "
            f"{ {pod: record and record.version for pod, record in records_at_kill.items()} }"
        )

        # -- the same operator, started again ------------------------------------------
        operator.start()
        steps_at_follow = None
        if case.canary:
            # The baseline pods follow the canary only after a verdict: the
            # restarted controller must run the canary's intervals again.
            def followed() -> tuple[bool, float]:
                moved = any(
                    (config := pod.read_config()) is not None
                    and config["version"] > before[pod.name]["version"]
                    for pod in selected[1:]
                )
                return moved, metric_total(operator.metrics_url, DECISIONS)

            steps_at_follow = eventually(
                followed, "the other pods following the canary", SETTLE_TIMEOUT_S, poll_s=POLL_S
            )

        def consistent() -> tuple[bool, dict[str, Any]]:
            seen = {"gates": view.gates(), "records": view.records(), "status": view.status()}
            configs = seen["gates"]
            if any(config is None for config in configs.values()):
                return False, seen
            settings = {Knobs.from_mapping(config["knobs"]) for config in configs.values()}
            if len(settings) != 1:
                return False, seen
            (setting,) = settings
            recorded = all(
                record is not None
                and record.policy == case.policy
                and record.knobs == setting
                and record.version == configs[pod]["version"]
                for pod, record in seen["records"].items()
            )
            summary = f"{len(selected)}/{len(selected)} {knobs_summary(setting)}"
            applied = (seen["status"].get("applied") or {}).get("summary")
            stable = condition_statuses(seen["status"]).get("Progressing") == "False"
            return recorded and applied == summary and stable, seen

        settled = eventually(
            consistent,
            "every pod on one setting, recorded, in status",
            SETTLE_TIMEOUT_S,
            poll_s=POLL_S,
        )
        (setting,) = {Knobs.from_mapping(config["knobs"]) for config in settled["gates"].values()}
        assert setting in (TARGET, STARTUP), settled
        # Each pod's record still holds what it ran before batchpilot.
        assert all(r.startup == STARTUP for r in settled["records"].values()), settled
        assert settled["status"]["applied"]["laggards"] == [], settled["status"]
        assert condition_statuses(settled["status"])["Ready"] == "True", settled["status"]

        # -- and it stays so: no more changes, no Events beyond the bound -------------
        steps = metric_total(operator.metrics_url, DECISIONS)
        eventually(
            lambda: (metric_total(operator.metrics_url, DECISIONS) >= steps + QUIET_STEPS, steps),
            f"{QUIET_STEPS} more control steps",
            SETTLE_TIMEOUT_S,
            poll_s=POLL_S,
        )
        assert view.versions() == {pod: c["version"] for pod, c in settled["gates"].items()}
        events = view.events(view.read_policy()["metadata"]["uid"])
        posted = Counter[str]()
        for event in events:
            posted[event.reason] += event.count or 1
        every = [(event.reason, event.message) for event in events]
        print(f"{case.policy}: settled on {knobs_summary(setting)}; Events {dict(posted)}")
        assert set(posted) <= set(EVENT_BOUND), every
        assert all(posted[reason] <= bound for reason, bound in EVENT_BOUND.items()), every
        assert posted["ModeChanged"] == 1, every

        # -- delete: the restarted operator's finalizer restores the startup settings ----
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, case.policy)

        def deleted() -> tuple[bool, str]:
            try:
                view.read_policy()
            except ApiException as err:
                return err.status == 404, str(err.reason)
            return False, "still there"

        eventually(deleted, "the policy deleted (finalizer done)", SETTLE_TIMEOUT_S, poll_s=POLL_S)
        restored = view.gates()
        assert all(c and Knobs.from_mapping(c["knobs"]) == STARTUP for c in restored.values())
        assert view.records() == {pod.name: None for pod in selected}
        assert kill_env.load.running(), kill_env.load.log_tail()
        if steps_at_follow is not None:
            # A verdict takes CANARY_INTERVALS steps after the one that starts the canary.
            assert steps_at_follow >= 1 + CANARY_INTERVALS, (
                f"the restarted operator rolled the canary out at its step {steps_at_follow:g}"
            )
    except BaseException:
        if operator.process is not None:
            print(operator.process.log_tail(60), file=sys.stderr)
        raise
    finally:
        operator.stop()
