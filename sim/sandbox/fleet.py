"""Gated simulated serving pods, as real processes, for the operator to steer.

One serving "pod" is what a cluster would run for one replica:

- the engine on ip:sim_port: `batchpilot sim serve`, or with `llama=` the
  real llama-server (sandbox.llama_server);
- `batchpilot gate` in front of it on ip:gate_port, its admin API on
  ip:admin_port (one admin port for every pod, as the policy's
  `spec.actuation.adminPort` is one port);
- a Running, Ready pod in the API server at that ip with those container ports;
- Prometheus scraping the gate's admin /metrics and the engine's /metrics with
  the `pod` and `namespace` labels a cluster's relabelling would attach.

The gates' admin token is in the Secret `gate-token` of the namespace (key
`token`), for the policy's `spec.actuation.tokenSecretRef`.

    with start_fleet(api, namespace, scenario=path, ips=("127.0.0.2", "127.0.0.3"),
                     labels={"app": "chat"}, workdir=tmp) as fleet:
        ...  # e.g. an OperatorProcess (sandbox.operator_process) with fleet.prometheus_url

Used by `batchpilot sandbox`, tests/test_e2e_operator.py,
tests/test_faults_operator_kill.py and bench/soak.py.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes import client

from batchpilot.sim.llamacpp import ServerOptions

from .kube import create_serving_pod
from .llama_server import start_llama_server
from .process import ManagedProcess, Stoppable, free_loopback_port, http_get, http_ok
from .prometheus import PrometheusServer, ScrapeTarget, start_prometheus
from .tools import BATCHPILOT_CLI, BATCHPILOT_GATE, StackError

GATE_TOKEN_SECRET = "gate-token"
# How long a gate or an engine may take to answer after its start: the 60 s
# that tests/test_e2e_operator.py and bench/soak.py allowed each before they
# shared this module.
START_TIMEOUT_S = 60.0


@dataclass
class GatedPod:
    """One serving pod: its engine, its gate (a ManagedProcess, for its pid) and their ports."""

    name: str
    ip: str
    sim_port: int
    gate_port: int
    admin_port: int
    engine: ManagedProcess = field(repr=False)
    gate: ManagedProcess = field(repr=False)

    @property
    def gate_url(self) -> str:
        return f"http://{self.ip}:{self.gate_port}"

    @property
    def config_url(self) -> str:
        return f"http://{self.ip}:{self.admin_port}/config"

    def read_config(self) -> dict[str, Any] | None:
        """The gate's `GET /config` (knobs, version, source), or None when it does not answer."""
        reply = http_get(self.config_url)
        if reply is None or reply[0] != 200:
            return None
        document: dict[str, Any] = json.loads(reply[1])
        return document

    def gate_config(self) -> dict[str, Any]:
        config = self.read_config()
        if config is None:
            raise AssertionError(f"the gate of {self.name} does not answer at {self.config_url}")
        return config


class Fleet(Stoppable):
    """Running serving pods and the Prometheus that scrapes them. Use as a context manager."""

    def __init__(self, namespace: str, admin_port: int, workdir: Path) -> None:
        self.namespace = namespace
        self.admin_port = admin_port
        self.workdir = workdir
        self.pods: list[GatedPod] = []
        self.prometheus: PrometheusServer | None = None
        self._processes: list[ManagedProcess] = []

    @property
    def prometheus_url(self) -> str:
        assert self.prometheus is not None, "the fleet's Prometheus is not started"
        return self.prometheus.url

    @property
    def gate_urls(self) -> list[str]:
        return [pod.gate_url for pod in self.pods]

    def stop(self) -> None:
        """Stop Prometheus, then every gate and engine (the pods go with their namespace)."""
        if self.prometheus is not None:
            self.prometheus.stop()
        for process in reversed(self._processes):
            # A test may have stopped a gate (SIGSTOP) to stall its admin API;
            # SIGTERM would stay pending until the process runs again.
            if process.running():
                os.kill(process.pid, signal.SIGCONT)
            process.stop()


