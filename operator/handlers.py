"""kopf handlers: thin translations between kopf and the plain functions of the operator.

`build_registry(config)` registers them on a registry of their own (the
timer's tick comes from the configuration, so registration waits for it).
Each handler is a few lines; what a cycle does lives in cycle.py (and
actuation.py), what status says in status.py, and the objects they share are
built by runtime.open_operator. The timer writes the status itself (kube.py says
why not through kopf's patch), and a write the API server refuses is tried
again at a later tick, so a 409, a 429 or an outage delays it but never loses it.

| handler | runs |
|---|---|
| `operator_configure` | once at startup: every kopf setting, the shared clients |
| `operator_login` | at startup: the API credentials (in-cluster, else KUBECONFIG) |
| `operator_cleanup` | once at exit: closes the clients |
| `operator_liveness` | on each liveness probe (kopf's endpoint, cached 10 s) |
| `pods_seen` | on every pod event: keeps the pod index (pods.PodIndex) and marks kopf's re-lists and deletions in the pod ledger |
| `inferencepolicy_step` | every `tick_seconds` per policy: a control step when due, its log line, the status write |
| `inferencepolicy_mode` | when spec.mode changes: an Event |
| `inferencepolicy_restore` | when a policy is deleted (finalizer): the pods' startup settings back |
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client
from kubernetes import config as kube_config
from prometheus_client import start_http_server

from batchpilot.contract.reasons import EventReason, EventType
from batchpilot.controller.policy import PolicyError
from batchpilot.operator.actuation import restore_pods
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.cycle import now_utc, run_cycle
from batchpilot.operator.election import LeaseElector, replica_identity
from batchpilot.operator.kube import (
    GROUP,
    PLURAL,
    VERSION,
    KubeError,
    list_pod_uids,
    write_policy_status,
)
from batchpilot.operator.logs import step_line
from batchpilot.operator.metrics import OperatorMetrics
from batchpilot.operator.podledger import ARRIVAL_RECHECK_S, AUDIT_RETRY_S, PodLedger
from batchpilot.operator.pods import PodIndex, PodInfo, pod_info
from batchpilot.operator.runtime import EventNote, Operator, open_operator
from batchpilot.operator.shard import Shard
from batchpilot.operator.spec import parse_policy
from batchpilot.operator.status import build_status, merge_patch

PREFIX = "batchpilot.dev"
FINALIZER = f"{PREFIX}/restore-gates"
# A follower asks kopf to try a policy's deletion again this much later: by
# then the leader has restored the pods and removed the finalizer, or this
# replica leads.
FOLLOWER_RETRY_S = 5.0
# kopf retries a failed API request (connection refused, 5xx, 403, 429) after
# these pauses, each at least the answer's Retry-After, then gives up on it.
# Its default (1, 1, 2, 3, 5, 8, 13, 21) gives up after 54 s; a finalizer
# removal given up on leaves a deleted policy Terminating until the policy's
# next event (kopf logs the failure and waits for one). An API server restart
# takes ~5 s here, a managed control-plane upgrade minutes: twelve more 21 s
# steps ride out about 5 minutes (306 s), and a watch still resumes within
# 21 s of the API server's return, as with the default.
ERROR_BACKOFFS_S = (1, 1, 2, 3, 5, 8, 13, 21, *(21,) * 12)
# A refused status write is tried again after 1 s, doubling to at most 30 s
# (and never before the answer's Retry-After), rounded up to the next tick:
# an outage costs the API server one write per policy per 30 s. A 409 is
# tried again at the next tick: a conflict clears by recomputing the patch
# from the latest status, which is what client-go's RetryOnConflict does too.
STATUS_RETRY_FIRST_S = 1.0
STATUS_RETRY_MAX_S = 30.0

log = logging.getLogger("batchpilot.operator")


def finalizer_name(config: OperatorConfig) -> str:
    """The finalizer this operator's shard puts on its policies.

    kopf removes its finalizer from every object none of its deletion
    handlers match: two releases splitting one namespace by label would each
    strip the other's. One name per shard keeps them apart; an unsharded
    operator keeps the plain name.
    """
    if config.shard_count == 1 and not config.policy_selector:
        return FINALIZER
    return f"{FINALIZER}-{config.lease_for_shard}"


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    shard = Shard.from_settings(config.shard_index, config.shard_count, config.policy_selector)

    def in_shard(name: str, namespace: str | None, labels: kopf.Labels, **_: Any) -> bool:
        return shard.owns(namespace or "", name, labels)

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
        settings.persistence.finalizer = finalizer_name(config)
        # No kopf peering: replicas elect a leader through a Lease of their
        # own (election.py says why); every replica watches, only the leader acts.
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
        # handlers (probe, login, mode Event): 4 threads are plenty.
        settings.execution.max_workers = 4
        settings.networking.error_backoffs = ERROR_BACKOFFS_S
        # Left at kopf's default (False): a 429 waits max(backoff, Retry-After),
        # never less than the API server asked for. A 409 kopf never retries,
        # which is why the status is written by the timer (see kube.py).
        settings.networking.enforce_retry_after = False
        # kopf re-opens a broken watch from the last resourceVersion, each
        # attempt with the backoffs above, for ever, and lists again on a 410
        # Gone; that listing misses pods deleted meanwhile (podledger.py).

        op = memo.op = await open_operator(config, _kube_client())
        memo.campaign = memo.elector = None
        if config.leader_election:
            elector = LeaseElector(
                op.kube,
                name=config.lease_for_shard,
                namespace=config.lease_namespace or os.environ.get("POD_NAMESPACE") or "default",
                identity=replica_identity(),
                lease_s=config.lease_seconds,
                renew_s=config.lease_renew_seconds,
                renew_deadline_s=config.lease_renew_deadline_seconds,
                registry=op.metrics.registry,
            )
            # One round now: a lone replica leads from its first tick.
            await asyncio.to_thread(elector.try_once)
            op.leadership = memo.elector = elector
            memo.campaign = asyncio.create_task(elector.run(), name="lease-campaign")
        memo.pod_ledger = PodLedger()
        memo.pod_index = PodIndex()
        memo.status_writer = StatusWriter(op.kube, op.metrics, config.tick_seconds)
        memo.metrics_server = (
            start_http_server(
                config.metrics_port, config.metrics_host, registry=op.metrics.registry
            )[0]
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
        if memo.campaign is not None:
            memo.campaign.cancel()
            # Handing the Lease back lets a follower lead at its next try,
            # not a whole lease_seconds later (a rolling update, a drain).
            await memo.elector.release()
        await memo.op.close()
        memo.op.kube.close()
        if memo.metrics_server is not None:
            memo.metrics_server.shutdown()

    @kopf.on.probe(registry=registry, id="timers")
    def operator_liveness(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
        liveness: dict[str, Any] = memo.op.liveness(time.monotonic())
        return liveness

    # kopf's callback protocols declare every keyword it passes, typed for any
    # resource (`namespace: str | None` for cluster-scoped ones); the handlers
    # name only those they use, typed for these namespaced kinds. An async
    # handler: it runs on the event loop, as the control steps that read the
    # index do.
    @kopf.on.event("", "v1", "pods", registry=registry, id="pods_seen")  # type: ignore[arg-type]
    async def pods_seen(
        event: kopf.RawEvent,
        name: str,
        uid: str,
        namespace: str,
        labels: kopf.Labels,
        annotations: kopf.Annotations,
        status: kopf.Status,
        meta: kopf.Meta,
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        ledger: PodLedger = memo.pod_ledger
        index: PodIndex = memo.pod_index
        if event["type"] == "DELETED":
            ledger.deleted(uid)
            index.drop(namespace, uid)
            return
        now = time.monotonic()
        ledger.seen(uid, now)
        if event["type"] is None:  # a listing's object: at start-up, or a re-list
            ledger.relisted(namespace, now)
        deleting = meta.get("deletionTimestamp") is not None
        index.store(namespace, pod_info(name, uid, labels, annotations, status, deleting))

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        registry=registry,
        id="inferencepolicy_step",
        interval=config.tick_seconds,
        when=in_shard,
    )
    async def inferencepolicy_step(
        body: kopf.Body,
        spec: kopf.Spec,
        meta: kopf.Meta,
        status: kopf.Status,
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        op: Operator = memo.op
        namespace = _namespace(meta)
        op.last_tick_s = time.monotonic()
        op.metrics.last_tick.set(time.time())
        runtime = op.runtime(meta.uid, meta.name, namespace)
        writer: StatusWriter = memo.status_writer
        if not op.leadership.acting(op.last_tick_s):
            # A follower keeps its watches and pod index warm, nothing else;
            # if it leads later it starts this policy afresh, from what the
            # pods' records say the leader left them on.
            runtime.generation = None
            writer.forget(meta.uid)
            return
        pods = await _current_pods(op, memo.pod_ledger, memo.pod_index, namespace)
        if pods is None:
            return  # the namespace's pods are still arriving: the next tick
        now, generation = now_utc(), meta.get("generation", 0)
        outcome = await run_cycle(
            op,
            runtime,
            spec=dict(spec),
            generation=generation,
            pods=pods,
            now_mono=op.last_tick_s,
            now_wall=now,
        )
        if not op.leadership.acting(time.monotonic()):
            return  # deposed during the step: the new leader reports
        _post(body, outcome.events)
        current = _plain(status)
        if outcome.report is not None:
            level, line = step_line(outcome.report)
            log.log(level, "policy %s/%s: %s", namespace, meta.name, line)
            desired = build_status(outcome.report, current, generation=generation, now=now)
            op.metrics.record_conditions(namespace, meta.name, desired["conditions"])
            writer.want(meta.uid, desired)
        await writer.write(meta.uid, namespace, meta.name, current)
        if outcome.retry_after_s is not None:
            raise kopf.TemporaryError(outcome.retry_message, delay=outcome.retry_after_s)

    @kopf.on.field(
        GROUP,
        VERSION,
        PLURAL,
        registry=registry,
        id="inferencepolicy_mode",
        field="spec.mode",
        when=in_shard,
    )
    def inferencepolicy_mode(
        old: Any, new: Any, body: kopf.Body, memo: kopf.Memo, **_: Any
    ) -> None:
        if old is None or not memo.op.leadership.acting(time.monotonic()):
            return  # creation, not a switch; or the leader posts it
        if new == "Off":
            then = " (the pods return to their startup settings)"
        elif old == "Auto":
            # Recommend changes no pod, not even back: see docs/how-it-works.md#modes.
            then = " (the pods keep the settings Auto applied; mode Off restores their startup settings)"
        else:
            then = ""
        kopf.event(
            body,
            type=EventType.NORMAL,
            reason=EventReason.MODE_CHANGED,
            message=f"mode {old} -> {new}{then}",
        )

    @kopf.on.delete(
        GROUP, VERSION, PLURAL, registry=registry, id="inferencepolicy_restore", when=in_shard
    )
    async def inferencepolicy_restore(
        body: kopf.Body,
        spec: kopf.Spec,
        meta: kopf.Meta,
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        op: Operator = memo.op
        if not op.leadership.acting(time.monotonic()):
            raise kopf.TemporaryError(
                "this replica follows; its shard's leader restores the pods",
                delay=FOLLOWER_RETRY_S,
            )
        namespace = _namespace(meta)
        runtime = op.runtime(meta.uid, meta.name, namespace)
        try:
            parsed = parse_policy(dict(spec), name=meta.name, namespace=namespace, config=op.config)
        except PolicyError as err:
            parsed = None
            log.warning(
                "policy %s/%s: restoring without a valid spec: %s", namespace, meta.name, err
            )
        pods = await _current_pods(op, memo.pod_ledger, memo.pod_index, namespace)
        if pods is None:
            raise kopf.TemporaryError(
                "the namespace's pods are still arriving", delay=AUDIT_RETRY_S
            )
        async with runtime.lock:
            notes = await restore_pods(op, runtime, parsed, list(pods))
        _post(body, notes)
        op.forget(meta.uid)
        memo.status_writer.forget(meta.uid)

    return registry


def _namespace(meta: kopf.Meta) -> str:
    # InferencePolicy is namespaced: the API server always sets it.
    namespace = meta.namespace
    if namespace is None:
        raise kopf.PermanentError("an InferencePolicy without a namespace")
    return str(namespace)


@dataclass
class _Unwritten:
    """A policy's desired status that the API server has not taken yet."""

    desired: dict[str, Any]
    failures: int = 0
    retry_at_s: float = 0.0  # monotonic


