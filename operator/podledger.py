"""Pods that the pod index still holds after the API server deleted them.

kopf lists the pods again when a broken watch cannot resume (410 Gone: the
API server restarted, or the watch was down longer than etcd keeps its
history), and a re-list only adds to the index: kopf 1.45 keeps nothing to
compare the list with, so a pod deleted while the watch was down stays in
the index for good (kopf's own index and pods.PodIndex alike, both fed
by kopf's events). Such a ghost would count as selected and Ready in the
policy's status, and the operator would go on configuring the gate at its
address, which a new pod may have been given meanwhile.

So each re-list (kopf delivers its objects as events of type None) makes
the namespace due for an audit: before the next control step there, the
operator lists the namespace's pods itself, and the index's pods that the
list lacks and that the index has not seen since the list began are set
aside. One that the index saw later was created after the list's snapshot.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Iterable, Iterator

from batchpilot.operator.pods import PodInfo

# A failed list (the API server down again) is tried again this much later,
# not at every 0.5 s tick of every policy in the namespace.
AUDIT_RETRY_S = 5.0
# A namespace whose listed pods have not all arrived is listed again this
# much later: only a pod deleted before its event arrived needs it, and a
# list of thousands of pods is not free while kopf is still delivering them.
ARRIVAL_RECHECK_S = 30.0


class PodLedger:
    """When the pod index last saw each pod, which namespaces were re-listed, which pods are ghosts.

    kopf calls the indexer and the event handler in its worker threads and
    the control steps run on the event loop: every method takes the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen_s: dict[str, float] = {}  # uid -> monotonic time of its latest event
        self._relisted_s: dict[str, float] = {}  # namespace -> latest re-listed pod's time
        self._audited_s: dict[str, float] = {}  # namespace -> start of its latest audit
        self._retry_at_s: dict[str, float] = {}  # namespace -> no audit before, after a failure
        # Never emptied: kopf never drops a ghost from its index either. Only
        # pods deleted while a watch was down land here.
        self._ghosts: set[str] = set()

    def seen(self, uid: str, now_s: float) -> None:
        """The index took an event of this pod (called before kopf stores it)."""
        with self._lock:
            self._seen_s[uid] = now_s

    def deleted(self, uid: str) -> None:
        """A DELETED event: kopf drops the pod from its index itself."""
        with self._lock:
            self._seen_s.pop(uid, None)

    def relisted(self, namespace: str, now_s: float) -> None:
        """kopf listed a pod of `namespace` (its start-up listing, or a re-list)."""
        with self._lock:
            self._relisted_s[namespace] = now_s

    def start_audit(self, namespace: str, now_s: float) -> bool:
        """Whether `namespace` is due for an audit; if so, it is not due again
        unless kopf re-lists it from `now_s` on, or the audit fails."""
        with self._lock:
            relisted = self._relisted_s.get(namespace, -math.inf)
            if relisted < self._audited_s.get(namespace, -math.inf):
                return False
            if now_s < self._retry_at_s.get(namespace, -math.inf):
                return False
            self._audited_s[namespace] = now_s
            return True

    def audit_again(self, namespace: str, now_s: float, after_s: float = AUDIT_RETRY_S) -> None:
        """`namespace` is due again, `after_s` from now: the list failed, or the
        pods it listed have not all reached the pod index yet."""
        with self._lock:
            self._audited_s.pop(namespace, None)
            self._retry_at_s[namespace] = now_s + after_s

    def set_aside(
        self, indexed: Iterable[PodInfo], live_uids: Collection[str], listed_s: float
    ) -> list[PodInfo]:
        """Set aside the `indexed` pods missing from a list begun at `listed_s`; return them.

        A pod the index saw at or after `listed_s` stays: it may have been
        created after the list's snapshot.
        """
        with self._lock:
            ghosts = [
                pod
                for pod in indexed
                if pod.uid not in live_uids
                and pod.uid not in self._ghosts
                and self._seen_s.get(pod.uid, -math.inf) < listed_s
            ]
            for pod in ghosts:
                self._ghosts.add(pod.uid)
                self._seen_s.pop(pod.uid, None)
            return ghosts

    def live(self, indexed: Iterable[PodInfo]) -> Iterator[PodInfo]:
        """The `indexed` pods that are not ghosts."""
        with self._lock:
            ghosts = frozenset(self._ghosts)
        return (pod for pod in indexed if pod.uid not in ghosts)
