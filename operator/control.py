"""The controller as the operator drives it: one `Stepper` per policy.

`ControllerStepper` runs controller/loop.py's `PolicyController` over
Prometheus (controller/sources.py's `PrometheusSource`). The loop itself
survives a failed query by holding its last setting; the operator needs to
know the difference between "metrics missing for some pods" and "Prometheus
did not answer at all" (the latter skips the cycle and says so in status),
so the source is watched for outright failures.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Protocol

from batchpilot.contract.knobs import Knobs
from batchpilot.controller.explain import Decision
from batchpilot.controller.loop import PolicyController
from batchpilot.controller.observe import MetricsSource, MetricsUnavailable, RawWindow
from batchpilot.controller.policy import Policy
from batchpilot.controller.sources import PrometheusSource, PromQueryClient


class Stepper(Protocol):
    """One policy's controller as the operator drives it."""

    @property
    def last_known_good(self) -> Knobs:
        """The settings last seen meeting the SLOs (the controller's state)."""

    @property
    def outage(self) -> str | None:
        """Why the last step's metrics query failed outright (Prometheus down),
        None when it answered; the controller itself only holds in that case."""

    def run_once(self, now_s: float, pods: Sequence[str]) -> Decision: ...

    def resume(self, fleet_setting: Knobs, *, steered_until_s: float | None = None) -> None:
        """Before the first step: the setting this policy's pods were left on,
        and, when an earlier controller steered them, the time this one took
        over (controller/loop.py, PolicyController.resume)."""


StepperFactory = Callable[[Policy, PromQueryClient], Stepper]


class OutageWatch:
    """A MetricsSource that remembers whether its last read failed outright."""

    def __init__(self, inner: MetricsSource) -> None:
        self._inner = inner
        self.failure: str | None = None

    def read(self, now_s: float, pods: Sequence[str]) -> RawWindow:
        try:
            window = self._inner.read(now_s, pods)
        except MetricsUnavailable as err:
            self.failure = stable_message(str(err))
            raise
        self.failure = None
        return window


def stable_message(text: str) -> str:
    """An error message without the parts that differ on every attempt.

    HTTP client errors quote the request URL, whose query string carries the
    evaluation time, and objects' addresses; left in, every failed step would
    change the status and post another Event for the same outage.
    """
    text = re.sub(r"\?[^\s'\")]*", "", text)
    return re.sub(r" at 0x[0-9a-f]+", "", text)


class ControllerStepper:
    """controller/loop.py's PolicyController over Prometheus, seen as a Stepper;
    a step's queries go out together on `query_pool` (the operator's) when given."""

    def __init__(
        self, policy: Policy, prometheus: PromQueryClient, query_pool: Executor | None = None
    ) -> None:
        self._source = OutageWatch(PrometheusSource(prometheus, policy, query_pool))
        self._loop = PolicyController(policy, self._source)

    @property
    def last_known_good(self) -> Knobs:
        return self._loop.last_known_good

    @property
    def outage(self) -> str | None:
        return self._source.failure

    def run_once(self, now_s: float, pods: Sequence[str]) -> Decision:
        return self._loop.run_once(now_s, pods)

    def resume(self, fleet_setting: Knobs, *, steered_until_s: float | None = None) -> None:
        self._loop.resume(fleet_setting, steered_until_s=steered_until_s)
