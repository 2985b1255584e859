"""kopf handlers: thin translations between kopf and the plain functions in reconcile.py.

`build_registry(config)` registers them on a registry of their own (the
timer's tick comes from the configuration, so registration waits for it).
Each handler is a few lines; what a cycle does lives in reconcile.py, what
status says in status.py.

| handler | runs |
|---|---|
| `operator_configure` | once at startup: every kopf setting, the shared clients |
| `operator_login` | at startup: the API credentials (in-cluster, else KUBECONFIG) |
| `operator_cleanup` | once at exit: closes the clients |
| `operator_liveness` | on each liveness probe (kopf's endpoint, cached 10 s) |
| `pods_by_namespace` | on every pod event: keeps the pod index |
| `inferencepolicy_step` | every `tick_seconds` per policy: a control step when due |
| `inferencepolicy_mode` | when spec.mode changes: an Event |
| `inferencepolicy_restore` | when a policy is deleted (finalizer): the pods' startup settings back |
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import kopf
from kubernetes import config as kube_config
from prometheus_client import start_http_server

from batchpilot.controller.policy import PolicyError
from batchpilot.operator import reconcile
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.gates import GateClient
from batchpilot.operator.metrics import OperatorMetrics
from batchpilot.operator.spec import parse_policy
from batchpilot.operator.status import build_status, merge_patch

GROUP, VERSION, PLURAL = "batchpilot.dev", "v1alpha1", "inferencepolicies"
PREFIX = "batchpilot.dev"
FINALIZER = f"{PREFIX}/restore-gates"

log = logging.getLogger("batchpilot.operator")


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def operator_configure(
        settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any
    ) -> None:
        # Handler progress and the diff base go into annotations with our own
        # prefix: the CRD's status schema has no `status.kopf`, which the API
        # server would prune, and other kopf operators must not read ours.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX)
        # Named after what it guards, so `kubectl get -o yaml` explains itself.
        settings.persistence.finalizer = FINALIZER
        # One replica, no peering objects to install; HA via kopf peering is
        # a later addition (its CRDs would have to ship with the chart).
        settings.peering.standalone = True
        # Events say which controller wrote them in `kubectl describe`.
        settings.posting.reporting_component = config.reporting_component
        # 30 s per API call instead of kopf's 5 min: a status patch or Event that
        # hangs longer than a few control intervals is better retried.
        settings.networking.request_timeout = 30.0
        # End each watch after ~4.5 min, before API servers or load balancers
        # drop idle long-polls (often at 5 min), so reconnects are orderly.
        settings.watching.server_timeout = 270  # an integer: the API server parses it as one
        settings.watching.client_timeout = 300.0
        # Control steps run in the operator's own pool (step_threads) and API
        # calls in asyncio.to_thread's; kopf's pool runs only the small sync
        # handlers (pod index, probe, login, mode Event): 4 threads are plenty.
        settings.execution.max_workers = 4

        kube_api = _kube_client()
        session = aiohttp.ClientSession()
        metrics = OperatorMetrics()
        memo.session = session
        memo.op = reconcile.Operator(
            config=config,
            gates=GateClient(session, config.gate_timeout_seconds),
            kube=kube_api,
            metrics=metrics,
            step_slots=asyncio.Semaphore(config.max_parallel_steps),
            step_threads=ThreadPoolExecutor(
                config.max_parallel_steps, thread_name_prefix="control-step"
            ),
        )
        memo.metrics_server = (
            start_http_server(config.metrics_port, registry=metrics.registry)[0]
            if config.metrics_port
            else None
        )

    @kopf.on.login(registry=registry)
    def operator_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A registry of our own has none of kopf's default login handlers;
        # this is the one they would pick with the kubernetes client
        # installed, the same config the operator's own client loads.
        return kopf.login_via_client(**kwargs)

    @kopf.on.cleanup(registry=registry)
    async def operator_cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo.session.close()
        memo.op.step_threads.shutdown(wait=False, cancel_futures=True)
        memo.op.kube.close()
        if memo.metrics_server is not None:
            memo.metrics_server.shutdown()

    @kopf.on.probe(registry=registry, id="timers")
    def operator_liveness(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
        return memo.op.liveness(time.monotonic())

    @kopf.index("", "v1", "pods", registry=registry, id="pods_by_namespace")
    def pods_by_namespace(
        name: str,
        namespace: str,
        labels: kopf.Labels,
        annotations: kopf.Annotations,
        status: kopf.Status,
        meta: kopf.Meta,
        **_: Any,
    ) -> dict[str, reconcile.PodInfo]:
        deleting = meta.get("deletionTimestamp") is not None
        return {namespace: reconcile.pod_info(name, labels, annotations, status, deleting)}

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        registry=registry,
        id="inferencepolicy_step",
        interval=config.tick_seconds,
    )
    async def inferencepolicy_step(
        body: kopf.Body,
        spec: kopf.Spec,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        memo: kopf.Memo,
        pods_by_namespace: kopf.Index[str, reconcile.PodInfo],
        **_: Any,
    ) -> None:
        op: reconcile.Operator = memo.op
        op.last_tick_s = time.monotonic()
        op.metrics.last_tick.set(time.time())
        runtime = op.runtime(meta.uid, meta.name, meta.namespace)
        now, generation = reconcile.now_utc(), meta.get("generation", 0)
        outcome = await reconcile.run_cycle(
            op,
            runtime,
            spec=dict(spec),
            generation=generation,
            pods=_pods(pods_by_namespace, meta.namespace),
            now_mono=op.last_tick_s,
            now_wall=now,
        )
        _post(body, outcome.events)
        if outcome.report is not None:
            current = _plain(status)
            desired = build_status(outcome.report, current, generation=generation, now=now)
            op.metrics.record_conditions(meta.namespace, meta.name, desired["conditions"])
            if delta := merge_patch(current, desired):
                patch.status.update(delta)
                op.metrics.status_writes.inc()
        if outcome.retry_after_s is not None:
            raise kopf.TemporaryError(outcome.retry_message, delay=outcome.retry_after_s)

    @kopf.on.field(
        GROUP, VERSION, PLURAL, registry=registry, id="inferencepolicy_mode", field="spec.mode"
    )
    def inferencepolicy_mode(old: Any, new: Any, body: kopf.Body, **_: Any) -> None:
        if old is None:
            return  # creation, not a switch
        then = " (the pods return to their startup settings)" if new == "Off" else ""
        kopf.event(body, type="Normal", reason="ModeChanged", message=f"mode {old} -> {new}{then}")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, id="inferencepolicy_restore")
    async def inferencepolicy_restore(
        body: kopf.Body,
        spec: kopf.Spec,
        meta: kopf.Meta,
        memo: kopf.Memo,
        pods_by_namespace: kopf.Index[str, reconcile.PodInfo],
        **_: Any,
    ) -> None:
        op: reconcile.Operator = memo.op
        runtime = op.runtime(meta.uid, meta.name, meta.namespace)
        try:
            parsed = parse_policy(
                dict(spec), name=meta.name, namespace=meta.namespace, config=op.config
            )
        except PolicyError as err:
            parsed = None
            log.warning(
                "policy %s/%s: restoring without a valid spec: %s", meta.namespace, meta.name, err
            )
        async with runtime.lock:
            notes = await reconcile.restore_pods(
                op, runtime, parsed, list(_pods(pods_by_namespace, meta.namespace))
            )
        _post(body, notes)
        op.forget(meta.uid)

    return registry


def _pods(index: kopf.Index[str, reconcile.PodInfo], namespace: str) -> Iterable[reconcile.PodInfo]:
    return index.get(namespace, ())


def _post(body: kopf.Body, notes: Iterable[reconcile.EventNote]) -> None:
    for note in notes:
        kopf.event(body, type=note.type, reason=note.reason, message=note.message)


def _plain(view: Any) -> Any:
    """A kopf body view as plain dicts and lists (deep), for comparing with JSON data."""
    if isinstance(view, Mapping):
        return {key: _plain(value) for key, value in view.items()}
    if isinstance(view, list):
        return [_plain(item) for item in view]
    return view


def _kube_client() -> Any:
    """The official client, configured as kopf logs in: in-cluster, else kubeconfig."""
    from kubernetes import client

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    return client.ApiClient()
