"""operator/cycle.py and actuation.py against the real stack: API server pods, real gates on 127.0.0.x.

The controller is replaced by a scripted one (a `Stepper` that returns the
decisions a test gives it): what is under test here is what the operator does
with a decision, i.e. pod selection, actuation, records, restore, reporting.
The real controller runs in test_e2e_operator.py.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client
from stack.in_process import in_process_operator, pod_infos, start_gates

from batchpilot.contract.gate_api import APPLIED_ANNOTATION, KNOBS_ANNOTATION
from batchpilot.contract.knobs import Knobs
from batchpilot.contract.reasons import ConditionReason
from batchpilot.controller.explain import Conditions, Decision, ModelQuality, Reason
from batchpilot.gate.server import GateServer
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.cycle import CycleOutcome, run_cycle
from batchpilot.operator.gates import AppliedRecord
from batchpilot.operator.pods import PodInfo
from batchpilot.operator.runtime import Operator, PolicyRuntime

pytestmark = pytest.mark.stack

TOKEN = "actuation-test-token"
IPS = ("127.0.0.2", "127.0.0.3")
STARTUP = Knobs(max_concurrency=96, discipline="fcfs")


@dataclass
class ScriptedStepper:
    """Returns `targets[i]` (policy-wide, or per pod) on the i-th step; the last one repeats."""

    targets: list[Knobs | dict[str, Knobs]]
    outage: str | None = None
    last_known_good: Knobs = field(default_factory=Knobs)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    resumed: list[Knobs] = field(default_factory=list)
    # Per resume: when it took over pods an earlier controller steered (None: none did).
    took_over: list[float | None] = field(default_factory=list)

    def resume(self, fleet_setting: Knobs, *, steered_until_s: float | None = None) -> None:
        self.resumed.append(fleet_setting)
        self.took_over.append(steered_until_s)

    def run_once(self, now_s: float, pods: Sequence[str]) -> Decision:
        self.calls.append(tuple(pods))
        planned = self.targets[min(len(self.calls), len(self.targets)) - 1]
        per_pod = planned if isinstance(planned, dict) else dict.fromkeys(pods, planned)
        target = next(iter(per_pod.values())) if per_pod else Knobs()
        return Decision(
            time_s=now_s, target=target, per_pod=per_pod, actuate=True,
            reasons=(Reason("decide", "scripted"),), quality=ModelQuality(10, 0.1, True),
            conditions=Conditions(True, True, True), step_seconds={"observe": 0.001},
            signals={"reporting_pods": len(pods)},
        )


@dataclass
class Stack:
    api: client.ApiClient
    namespace: str
    gates: list[GateServer]
    admin_port: int
    op: Operator

    def pods(self) -> list[PodInfo]:
        return pod_infos(self.api, self.namespace)

    def annotations(self, pod: str) -> dict[str, str]:
        return client.CoreV1Api(self.api).read_namespaced_pod(pod, self.namespace).metadata.annotations or {}

    async def cycle(self, runtime: PolicyRuntime, spec: dict[str, Any], generation: int = 1) -> CycleOutcome:
        runtime.next_step_s = 0.0  # due now: these tests do not wait for intervals
        return await run_cycle(self.op, runtime, spec=spec, generation=generation, pods=self.pods(),
                               now_mono=0.0, now_wall=datetime.now(UTC))


def policy_spec(mode: str = "Auto", **extra: Any) -> dict[str, Any]:
    return {
        "selector": {"matchLabels": {"app": "chat"}},
        "slo": {"ttftMs": 2000, "tpotMs": 50},
        "actuation": {"adminPort": 0, "tokenSecretRef": {"name": "gate-token", "key": "token"}},
        "mode": mode,
        **extra,
    }


@pytest.fixture
def stack_factory(k8s_client: client.ApiClient, namespace: str, make_serving_pod: Callable[..., Any]) -> Callable[..., Any]:
    core = client.CoreV1Api(k8s_client)
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="gate-token"), data={"token": base64.b64encode(TOKEN.encode()).decode()}))

    @asynccontextmanager
    async def make(stepper: ScriptedStepper, ready: Sequence[bool] = (True, True)) -> AsyncIterator[Stack]:
        async with AsyncExitStack() as exits:
            gates, admin_port = await start_gates(exits, [(ip, TOKEN) for ip in IPS], STARTUP)
            for index, (ip, is_ready) in enumerate(zip(IPS, ready, strict=True)):
                make_serving_pod(namespace, f"chat-{index}", pod_ip=ip, ports={"admin": admin_port},
                                 labels={"app": "chat"}, ready=is_ready)
            make_serving_pod(namespace, "other", pod_ip="127.0.0.4", ports={"admin": admin_port},
                             labels={"app": "other"})
            op = await in_process_operator(
                exits, k8s_client, OperatorConfig(prometheus={"default": "http://127.0.0.1:9"}),
                lambda policy, prometheus: stepper,
            )
            yield Stack(k8s_client, namespace, gates, admin_port, op)

    return make


def spec_for(stack: Stack, mode: str = "Auto", **extra: Any) -> dict[str, Any]:
    spec = policy_spec(mode, **extra)
    spec["actuation"]["adminPort"] = stack.admin_port
    return spec


def test_auto_applies_records_and_then_holds_still(stack_factory: Callable[..., Any]) -> None:
    target = Knobs(max_concurrency=24, queue_deadline_ms=1500, discipline="shortest-prompt-first")

    async def scenario() -> None:
        async with stack_factory(ScriptedStepper([target])) as stack:
            runtime = PolicyRuntime("chat", stack.namespace)
            first = await stack.cycle(runtime, spec_for(stack))
            assert [gate.gate.queue.knobs for gate in stack.gates] == [target, target]
            assert first.report is not None and first.report.actuation is not None
            assert first.report.actuation.changed == ("chat-0", "chat-1")
            assert first.report.actuation.laggards == ()
            assert [e.reason for e in first.events] == ["SettingsApplied"]
            assert "maxConcurrency 96 -> 24" in first.events[0].message
            record = AppliedRecord.from_json(stack.annotations("chat-0")[APPLIED_ANNOTATION])
            assert record is not None
            assert (record.policy, record.knobs, record.version, record.startup) == ("chat", target, 2, STARTUP)
            assert stack.annotations("chat-1")[KNOBS_ANNOTATION] == (
                '{"aging_ms":2000,"discipline":"shortest-prompt-first","max_concurrency":24,'
                '"max_inflight_tokens":null,"max_num_batched_tokens":null,"queue_deadline_ms":1500}')
            assert APPLIED_ANNOTATION not in stack.annotations("other")  # not selected

            second = await stack.cycle(runtime, spec_for(stack))
            assert [gate.gate.config.version for gate in stack.gates] == [2, 2]
            assert second.report is not None and second.report.actuation is not None
            assert second.report.actuation.changed == ()
            assert second.events == []

    asyncio.run(scenario())


def test_per_pod_targets_reach_their_own_pods(stack_factory: Callable[..., Any]) -> None:
    canary, baseline = Knobs(max_concurrency=16), Knobs(max_concurrency=64)

    async def scenario() -> None:
        async with stack_factory(ScriptedStepper([{"chat-0": canary, "chat-1": baseline}])) as stack:
            await stack.cycle(PolicyRuntime("chat", stack.namespace), spec_for(stack))
            assert [gate.gate.queue.knobs for gate in stack.gates] == [canary, baseline]

    asyncio.run(scenario())


def test_off_restores_the_startup_settings_and_clears_the_record(stack_factory: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with stack_factory(ScriptedStepper([Knobs(max_concurrency=8)])) as stack:
            runtime = PolicyRuntime("chat", stack.namespace)
            await stack.cycle(runtime, spec_for(stack, "Auto"), generation=1)
            assert [gate.gate.queue.knobs.max_concurrency for gate in stack.gates] == [8, 8]
            off = await stack.cycle(runtime, spec_for(stack, "Off"), generation=2)
            # The gates' own startup settings (96), not Knobs() defaults.
            assert [gate.gate.queue.knobs for gate in stack.gates] == [STARTUP, STARTUP]
            for pod in ("chat-0", "chat-1"):
                annotations = stack.annotations(pod)
                assert APPLIED_ANNOTATION not in annotations and KNOBS_ANNOTATION not in annotations
            assert [e.reason for e in off.events] == ["SettingsRestored"]
            assert off.report is not None and off.report.actuation is None

    asyncio.run(scenario())


def test_recommend_changes_nothing(stack_factory: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with stack_factory(ScriptedStepper([Knobs(max_concurrency=8)])) as stack:
            outcome = await stack.cycle(PolicyRuntime("chat", stack.namespace), spec_for(stack, "Recommend"))
            assert outcome.report is not None and outcome.report.decision is not None
            assert outcome.report.decision.target.max_concurrency == 8
            assert [gate.gate.config.version for gate in stack.gates] == [1, 1]
            assert APPLIED_ANNOTATION not in stack.annotations("chat-0")

    asyncio.run(scenario())


def test_only_ready_pods_are_stepped_and_actuated(stack_factory: Callable[..., Any]) -> None:
    stepper = ScriptedStepper([Knobs(max_concurrency=8)])

    async def scenario() -> None:
        async with stack_factory(stepper, ready=(True, False)) as stack:
            outcome = await stack.cycle(PolicyRuntime("chat", stack.namespace), spec_for(stack))
            assert stepper.calls == [("chat-0",)]
            assert [gate.gate.config.version for gate in stack.gates] == [2, 1]
            assert outcome.report is not None
            assert (outcome.report.pods.selected, outcome.report.pods.ready) == (2, 1)

    asyncio.run(scenario())


def test_no_ready_pods_is_a_problem_to_retry(stack_factory: Callable[..., Any]) -> None:
    stepper = ScriptedStepper([Knobs(max_concurrency=8)])

    async def scenario() -> None:
        async with stack_factory(stepper, ready=(False, False)) as stack:
            outcome = await stack.cycle(PolicyRuntime("chat", stack.namespace), spec_for(stack))
            assert stepper.calls == []
            assert outcome.report is not None and outcome.report.problem is not None
            assert outcome.report.problem[0] == ConditionReason.NO_READY_PODS
            assert outcome.retry_after_s is not None and outcome.retry_after_s > 0

    asyncio.run(scenario())


def test_metrics_outage_skips_actuation(stack_factory: Callable[..., Any]) -> None:
    stepper = ScriptedStepper([Knobs(max_concurrency=8)], outage="Prometheus query for admitted failed: refused")

    async def scenario() -> None:
        async with stack_factory(stepper) as stack:
            runtime = PolicyRuntime("chat", stack.namespace)
            first = await stack.cycle(runtime, spec_for(stack))
            assert [gate.gate.config.version for gate in stack.gates] == [1, 1]
            assert first.report is not None and first.report.problem == (ConditionReason.METRICS_UNAVAILABLE, stepper.outage)
            assert [e.reason for e in first.events] == ["MetricsUnavailable"]
            again = await stack.cycle(runtime, spec_for(stack))
            assert again.events == []  # the same outage is one Event, not one per step

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("secret_change", "says"),
    [
        ({"data": {"token": base64.b64encode(b"not-the-token").decode()}}, "refused the admin token (401)"),
        ({"data": {"other": base64.b64encode(b"x").decode()}}, "has no key 'token'"),
    ],
)
def test_token_problems_make_laggards(stack_factory: Callable[..., Any], k8s_client: client.ApiClient,
                                      namespace: str, secret_change: dict[str, Any], says: str) -> None:
    client.CoreV1Api(k8s_client).replace_namespaced_secret("gate-token", namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="gate-token"), data=secret_change["data"]))

    async def scenario() -> None:
        async with stack_factory(ScriptedStepper([Knobs(max_concurrency=8)])) as stack:
            outcome = await stack.cycle(PolicyRuntime("chat", stack.namespace), spec_for(stack))
            assert outcome.report is not None and outcome.report.actuation is not None
            assert outcome.report.actuation.up_to_date == 0
            assert len(outcome.report.actuation.laggards) == 2
            assert all(says in laggard.why for laggard in outcome.report.actuation.laggards)
            assert [gate.gate.config.version for gate in stack.gates] == [1, 1]
            assert any(e.type == "Warning" and says in e.message for e in outcome.events)

    asyncio.run(scenario())


def test_a_pod_steered_by_another_policy_is_left_alone(stack_factory: Callable[..., Any], k8s_client: client.ApiClient,
                                                      namespace: str) -> None:
    async def scenario() -> None:
        async with stack_factory(ScriptedStepper([Knobs(max_concurrency=8)])) as stack:
            foreign = AppliedRecord("other-policy", Knobs(max_concurrency=50), 1, "2026-01-01T00:00:00Z")
            client.CoreV1Api(k8s_client).patch_namespaced_pod(
                "chat-1", namespace, {"metadata": {"annotations": {APPLIED_ANNOTATION: foreign.to_json()}}},
                _content_type="application/merge-patch+json")
            outcome = await stack.cycle(PolicyRuntime("chat", stack.namespace), spec_for(stack))
            assert outcome.report is not None and outcome.report.actuation is not None
            (laggard,) = outcome.report.actuation.laggards
            assert laggard.text.startswith("chat-1: already steered by InferencePolicy other-policy")
            assert [gate.gate.config.version for gate in stack.gates] == [2, 1]

    asyncio.run(scenario())


def test_an_event_names_what_a_restarted_gate_ran_not_what_was_sent(stack_factory: Callable[..., Any]) -> None:
    """B4: a gate restarted unlimited, then a change: "none -> 32", not the record's "24 -> 32"."""
    stepper = ScriptedStepper([Knobs(max_concurrency=24), Knobs(max_concurrency=32)])

    async def scenario() -> None:
        async with stack_factory(stepper) as stack, AsyncExitStack() as restarted:
            runtime = PolicyRuntime("chat", stack.namespace)
            await stack.cycle(runtime, spec_for(stack))
            await stack.gates[0].stop()
            # The same pod's gate back with no limit, as a restarted gate without its settings file.
            (gate,), _ = await start_gates(restarted, [(IPS[0], TOKEN)], Knobs(), stack.admin_port)
            second = await stack.cycle(runtime, spec_for(stack))
            assert gate.gate.queue.knobs.max_concurrency == 32
            (applied,) = [e for e in second.events if e.reason == "SettingsApplied"]
            assert "chat-0: maxConcurrency none -> 32" in applied.message
            assert "chat-1: maxConcurrency 24 -> 32" in applied.message
            # The next step finds both at the target: no write, no Event.
            third = await stack.cycle(runtime, spec_for(stack))
            assert third.events == []
            assert gate.gate.config.version == 2

    asyncio.run(scenario())


