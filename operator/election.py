"""Leader election over a coordination.k8s.io/v1 Lease: one acting replica per shard.

Why a Lease of our own and not kopf's peering: kopf's peering is presence,
not election (every replica of equal priority keeps running, with a
warning), it needs its own cluster-wide CRDs, and it has no fencing token.
A Lease is what kube-scheduler and kube-controller-manager use, needs only
`leases` RBAC in the release's namespace, and `kubectl get lease` shows who
leads.

The algorithm is client-go's (k8s.io/client-go/tools/leaderelection):
expiry is judged by the *observer's* monotonic clock, from the moment it
last saw the Lease record change, never by comparing timestamps written by
another machine's clock. Every replica tries every `lease_renew_seconds`:
the holder renews; a follower takes the Lease over once it has seen the same
record for `lease_seconds`. Writes are conditional on the resourceVersion
read, so two followers racing for an expired Lease cannot both win.

A leader acts (steps, writes gates and status) only while its last renewal
is younger than `lease_renew_deadline_seconds`, shorter than
`lease_seconds`: a leader cut off from the API server stops acting before
any follower can take over. For what slips through anyway (a process paused
mid-write), every gate write carries the leader's fencing token, and a gate
refuses a token lower than one it has accepted (docs/scale-out.md). The
token is the leader's acquire time in microseconds, made larger than the
previous holder's: it grows with every takeover and survives the Lease being
deleted and recreated, as long as the replicas' clocks differ by less than
`lease_seconds` (the same assumption the Lease itself makes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter, Gauge
from urllib3.exceptions import HTTPError

log = logging.getLogger("batchpilot.operator.election")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Leadership(Protocol):
    """Whether this replica may act (step and write to gates) now, and its fencing token."""

    def acting(self, now_mono: float) -> bool: ...

    @property
    def fence(self) -> int | None:
        """The token every gate write carries, higher for every new leader; None without election."""

    def step_down(self, why: str) -> None:
        """A gate saw a newer leader's token: stop acting until the Lease is won again."""


class Standalone:
    """One replica, no election: always acting, writes carry no fencing token."""

    def acting(self, now_mono: float) -> bool:
        return True

    @property
    def fence(self) -> int | None:
        return None

    def step_down(self, why: str) -> None:
        # Only a replica elected through a Lease sends a fence, and only a
        # fenced write is refused as stale; a standalone replica never is.
        log.warning("a gate refused a write as stale (%s); this operator is not elected", why)


