"""Settings to the pods' gates: apply a decision (Auto), read what they hold (Recommend), restore (Off, delete).

Each function reaches every pod's gate at most `actuation_concurrency` at a
time and records what it did on the pod (`batchpilot.dev/applied`), so that
a restarted operator, or mode Off, knows what each pod runs and ran before.
A gate that does not take its settings makes its pod a `Laggard`; nothing
here raises for a gate or the API server.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

from batchpilot.contract.knobs import Knobs, knobs_change_text, knobs_summary
from batchpilot.contract.reasons import EventReason, EventType
from batchpilot.controller.explain import Decision
from batchpilot.operator.gates import CLEARED_ANNOTATIONS, AppliedRecord, GateError, StaleFence
from batchpilot.operator.kube import KubeError, read_token, write_annotations
from batchpilot.operator.pods import PodInfo
from batchpilot.operator.runtime import EventNote, Operator, PolicyRuntime
from batchpilot.operator.spec import PolicySpec
from batchpilot.operator.status import ActuationReport, HeldReport, Laggard, timestamp

T = TypeVar("T")


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
        runtime.warn_once(notes, EventReason.TOKEN_UNAVAILABLE, str(err))
        laggards = tuple(Laggard(pod.name, str(err)) for pod in ready)
        return ActuationReport(decision.target, 0, laggards), notes
    runtime.cleared(EventReason.TOKEN_UNAVAILABLE)
    stamp = timestamp(now_wall)

    async def one(pod: PodInfo) -> tuple[str, str | None, Knobs | None]:
        """(pod, laggard reason or None, the knobs it ran before if they changed)."""
        target = decision.per_pod.get(pod.name, decision.target)
        assert pod.ip is not None
        try:
            canary = pod.name == decision.canary_pod
            return await _apply_one(op, runtime, parsed, pod, target, canary, token, stamp)
        except StaleFence as err:
            # A newer leader wrote this gate: this replica stops acting at once,
            # and its other writes of this step are refused the same way.
            op.leadership.step_down(str(err))
            op.metrics.actuations.labels("failed").inc()
            return pod.name, str(err), None
        except (GateError, KubeError) as err:
            op.metrics.actuations.labels("failed").inc()
            return pod.name, str(err), None

    results = await each_pod(op, ready, one)
    laggards = tuple(Laggard(name, why) for name, why, _ in results if why is not None)
    changed = {name: before for name, why, before in results if why is None and before is not None}
    if changed:
        notes.append(
            EventNote(
                EventType.NORMAL, EventReason.SETTINGS_APPLIED, _applied_message(decision, changed)
            )
        )
    if laggards:
        runtime.warn_once(
            notes,
            EventReason.ACTUATION_FAILED,
            "; ".join(laggard.text for laggard in laggards[:3]),
        )
    else:
        runtime.cleared(EventReason.ACTUATION_FAILED)
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
    fence = op.leadership.fence
    if fence is not None and current.fence is not None and current.fence > fence:
        # A newer leader has written this gate: nothing of ours may follow.
        raise StaleFence(
            f"gate of {pod.name} holds fence {current.fence}, above this replica's {fence}: "
            "a newer leader took over",
            fence,
            current.fence,
        )
    # A gate already at its target is not written to: the read is the
    # whole steady-state cost, one GET per pod per interval. A new leader
    # writes once even then, to raise the gate's fence to its own: until it
    # does, a deposed leader's write would still be taken.
    unclaimed = fence is not None and current.fence != fence
    answer = (
        current
        if current.knobs == target and not unclaimed
        else await op.gates.write(pod.ip, port, token, target, fence=fence)
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
    ours = [pod for pod in ready if pod.steered_by(runtime.name)]
    if not ours:
        return None

    async def one(pod: PodInfo) -> Knobs | str:
        assert pod.ip is not None
        try:
            return (await op.gates.read(pod.ip, parsed.actuation.admin_port)).knobs
        except GateError as err:
            return str(err)

    answers = dict(zip((pod.name for pod in ours), await each_pod(op, ours, one), strict=True))
    running = Counter(knobs for knobs in answers.values() if isinstance(knobs, Knobs))
    # No gate answered: what the records say was applied is the best knowledge.
    recorded = Counter(record.knobs for pod in ours if (record := pod.record) is not None)
    knobs = (running or recorded).most_common(1)[0][0]
    others = tuple(
        Laggard(pod, answer if isinstance(answer, str) else f"runs {knobs_summary(answer)}")
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
    ours = [pod for pod in pods if pod.steered_by(runtime.name)]
    if not ours:
        return notes
    port = parsed.actuation.admin_port if parsed is not None else None
    secret = parsed.actuation.token_secret if parsed is not None else None
    if port is None or secret is None:
        notes.append(
            EventNote(
                EventType.WARNING,
                EventReason.RESTORE_FAILED,
                "no actuation settings to reach the gates with",
            )
        )
        return notes
    try:
        token = await asyncio.to_thread(read_token, op.kube, runtime.namespace, secret)
    except KubeError as err:
        notes.append(
            EventNote(
                EventType.WARNING,
                EventReason.RESTORE_FAILED,
                f"cannot restore the pods' startup settings: {err}",
            )
        )
        return notes

    async def one(pod: PodInfo) -> str | None:
        record = pod.record
        assert record is not None
        try:
            if pod.ip is None:
                raise GateError("the pod has no IP")
            await op.gates.write(
                pod.ip, port, token, record.startup or Knobs(), fence=op.leadership.fence
            )
            await asyncio.to_thread(
                write_annotations, op.kube, runtime.namespace, pod.name, CLEARED_ANNOTATIONS
            )
        except StaleFence as err:
            op.leadership.step_down(str(err))
            op.metrics.actuations.labels("failed").inc()
            return f"{pod.name}: {err}"
        except (GateError, KubeError) as err:
            op.metrics.actuations.labels("failed").inc()
            return f"{pod.name}: {err}"
        op.metrics.actuations.labels("restored").inc()
        return None

    failures = [why for why in await each_pod(op, ours, one) if why is not None]
    restored = len(ours) - len(failures)
    if restored:
        notes.append(
            EventNote(
                EventType.NORMAL,
                EventReason.SETTINGS_RESTORED,
                f"{restored} pod(s) back to their startup settings",
            )
        )
    if failures:
        notes.append(
            EventNote(
                EventType.WARNING,
                EventReason.RESTORE_FAILED,
                "; ".join(failures[:3]),
            )
        )
    return notes


async def startup_setting(
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


async def each_pod(
    op: Operator, pods: Sequence[PodInfo], work: Callable[[PodInfo], Awaitable[T]]
) -> list[T]:
    """`work` for every pod, at most `actuation_concurrency` at once; results in pod order."""
    slots = asyncio.Semaphore(op.config.actuation_concurrency)

    async def bounded(pod: PodInfo) -> T:
        async with slots:
            return await work(pod)

    return list(await asyncio.gather(*map(bounded, pods)))


def _token(op: Operator, parsed: PolicySpec, namespace: str) -> str:
    secret = parsed.actuation.token_secret
    if secret is None:
        raise KubeError("spec.actuation.tokenSecretRef is not set")
    return read_token(op.kube, namespace, secret)


def _applied_message(decision: Decision, changed: Mapping[str, Knobs]) -> str:
    parts = []
    for pod, before in sorted(changed.items()):
        after = decision.per_pod.get(pod, decision.target)
        parts.append(f"{pod}: {knobs_change_text(before, after) or 'settings re-applied'}")
    return "; ".join(parts[:8]) + (f"; and {len(parts) - 8} more pod(s)" if len(parts) > 8 else "")
