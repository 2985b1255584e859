"""`batchpilot sandbox`: the whole stack on one machine, for hands-on use.

`up` starts a supervisor process in its own session and returns once
everything answers; the supervisor holds the stack and replays the traffic
until `down` sends it SIGTERM. What it runs, all real processes on loopback:

- kube-apiserver with its embedded etcd, the InferencePolicy CRD installed,
  the namespace `sandbox` (the kubeconfig's default namespace);
- POD_COUNT serving pods `summarizer-vllm-N` on 127.0.0.2, 127.0.0.3, ...:
  each a simulated engine (`batchpilot sim serve`) behind a real gate, its
  admin API on port 9090 (the CRD's default `spec.actuation.adminPort`), and a
  Running, Ready pod object carrying the labels of examples/vllm-deployment.yaml,
  so the examples' policies select them as shipped; the gates' token is in the
  Secret `gate-token`;
- Prometheus scraping every gate and engine, with the pod labels a cluster's
  relabelling would attach;
- the operator (`batchpilot operator`), watching `sandbox`;
- a load generator replaying scenario.yaml (or --scenario) in a loop.

Everything lives under one directory (default: $BATCHPILOT_SANDBOX_DIR, else
$BATCHPILOT_CACHE_DIR/sandbox):
sandbox.json (what is running, where), progress.log, and every process's log.
The supervisor's children die with it (PR_SET_PDEATHSIG), so a killed
supervisor leaves nothing behind; `down` removes the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from batchpilot.sim.calibration import write_builtin_calibration
from batchpilot.sim.scenario import ScenarioError, load_scenario

from .apiserver import start_kube_apiserver, write_kubeconfig
from .fleet import start_fleet
from .kube import create_crd, create_namespace
from .operator_process import OperatorProcess
from .process import ManagedProcess, http_ok
from .tools import BATCHPILOT_CLI, StackError, cache_dir, kubectl_path

NAMESPACE = "sandbox"
# examples/vllm-deployment.yaml's pod labels and name: the quickstart's and
# the examples' policies select the sandbox's pods without an edit.
POD_LABELS = {"app.kubernetes.io/name": "summarizer-vllm"}
POD_PREFIX = "summarizer-vllm"
# The CRD's default spec.actuation.adminPort: a policy need not name it.
ADMIN_PORT = 9090
POD_COUNT = 2
SCENARIO = Path(__file__).with_name("scenario.yaml")
# Scenario seconds per wall second; SCENARIO's SLOs are set for it.
TIME_SCALE = 2.0
CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "inferencepolicy.yaml"
STATE_FILE = "sandbox.json"
PROGRESS_FILE = "progress.log"
SUPERVISOR_LOG = "supervisor.log"
# Fine enough for the sandbox's 10 s policy intervals.
OPERATOR_TICK_S = 1.0
# From `up` to every part answering: 15-25 s on an idle 2-core machine
# (kube-apiserver ~5 s, two engines and gates, Prometheus's first scrape,
# the operator); a loaded machine takes far longer.
UP_TIMEOUT_S = 300.0
# The supervisor stops every part in order after SIGTERM; past this `down`
# kills it, and the parts die with it.
DOWN_TIMEOUT_S = 60.0
# How often `up` looks for progress, and the load loop for a stop request.
POLL_S = 0.2


def default_directory() -> Path:
    """$BATCHPILOT_SANDBOX_DIR, else $BATCHPILOT_CACHE_DIR/sandbox."""
    explicit = os.environ.get("BATCHPILOT_SANDBOX_DIR")
    return Path(explicit) if explicit else cache_dir() / "sandbox"


@dataclass(frozen=True)
class PodAddress:
    name: str
    gate_url: str
    """Where clients send OpenAI requests."""
    admin_url: str
    """The gate's admin API (GET /config, /metrics)."""


