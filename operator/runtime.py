"""The operator's state in memory: operator-wide (`Operator`) and per policy (`PolicyRuntime`).

`open_operator(config, kube)` is the one place the operator's object graph
is built from its configuration: kopf's startup hook (handlers.py) and the
tests that run cycles in-process both call it, so a test runs the parts
production runs, wired the same way. `Operator.close` releases what it
opened; the Kubernetes API client stays its caller's.
"""

from __future__ import annotations

import asyncio
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
from kubernetes import client as k8s

from batchpilot.contract.reasons import EventReason, EventType
from batchpilot.controller.policy import PolicyError
from batchpilot.controller.sources import PromQueryClient
from batchpilot.operator.config import OperatorConfig, PrometheusEndpoint
from batchpilot.operator.control import ControllerStepper, Stepper, StepperFactory
from batchpilot.operator.election import Leadership, Standalone
from batchpilot.operator.gates import GateClient
from batchpilot.operator.metrics import OperatorMetrics
from batchpilot.operator.prometheus import QueryPool, open_query_client
from batchpilot.operator.spec import LabelSelector, PolicySpec

# A Deployment's selector is immutable, but the Deployment can be deleted and
# recreated under the same name: re-read it every 5 minutes.
WORKLOAD_SELECTOR_TTL_S = 300.0


class TimersStalled(Exception):
    """The liveness probe's failure: policy timers stopped firing (a wedged loop or watch)."""


@dataclass(frozen=True, slots=True)
class EventNote:
    """An Event to post on the policy; the kopf layer posts it."""

    type: EventType
    reason: EventReason
    message: str


@dataclass(slots=True)
class PolicyRuntime:
    """In-memory state of one policy between cycles (the controller's too)."""

    name: str
    namespace: str
    # Where in each interval this policy steps, as a fraction (see cycle.next_due).
    phase: float = 0.0
    generation: int | None = None
    spec: PolicySpec | None = None
    spec_error: PolicyError | None = None
    stepper: Stepper | None = None
    # Whether the stepper was told the setting the pods were left on (resume).
    resumed: bool = False
    # Serializes everything that writes to the pods' gates for this policy.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_step_s: float = 0.0  # monotonic
    workload_selector: LabelSelector | None = None
    workload_read_s: float = -WORKLOAD_SELECTOR_TTL_S
    # Whether any step of this spec saw the SLOs met.
    seen_good: bool = False
    # Warning Events already posted (reason -> message): posted again only
    # when the message changes, so a persistent problem is one Event, not one per tick.
    warned: dict[EventReason, str] = field(default_factory=dict)

    def warn_once(self, notes: list[EventNote], reason: EventReason, message: str) -> None:
        """Add a Warning to `notes` unless this very one was posted last."""
        if self.warned.get(reason) != message:
            self.warned[reason] = message
            notes.append(EventNote(EventType.WARNING, reason, message))

    def cleared(self, reason: EventReason) -> None:
        """The trouble behind `reason` is over: its next occurrence is posted again."""
        self.warned.pop(reason, None)


@dataclass
class Operator:
    """Operator-wide dependencies and state, built once at startup (kopf memo)."""

    config: OperatorConfig
    gates: GateClient
    kube: k8s.ApiClient
    metrics: OperatorMetrics
    step_slots: asyncio.Semaphore
    # One thread per step slot. asyncio.to_thread's shared pool has
    # min(32, cores + 4) threads (6 on two cores): with more slots than
    # that, steps queued invisibly inside it (measured: half of a 3.4 s step).
    step_threads: ThreadPoolExecutor
    # The gate client's connections, closed with the operator.
    session: aiohttp.ClientSession
    # The threads every step's Prometheus queries go out on (prometheus.py).
    query_pool: QueryPool
    stepper_factory: StepperFactory = ControllerStepper
    # Whether this replica leads its shard; handlers.py swaps in the Lease
    # elector when leader_election is on.
    leadership: Leadership = field(default_factory=Standalone)
    runtimes: dict[str, PolicyRuntime] = field(default_factory=dict)
    prometheus: dict[str, PromQueryClient] = field(default_factory=dict)
    # Monotonic time of the last timer tick; None until the first one.
    last_tick_s: float | None = None

    def query_client(self, endpoint: str, url: str) -> PromQueryClient:
        """One client (and connection pool) per Prometheus endpoint, shared by its policies."""
        if endpoint not in self.prometheus:
            self.prometheus[endpoint] = open_query_client(
                endpoint,
                self.config.endpoint(endpoint) or PrometheusEndpoint(url),
                # A connection per query slot: with urllib3's default pool of
                # 10, concurrent queries would open and discard connections.
                connections=self.config.max_concurrent_queries,
                max_per_second=self.config.max_queries_per_second,
                metrics=self.metrics,
            )
        return self.prometheus[endpoint]

    def runtime(self, uid: str, name: str, namespace: str) -> PolicyRuntime:
        runtime = self.runtimes.get(uid)
        if runtime is None:
            # A phase from the uid: stable across restarts, uniform across policies.
            phase = zlib.crc32(uid.encode()) / 2**32
            runtime = self.runtimes[uid] = PolicyRuntime(name, namespace, phase)
            self.metrics.policies.set(len(self.runtimes))
            self.metrics.start_policy(namespace, name)
        return runtime

    def liveness(self, now_mono: float) -> dict[str, Any]:
        """The liveness probe's answer; raises TimersStalled when the timers stopped firing."""
        age = None if self.last_tick_s is None else now_mono - self.last_tick_s
        if self.runtimes and age is not None and age > self.config.liveness_stall_seconds:
            raise TimersStalled(
                f"no policy timer fired for {age:.0f} s ({len(self.runtimes)} policies)"
            )
        return {
            "policies": len(self.runtimes),
            "lastTickAgeSeconds": None if age is None else round(age, 1),
        }

    def forget(self, uid: str) -> None:
        runtime = self.runtimes.pop(uid, None)
        self.metrics.policies.set(len(self.runtimes))
        if runtime is not None:
            self.metrics.forget_policy(runtime.namespace, runtime.name)

    async def close(self) -> None:
        """Close the gate connections and stop the step and query threads
        (a step in flight is dropped)."""
        await self.session.close()
        self.step_threads.shutdown(wait=False, cancel_futures=True)
        self.query_pool.shutdown(wait=False, cancel_futures=True)


async def open_operator(
    config: OperatorConfig,
    kube: k8s.ApiClient,
    *,
    stepper_factory: StepperFactory = ControllerStepper,
) -> Operator:
    """The operator's object graph from its configuration (async: the gate
    client's HTTP session belongs to the running event loop)."""
    session = aiohttp.ClientSession()
    metrics = OperatorMetrics()
    query_pool = QueryPool(config.max_concurrent_queries, metrics)
    if stepper_factory is ControllerStepper:
        # The real controller, as production runs it: its queries go out
        # together on the operator's query pool.
        stepper_factory = partial(ControllerStepper, query_pool=query_pool)
    return Operator(
        config=config,
        gates=GateClient(session, config.gate_timeout_seconds),
        kube=kube,
        metrics=metrics,
        step_slots=asyncio.Semaphore(config.max_parallel_steps),
        step_threads=ThreadPoolExecutor(
            config.max_parallel_steps, thread_name_prefix="control-step"
        ),
        session=session,
        query_pool=query_pool,
        stepper_factory=stepper_factory,
    )
