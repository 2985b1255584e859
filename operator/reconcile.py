"""One control cycle of one InferencePolicy, as plain async functions (no kopf).

A cycle: (re)parse the spec when its generation changed -> select the pods
from the pod index -> run the controller's step in a worker thread (queries
and model fitting must never block the event loop) -> in Auto, read every
Ready pod's gate and send it its target where it runs something else, and
record it on the pod; in Recommend, read what the pods configured in Auto
still run -> describe the outcome as a `CycleReport` for status.py, plus the Events to
post. kopf's handlers (handlers.py) call these and only translate the
outcome into kopf's terms (status patch, Events, TemporaryError).

Errors are mapped here, once: an invalid spec, a missing workload or token,
a metrics outage each become a `Problem` with a message; a gate that does not
take its settings makes its pod a laggard. Nothing here raises for them.
"""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import requests
from kubernetes import client as k8s
from prometheus_api_client import PrometheusConnect
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from batchpilot.controller.explain import Decision
from batchpilot.controller.knobs import Knobs
from batchpilot.controller.observe import PromQueryClient
from batchpilot.controller.policy import CAMEL_NAMES, Mode, PolicyError
from batchpilot.operator.config import OperatorConfig
from batchpilot.operator.control import ControllerStepper, Stepper, StepperFactory
from batchpilot.operator.gates import (
    APPLIED_ANNOTATION,
    CLEARED_ANNOTATIONS,
    AppliedRecord,
    GateClient,
    GateError,
)
from batchpilot.operator.kube import (
    KubeError,
    read_token,
    read_workload_selector,
    write_annotations,
)
from batchpilot.operator.metrics import CountingQueryClient, OperatorMetrics
from batchpilot.operator.spec import LabelSelector, PolicySpec, parse_policy
from batchpilot.operator.status import (
    ActuationReport,
    CycleReport,
    HeldReport,
    PodCounts,
    Problem,
    knobs_summary,
    timestamp,
)

# A Deployment's selector is immutable, but the Deployment can be deleted and
# recreated under the same name: re-read it every 5 minutes.
WORKLOAD_SELECTOR_TTL_S = 300.0
# Retry soon when pods or their workload are missing: 10 s, or the policy's
# interval if that is shorter.
NOT_READY_RETRY_S = 10.0