@dataclass(frozen=True)
class SandboxState:
    """What a running sandbox is made of, as sandbox.json holds it."""

    supervisor_pid: int
    directory: str
    namespace: str
    kubeconfig: str
    apiserver_url: str
    prometheus_url: str
    operator_health_url: str
    operator_metrics_url: str
    kubectl: str
    scenario: str
    time_scale: float
    pods: tuple[PodAddress, ...]
    started_at: float

    def write(self, directory: Path) -> None:
        # Written whole then renamed: a reader never sees half a file.
        partial = directory / f"{STATE_FILE}.partial"
        partial.write_text(json.dumps(asdict(self), indent=2) + "\n")
        partial.replace(directory / STATE_FILE)

    @classmethod
    def read(cls, directory: Path) -> SandboxState | None:
        """The state in `directory`, or None when no sandbox was brought up there."""
        try:
            data = json.loads((directory / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        data["pods"] = tuple(PodAddress(**pod) for pod in data["pods"])
        return cls(**data)

    def supervisor_alive(self) -> bool:
        return _alive(self.supervisor_pid)

    def checks(self) -> list[tuple[str, str, bool]]:
        """(part, where, answering) for every part, each probed once."""
        parts = [
            ("kube-apiserver", self.apiserver_url, self._apiserver_ready()),
            ("prometheus", self.prometheus_url, http_ok(f"{self.prometheus_url}/-/ready")),
            ("operator", self.operator_health_url, http_ok(self.operator_health_url)),
        ]
        for pod in self.pods:
            parts.append((f"gate {pod.name}", pod.gate_url, http_ok(f"{pod.admin_url}/readyz")))
        return parts

    def _apiserver_ready(self) -> bool:
        # Refused or reset (urllib3's errors), an error status, or a
        # kubeconfig `down` removed meanwhile: not answering.
        unreachable = (ApiException, HTTPError, OSError, ConfigException)
        with contextlib.suppress(*unreachable), self.api_client() as api:
            client.VersionApi(api).get_code(_request_timeout=2)
            return True
        return False

    def api_client(self) -> client.ApiClient:
        api: client.ApiClient = config.new_client_from_config(config_file=self.kubeconfig)
        return api

    def last_round(self) -> dict[str, Any] | None:
        """The summary of the load generator's last finished round, if any."""
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
            return dict(
                json.loads((Path(self.directory) / "load" / "last.json").read_text())["summary"]
            )
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def up(directory: Path, *, scenario: Path, on_progress: Callable[[str], None]) -> SandboxState:
    """Start a sandbox in `directory` and return its state once every part answers.

    Idempotent: a sandbox already running there is returned as it is. Raises
    StackError with the supervisor's own error when it cannot start.
    """
    running = SandboxState.read(directory)
    if running is not None and running.supervisor_alive():
        return running
    # A state without its supervisor is what a crash or a reboot leaves: start afresh.
    _remove(directory)
    directory.mkdir(parents=True)
    log = (directory / SUPERVISOR_LOG).open("wb")
    supervisor = subprocess.Popen(
        [*BATCHPILOT_CLI, "sandbox", "supervise", "--dir", str(directory),
         "--scenario", str(scenario)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        # Its own session: it outlives this command and the terminal's Ctrl-C.
        start_new_session=True,
    )  # fmt: skip
    log.close()
    shown = 0
    deadline = time.monotonic() + UP_TIMEOUT_S
    while True:
        lines = _read_lines(directory / PROGRESS_FILE)
        for line in lines[shown:]:
            on_progress(line)
        shown = len(lines)
        state = SandboxState.read(directory)
        if state is not None:
            return state
        if supervisor.poll() is not None:
            raise StackError(_failure(directory, supervisor.returncode))
        if time.monotonic() > deadline:
            supervisor.send_signal(signal.SIGTERM)
            raise StackError(
                f"the sandbox did not come up within {UP_TIMEOUT_S:.0f} s; "
                f"its log is {directory / SUPERVISOR_LOG}"
            )
        time.sleep(POLL_S)


def _failure(directory: Path, returncode: int) -> str:
    log = (directory / SUPERVISOR_LOG).read_text(errors="replace").strip().splitlines()
    # The supervisor's last line is its error, already worded for the user.
    reason = log[-1] if log else f"exit code {returncode}"
    return f"the sandbox could not start: {reason}\n(full log: {directory / SUPERVISOR_LOG})"


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def down(directory: Path) -> bool:
    """Stop the sandbox in `directory` and delete the directory; False if none ran."""
    state = SandboxState.read(directory)
    was_running = state is not None and state.supervisor_alive()
    if state is not None and was_running:
        os.kill(state.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        while state.supervisor_alive() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if state.supervisor_alive():
            # Its children have PR_SET_PDEATHSIG: they go with it.
            os.kill(state.supervisor_pid, signal.SIGKILL)
    _remove(directory)
    return was_running


def _remove(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)


def supervise(directory: Path, scenario: Path) -> None:
    """The supervisor's body: start every part, publish the state, replay the
    traffic until SIGTERM or SIGINT, then stop every part in reverse order."""
    stopping = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stopping.set())
    progress = (directory / PROGRESS_FILE).open("a", buffering=1)

    @contextlib.contextmanager
    def step(what: str) -> Iterator[None]:
        started = time.monotonic()
        progress.write(f"{what} ...\n")
        yield
        progress.write(f"{what}: ready in {time.monotonic() - started:.1f} s\n")

    with contextlib.ExitStack() as stack:
        with step("kube-apiserver with the InferencePolicy CRD"):
            kube = stack.enter_context(start_kube_apiserver(directory / "apiserver"))
            api = stack.enter_context(kube.api_client())
            create_crd(api, _crd_manifest())
            create_namespace(api, NAMESPACE)
        runnable = _runnable_scenario(scenario, directory)
        ips = [f"127.0.0.{2 + index}" for index in range(POD_COUNT)]
        with step(f"{POD_COUNT} serving pods (simulated engine + gate) and Prometheus"):
            fleet = stack.enter_context(
                start_fleet(api, NAMESPACE, ips=ips, labels=POD_LABELS,
                            workdir=directory / "pods", scenario=runnable,
                            time_scale=TIME_SCALE, pod_prefix=POD_PREFIX,
                            admin_port=ADMIN_PORT)
            )  # fmt: skip
        with step("the operator"):
            operator = OperatorProcess(
                workdir=_mkdir(directory / "operator"),
                kubeconfig=kube.kubeconfig,
                prometheus_url=fleet.prometheus_url,
                namespaces=[NAMESPACE],
                tick_seconds=OPERATOR_TICK_S,
            )
            stack.enter_context(operator.start())
        kubeconfig = write_kubeconfig(
            directory / "kubeconfig", server=kube.server, ca_file=kube.ca_file,
            user="sandbox-admin", token=kube.token, namespace=NAMESPACE,
        )  # fmt: skip
        SandboxState(
            supervisor_pid=os.getpid(),
            directory=str(directory),
            namespace=NAMESPACE,
            kubeconfig=str(kubeconfig),
            apiserver_url=kube.server,
            prometheus_url=fleet.prometheus_url,
            operator_health_url=operator.health_url,
            operator_metrics_url=operator.metrics_url,
            kubectl=str(kubectl_path()),
            scenario=str(scenario),
            time_scale=TIME_SCALE,
            pods=tuple(
                PodAddress(pod.name, pod.gate_url, f"http://{pod.ip}:{pod.admin_port}")
                for pod in fleet.pods
            ),
            started_at=time.time(),
        ).write(directory)
        progress.write("ready\n")
        _replay_until(stopping, runnable, fleet.gate_urls, _mkdir(directory / "load"))
        progress.write("stopping\n")
        (directory / STATE_FILE).unlink(missing_ok=True)


def _replay_until(stopping: threading.Event, scenario: Path, urls: list[str], out: Path) -> None:
    """`batchpilot sim load` of `scenario` against `urls`, round after round.

    Each round's results replace load/last.json; `status` shows them.
    """
    rounds = 0
    while not stopping.is_set():
        rounds += 1
        load = ManagedProcess(
            "load",
            [*BATCHPILOT_CLI, "sim", "load", str(scenario), "--time-scale", str(TIME_SCALE),
             "--json", str(out / "round.json"), *(f"--url={url}" for url in urls)],
            out / "load.log",
        )  # fmt: skip
        while load.running() and not stopping.wait(POLL_S):
            pass
        load.stop()
        with contextlib.suppress(FileNotFoundError):
            (out / "round.json").replace(out / "last.json")


def _crd_manifest() -> dict[str, Any]:
    if not CRD_PATH.exists():
        raise StackError(
            f"the InferencePolicy CRD is not at {CRD_PATH}: the sandbox runs from a "
            "source checkout of batchpilot (git clone, then scripts/sandbox up)"
        )
    manifest: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return manifest


def _runnable_scenario(scenario: Path, directory: Path) -> Path:
    """`scenario` as a file `sim serve` and `sim load` read; the built-in one
    gets the built-in calibration when ../shared is absent."""
    data = yaml.safe_load(scenario.read_text())
    engine = data["engine"]
    calibration = (scenario.parent / engine["calibration"]).resolve()
    if not calibration.exists():
        if scenario != SCENARIO:
            raise StackError(
                f"--scenario {scenario}: engine.calibration {calibration} does not exist; "
                "point it at a step-latency CSV (see ../shared/contracts/bench.md)"
            )
        calibration = write_builtin_calibration(
            directory / "calibration.csv", engine["model"], engine["system"]
        )
    engine["calibration"] = str(calibration)
    runnable = directory / "scenario.yaml"
    runnable.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        load_scenario(runnable)
    except ScenarioError as error:
        raise StackError(f"--scenario {scenario}: {error}") from error
    return runnable


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_supervisor(directory: Path, scenario: Path) -> None:
    """`supervise`, with any error as the log's last line, for `up` to show."""
    try:
        supervise(directory, scenario)
    except StackError as error:
        # Multi-line errors (a server's log tail) on one line, the summary last.
        print(str(error).replace("\n", " | "), file=sys.stderr, flush=True)
        raise SystemExit(1) from error