def replica_identity() -> str:
    """client-go's default: the host (the pod's name in a cluster) plus a unique suffix,
    so that a restarted replica never mistakes its predecessor's Lease for its own."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class _Record:
    """What identifies one version of the Lease record."""

    holder: str | None
    renew_time: str | None
    transitions: int
    resource_version: str


class LeaseElector:
    """Campaigns for one Lease and keeps it; `run()` is the campaign, as an asyncio task."""

    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        name: str,
        namespace: str,
        identity: str,
        lease_s: float,
        renew_s: float,
        renew_deadline_s: float,
        registry: CollectorRegistry,
    ) -> None:
        self._api = k8s.CoordinationV1Api(api)
        self.name, self.namespace, self.identity = name, namespace, identity
        self._lease_s, self._renew_s, self._deadline_s = lease_s, renew_s, renew_deadline_s
        self._leader = False
        self._fence: int | None = None
        self._renewed_s = -float("inf")  # monotonic, the start of the last successful write
        self._observed: _Record | None = None
        self._observed_s = 0.0  # monotonic, when `_observed` was first seen
        self._failing: str | None = None  # the cause last logged, logged again when it changes
        self._leading = Gauge(
            "batchpilot_operator_leader",
            "1 while this replica holds its shard's Lease and acts, 0 while it follows.",
            ["lease"],
            registry=registry,
        )
        self._leading.labels(name).set(0)
        self._transitions = Counter(
            "batchpilot_operator_leader_transitions",
            "Times this replica became or stopped being its shard's leader, by direction.",
            ["lease", "direction"],
            registry=registry,
        )
        self._errors = Counter(
            "batchpilot_operator_lease_errors",
            "Lease reads or writes that failed, by cause (conflict: another replica wrote "
            "first; the HTTP status; unreachable).",
            ["lease", "cause"],
            registry=registry,
        )

    # -- Leadership ------------------------------------------------------------

    def acting(self, now_mono: float) -> bool:
        return self._leader and now_mono - self._renewed_s < self._deadline_s

    @property
    def fence(self) -> int | None:
        return self._fence if self._leader else None

    def step_down(self, why: str) -> None:
        if self._leader:
            log.warning("lease %s: stepping down: %s", self._where, why)
            self._lose()

    # -- the campaign ------------------------------------------------------------

    async def run(self) -> None:
        """Try to acquire or renew every `renew_s` seconds, until cancelled."""
        while True:
            await asyncio.to_thread(self.try_once)
            await asyncio.sleep(self._renew_s)

    async def release(self) -> None:
        """On a clean shutdown: hand the Lease back so a follower takes over at its next try."""
        if not self._leader:
            return
        self._lose()
        await asyncio.to_thread(self._release)

    def try_once(self) -> None:
        """One round: read the Lease, then renew it, take it over, or follow."""
        started = time.monotonic()
        try:
            self._round(started)
        except ApiException as err:
            self._failed("conflict" if err.status == 409 else str(err.status), err.reason)
        except (HTTPError, OSError) as err:
            self._failed("unreachable", str(err))
        else:
            if self._failing is not None:
                log.info("lease %s: the API server answers again", self._where)
                self._failing = None

    def _round(self, started: float) -> None:
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            self._create(started)
            return
        spec = lease.spec or k8s.V1LeaseSpec()
        record = _Record(
            spec.holder_identity or None,
            _micro_time(spec.renew_time),
            spec.lease_transitions or 0,
            _resource_version(lease),
        )
        if record != self._observed:
            self._observed, self._observed_s = record, started
        if record.holder == self.identity and self._leader:
            self._write(lease, spec, started, take_over=False)
            return
        if self._leader:
            # The record names someone else: they took over (we could not renew in time).
            self._lose()
        duration = spec.lease_duration_seconds or self._lease_s
        if record.holder is not None and started - self._observed_s < duration:
            return  # a live leader: follow
        self._write(lease, spec, started, take_over=True)

    def _create(self, started: float) -> None:
        fence = _now_us()
        # Dict bodies with MicroTime strings of our own (six fractional
        # digits, as the API server writes them): the client's datetime
        # serialisation leaves the fraction out when it is zero.
        body: Any = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": round(self._lease_s),
                "acquireTime": _format_micro(fence),
                "renewTime": _format_micro(fence),
                "leaseTransitions": 0,
            },
        }
        self._api.create_namespaced_lease(self.namespace, body)
        self._win(fence, started)

    def _write(
        self, lease: k8s.V1Lease, spec: k8s.V1LeaseSpec, started: float, *, take_over: bool
    ) -> None:
        now = _now_us()
        if take_over:
            previous = _micro_us(spec.acquire_time)
            fence = max(now, previous + 1) if previous is not None else now
            transitions = (spec.lease_transitions or 0) + 1
        else:
            fence = self._fence if self._fence is not None else now
            transitions = spec.lease_transitions or 0
        spec_body = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": round(self._lease_s),
            "acquireTime": _format_micro(fence),
            "renewTime": _format_micro(now),
            "leaseTransitions": transitions,
        }
        self._replace(lease, spec_body)
        if take_over:
            self._win(fence, started)
        else:
            self._renewed_s = started

    def _release(self) -> None:
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
            spec = lease.spec or k8s.V1LeaseSpec()
            if spec.holder_identity != self.identity:
                return
            # client-go's release: no holder and a one-second Lease, so anyone
            # may take it now; the acquire time stays, so the next leader's
            # fence is still above this one's.
            spec_body = {
                "leaseDurationSeconds": 1,
                "acquireTime": _micro_time(spec.acquire_time),
                "leaseTransitions": spec.lease_transitions or 0,
            }
            self._replace(lease, spec_body)
        except (ApiException, HTTPError, OSError) as err:
            log.warning(
                "lease %s: not released (%s); a follower takes over once it expires",
                self._where,
                err,
            )

    def _replace(self, lease: k8s.V1Lease, spec: dict[str, Any]) -> None:
        """Write the Lease with `spec`, conditional on the resourceVersion read:
        409 if anyone wrote it since."""
        body: Any = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": _resource_version(lease),
            },
            "spec": spec,
        }
        self._api.replace_namespaced_lease(self.name, self.namespace, body)

    def _win(self, fence: int, started: float) -> None:
        self._leader, self._fence, self._renewed_s = True, fence, started
        self._leading.labels(self.name).set(1)
        self._transitions.labels(self.name, "acquired").inc()
        log.info("lease %s: leading as %s (fence %d)", self._where, self.identity, fence)

    def _lose(self) -> None:
        self._leader, self._fence = False, None
        self._leading.labels(self.name).set(0)
        self._transitions.labels(self.name, "lost").inc()
        log.warning("lease %s: no longer leading; following", self._where)

    def _failed(self, cause: str, detail: str | None) -> None:
        self._errors.labels(self.name, cause).inc()
        # One line per cause, not one per try: a long outage is one warning.
        if cause != self._failing:
            self._failing = cause
            log.warning(
                "lease %s: %s (%s); %s",
                self._where,
                cause,
                detail,
                "still leading until the renew deadline" if self._leader else "still following",
            )

    @property
    def _where(self) -> str:
        return f"{self.namespace}/{self.name}"


def _resource_version(lease: k8s.V1Lease) -> str:
    return (lease.metadata.resource_version if lease.metadata else None) or ""


def _now_us() -> int:
    return time.time_ns() // 1000


def _format_micro(us: int) -> str:
    """A MicroTime as the API server writes it (RFC 3339, six fractional digits, Z)."""
    # Integer arithmetic: a float of 1.7e9 s keeps only ~0.4 us, and a
    # fence read back from the Lease must be exactly the one written.
    stamp = datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _micro_us(value: Any) -> int | None:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return (aware - _EPOCH) // timedelta(microseconds=1)
    return None


def _micro_time(value: Any) -> str | None:
    us = _micro_us(value)
    return None if us is None else _format_micro(us)
