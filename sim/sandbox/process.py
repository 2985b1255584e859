"""A server child process with its output in a log file, plus loopback helpers."""

from __future__ import annotations

import abc
import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, TypeVar

from .tools import StackError

# How often readiness is polled: fast enough that it adds little to a 4-5 s
# apiserver start, slow enough not to load the 2 shared cores.
POLL_INTERVAL_S = 0.1
# A healthy server answers a loopback probe in milliseconds; a probe that hangs
# (say, on a port another process took and never answers) costs at most this.
PROBE_TIMEOUT_S = 1.0
# A graceful kube-apiserver shutdown takes 1-2 s (median 1.2 s over 5 stops);
# past this it is killed.
STOP_GRACE_S = 15.0

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel kills the server when
    # the thread that started it dies, so a killed pytest leaves no apiserver
    # or Prometheus eating the shared cores.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); after the ")" (the
    # command name may hold spaces) they are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_loopback_port(ips: Sequence[str] = ("127.0.0.1",)) -> int:
    """A TCP port that was free on every one of `ips` a moment ago.

    Several ips: one port number for servers on different loopback
    addresses (each serving pod listens on its own IP, on the same admin
    port). Another process can take the port before the server binds it; the
    start functions therefore retry with fresh ports when a bind fails.
    """
    # A port free on the first ip may be taken on another: pick again, up to 50 times.
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((ips[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for ip in ips[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
                    other.bind((ip, port))
        except OSError:
            continue
        return port
    raise StackError(f"no port free on all of {', '.join(ips)}")


def require_loopback(host: str, field: str) -> None:
    """Reject a host that is not on loopback: tests may send traffic only there."""
    if host == "localhost":
        return
    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise ValueError(
            f"{field}: {host!r} is not a loopback address; use 127.0.0.x (the test stack "
            "never sends traffic off this machine)"
        )


def http_get(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> tuple[int, bytes] | None:
    """(status, body) of a GET, or None when nothing answered (yet)."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=ssl_context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        # Connection refused or reset, TLS not up yet, timeout: not serving yet.
        return None


def http_ok(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    """Whether a GET of `url` answers 200: the readiness probe of every server here."""
    reply = http_get(url, headers=headers, ssl_context=ssl_context)
    return reply is not None and reply[0] == 200


@contextlib.contextmanager
def serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """An HTTP server on a free 127.0.0.1 port, answering with `handler`; yields the port.

    For the small in-test servers (exporters, fake APIs): a daemon thread
    serves them, and the `with` block's end closes the listener.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class Stoppable(abc.ABC):
    """Something running that stop() ends; a `with` block calls stop() on the way out."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class ServerExited(StackError):
    """The server process exited while it was being waited for."""


class ManagedProcess:
    """One server process, its output in `log_path`, stopped by its own pid."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            # Its own session: a Ctrl-C in the terminal reaches pytest, whose
            # teardown then stops the server in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self._popen.pid

    def running(self) -> bool:
        return self._popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def log_contains(self, needle: str) -> bool:
        return needle in self.log_path.read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll `ready` until it is true; raise with the log's tail on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            # Liveness first: a probe of a dead server's port may hang on whoever took it.
            if not self.running():
                raise ServerExited(
                    f"{self.name} exited with code {self._popen.returncode} before {what}; "
                    f"its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"{self.name} not {what} after {timeout_s:.0f} s; "
                    f"its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost node ends a process: no cleanup runs.

        Returns once the process is gone and reaped.
        """
        self._popen.kill()
        try:
            self._popen.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired as error:
            # Only a process stuck in the kernel (uninterruptible I/O) outlives SIGKILL.
            raise StackError(f"{self.name} (pid {self.pid}) survived SIGKILL") from error
        self._log.close()

    def terminate(self) -> None:
        """SIGTERM without waiting: several servers then stop at once, and each
        stop() afterwards only waits."""
        if self.running():
            self._popen.terminate()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S. Safe to call twice."""
        if self.running():
            self._popen.terminate()
            try:
                self._popen.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
        self._log.close()


# A port picked by free_loopback_port can be taken before the server binds it;
# with 3-4 engineers starting servers on one machine that is rare, and three
# fresh picks in a row all losing the race is rarer still.
PORT_ATTEMPTS = 3
# In the log of a Go server (kube-apiserver, its etcd, Prometheus) whose port was taken.
ADDRESS_IN_USE = "address already in use"


class _HasProcess(Protocol):
    process: ManagedProcess


_Server = TypeVar("_Server", bound=_HasProcess)


def start_with_port_retry(
    launch: Callable[[], _Server],
    wait_ready: Callable[[_Server], None],
    address_in_use: str = ADDRESS_IN_USE,
) -> _Server:
    """`launch()` starts a server on freshly picked ports; `wait_ready` waits for it.

    When the server exits because a port was taken meanwhile (its log says
    `address_in_use`), launch again.
    On any other failure the server is stopped and the error passes on.
    """
    attempt = 1
    while True:
        server = launch()
        try:
            wait_ready(server)
            return server
        except ServerExited:
            server.process.stop()
            if attempt == PORT_ATTEMPTS or not server.process.log_contains(address_in_use):
                raise
        except BaseException:
            server.process.stop()
            raise
        attempt += 1
