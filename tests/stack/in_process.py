"""The operator's parts run in the test's own event loop, against the real API server.

For tests that drive `cycle.run_cycle` themselves (no kopf): real gates on
pod IPs, the pod index as kopf builds it, and an `Operator` built by
`open_operator`, as `operator_configure` builds it.

    async with AsyncExitStack() as exits:
        gates, admin_port = await start_gates(exits, [("127.0.0.2", TOKEN)], STARTUP)
        op = await in_process_operator(exits, api, OperatorConfig(...), stepper_factory)
        await run_cycle(op, runtime, ..., pods=pod_infos(api, namespace), ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack

from kubernetes import client

from batchpilot.contract.knobs import Knobs
from batchpilot.gate.server import GateServer
from batchpilot.gate.settings import load_settings
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.control import ControllerStepper, StepperFactory
from batchpilot.operator.pods import PodInfo, pod_from_body
from batchpilot.operator.runtime import Operator, open_operator


async def start_gates(
    exits: AsyncExitStack,
    ips_and_tokens: Sequence[tuple[str, str]],
    startup: Knobs,
    admin_port: int = 0,
) -> tuple[list[GateServer], int]:
    """One gate per (pod IP, admin token), all on one admin port number (a
    policy names one; 0: the first gate picks it), running `startup`; stopped
    when `exits` closes. Returns the gates and that port. Their engine
    address answers nothing."""
    gates: list[GateServer] = []
    for ip, token in ips_and_tokens:
        gate = GateServer(
            load_settings(
                {
                    "listen": f"{ip}:0",
                    "admin": f"{ip}:{admin_port}",
                    "upstream": "http://127.0.0.1:9",
                    "token": token,
                    "knobs": startup.to_mapping(),
                },
                {},
            )
        )
        await gate.start()
        exits.push_async_callback(gate.stop)
        admin_port = gate.admin_port
        gates.append(gate)
    return gates, admin_port


async def in_process_operator(
    exits: AsyncExitStack,
    api: client.ApiClient,
    config: OperatorConfig,
    stepper_factory: StepperFactory = ControllerStepper,
) -> Operator:
    """An Operator as `operator_configure` builds it (the real controller
    unless `stepper_factory` says otherwise); it closes with `exits`, `api` stays open."""
    op = await open_operator(config, api, stepper_factory=stepper_factory)
    exits.push_async_callback(op.close)
    return op


def pod_infos(api: client.ApiClient, namespace: str) -> list[PodInfo]:
    """The pods of `namespace` as kopf's pod index keeps them."""
    return [
        as_pod_info(api, pod) for pod in client.CoreV1Api(api).list_namespaced_pod(namespace).items
    ]


def as_pod_info(api: client.ApiClient, pod: client.V1Pod) -> PodInfo:
    """One listed pod as kopf's pod index keeps it."""
    return pod_from_body(api.sanitize_for_serialization(pod))