class StatusWriter:
    """Writes each policy's latest desired status; what the API server refuses
    stays pending and is tried again at a later tick, against the status then
    current, so a refused write is delayed, never lost."""

    def __init__(self, kube_api: Any, metrics: OperatorMetrics, tick_s: float) -> None:
        self._kube = kube_api
        self._metrics = metrics
        self._tick_s = tick_s
        self._pending: dict[str, _Unwritten] = {}

    def want(self, uid: str, desired: dict[str, Any]) -> None:
        """`desired` replaces any status still pending; its retry delay stays."""
        pending = self._pending.get(uid)
        if pending is None:
            self._pending[uid] = _Unwritten(desired)
        else:
            pending.desired = desired

    async def write(self, uid: str, namespace: str, name: str, current: Mapping[str, Any]) -> None:
        """Write what `current` lacks of the pending status, once its retry delay has passed."""
        pending = self._pending.get(uid)
        if pending is None or time.monotonic() < pending.retry_at_s:
            return
        delta = merge_patch(current, pending.desired)
        if delta is not None:
            try:
                written = await asyncio.to_thread(
                    write_policy_status, self._kube, namespace, name, delta
                )
            except KubeError as err:
                pending.failures += 1
                self._metrics.status_write_failures.labels(str(err.status or "unanswered")).inc()
                delay = _status_retry_delay(err, pending.failures)
                # From the answer, not the request: Retry-After counts from there.
                pending.retry_at_s = time.monotonic() + delay
                log.warning(
                    "policy %s/%s: status not written (%s); trying again in %.1f s",
                    namespace,
                    name,
                    err,
                    max(delay, self._tick_s),  # the timer's next tick at the soonest
                )
                return
            if written:
                self._metrics.status_writes.inc()
        del self._pending[uid]

    def forget(self, uid: str) -> None:
        self._pending.pop(uid, None)


