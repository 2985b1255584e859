"""Operator faults on the real stack: a Prometheus that fails in every way, gates that vanish.

What runs: the API server (stack fixtures) with two serving pods whose real
gates listen on 127.0.0.2 / 127.0.0.3; a real Prometheus scraping those
gates with `pod` / `namespace` labels; between the operator and Prometheus a
small fault-injecting proxy. Cycles run through `cycle.run_cycle` with
the REAL controller (`ControllerStepper`, the operator's default), in Auto.

Faults: Prometheus down, slower than the policy's query timeout, answering
NaN for every sample, answering garbage (not JSON, JSON of the wrong shape,
HTTP 500). Each must leave the gates as they were (no decision from missing
data), report MetricsAvailable=False with the reason, and clear by itself
when Prometheus is back. A gate that is unreachable mid-rollout makes its pod
a laggard while the other pod is still configured.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client
from stack import PrometheusServer, ScrapeTarget
from stack.in_process import in_process_operator, pod_infos, start_gates
from test_operator_actuation import ScriptedStepper

from batchpilot.contract.knobs import Knobs
from batchpilot.contract.reasons import ConditionReason
from batchpilot.gate.server import GateServer
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.cycle import CycleOutcome, run_cycle
from batchpilot.operator.gates import AppliedRecord
from batchpilot.operator.pods import PodInfo
from batchpilot.operator.runtime import Operator, PolicyRuntime
from batchpilot.operator.status import build_status

pytestmark = pytest.mark.stack

TOKEN = "faults-admin-token"
IPS = ("127.0.0.2", "127.0.0.3")
STARTUP = Knobs(max_concurrency=96)
# The policy's Prometheus timeout: a "slow" Prometheus answers after twice that.
QUERY_TIMEOUT_S = 1.0


class FaultyPrometheus(BaseHTTPRequestHandler):
    """Forwards to the real Prometheus, or fails as `server.fault` says."""

    server: FaultProxy

    def do_GET(self) -> None:
        fault = self.server.fault
        self.server.queries += 1
        if fault == "slow":
            time.sleep(2 * QUERY_TIMEOUT_S)
        if fault == "http-500":
            return self._answer(500, b'{"status":"error","error":"boom"}')
        if fault == "not-json":
            return self._answer(200, b"<html>502 Bad Gateway</html>")
        if fault == "wrong-shape":
            return self._answer(
                200, b'{"status":"success","data":{"resultType":"vector","result":"x"}}'
            )
        if fault == "no-data":
            return self._answer(200, b'{"status":"success"}')
        if fault == "top-level-list":
            return self._answer(200, b"[]")
        try:
            with urllib.request.urlopen(self.server.upstream + self.path, timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            return self._answer(error.code, error.read())
        if fault == "nan":
            document = json.loads(body)
            for item in document["data"]["result"]:
                item["value"][1] = "NaN"
            body = json.dumps(document).encode()
        self._answer(200, body)

    def _answer(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the operator gave up waiting ("slow"): nobody to answer

    def log_message(self, format: str, *args: object) -> None:
        return


class FaultProxy(ThreadingHTTPServer):
    daemon_threads = True
    # A step's ~22 queries connect at once; socketserver's listen backlog of 5
    # would drop the other connects' SYNs, which the kernel resends only
    # after 1 s, the whole query timeout here.
    request_queue_size = 64

    def __init__(self, upstream: str, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), FaultyPrometheus)
        self.upstream = upstream
        self.fault = "none"
        self.queries = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@dataclass
class Stack:
    api: client.ApiClient
    namespace: str
    gates: list[GateServer]
    admin_port: int
    op: Operator
    proxy: FaultProxy
    runtime: PolicyRuntime
    # Closes the operator (and any restarted one) with the stack.
    exits: AsyncExitStack

    def pods(self) -> list[PodInfo]:
        return pod_infos(self.api, self.namespace)

    def spec(self, mode: str = "Auto") -> dict[str, Any]:
        return {
            "selector": {"matchLabels": {"app": "chat"}},
            "slo": {"ttftMs": 2000, "tpotMs": 50},
            "actuation": {"adminPort": self.admin_port, "tokenSecretRef": {"name": "gate-token"}},
            "metrics": {
                "windowSeconds": 10,
                "stalenessSeconds": 10,
                "timeoutSeconds": QUERY_TIMEOUT_S,
            },
            "mode": mode,
        }

    async def cycle(self, mode: str = "Auto", generation: int = 1) -> CycleOutcome:
        self.runtime.next_step_s = 0.0  # due now
        return await run_cycle(
            self.op,
            self.runtime,
            spec=self.spec(mode),
            generation=generation,
            pods=self.pods(),
            now_mono=0.0,
            now_wall=datetime.now(UTC),
        )

    def versions(self) -> list[int]:
        return [gate.gate.config.version for gate in self.gates]

    async def restart_operator(self, stepper: ScriptedStepper) -> None:
        """A new operator process: no in-memory state, only what the cluster and gates hold."""
        self.op = await in_process_operator(
            self.exits, self.api, self.op.config, lambda policy, prometheus: stepper
        )
        self.runtime = PolicyRuntime("chat", self.namespace)

    def records(self) -> list[AppliedRecord | None]:
        return [pod.record for pod in sorted(self.pods(), key=lambda pod: pod.name)]


def conditions(outcome: CycleOutcome) -> dict[str, dict[str, Any]]:
    assert outcome.report is not None
    status = build_status(outcome.report, {}, generation=1, now=datetime.now(UTC))
    return {condition["type"]: condition for condition in status["conditions"]}


@pytest.fixture
def stack_factory(
    k8s_client: client.ApiClient,
    namespace: str,
    make_serving_pod: Callable[..., Any],
    prometheus: Callable[..., PrometheusServer],
) -> Iterator[Callable[[], Any]]:
    client.CoreV1Api(k8s_client).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="gate-token"),
            data={"token": base64.b64encode(TOKEN.encode()).decode()},
        ),
    )
    servers: list[PrometheusServer] = []

    @asynccontextmanager
    async def make() -> AsyncIterator[Stack]:
        async with AsyncExitStack() as exits:
            gates, admin_port = await start_gates(exits, [(ip, TOKEN) for ip in IPS], STARTUP)
            for index, ip in enumerate(IPS):
                make_serving_pod(
                    namespace,
                    f"chat-{index}",
                    pod_ip=ip,
                    ports={"admin": admin_port},
                    labels={"app": "chat"},
                )
            # Prometheus blocks until both gates are scraped; it runs in a
            # thread so that the gates (on this loop) can answer meanwhile.
            server = await asyncio.to_thread(
                prometheus,
                [
                    ScrapeTarget(
                        f"{ip}:{admin_port}", {"pod": f"chat-{index}", "namespace": namespace}
                    )
                    for index, ip in enumerate(IPS)
                ],
            )
            servers.append(server)
            proxy = _serve(FaultProxy(server.url))
            stack_ref: list[Stack] = []
            exits.callback(lambda: _close(stack_ref[0].proxy))
            op = await in_process_operator(
                exits, k8s_client, OperatorConfig(prometheus={"default": proxy.url})
            )
            stack = Stack(
                k8s_client,
                namespace,
                gates,
                admin_port,
                op,
                proxy,
                PolicyRuntime("chat", namespace),
                exits,
            )
            stack_ref.append(stack)
            yield stack

    yield make
    for server in servers:
        server.stop()


def _serve(proxy: FaultProxy) -> FaultProxy:
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


def _close(proxy: FaultProxy) -> None:
    proxy.shutdown()
    proxy.server_close()


async def _healthy_cycle(stack: Stack) -> CycleOutcome:
    """Cycles until the controller sees fresh metrics (rate() needs two scrapes)."""
    deadline = time.monotonic() + 30
    while True:
        outcome = await stack.cycle()
        if (
            conditions(outcome)["MetricsAvailable"]["status"] == "True"
            or time.monotonic() > deadline
        ):
            return outcome
        await asyncio.sleep(1.0)


OUTAGES = ["down", "slow", "http-500", "not-json", "wrong-shape", "no-data", "top-level-list"]


def test_prometheus_outages_hold_the_gates_and_clear_by_themselves(
    stack_factory: Callable[[], Any],
) -> None:
    # One stack for every fault in turn (Prometheus takes ~6 s to first
    # scrape); each fault starts from a healthy cycle and must end in one.
    async def scenario() -> None:
        async with stack_factory() as stack:
            for fault in OUTAGES:
                await _outage_holds_and_clears(stack, fault)

    asyncio.run(scenario())


async def _outage_holds_and_clears(stack: Stack, fault: str) -> None:
    healthy = await _healthy_cycle(stack)
    assert conditions(healthy)["MetricsAvailable"]["status"] == "True", (fault, conditions(healthy))
    before = stack.versions()
    knobs_before = [gate.gate.queue.knobs for gate in stack.gates]

    port = stack.proxy.server_address[1]
    if fault == "down":
        _close(stack.proxy)  # connections to its port are refused from now on
    else:
        stack.proxy.fault = fault
    started = time.monotonic()
    during = [await stack.cycle() for _ in range(2)]
    elapsed_s = time.monotonic() - started
    for outcome in during:
        assert outcome.report is not None and outcome.report.problem is not None, fault
        reason, message = outcome.report.problem
        assert reason == ConditionReason.METRICS_UNAVAILABLE and "Prometheus" in message, (fault, message)
        assert outcome.report.actuation is None, fault
        metrics = conditions(outcome)["MetricsAvailable"]
        assert metrics["status"] == "False" and metrics["message"], (fault, metrics)
    # One Event for the outage, not one per step.
    assert [e.reason for e in during[0].events] == ["MetricsUnavailable"], fault
    assert during[1].events == [], fault
    assert stack.versions() == before, fault
    assert [gate.gate.queue.knobs for gate in stack.gates] == knobs_before, fault
    # Two steps end within their query timeouts (one retry each), not after
    # minutes of retries: a step stops at its first failed query.
    assert elapsed_s < 2 * 2 * (2 * QUERY_TIMEOUT_S) + 5, (fault, elapsed_s)

    if fault == "down":
        # Back on the same address, as a restarted Prometheus behind its Service.
        stack.proxy = _serve(FaultProxy(stack.proxy.upstream, port))
    stack.proxy.fault = "none"
    recovered = await stack.cycle()
    assert recovered.report is not None and recovered.report.problem is None, (
        fault,
        recovered.report,
    )
    assert conditions(recovered)["MetricsAvailable"]["status"] == "True", fault
    assert [e.reason for e in recovered.events if e.type == "Warning"] == [], fault


def test_nan_everywhere_is_missing_data_and_nothing_is_applied(
    stack_factory: Callable[[], Any],
) -> None:
    async def scenario() -> None:
        async with stack_factory() as stack:
            await _healthy_cycle(stack)
            before = stack.versions()
            stack.proxy.fault = "nan"
            outcome = await stack.cycle()
            assert outcome.report is not None and outcome.report.decision is not None
            decision = outcome.report.decision
            assert decision.conditions.metrics_available is False
            assert conditions(outcome)["MetricsAvailable"]["status"] == "False"
            # Held: the target is what the pods run, so nothing changes on them.
            assert stack.versions() == before
            stack.proxy.fault = "none"
            recovered = await stack.cycle()
            assert conditions(recovered)["MetricsAvailable"]["status"] == "True"

    asyncio.run(scenario())


def test_gate_unreachable_and_pods_flapping_mid_rollout_leave_laggards_not_crashes(
    stack_factory: Callable[[], Any],
    namespace: str,
    make_serving_pod: Callable[..., Any],
    k8s_client: client.ApiClient,
) -> None:
    targets = [Knobs(max_concurrency=24), Knobs(max_concurrency=32), Knobs(max_concurrency=40)]

    async def scenario() -> None:
        async with stack_factory() as stack:
            # A scripted controller: what is under test is the rollout, not the decision.
            stack.op.stepper_factory = lambda policy, prometheus: ScriptedStepper(list(targets))
            # chat-1's gate dies; its pod is still Ready in the API, as
            # between a crash and the kubelet's next probe.
            await stack.gates[1].stop()
            first = await stack.cycle()
            assert first.report is not None and first.report.actuation is not None
            assert first.report.actuation.changed == ("chat-0",)
            (laggard,) = first.report.actuation.laggards
            assert laggard.pod == "chat-1", laggard
            assert stack.gates[0].gate.queue.knobs == targets[0]
            assert any(e.type == "Warning" for e in first.events)

            # Readiness flaps, a pod is deleted and another added between steps.
            core = client.CoreV1Api(k8s_client)
            core.delete_namespaced_pod("chat-1", namespace, grace_period_seconds=0)
            added = make_serving_pod(
                namespace,
                "chat-2",
                pod_ip="127.0.0.4",
                ports={"admin": stack.admin_port},
                labels={"app": "chat"},
                ready=False,
            )
            second = await stack.cycle()
            assert second.report is not None and second.report.actuation is not None
            assert second.report.actuation.changed == ("chat-0",)
            assert stack.gates[0].gate.queue.knobs == targets[1]
            assert (second.report.pods.selected, second.report.pods.ready) in {(2, 1), (3, 1)}
            # chat-2 turns Ready with no gate answering on its address: a laggard, the rest proceed.
            added.set_ready(True)
            third = await stack.cycle()
            assert third.report is not None and third.report.actuation is not None
            assert third.report.actuation.changed == ("chat-0",)
            assert any(laggard.pod == "chat-2" for laggard in third.report.actuation.laggards)
            assert stack.gates[0].gate.queue.knobs == targets[2]

    asyncio.run(scenario())


TARGET = Knobs(max_concurrency=24)


def test_operator_restarted_after_a_partial_rollout_converges_and_restores(
    stack_factory: Callable[[], Any],
) -> None:
    """Killed after chat-0 was configured and recorded, before chat-1 was."""

    async def scenario() -> None:
        async with stack_factory() as stack:
            stack.op.stepper_factory = lambda policy, prometheus: ScriptedStepper([TARGET])
            await stack.gates[1].stop()
            partial = await stack.cycle()
            assert partial.report is not None and partial.report.actuation is not None
            assert partial.report.actuation.changed == ("chat-0",)
            async with AsyncExitStack() as revival:
                # chat-1's gate is back; the operator that started the rollout is gone.
                (stack.gates[1],), _ = await start_gates(
                    revival, [(IPS[1], TOKEN)], STARTUP, stack.admin_port
                )
                restarted = ScriptedStepper([TARGET])
                await stack.restart_operator(restarted)
                resumed = await stack.cycle()
                # chat-0's record is the only one: the fleet was left on TARGET.
                assert restarted.resumed == [TARGET]
                assert resumed.report is not None and resumed.report.actuation is not None
                assert resumed.report.actuation.laggards == ()
                assert [gate.gate.queue.knobs for gate in stack.gates] == [TARGET, TARGET]
                records = stack.records()
                assert [r.knobs if r else None for r in records] == [TARGET, TARGET]
                assert [r.startup if r else None for r in records] == [STARTUP, STARTUP]
                await stack.cycle(mode="Off", generation=2)
                assert [gate.gate.queue.knobs for gate in stack.gates] == [STARTUP, STARTUP]

    asyncio.run(scenario())


def test_operator_killed_between_gate_write_and_annotation_still_restores_startup(
    stack_factory: Callable[[], Any],
) -> None:
    async def scenario() -> None:
        async with stack_factory() as stack:
            # The state such a kill leaves: chat-0's gate already runs the
            # target, no pod carries a record yet.
            await stack.op.gates.write(IPS[0], stack.admin_port, TOKEN, TARGET)
            assert stack.records() == [None, None]
            restarted = ScriptedStepper([TARGET])
            await stack.restart_operator(restarted)
            await stack.cycle()
            # No record to resume from: the gates' own startup settings are
            # the fleet's, not the setting the killed operator left on one.
            assert restarted.resumed == [STARTUP]
            assert [gate.gate.queue.knobs for gate in stack.gates] == [TARGET, TARGET]
            await stack.cycle(mode="Off", generation=2)
            assert [gate.gate.queue.knobs for gate in stack.gates] == [STARTUP, STARTUP]

    asyncio.run(scenario())