class TimersStalled(Exception):
    """The liveness probe's failure: policy timers stopped firing (a wedged loop or watch)."""


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the pod index keeps of a pod: enough to select, reach and record."""

    name: str
    uid: str  # a pod recreated under the same name (a StatefulSet's) is another pod
    labels: tuple[tuple[str, str], ...]
    ip: str | None
    ready: bool
    applied: str | None = None

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def record(self) -> AppliedRecord | None:
        return AppliedRecord.from_json(self.applied)


def pod_info(
    name: str,
    uid: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    status: Mapping[str, Any],
    deleting: bool,
) -> PodInfo:
    """A pod body's parts -> PodInfo. Ready means the kubelet's Ready condition is True."""
    conditions = status.get("conditions") or []
    ready = not deleting and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
        if isinstance(c, Mapping)
    )
    return PodInfo(
        name=name,
        uid=uid,
        labels=tuple(sorted(labels.items())),
        ip=status.get("podIP") or None,
        ready=ready,
        applied=annotations.get(APPLIED_ANNOTATION),
    )


@dataclass(frozen=True, slots=True)
class EventNote:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(slots=True)
class CycleOutcome:
    report: CycleReport | None  # None: nothing was due, status stays as it is
    events: list[EventNote] = field(default_factory=list)
    # Set when the cycle could not run for a reason that clears by itself
    # (pods not ready yet): the handler raises kopf.TemporaryError with it.
    retry_after_s: float | None = None
    retry_message: str = ""
    # Time the step waited for one of the operator's step slots.
    slot_wait_s: float = 0.0


@dataclass(slots=True)
class PolicyRuntime:
    """In-memory state of one policy between cycles (the controller's too)."""

    name: str
    namespace: str
    # Where in each interval this policy steps, as a fraction (see next_due).
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
    warned: dict[str, str] = field(default_factory=dict)


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
    stepper_factory: StepperFactory = ControllerStepper
    runtimes: dict[str, PolicyRuntime] = field(default_factory=dict)
    prometheus: dict[str, PromQueryClient] = field(default_factory=dict)
    # Monotonic time of the last timer tick; None until the first one.
    last_tick_s: float | None = None

    def query_client(self, endpoint: str, url: str) -> PromQueryClient:
        """One client (and connection pool) per Prometheus endpoint, shared by its policies."""
        if endpoint not in self.prometheus:
            # One retry, no backoff to speak of: an outage must end the step
            # within the query timeout, not after urllib3's default retries.
            retry = Retry(total=1, backoff_factor=0.1)
            session = requests.Session()
            # Proxy variables and .netrc are not consulted (kopf's own default,
            # settings.networking.trust_env): looking them up again for every
            # query cost ~30 ms of CPU per control step (22 queries).
            session.trust_env = False
            connect = PrometheusConnect(url=url, retry=retry, session=session)
            # A connection per step slot: with urllib3's default pool of 10,
            # concurrent steps would open and discard connections.
            session.mount(
                url, HTTPAdapter(max_retries=retry, pool_maxsize=self.config.max_parallel_steps)
            )
            self.prometheus[endpoint] = CountingQueryClient(connect, endpoint, self.metrics)
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


def refresh_spec(
    op: Operator, runtime: PolicyRuntime, spec: Mapping[str, Any], generation: int
) -> None:
    """Re-parse the spec and rebuild the controller when the generation changed."""
    if runtime.generation == generation:
        return
    runtime.generation = generation
    runtime.next_step_s = 0.0  # a changed spec takes effect at the next tick
    try:
        parsed = parse_policy(
            spec, name=runtime.name, namespace=runtime.namespace, config=op.config
        )
    except PolicyError as err:
        runtime.spec, runtime.spec_error, runtime.stepper = None, err, None
        return
    # The controller's state (history, canary, model) is rebuilt with the
    # policy: bounds, objectives or metrics may all have changed.
    runtime.spec, runtime.spec_error, runtime.seen_good = parsed, None, False
    runtime.warned.pop(Problem.INVALID_SPEC, None)
    runtime.stepper = op.stepper_factory(
        parsed.policy, op.query_client(parsed.endpoint, parsed.prometheus_url)
    )
    runtime.resumed = False
    runtime.workload_read_s = -WORKLOAD_SELECTOR_TTL_S


async def run_cycle(
    op: Operator,
    runtime: PolicyRuntime,
    *,
    spec: Mapping[str, Any],
    generation: int,
    pods: Iterable[PodInfo],
    now_mono: float,
    now_wall: datetime,
) -> CycleOutcome:
    """One tick for one policy: run its control step if it is due."""
    refresh_spec(op, runtime, spec, generation)
    if runtime.spec_error is not None:
        mode = spec.get("mode")
        report = CycleReport(
            Mode(mode) if mode in {m.value for m in Mode} else Mode.RECOMMEND,
            problem=(Problem.INVALID_SPEC, str(runtime.spec_error)),
        )
        outcome = CycleOutcome(report)
        _warn_once(runtime, outcome, Problem.INVALID_SPEC, str(runtime.spec_error))
        op.metrics.errors.labels(Problem.INVALID_SPEC).inc()
        return outcome
    parsed, stepper = runtime.spec, runtime.stepper
    assert parsed is not None and stepper is not None
    if now_mono < runtime.next_step_s:
        return CycleOutcome(None)
    runtime.next_step_s = next_due(now_mono, parsed.policy.behavior.interval_s, runtime.phase)
    started = time.perf_counter()
    outcome = await _step(op, runtime, parsed, stepper, list(pods), now_mono, now_wall)
    # The step's own time; waiting for a free slot is exported on its own.
    op.metrics.cycle_seconds.observe(time.perf_counter() - started - outcome.slot_wait_s)
    return outcome


def next_due(now: float, interval: float, phase: float) -> float:
    """The first time after `now` at `phase` (a fraction of the interval) in the interval grid.

    Each policy steps at its own phase, so 100 policies created together
    (or resumed together when the operator restarts) spread their queries
    over the interval instead of all querying Prometheus in the same second.
    """
    offset = phase * interval
    return offset + (math.floor((now - offset) / interval) + 1) * interval


async def _step(
    op: Operator,
    runtime: PolicyRuntime,
    parsed: PolicySpec,
    stepper: Stepper,
    pods: list[PodInfo],
    now_mono: float,
    now_wall: datetime,
) -> CycleOutcome:
    mode = parsed.mode
    retry_s = min(NOT_READY_RETRY_S, parsed.policy.behavior.interval_s)

    def stopped(counts: PodCounts, problem: str, message: str, retry: float | None) -> CycleOutcome:
        op.metrics.errors.labels(problem).inc()
        if retry is not None:
            runtime.next_step_s = now_mono + retry
        report = CycleReport(mode, counts, problem=(problem, message))
        return CycleOutcome(report, retry_after_s=retry, retry_message=message)

    try:
        selector = await _selector(op, runtime, parsed)
    except KubeError as err:
        return stopped(PodCounts(), Problem.TARGET_NOT_FOUND, str(err), retry_s)
    selected = [pod for pod in pods if selector.matches(pod.label_map)]
    ready = sorted((pod for pod in selected if pod.ready and pod.ip), key=lambda pod: pod.name)
    counts = PodCounts(len(selected), len(ready))
    if not selected:
        return stopped(counts, Problem.NO_PODS, "the selector matches no pods", retry_s)
    if not ready:
        return stopped(
            counts,
            Problem.NO_READY_PODS,
            f"none of the {len(selected)} selected pod(s) is Ready",
            retry_s,
        )

    if not runtime.resumed:
        runtime.resumed = True
        left_on = fleet_setting(ready, runtime.name)
        if left_on is not None:
            # The records say an earlier controller steered these pods: its
            # stabilization window went with it (an operator restart).
            stepper.resume(left_on, steered_until_s=now_wall.timestamp())
        else:
            left_on = await _startup_setting(op, parsed, ready)
            if left_on is not None:
                stepper.resume(left_on)
    names = [pod.name for pod in ready]
    waiting = time.perf_counter()
    async with op.step_slots:
        slot_wait_s = time.perf_counter() - waiting
        op.metrics.slot_wait_seconds.observe(slot_wait_s)
        phase_started = time.perf_counter()
        decision = await asyncio.get_running_loop().run_in_executor(
            op.step_threads, stepper.run_once, now_wall.timestamp(), names
        )
    if stepper.outage is not None:
        # Prometheus did not answer: nothing was observed, so nothing is
        # applied; the status keeps the last recommendation and says why.
        outcome = stopped(counts, Problem.METRICS_UNAVAILABLE, stepper.outage, None)
        _warn_once(runtime, outcome, Problem.METRICS_UNAVAILABLE, stepper.outage)
        outcome.slot_wait_s = slot_wait_s
        return outcome
    op.metrics.step_seconds.labels("controller").observe(time.perf_counter() - phase_started)
    for phase, seconds in decision.step_seconds.items():
        op.metrics.step_seconds.labels(phase).observe(seconds)
    op.metrics.decisions.labels(mode.value).inc()
    runtime.warned.pop(Problem.METRICS_UNAVAILABLE, None)
    outcome = CycleOutcome(None, slot_wait_s=slot_wait_s)
    if _rolled_back(decision):
        outcome.events.append(EventNote("Warning", "RolledBack", _rollback_message(decision)))
        op.metrics.policy_rollbacks.labels(runtime.namespace, runtime.name).inc()

    actuation = None
    phase_started = time.perf_counter()
    if mode is Mode.AUTO:
        async with runtime.lock:
            actuation, notes = await apply_decision(op, runtime, parsed, decision, ready, now_wall)
        outcome.events.extend(notes)
    elif mode is Mode.OFF and any(_ours(pod, runtime.name) for pod in selected):
        async with runtime.lock:
            outcome.events.extend(await restore_pods(op, runtime, parsed, selected))
    held = None
    if mode is Mode.RECOMMEND:
        held = await held_settings(op, runtime, parsed, ready)
    op.metrics.step_seconds.labels("actuate").observe(time.perf_counter() - phase_started)

    runtime.seen_good = runtime.seen_good or decision.conditions.slo_met is True
    outcome.report = CycleReport(
        mode=mode,
        pods=PodCounts(len(selected), len(ready), _reporting(decision)),
        decision=decision,
        actuation=actuation,
        # Until some window met the SLOs, "last known good" would only be the
        # starting point, which nothing has shown to be good.
        last_known_good=stepper.last_known_good if runtime.seen_good else None,
        held=held,
    )
    return outcome


async def apply_decision(
    op: Operator,
    runtime: PolicyRuntime,
    parsed: PolicySpec,
    decision: Decision,
    ready: Sequence[PodInfo],
    now_wall: datetime,
) -> tuple[ActuationReport, list[EventNote]]:
    """Bring each Ready pod to its target, record it, report laggards.

    Every gate is read on every step, not only on a change: a gate that
    restarted with its startup settings gets its target back within one
    step, and what it ran before is what the SettingsApplied Event names,
    not what the operator last sent it.
    """
    notes: list[EventNote] = []
    try:
        token = await asyncio.to_thread(_token, op, parsed, runtime.namespace)
    except KubeError as err:
        _warn_once_notes(runtime, notes, Problem.TOKEN_UNAVAILABLE, str(err))
        laggards = tuple(f"{pod.name}: {err}" for pod in ready)
        return ActuationReport(decision.target, 0, laggards), notes
    runtime.warned.pop(Problem.TOKEN_UNAVAILABLE, None)
    stamp = timestamp(now_wall)

    async def one(pod: PodInfo) -> tuple[str, str | None, Knobs | None]:
        """(pod, laggard reason or None, the knobs it ran before if they changed)."""
        target = decision.per_pod.get(pod.name, decision.target)
        assert pod.ip is not None
        try:
            canary = pod.name == decision.canary_pod
            return await _apply_one(op, runtime, parsed, pod, target, canary, token, stamp)
        except (GateError, KubeError) as err:
            op.metrics.actuations.labels("failed").inc()
            return pod.name, str(err), None

    results = await _each_pod(op, ready, one)
    laggards = tuple(f"{name}: {why}" for name, why, _ in results if why is not None)
    changed = {name: before for name, why, before in results if why is None and before is not None}
    if changed:
        notes.append(EventNote("Normal", "SettingsApplied", _applied_message(decision, changed)))
    if laggards:
        _warn_once_notes(runtime, notes, "ActuationFailed", "; ".join(laggards[:3]))
    else:
        runtime.warned.pop("ActuationFailed", None)
    report = ActuationReport(
        decision.target, len(ready) - len(laggards), laggards, tuple(sorted(changed))
    )
    return report, notes


async def _apply_one(
    op: Operator,
    runtime: PolicyRuntime,
    parsed: PolicySpec,
    pod: PodInfo,
    target: Knobs,
    canary: bool,
    token: str,
    stamp: str,
) -> tuple[str, str | None, Knobs | None]:
    port = parsed.actuation.admin_port
    assert pod.ip is not None
    record = pod.record
    if record is not None and record.policy != runtime.name:
        return (
            pod.name,
            f"already steered by InferencePolicy {record.policy}; two policies select this pod",
            None,
        )
    # What the gate runs now, read back: the record says what the operator
    # sent, which a gate restarted with its startup settings no longer runs.
    current = await op.gates.read(pod.ip, port)
    # On first contact (no record), remember what the gate ran before
    # batchpilot, so that deleting the policy (or mode Off) can put exactly
    # that back. The gate's own report of its startup settings wins over its
    # current ones: an operator killed between a write and this pod's record
    # has already changed the current ones.
    startup = record.startup if record is not None else current.startup or current.knobs
    # A gate already at its target is not written to: the read is the
    # whole steady-state cost, one GET per pod per interval.
    answer = (
        current if current.knobs == target else await op.gates.write(pod.ip, port, token, target)
    )
    op.metrics.actuations.labels("changed" if answer.changed else "unchanged").inc()
    if (
        record is None
        or record.knobs != target
        or record.version != answer.version
        or record.canary != canary
    ):
        fresh = AppliedRecord(runtime.name, target, answer.version, stamp, startup, canary)
        await asyncio.to_thread(
            write_annotations, op.kube, runtime.namespace, pod.name, fresh.annotations()
        )
    if parsed.actuation.native and answer.native_status in ("rejected", "error"):
        return (
            pod.name,
            f"engine refused its part ({answer.native_status}: {answer.native_detail})",
            None,
        )
    return pod.name, None, current.knobs if answer.changed else None


async def held_settings(
    op: Operator, runtime: PolicyRuntime, parsed: PolicySpec, ready: Sequence[PodInfo]
) -> HeldReport | None:
    """Mode Recommend: what the Ready pods this policy configured in Auto run now.

    Recommend changes no pod, so pods Auto configured keep batchpilot's
    settings until mode Off (or deletion) restores their startup ones; the
    status must say so. Their gates are asked (GET, no token), as in Auto:
    a gate that restarted runs its startup settings whatever its record says.
    None when no Ready pod carries this policy's record.
    """
    ours = [pod for pod in ready if _ours(pod, runtime.name)]
    if not ours:
        return None

    async def one(pod: PodInfo) -> Knobs | str:
        assert pod.ip is not None
        try:
            return (await op.gates.read(pod.ip, parsed.actuation.admin_port)).knobs
        except GateError as err:
            return str(err)

    answers = dict(zip((pod.name for pod in ours), await _each_pod(op, ours, one), strict=True))
    running = Counter(knobs for knobs in answers.values() if isinstance(knobs, Knobs))
    # No gate answered: what the records say was applied is the best knowledge.
    recorded = Counter(pod.record.knobs for pod in ours if pod.record is not None)
    knobs = (running or recorded).most_common(1)[0][0]
    others = tuple(
        f"{pod}: {answer}" if isinstance(answer, str) else f"{pod}: runs {knobs_summary(answer)}"
        for pod, answer in sorted(answers.items())
        if answer != knobs
    )
    return HeldReport(knobs, running[knobs], others)


async def restore_pods(
    op: Operator, runtime: PolicyRuntime, parsed: PolicySpec | None, pods: Sequence[PodInfo]
) -> list[EventNote]:
    """Put back the settings each of this policy's pods ran before batchpilot; drop the record.

    A pod whose gate cannot be reached keeps its record (it still runs what
    the record says) and is named in a Warning Event.
    """
    notes: list[EventNote] = []
    ours = [pod for pod in pods if _ours(pod, runtime.name)]
    if not ours:
        return notes
    port = parsed.actuation.admin_port if parsed is not None else None
    secret = parsed.actuation.token_secret if parsed is not None else None
    if port is None or secret is None:
        notes.append(
            EventNote("Warning", "RestoreFailed", "no actuation settings to reach the gates with")
        )
        return notes
    try:
        token = await asyncio.to_thread(read_token, op.kube, runtime.namespace, secret)
    except KubeError as err:
        notes.append(
            EventNote(
                "Warning", "RestoreFailed", f"cannot restore the pods' startup settings: {err}"
            )
        )
        return notes

    async def one(pod: PodInfo) -> str | None:
        record = pod.record
        assert record is not None
        try:
            if pod.ip is None:
                raise GateError("the pod has no IP")
            await op.gates.write(pod.ip, port, token, record.startup or Knobs())
            await asyncio.to_thread(
                write_annotations, op.kube, runtime.namespace, pod.name, CLEARED_ANNOTATIONS
            )
        except (GateError, KubeError) as err:
            op.metrics.actuations.labels("failed").inc()
            return f"{pod.name}: {err}"
        op.metrics.actuations.labels("restored").inc()
        return None

    failures = [why for why in await _each_pod(op, ours, one) if why is not None]
    restored = len(ours) - len(failures)
    if restored:
        notes.append(
            EventNote(
                "Normal", "SettingsRestored", f"{restored} pod(s) back to their startup settings"
            )
        )
    if failures:
        notes.append(EventNote("Warning", "RestoreFailed", "; ".join(failures[:3])))
    return notes


# -- helpers --------------------------------------------------------------------


async def _selector(op: Operator, runtime: PolicyRuntime, parsed: PolicySpec) -> LabelSelector:
    if parsed.selector is not None:
        return parsed.selector
    assert parsed.workload is not None
    now = time.monotonic()
    if runtime.workload_selector is None or now - runtime.workload_read_s > WORKLOAD_SELECTOR_TTL_S:
        runtime.workload_selector = await asyncio.to_thread(
            read_workload_selector, op.kube, runtime.namespace, parsed.workload
        )
        runtime.workload_read_s = now
    return runtime.workload_selector


def _token(op: Operator, parsed: PolicySpec, namespace: str) -> str:
    secret = parsed.actuation.token_secret
    if secret is None:
        raise KubeError("spec.actuation.tokenSecretRef is not set")
    return read_token(op.kube, namespace, secret)


def _warn_once(runtime: PolicyRuntime, outcome: CycleOutcome, reason: str, message: str) -> None:
    _warn_once_notes(runtime, outcome.events, reason, message)


def _warn_once_notes(
    runtime: PolicyRuntime, notes: list[EventNote], reason: str, message: str
) -> None:
    if runtime.warned.get(reason) != message:
        runtime.warned[reason] = message
        notes.append(EventNote("Warning", reason, message))


def fleet_setting(pods: Iterable[PodInfo], policy: str) -> Knobs | None:
    """The setting `policy` left its pods on, from their records (None: no records).

    A canary's record names a candidate, not the fleet's setting: the others
    decide, so that a canary an operator restart interrupted (on one of two
    pods, say) is judged again rather than taken for the fleet's setting.
    Among them the most common; on a tie the longest established (its newest
    record the oldest). With only canary records, the other pods were never
    changed: they run their startup settings, which the canary's record keeps.
    """
    records = [pod.record for pod in pods if pod.record is not None and _ours(pod, policy)]
    applied: dict[Knobs, list[str]] = {}
    for record in records:
        if not record.canary:
            applied.setdefault(record.knobs, []).append(record.time)
    if not applied:
        for record in records:
            if record.startup is not None:
                applied.setdefault(record.startup, []).append(record.time)
    if not applied:
        return None
    most = max(len(times) for times in applied.values())
    tied = [knobs for knobs, times in applied.items() if len(times) == most]
    return min(tied, key=lambda knobs: max(applied[knobs]))


async def _startup_setting(
    op: Operator, parsed: PolicySpec, ready: Sequence[PodInfo]
) -> Knobs | None:
    """The most common startup setting the pods' gates report (None: no gate answered).

    With no records, the policy never finished a change on these pods: they
    run their startup settings, unless an operator was killed between its
    first gate write and that pod's record, which the gate's own report of
    its startup settings sees through.
    """

    async def startup(pod: PodInfo) -> Knobs | None:
        assert pod.ip is not None
        try:
            config = await op.gates.read(pod.ip, parsed.actuation.admin_port)
        except GateError:
            return None
        return config.startup or config.knobs

    answers = [knobs for knobs in await asyncio.gather(*map(startup, ready)) if knobs]
    return Counter(answers).most_common(1)[0][0] if answers else None


T = TypeVar("T")


async def _each_pod(
    op: Operator, pods: Sequence[PodInfo], work: Callable[[PodInfo], Awaitable[T]]
) -> list[T]:
    """`work` for every pod, at most `actuation_concurrency` at once; results in pod order."""
    slots = asyncio.Semaphore(op.config.actuation_concurrency)

    async def bounded(pod: PodInfo) -> T:
        async with slots:
            return await work(pod)

    return list(await asyncio.gather(*map(bounded, pods)))


def _ours(pod: PodInfo, policy: str) -> bool:
    record = pod.record
    return record is not None and record.policy == policy


def _reporting(decision: Decision) -> int | None:
    reporting = decision.signals.get("reporting_pods")
    return int(reporting) if isinstance(reporting, int | float) else None


def _rolled_back(decision: Decision) -> bool:
    return any(r.step == "guard:canary" and "rolling back" in r.message for r in decision.reasons)


def _rollback_message(decision: Decision) -> str:
    reason = next(
        r for r in decision.reasons if r.step == "guard:canary" and "rolling back" in r.message
    )
    return f"{reason.message}; every pod returns to {_knobs_text(decision.target)}"


def _applied_message(decision: Decision, changed: Mapping[str, Knobs]) -> str:
    parts = []
    for pod, before in sorted(changed.items()):
        after = decision.per_pod.get(pod, decision.target)
        diff = ", ".join(
            f"{CAMEL_NAMES[name]} {_text(getattr(before, name))} -> {_text(getattr(after, name))}"
            for name in CAMEL_NAMES
            if getattr(before, name) != getattr(after, name)
        )
        parts.append(f"{pod}: {diff or 'settings re-applied'}")
    return "; ".join(parts[:8]) + (f"; and {len(parts) - 8} more pod(s)" if len(parts) > 8 else "")


def _knobs_text(knobs: Knobs) -> str:
    return ", ".join(
        f"{CAMEL_NAMES[name]}={_text(value)}" for name, value in knobs.to_mapping().items()
    )


def _text(value: Any) -> str:
    return "none" if value is None else str(value)


def now_utc() -> datetime:
    return datetime.now(UTC)