def _status_retry_delay(err: KubeError, failures: int) -> float:
    if err.status == 409:
        return 0.0
    backoff = min(STATUS_RETRY_FIRST_S * 2.0 ** (failures - 1), STATUS_RETRY_MAX_S)
    return max(backoff, err.retry_after_s or 0.0)


async def _current_pods(
    op: Operator, ledger: PodLedger, index: PodIndex, namespace: str
) -> list[PodInfo] | None:
    """The namespace's pods, ghosts set aside; None until its pods have all arrived."""
    await _audit_pods(op, ledger, index, namespace)
    if not index.listed(namespace):
        return None
    return list(ledger.live(index.in_namespace(namespace)))


async def _audit_pods(op: Operator, ledger: PodLedger, index: PodIndex, namespace: str) -> None:
    """When due (the first time, after kopf re-listed the namespace's pods, or
    while they are arriving): list the namespace's pods, set aside the
    index's pods the API server no longer has (podledger.py says why), and
    tell the index which pods to wait for."""
    listed_s = time.monotonic()
    if not ledger.start_audit(namespace, listed_s):
        return
    try:
        live = await asyncio.to_thread(list_pod_uids, op.kube, namespace)
    except KubeError as err:
        ledger.audit_again(namespace, time.monotonic())
        log.warning("%s; the pod index is checked again in %.0f s", err, AUDIT_RETRY_S)
        return
    index.expect(namespace, live)
    if not index.listed(namespace):
        # Listed again shortly, in case a pod listed here was deleted
        # before its event could arrive (then nothing else would clear it).
        ledger.audit_again(namespace, time.monotonic(), ARRIVAL_RECHECK_S)
    for ghost in ledger.set_aside(index.in_namespace(namespace), live, listed_s):
        log.warning(
            "pod %s/%s (uid %s) was deleted while the pod watch was down; kopf still "
            "delivered it, so the operator no longer counts or configures it",
            namespace,
            ghost.name,
            ghost.uid,
        )


def _post(body: kopf.Body, notes: Iterable[EventNote]) -> None:
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
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    return client.ApiClient()
