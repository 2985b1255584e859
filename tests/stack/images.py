"""The project's container images (scripts/build-images) and podman to run them.

scripts/build-images builds the operator and gate images into podman storage
under $BATCHPILOT_CACHE_DIR/podman, tagged by a hash of everything each is
built from, and saves each as an OCI archive for containerd. podman runs here
with that configuration, as scripts/podman runs it, so tests see the same
images as a human at the shell:

    with run_container(image_ref("gate"), "--help") as gate: ...
    podman("image", "inspect", image_ref("operator"))
    oci_archive("operator")   # for `ctr -n k8s.io images import`

image_ref() and oci_archive() ask scripts/build-images for this tree's names,
so a test never runs an image built from other sources; when it is not built
they raise StackError whose message is the fix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from batchpilot.sim.sandbox.tools import SETUP_FIX, StackError, cache_dir

REPO = Path(__file__).resolve().parents[2]
BUILD_IMAGES = REPO / "scripts" / "build-images"
BUILD_FIX = "run scripts/build-images"
# podman commands here take well under a second (a `run` of a small command
# about 0.3 s); a minute covers a machine loaded by other engineers' builds.
PODMAN_TIMEOUT_S = 60.0
# A test's container is killed by conmon after this long even when the pytest
# that started it was killed before its cleanup ran: pytest's own limit.
CONTAINER_TIMEOUT_S = 600
# Each poll of a container's state is a podman process (~50 ms of CPU).
POLL_INTERVAL_S = 0.2


def podman_path() -> Path:
    found = shutil.which("podman")
    if found is None:
        raise StackError(f"podman not found on PATH: {SETUP_FIX} (installs Debian's podman, runc)")
    return Path(found)


def podman_env() -> dict[str, str]:
    """This process's environment plus the configuration scripts/build-images writes."""
    config = cache_dir() / "podman"
    containers_conf, storage_conf = config / "containers.conf", config / "storage.conf"
    if not (containers_conf.is_file() and storage_conf.is_file()):
        raise StackError(f"no podman configuration in {config}: {BUILD_FIX}")
    return {
        **os.environ,
        "CONTAINERS_CONF": str(containers_conf),
        "CONTAINERS_STORAGE_CONF": str(storage_conf),
    }


def podman(
    *args: str, check: bool = True, timeout_s: float = PODMAN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run `podman args...`; with `check`, raise StackError with its stderr when it fails."""
    argv = [str(podman_path()), *args]
    completed = subprocess.run(
        argv, capture_output=True, text=True, env=podman_env(), timeout=timeout_s, check=False
    )
    if check and completed.returncode != 0:
        raise StackError(f"{' '.join(argv)} failed: {completed.stderr.strip()}")
    return completed


def _ask_build_images(*args: str) -> str:
    completed = subprocess.run(
        [str(BUILD_IMAGES), *args], capture_output=True, text=True, timeout=30, check=False
    )
    if completed.returncode != 0:
        raise StackError(f"scripts/build-images {' '.join(args)}: {completed.stderr.strip()}")
    return completed.stdout.strip()


def image_ref(name: str) -> str:
    """The podman name of this tree's image `name` (operator or gate); it must be built."""
    ref = _ask_build_images("--print-ref", name)
    # `image exists` answers 1 for a missing image, 125 when podman itself failed.
    exists = podman("image", "exists", ref, check=False)
    if exists.returncode == 1:
        raise StackError(f"the {name} image of this tree ({ref}) is not built: {BUILD_FIX}")
    if exists.returncode != 0:
        raise StackError(f"podman image exists {ref} failed: {exists.stderr.strip()}")
    return ref


def oci_archive(name: str) -> Path:
    """This tree's image `name` saved as an OCI archive, for `ctr images import`."""
    path = Path(_ask_build_images("--print-archive", name))
    if not path.is_file():
        raise StackError(f"no OCI archive of this tree's {name} image at {path}: {BUILD_FIX}")
    return path


@dataclass
class Container:
    """A detached container, named so that cleanup can find it whatever happened."""

    name: str

    def logs(self) -> str:
        """Everything the container wrote, stdout then stderr."""
        completed = podman("logs", self.name)
        return completed.stdout + completed.stderr

    def running(self) -> bool:
        return (
            podman("inspect", "--format", "{{.State.Running}}", self.name).stdout.strip() == "true"
        )

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll `ready` until it is true; raise with the logs' tail on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            exited = not self.running()
            if exited or time.monotonic() > deadline:
                problem = "exited" if exited else f"not {what} after {timeout_s:.0f} s"
                tail = "\n".join(self.logs().splitlines()[-30:])
                raise StackError(f"container {self.name} {problem}; its logs end:\n{tail}")
            time.sleep(POLL_INTERVAL_S)

    def stop(self, timeout_s: int) -> int:
        """SIGTERM, SIGKILL after `timeout_s` as the kubelet does; the exit code."""
        podman("stop", "--time", str(timeout_s), self.name, timeout_s=PODMAN_TIMEOUT_S + timeout_s)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout)


@contextlib.contextmanager
def run_container(image: str, *args: str, options: Sequence[str] = ()) -> Iterator[Container]:
    """`podman run --detach [options] image args...`, removed on the way out, however it went."""
    container = Container(f"batchpilot-test-{uuid.uuid4().hex[:12]}")
    try:
        podman(
            *("run", "--detach", "--name", container.name),
            *("--timeout", str(CONTAINER_TIMEOUT_S), *options, image, *args),
        )
        yield container
    finally:
        # --ignore: a container that never started is no error here.
        podman("rm", "--force", "--ignore", "--time", "0", container.name)