def start_fleet(
    api: client.ApiClient,
    namespace: str,
    *,
    ips: Sequence[str],
    labels: Mapping[str, str],
    workdir: Path,
    scenario: Path | None = None,
    time_scale: float = 1.0,
    llama: ServerOptions | None = None,
    pod_prefix: str = "chat",
    admin_port: int | None = None,
) -> Fleet:
    """Start one gated engine per ip (pods `chat-0`, `chat-1`, ... after
    `pod_prefix`) and Prometheus.

    The engines are `sim serve` of `scenario`, or llama-servers started with
    `llama`: give exactly one. Every sim engine and gate is launched before
    any is waited for, so their start-ups overlap. The gates' token is random
    and stored in the Secret `gate-token`. Returns when every gate is ready
    (its engine answered) and Prometheus has scraped every target.

    The gates' admin API listens on `admin_port` (a policy's
    `spec.actuation.adminPort`), or on a port free on every ip. A given port
    that is taken on one of them raises StackError naming it.
    """
    if (scenario is None) == (llama is None):
        raise ValueError("start_fleet: give exactly one of scenario= (sim serve) and llama=")
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    token_file = workdir / "gate-token"
    token_file.write_text(token)
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=GATE_TOKEN_SECRET),
            data={"token": base64.b64encode(token.encode()).decode()},
        ),
    )
    if admin_port is None:
        admin_port = free_loopback_port(ips)
    else:
        _require_free(admin_port, ips)
    fleet = Fleet(namespace, admin_port, workdir)
    try:
        for index, ip in enumerate(ips):
            name = f"{pod_prefix}-{index}"
            if llama is not None:
                # Started and waited for one by one: llama-server loads in a second.
                server = start_llama_server(llama, host=ip, workdir=workdir / name)
                fleet._processes.append(server.process)
                sim_port, engine = server.port, server.process
            else:
                sim_port = free_loopback_port((ip,))
                engine = _launch(fleet, f"sim-{name}", [
                    "sim", "serve", "--scenario", str(scenario), "--listen", f"{ip}:{sim_port}",
                    "--time-scale", str(time_scale)])  # fmt: skip
            gate_port = free_loopback_port((ip,))
            # No shutdown delay: no kube-proxy routes to these gates, and a
            # stopped pod's gate must go as soon as its requests have.
            gate = _launch(fleet, f"gate-{name}", [
                "--upstream", f"http://{ip}:{sim_port}", "--listen", f"{ip}:{gate_port}",
                "--admin", f"{ip}:{fleet.admin_port}", "--token-file", str(token_file),
                "--shutdown-delay-s", "0"],
                command=BATCHPILOT_GATE)  # fmt: skip
            fleet.pods.append(
                GatedPod(name, ip, sim_port, gate_port, fleet.admin_port, engine, gate)
            )
        for pod in fleet.pods:
            pod.engine.wait_until(
                partial(http_ok, f"http://{pod.ip}:{pod.sim_port}/health"),
                START_TIMEOUT_S,
                "serving /health",
            )
            # Ready means the gate's engine answered its /health probe too.
            pod.gate.wait_until(
                partial(http_ok, f"http://{pod.ip}:{pod.admin_port}/readyz"),
                START_TIMEOUT_S,
                "ready (/readyz)",
            )
            create_serving_pod(
                api,
                namespace,
                pod.name,
                pod_ip=pod.ip,
                ports={"http": pod.gate_port, "admin": pod.admin_port},
                labels=labels,
            )
        targets = [
            ScrapeTarget(f"{pod.ip}:{port}", {"pod": pod.name, "namespace": namespace})
            for pod in fleet.pods
            for port in (pod.admin_port, pod.sim_port)
        ]
        fleet.prometheus = start_prometheus(targets, workdir=workdir / "prometheus")
    except BaseException:
        fleet.stop()
        raise
    return fleet


def _launch(
    fleet: Fleet, name: str, args: list[str], command: tuple[str, ...] = BATCHPILOT_CLI
) -> ManagedProcess:
    process = ManagedProcess(name, [*command, *args], fleet.workdir / f"{name}.log")
    fleet._processes.append(process)
    return process


def _require_free(port: int, ips: Sequence[str]) -> None:
    for ip in ips:
        with socket.socket() as probe:
            # As the gate binds (aiohttp sets SO_REUSEADDR): connections of a
            # gate stopped a moment ago, still in TIME_WAIT, do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError as error:
                raise StackError(
                    f"port {port} on {ip} is taken ({error.strerror}): the gates' admin API "
                    "needs it on every pod address; stop what listens there or choose another "
                    "admin port"
                ) from error
