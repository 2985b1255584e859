"""llama.cpp's llama-server, the real CPU engine, on a free loopback port.

The binary comes from scripts/build-llama-server and the model from
batchpilot.sim.llamacpp (both under $BATCHPILOT_CACHE_DIR, made by
scripts/dev-setup). `/health` answers 503 while the model loads and 200 once
the server takes requests.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from batchpilot.sim.llamacpp import (
    DEFAULT_SERVER_OPTIONS,
    SERVED_MODEL,
    EngineSetupError,
    ServerOptions,
    cached_model,
    server_argv,
    server_path,
)

from .process import (
    ManagedProcess,
    Stoppable,
    free_loopback_port,
    http_ok,
    start_with_port_retry,
)
from .tools import StackError, cache_dir

# The 47 MB model loads in well under a second; a loaded shared machine and
# the warm-up pass llama-server runs first stretch that to a few seconds.
START_TIMEOUT_S = 60.0
# llama-server logs this (not Go's wording) when its port was taken meanwhile.
_PORT_TAKEN = "couldn't bind HTTP server socket"


@dataclass
class LlamaServer(Stoppable):
    process: ManagedProcess
    host: str
    port: int
    options: ServerOptions
    workdir: Path
    owns_workdir: bool
    model: str = SERVED_MODEL

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.process.stop()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def engine_files() -> tuple[Path, Path]:
    """(llama-server binary, model file); StackError with the fix when either is missing."""
    try:
        return server_path(cache_dir()), cached_model(cache_dir())
    except EngineSetupError as err:
        raise StackError(str(err)) from err


def start_llama_server(
    options: ServerOptions = DEFAULT_SERVER_OPTIONS,
    *,
    host: str = "127.0.0.1",
    workdir: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> LlamaServer:
    """Start llama-server with `options` and return once `/health` answers 200."""
    binary, model = engine_files()
    owns_workdir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="batchpilot-llama-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    # Erasing a slot (the step sweep empties the cache between rows) needs a save path.
    slot_dir = workdir / "slots"
    slot_dir.mkdir(exist_ok=True)

    def launch() -> LlamaServer:
        port = free_loopback_port([host])
        argv = server_argv(binary, model, host, port, options, slot_dir=slot_dir)
        process = ManagedProcess("llama-server", argv, workdir / f"llama-server-{port}.log")
        return LlamaServer(process, host, port, options, workdir, owns_workdir)

    def wait_ready(server: LlamaServer) -> None:
        server.process.wait_until(
            lambda: http_ok(f"{server.url}/health"), timeout_s, "answering /health"
        )

    # On failure the workdir is kept: the error message points at the log in it.
    return start_with_port_retry(launch, wait_ready, address_in_use=_PORT_TAKEN)
