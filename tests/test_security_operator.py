"""Tenant boundaries of the operator, on the real API server with real gates.

- SSRF: a policy names a Prometheus endpoint of the operator's config, never
  a URL; a URL (or any unknown name) is refused by the CRD and, should one get
  past it, by the operator with an InvalidSpec condition, before any query.
- The admin-token Secret is read from the policy's own namespace only: a
  policy in A naming a Secret that exists only in B gets no token.
- A policy in A never steers pods in B, even pods its selector matches.
- The token never appears in status or Events.

Cycles run through `cycle.run_cycle` with a scripted controller (as in
tests/test_operator_actuation.py, whose `ScriptedStepper` is reused), the
pods listed from the API server and indexed by namespace as the operator's
kopf index does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from stack import create_namespace, unique_name
from stack.in_process import as_pod_info, in_process_operator, start_gates
from test_operator_actuation import ScriptedStepper

from batchpilot.contract.gate_api import APPLIED_ANNOTATION
from batchpilot.contract.knobs import Knobs
from batchpilot.contract.reasons import ConditionReason
from batchpilot.gate.server import GateServer
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.cycle import CycleOutcome, run_cycle
from batchpilot.operator.pods import PodIndex
from batchpilot.operator.runtime import Operator, PolicyRuntime
from batchpilot.operator.status import build_status

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[1]
TOKEN_A = "tenant-a-admin-token-91c2"
TOKEN_B = "tenant-b-admin-token-5e7d"
IP_A, IP_B = "127.0.0.2", "127.0.0.3"
STARTUP = Knobs(max_concurrency=96)
TARGET = Knobs(max_concurrency=24)
PROMETHEUS_ENDPOINTS = {"default": "http://127.0.0.1:9", "thanos": "http://127.0.0.1:9"}


def _secret(api: client.ApiClient, namespace: str, name: str, token: str) -> None:
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=name),
            data={"token": base64.b64encode(token.encode()).decode()},
        ),
    )


@pytest.fixture
def other_namespace(k8s_client: client.ApiClient, namespace: str) -> Iterator[str]:
    name = unique_name("tenant-b")
    create_namespace(k8s_client, name)
    yield name
    client.CoreV1Api(k8s_client).delete_namespace(name)


@dataclass
class Tenants:
    api: client.ApiClient
    a: str
    b: str
    gate_a: GateServer
    gate_b: GateServer
    admin_port: int
    op: Operator
    stepper_factory_calls: list[str]

    def index(self) -> PodIndex:
        """The operator's pod index, fed every pod in the cluster as kopf's pod events feed it."""
        index = PodIndex()
        for pod in client.CoreV1Api(self.api).list_pod_for_all_namespaces().items:
            index.store(pod.metadata.namespace, as_pod_info(self.api, pod))
        return index

    def annotations(self, namespace: str, pod: str) -> dict[str, str]:
        return (
            client.CoreV1Api(self.api).read_namespaced_pod(pod, namespace).metadata.annotations
            or {}
        )

    async def cycle(self, namespace: str, spec: dict[str, Any]) -> CycleOutcome:
        runtime = PolicyRuntime("chat", namespace)
        return await run_cycle(
            self.op,
            runtime,
            spec=spec,
            generation=1,
            pods=self.index().in_namespace(namespace),
            now_mono=0.0,
            now_wall=datetime.now(UTC),
        )


@pytest.fixture
def tenants_factory(
    k8s_client: client.ApiClient,
    namespace: str,
    other_namespace: str,
    make_serving_pod: Callable[..., Any],
) -> Callable[[], Any]:
    _secret(k8s_client, namespace, "gate-token", TOKEN_A)
    _secret(k8s_client, other_namespace, "gate-token", TOKEN_B)
    _secret(
        k8s_client, other_namespace, "only-in-b", TOKEN_A
    )  # even the right token, wrong namespace

    @asynccontextmanager
    async def make() -> AsyncIterator[Tenants]:
        async with AsyncExitStack() as exits:
            gates, admin_port = await start_gates(
                exits, [(IP_A, TOKEN_A), (IP_B, TOKEN_B)], STARTUP
            )
            # Same labels in both namespaces: only the namespace tells them apart.
            make_serving_pod(
                namespace,
                "chat-0",
                pod_ip=IP_A,
                ports={"admin": admin_port},
                labels={"app": "chat"},
            )
            make_serving_pod(
                other_namespace,
                "chat-0",
                pod_ip=IP_B,
                ports={"admin": admin_port},
                labels={"app": "chat"},
            )
            calls: list[str] = []

            def stepper_factory(policy: Any, prometheus: Any) -> ScriptedStepper:
                calls.append(policy.namespace)
                return ScriptedStepper([TARGET])

            op = await in_process_operator(
                exits, k8s_client, OperatorConfig(prometheus=PROMETHEUS_ENDPOINTS), stepper_factory
            )
            yield Tenants(
                k8s_client, namespace, other_namespace, gates[0], gates[1], admin_port, op, calls
            )

    return make


def spec(
    admin_port: int, secret: dict[str, Any] | None = None, endpoint: str | None = None
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "chat"}},
        "slo": {"ttftMs": 2000, "tpotMs": 50},
        "actuation": {"adminPort": admin_port, "tokenSecretRef": secret or {"name": "gate-token"}},
        "mode": "Auto",
    }
    if endpoint is not None:
        document["metrics"] = {"endpoint": endpoint}
    return document


def _everything_said(outcome: CycleOutcome) -> str:
    """Status and Event text a cycle would publish."""
    assert outcome.report is not None
    status = build_status(outcome.report, {}, generation=1, now=datetime.now(UTC))
    return json.dumps(status) + "\n".join(f"{e.reason}: {e.message}" for e in outcome.events)


def test_a_policy_steers_only_pods_in_its_own_namespace(tenants_factory: Callable[[], Any]) -> None:
    async def scenario() -> None:
        async with tenants_factory() as tenants:
            outcome = await tenants.cycle(tenants.a, spec(tenants.admin_port))
            assert outcome.report is not None and outcome.report.actuation is not None
            assert outcome.report.pods.selected == 1
            assert outcome.report.actuation.changed == ("chat-0",)
            assert tenants.gate_a.gate.queue.knobs == TARGET
            assert tenants.gate_b.gate.queue.knobs == STARTUP
            assert tenants.gate_b.gate.config.version == 1
            assert APPLIED_ANNOTATION in tenants.annotations(tenants.a, "chat-0")
            assert APPLIED_ANNOTATION not in tenants.annotations(tenants.b, "chat-0")
            said = _everything_said(outcome)
            assert TOKEN_A not in said and TOKEN_B not in said

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "secret_ref",
    [
        {"name": "only-in-b"},
        {"name": "<B>/only-in-b"},
        {"name": "../<B>/secrets/only-in-b"},
    ],
)
def test_a_secret_in_another_namespace_gives_no_token(
    tenants_factory: Callable[[], Any], secret_ref: dict[str, str]
) -> None:
    async def scenario() -> None:
        async with tenants_factory() as tenants:
            ref = {key: value.replace("<B>", tenants.b) for key, value in secret_ref.items()}
            outcome = await tenants.cycle(tenants.a, spec(tenants.admin_port, secret=ref))
            assert outcome.report is not None and outcome.report.actuation is not None
            assert outcome.report.actuation.up_to_date == 0
            (laggard,) = outcome.report.actuation.laggards
            assert f"Secret {tenants.a}/" in laggard.why and "not found" in laggard.why, laggard
            assert tenants.gate_a.gate.config.version == 1
            assert tenants.gate_b.gate.config.version == 1
            said = _everything_said(outcome)
            assert TOKEN_A not in said and TOKEN_B not in said

    asyncio.run(scenario())


def test_a_secret_ref_naming_another_namespace_is_refused_and_reads_nothing(
    tenants_factory: Callable[[], Any],
) -> None:
    # The spec has no namespace for its Secret: the field is refused by name,
    # never followed to another namespace (the API server prunes it anyway).
    async def scenario() -> None:
        async with tenants_factory() as tenants:
            ref = {"name": "only-in-b", "namespace": tenants.b}
            outcome = await tenants.cycle(tenants.a, spec(tenants.admin_port, secret=ref))
            assert outcome.report is not None and outcome.report.problem is not None
            reason, message = outcome.report.problem
            assert reason == ConditionReason.INVALID_SPEC
            assert "spec.actuation.tokenSecretRef.namespace: unknown field" in message
            assert outcome.report.actuation is None
            assert tenants.gate_a.gate.config.version == 1
            assert tenants.gate_b.gate.config.version == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://127.0.0.1:9090",
        "prometheus.monitoring.svc:9090",
        "//evil.example",
        "Default",
        "default ",
        "not-configured",
    ],
)
def test_a_policy_cannot_point_the_operator_at_a_url(
    tenants_factory: Callable[[], Any], endpoint: str
) -> None:
    async def scenario() -> None:
        async with tenants_factory() as tenants:
            outcome = await tenants.cycle(tenants.a, spec(tenants.admin_port, endpoint=endpoint))
            assert outcome.report is not None and outcome.report.problem is not None
            reason, message = outcome.report.problem
            assert reason == ConditionReason.INVALID_SPEC
            assert "spec.metrics.endpoint" in message and "default, thanos" in message
            # Refused before any controller (and so any Prometheus client) exists.
            assert tenants.stepper_factory_calls == []
            assert tenants.op.prometheus == {}
            status = build_status(outcome.report, {}, generation=1, now=datetime.now(UTC))
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            assert (ready["status"], ready["reason"]) == ("False", ConditionReason.INVALID_SPEC)
            assert "spec.metrics.endpoint" in ready["message"]
            assert tenants.gate_a.gate.config.version == 1

    asyncio.run(scenario())


def test_a_configured_endpoint_name_is_accepted(tenants_factory: Callable[[], Any]) -> None:
    """The control for the test above: a listed name does get a controller."""

    async def scenario() -> None:
        async with tenants_factory() as tenants:
            outcome = await tenants.cycle(tenants.a, spec(tenants.admin_port, endpoint="thanos"))
            assert outcome.report is not None and outcome.report.problem is None
            assert tenants.stepper_factory_calls == [tenants.a]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "endpoint",
    ["http://169.254.169.254/latest", "prometheus:9090", "a/b", "UPPER", "-dash", "x" * 64],
)
def test_the_crd_refuses_a_url_as_endpoint(
    kube_api: Any, kubectl: Path, inferencepolicy_crd: None, namespace: str, endpoint: str
) -> None:
    run = [str(kubectl), f"--kubeconfig={kube_api.kubeconfig}"]
    document = {
        "apiVersion": "batchpilot.dev/v1alpha1",
        "kind": "InferencePolicy",
        "metadata": {"name": "ssrf", "namespace": namespace},
        "spec": spec(9090, endpoint=endpoint),
    }
    created = subprocess.run(
        [*run, "create", "-f", "-"],
        input=yaml.safe_dump(document),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode != 0
    assert "spec.metrics.endpoint" in created.stderr, created.stderr
