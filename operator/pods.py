"""The serving pods as the operator sees them: one record per pod, and which pods a policy selects.

The operator and `batchpilot explain` read pods the same way, with the
functions here: what makes a pod Ready (`pod_info`), which pods a policy
selects (`policy_selection`, then `LabelSelector.matches` or, for the API
server, `selector_query`), and which setting a policy left its pods on
(`fleet_setting`, from their `batchpilot.dev/applied` records).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from batchpilot.contract.gate_api import APPLIED_ANNOTATION
from batchpilot.contract.knobs import Knobs
from batchpilot.operator.gates import AppliedRecord
from batchpilot.operator.spec import LabelSelector, WorkloadRef, parse_selector, parse_workload


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

    def steered_by(self, policy: str) -> bool:
        """Whether the pod's record says `policy` configured it."""
        record = self.record
        return record is not None and record.policy == policy


class PodIndex:
    """The pods of each watched namespace, kept from kopf's pod events.

    Not a kopf index: kopf holds every handler back until each indexed
    object is indexed, through one condition that every object's worker
    waits on and that each of them notifies, which is quadratic in the
    pods at start-up: with 16,000 pods the operator spent more than four
    minutes of CPU there without a single control step
    (bench/operator_cost.py --policies 1000). Here a pod event costs a
    dict update, and readiness is per namespace: a namespace's pods are
    `listed` once every pod the API server listed for it (the operator's
    own list, `expect`) has been stored or dropped since.

    kopf runs the event handler and the control steps on the event loop:
    no lock is needed.
    """

    def __init__(self) -> None:
        self._pods: dict[str, dict[str, PodInfo]] = {}
        # namespace -> uids the API server listed that no event brought yet
        self._awaiting: dict[str, set[str]] = {}
        self._listed: set[str] = set()

    def store(self, namespace: str, pod: PodInfo) -> None:
        self._pods.setdefault(namespace, {})[pod.uid] = pod
        self._awaiting.get(namespace, set()).discard(pod.uid)

    def drop(self, namespace: str, uid: str) -> None:
        self._pods.get(namespace, {}).pop(uid, None)
        self._awaiting.get(namespace, set()).discard(uid)

    def in_namespace(self, namespace: str) -> list[PodInfo]:
        return list(self._pods.get(namespace, {}).values())

    def expect(self, namespace: str, uids: Iterable[str]) -> None:
        """The API server lists these pods in `namespace` now; until the events
        bring each one (or its deletion), the namespace is not `listed`."""
        if namespace not in self._listed:
            self._awaiting[namespace] = set(uids) - set(self._pods.get(namespace, {}))

    def listed(self, namespace: str) -> bool:
        if namespace in self._listed:
            return True
        if self._awaiting.get(namespace) == set():
            self._listed.add(namespace)
            del self._awaiting[namespace]
            return True
        return False


def pod_info(
    name: str,
    uid: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    status: Mapping[str, Any],
    deleting: bool,
) -> PodInfo:
    """A pod body's parts -> PodInfo. Ready means the kubelet's Ready condition
    is True and the pod is not being deleted: a terminating pod takes no new settings."""
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


def pod_from_body(body: Mapping[str, Any]) -> PodInfo:
    """A pod as the API server returns it (JSON, as listed) -> PodInfo."""
    meta = body.get("metadata") or {}
    return pod_info(
        meta.get("name", ""),
        meta.get("uid", ""),
        meta.get("labels") or {},
        meta.get("annotations") or {},
        body.get("status") or {},
        meta.get("deletionTimestamp") is not None,
    )


def policy_selection(spec: Mapping[str, Any]) -> LabelSelector | WorkloadRef:
    """Which pods a policy's spec selects: its `selector`, or the workload of
    its `targetRef`, whose own selector is read from the API server
    (kube.read_workload_selector). parse_policy's own parsers of the two
    fields, so a selector means to `batchpilot explain` exactly what it means
    to the control step; raises PolicyError as parse_policy does."""
    if "selector" in spec:
        return parse_selector(spec["selector"])
    return parse_workload(spec.get("targetRef"))


def selector_query(selector: LabelSelector) -> str:
    """The API server's `labelSelector` syntax for `selector`: `app=chat,tier in (a,b),!spot`."""
    parts = [f"{key}={value}" for key, value in sorted(selector.match_labels.items())]
    for requirement in selector.requirements:
        key, values = requirement.key, ",".join(sorted(requirement.values))
        parts.append(
            {
                "In": f"{key} in ({values})",
                "NotIn": f"{key} notin ({values})",
                "Exists": key,
                "DoesNotExist": f"!{key}",
            }[requirement.operator]
        )
    return ",".join(parts)


def fleet_setting(pods: Iterable[PodInfo], policy: str) -> Knobs | None:
    """The setting `policy` left its pods on, from their records (None: no records).

    A canary's record names a candidate, not the fleet's setting: the others
    decide, so that a canary an operator restart interrupted (on one of two
    pods, say) is judged again rather than taken for the fleet's setting.
    Among them the most common; on a tie the longest established (its newest
    record the oldest). With only canary records, the other pods were never
    changed: they run their startup settings, which the canary's record keeps.
    """
    records = [
        record for pod in pods if (record := pod.record) is not None and record.policy == policy
    ]
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
