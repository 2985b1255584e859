"""Debian's Prometheus on a free loopback port, scraping given targets every second."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .process import (
    ManagedProcess,
    Stoppable,
    free_loopback_port,
    http_get,
    http_ok,
    require_loopback,
    start_with_port_retry,
)
from .tools import prometheus_path

# Prometheus is ready in 0.13 s, but 2.42 hands even static targets to its
# scrape loop on a fixed 5 s tick: the first scrape lands 5.4-6.0 s after start
# (measured, 5 runs). Ten times that leaves room for a loaded shared machine.
START_TIMEOUT_S = 60.0
# 1 s instead of the usual 15 s so tests see a change within a couple of seconds.
DEFAULT_SCRAPE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ScrapeTarget:
    """A host:port to scrape, with labels to attach to its series (e.g. pod)."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        host, separator, port = self.address.rpartition(":")
        if not separator or not port.isdigit():
            raise ValueError(f"ScrapeTarget.address: {self.address!r} is not host:port")
        # "[::1]:9090": the brackets are URL syntax, not part of the address.
        require_loopback(host.removeprefix("[").removesuffix("]"), "ScrapeTarget.address")


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _config(scrape_configs: Sequence[Mapping[str, object]], interval_s: float) -> str:
    interval = _duration(interval_s)
    text: str = yaml.safe_dump(
        {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            # The default 10 s timeout is longer than the interval, which
            # Prometheus rejects.
            "scrape_configs": [{"scrape_timeout": interval, **config} for config in scrape_configs],
        },
        sort_keys=False,
    )
    return text


def _static_job(targets: Sequence[ScrapeTarget], metrics_path: str) -> dict[str, object]:
    return {
        "job_name": "batchpilot",
        "metrics_path": metrics_path,
        "static_configs": [
            {"targets": [target.address], "labels": dict(target.labels)} for target in targets
        ],
    }


class PrometheusServer(Stoppable):
    """A running Prometheus. Use as a context manager, or call stop()."""

    def __init__(
        self,
        *,
        workdir: Path,
        owns_workdir: bool,
        url: str,
        process: ManagedProcess,
        target_count: int,
    ) -> None:
        self.workdir = workdir
        self.url = url
        self.process = process
        self._owns_workdir = owns_workdir
        self._target_count = target_count

    def _ready_and_scraped(self) -> bool:
        if not http_ok(f"{self.url}/-/ready"):
            return False
        reply = http_get(f"{self.url}/api/v1/targets?state=active")
        if reply is None or reply[0] != 200:
            return False
        active = json.loads(reply[1])["data"]["activeTargets"]
        up = [target for target in active if target["health"] == "up"]
        return len(up) == self._target_count

    def stop(self) -> None:
        """Stop the server and delete its data (and the workdir if it made it)."""
        self.process.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            shutil.rmtree(self.workdir / "data", ignore_errors=True)


def start_prometheus(
    targets: Sequence[str | ScrapeTarget],
    *,
    scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S,
    metrics_path: str = "/metrics",
    workdir: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> PrometheusServer:
    """Start Prometheus scraping `targets` (loopback host:port, or ScrapeTarget
    with labels) and wait until every target has been scraped successfully.

    Its config, log (prometheus.log) and data go into `workdir`; without one, a
    temporary directory that stop() deletes (kept when the start fails: the
    error points at the log in it). Raises StackError when the binary is
    missing or a target is not up within `timeout_s`.
    """
    if scrape_interval_s <= 0:
        raise ValueError(f"scrape_interval_s: {scrape_interval_s} must be positive")
    scrape_targets = [t if isinstance(t, ScrapeTarget) else ScrapeTarget(t) for t in targets]
    # Prometheus merges identical targets, so the wait below would never see them all up.
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for target in scrape_targets:
        key = (target.address, tuple(sorted(target.labels.items())))
        if key in seen:
            raise ValueError(
                f"targets: {target.address} with labels {dict(target.labels)} is listed twice"
            )
        seen.add(key)
    binary = str(prometheus_path())
    owns_workdir = workdir is None
    workdir = (
        Path(tempfile.mkdtemp(prefix="batchpilot-prometheus-")) if workdir is None else workdir
    )
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(_config([_static_job(scrape_targets, metrics_path)], scrape_interval_s))

    def launch() -> PrometheusServer:
        port = free_loopback_port()
        argv = [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        process = ManagedProcess("prometheus", argv, workdir / "prometheus.log")
        return PrometheusServer(
            workdir=workdir,
            owns_workdir=owns_workdir,
            url=f"http://127.0.0.1:{port}",
            process=process,
            target_count=len(scrape_targets),
        )

    def wait_ready(server: PrometheusServer) -> None:
        server.process.wait_until(
            server._ready_and_scraped,
            timeout_s,
            f"ready with all {len(scrape_targets)} target(s) up",
        )

    return start_with_port_retry(launch, wait_ready)


def start_prometheus_in_namespace(
    scrape_configs: Sequence[Mapping[str, object]],
    *,
    command_prefix: Sequence[str],
    address: str,
    workdir: Path,
    expected_up: int,
    scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S,
    timeout_s: float = START_TIMEOUT_S,
) -> PrometheusServer:
    """Start Prometheus with these scrape configs inside a network namespace
    (`command_prefix`, e.g. tests/stack/node.py Cluster.nsenter_prefix()) on
    `address`:9090, and wait until `expected_up` targets are up.

    For discovered targets (file_sd_configs) rather than static ones: the
    namespace is one the test created, so the fixed port cannot clash.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(_config(scrape_configs, scrape_interval_s))
    argv = [
        *command_prefix,
        str(prometheus_path()),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={address}:9090",
    ]
    server = PrometheusServer(
        workdir=workdir,
        owns_workdir=False,
        url=f"http://{address}:9090",
        process=ManagedProcess("prometheus", argv, workdir / "prometheus.log"),
        target_count=expected_up,
    )
    try:
        server.process.wait_until(
            server._ready_and_scraped, timeout_s, f"ready with {expected_up} target(s) up"
        )
    except BaseException:
        server.stop()
        raise
    return server
