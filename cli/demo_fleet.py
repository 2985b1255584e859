"""A local serving fleet for `batchpilot demo`: per replica, `sim serve` behind a real gate.

Each fleet runs in its own process (multiprocessing, spawn): one asyncio loop
hosting, per replica, a `SimServer` (the simulated engine on the wall clock
times `time_scale`) and a `GateServer` (the real gate, proxying to it), both on
free ports of 127.0.0.1. Two fleets therefore use both of the machine's cores
instead of sharing one event loop, and an engine's timing is never delayed by
the other fleet's traffic.

The parent gets each replica's addresses back through a pipe, talks to the
replicas over HTTP only (load through the gate's proxy port, /metrics from
the gate's admin port and the engine's port, settings through the gate's
admin API), and stops the fleet by sending on the same pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from batchpilot.contract.knobs import Knobs
from batchpilot.gate.server import GateServer
from batchpilot.gate.settings import GateSettingsError, load_settings
from batchpilot.sim.engine import EngineConfig
from batchpilot.sim.serve import SimServer

HOST = "127.0.0.1"
# Replicas answering within this long after the process starts, or the fleet failed:
# spawning Python and importing aiohttp takes ~2 s on a busy two-core machine.
START_TIMEOUT_S = 60.0
_STOP = "stop"


class FleetError(RuntimeError):
    """A fleet could not start; the message says which part and why."""


@dataclass(frozen=True)
class FleetSpec:
    name: str
    replicas: tuple[str, ...]
    engine: EngineConfig
    time_scale: float
    model: str
    admin_token: str
    startup_knobs: Knobs


@dataclass(frozen=True)
class ReplicaAddress:
    name: str
    proxy_url: str  # clients send requests here (the gate)
    admin_port: int  # gate admin API and gate /metrics
    engine_url: str  # the simulated engine, for its vllm:* /metrics

    @property
    def metrics_urls(self) -> tuple[str, str]:
        return f"http://{HOST}:{self.admin_port}/metrics", f"{self.engine_url}/metrics"


class Fleet:
    """Start with `start()`, stop with `stop()` (or use it as a context manager)."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.replicas: tuple[ReplicaAddress, ...] = ()
        self._conn: Connection | None = None
        self._process: Any = None

    def start(self) -> tuple[ReplicaAddress, ...]:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._conn = parent
        self._process = context.Process(
            target=serve_fleet, args=(self.spec, child), name=f"fleet-{self.spec.name}", daemon=True
        )
        self._process.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            self.stop()
            raise FleetError(
                f"fleet {self.spec.name!r} did not start within {START_TIMEOUT_S:.0f} s"
            )
        try:
            answer = parent.recv()
        except EOFError as err:
            self.stop()
            raise FleetError(
                f"fleet {self.spec.name!r} exited while starting (see its error above)"
            ) from err
        if isinstance(answer, str):
            self.stop()
            raise FleetError(f"fleet {self.spec.name!r} could not start: {answer}")
        self.replicas = tuple(answer)
        return self.replicas

    def stop(self) -> None:
        if self._conn is not None:
            # A process that is already gone needs no telling.
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(_STOP)
            self._conn.close()
            self._conn = None
        if self._process is not None:
            # 10 s: the gates drain with a 1 s grace period, the rest is shutdown.
            self._process.join(10.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_fleet(spec: FleetSpec, conn: Connection) -> None:
    """The fleet process's entry point: serve until the parent says stop or goes away."""
    # The parent draws a live view on the shared terminal: only errors may print.
    logging.basicConfig(level=logging.ERROR)
    # Ctrl-C reaches the whole process group; the parent decides when to stop
    # (it tells us through the pipe), so a fleet never dies mid-report.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(spec, conn))


async def _serve(spec: FleetSpec, conn: Connection) -> None:
    engines: list[SimServer] = []
    gates: list[GateServer] = []
    try:
        addresses = []
        for name in spec.replicas:
            engine = SimServer(spec.engine, spec.model, time_scale=spec.time_scale)
            engines.append(engine)
            engine_port = await engine.start(HOST, 0)
            settings = load_settings(
                {
                    "upstream": f"http://{HOST}:{engine_port}",
                    "listen": f"{HOST}:0",
                    "admin": f"{HOST}:0",
                    "token": spec.admin_token,
                    "knobs": spec.startup_knobs,
                    # The demo stops after its last request: nothing left to drain.
                    "grace_period_s": 1.0,
                    # 0.5 s: the gate turns ready within a second of start.
                    "health_interval_s": 0.5,
                },
                {},
            )
            gate = GateServer(settings)
            gates.append(gate)
            await gate.start()
            addresses.append(
                ReplicaAddress(
                    name,
                    f"http://{HOST}:{gate.proxy_port}",
                    gate.admin_port,
                    f"http://{HOST}:{engine_port}",
                )
            )
        conn.send(addresses)
    except (OSError, GateSettingsError, ValueError) as err:
        conn.send(f"{type(err).__name__}: {err}")
        await _stop_all(gates, engines)
        return
    loop = asyncio.get_running_loop()
    # recv() blocks: wait for it in a thread. EOF means the parent died.
    with contextlib.suppress(EOFError):
        await loop.run_in_executor(None, conn.recv)
    await _stop_all(gates, engines)


async def _stop_all(gates: list[Any], engines: list[Any]) -> None:
    for gate in gates:
        await gate.stop()
    for engine in engines:
        await engine.stop()