def test_recommend_after_auto_keeps_the_pods_and_reports_what_they_run(stack_factory: Callable[..., Any]) -> None:
    """B3: leaving Auto for Recommend changes no gate, and the report reads what the gates run."""
    cap15 = Knobs(max_concurrency=15)

    async def scenario() -> None:
        async with stack_factory(ScriptedStepper([cap15, Knobs(max_concurrency=40)])) as stack:
            runtime = PolicyRuntime("chat", stack.namespace)
            await stack.cycle(runtime, spec_for(stack, "Auto"), generation=1)
            recommend = await stack.cycle(runtime, spec_for(stack, "Recommend"), generation=2)
            assert [gate.gate.queue.knobs for gate in stack.gates] == [cap15, cap15]
            assert recommend.events == []
            report = recommend.report
            assert report is not None and report.actuation is None and report.held is not None
            assert (report.held.knobs, report.held.running, report.held.others) == (cap15, 2, ())
            # A gate that restarted with its startup settings is named with what it runs.
            await stack.gates[1].stop()
            again = await stack.cycle(runtime, spec_for(stack, "Recommend"), generation=2)
            assert again.report is not None and again.report.held is not None
            assert again.report.held.running == 1
            (other,) = again.report.held.others
            assert other.text.startswith("chat-1: gate admin API at") and "unreachable" in other.why

    asyncio.run(scenario())


def test_a_controller_taking_over_steered_pods_is_told_when(stack_factory: Callable[..., Any]) -> None:
    """After a restart the records say an earlier controller steered the pods: the new one
    gets the time it took over, so its stabilization window starts empty (guards.stabilize)."""
    target = Knobs(max_concurrency=24)

    async def scenario() -> None:
        stepper = ScriptedStepper([target])
        async with stack_factory(stepper) as stack:
            await stack.cycle(PolicyRuntime("chat", stack.namespace), spec_for(stack))
            # Never steered before: resumed from the gates' startup settings, nothing missed.
            assert (stepper.resumed, stepper.took_over) == ([STARTUP], [None])
            restarted = PolicyRuntime("chat", stack.namespace)  # a new operator process's memory
            before = datetime.now(UTC).timestamp()
            await stack.cycle(restarted, spec_for(stack))
            assert stepper.resumed[-1] == target
            took_over = stepper.took_over[-1]
            assert took_over is not None and before <= took_over <= datetime.now(UTC).timestamp()

    asyncio.run(scenario())
