"""`batchpilot operator --config` as a child process, the way a Deployment runs it.

    with OperatorProcess(workdir=tmp_path, kubeconfig=kube.kubeconfig,
                         prometheus_url=prom.url, namespaces=["ns"]).start() as operator:
        ...
        operator.kill()   # SIGKILL, as the kernel's OOM killer or a node loss would
        operator.start()  # the same config and identity, a fresh process

It talks to whatever apiserver the kubeconfig names (the test apiserver, or
a KubeFaultProxy in front of it). Each start is a fresh process (no memory
of the last one) with the same configuration file, ports and identity; its
log is operator.log in `workdir`, then operator-2.log, ...
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import yaml

from .process import ManagedProcess, Stoppable, free_loopback_port, http_ok
from .tools import BATCHPILOT_CLI

# Started to /healthz answering in about 2.5 s (imports, kopf's startup and
# first listings); a loaded shared machine gets far more.
START_TIMEOUT_S = 60.0


class OperatorProcess(Stoppable):
    """The operator's configuration and endpoints, and its current process once started."""

    def __init__(
        self,
        *,
        workdir: Path,
        kubeconfig: Path,
        prometheus_url: str,
        namespaces: Sequence[str],
        tick_seconds: float = 0.5,
        **settings: Any,
    ) -> None:
        """Its only Prometheus endpoint is `default`, at `prometheus_url`.

        `tick_seconds`: policies' steps fall due on this grid; 0.5 s, so a
        test sees a 2 s policy interval kept. `settings`: more operator
        settings (operator/config.py).
        """
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        health_port, metrics_port = free_loopback_port(), free_loopback_port()
        self.health_url = f"http://127.0.0.1:{health_port}/healthz"
        """kopf's liveness endpoint."""
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        """The operator's own metrics."""
        self.config_path = workdir / "operator.yaml"
        self.config_path.write_text(
            yaml.safe_dump(
                {
                    "prometheus": {"default": prometheus_url},
                    "namespaces": list(namespaces),
                    "tick_seconds": tick_seconds,
                    "health_host": "127.0.0.1",
                    "health_port": health_port,
                    "metrics_port": metrics_port,
                    **settings,
                }
            )
        )
        self.starts = 0
        self.process: ManagedProcess | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "the operator was never started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def start(self) -> Self:
        """Start a fresh process and wait until its liveness endpoint answers."""
        assert not self.running(), "the operator is running"
        self.starts += 1
        name = "operator" if self.starts == 1 else f"operator-{self.starts}"
        self.process = ManagedProcess(
            name,
            [*BATCHPILOT_CLI, "operator", "--config", str(self.config_path)],
            self.workdir / f"{name}.log",
            {**os.environ, "KUBECONFIG": str(self.kubeconfig)},
        )
        try:
            self.process.wait_until(
                lambda: http_ok(self.health_url), START_TIMEOUT_S, "answering /healthz"
            )
        except BaseException:
            self.process.stop()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup handler, no finalizer, nothing flushed."""
        assert self.process is not None and self.running(), "the operator is not running"
        self.process.kill()

    def stop(self) -> None:
        """SIGTERM, as a Deployment's rollout would; see ManagedProcess.stop. Safe to call twice."""
        if self.process is not None:
            self.process.stop()
