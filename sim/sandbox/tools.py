"""Where the stack's binaries live, and the error raised when one is missing.

scripts/dev-setup installs every binary. The stack runs them by absolute path,
never by a PATH lookup, so plain `pytest` works without scripts/test and a system
kubectl (this image has Google Cloud SDK's 1.32 dispatcher at /usr/bin/kubectl)
is never picked up by mistake. Only Debian's prometheus and openssl are looked
up on PATH, where their packages put them; batchpilot itself runs as
`python -m batchpilot.cli.main` under this interpreter (BATCHPILOT_CLI).

    $BATCHPILOT_CACHE_DIR/bin/kube-apiserver-etcd    scripts/build-kube-apiserver
    $BATCHPILOT_CACHE_DIR/bin/{kubelet,kube-scheduler,kube-controller-manager,
        kube-proxy,crictl}, bin/kube-node/{pause,agnhost}.oci.tar
                                                     scripts/build-kube-node
    $BATCHPILOT_CACHE_DIR/tools/bin/{kubectl,helm}   scripts/dev-setup
    prometheus, openssl (on PATH, from Debian)       scripts/dev-setup
    containerd, runc, ctr, conntrack, ip, iptables, nsenter and the CNI plugins
        (Debian's, by absolute path)                 scripts/dev-setup

BATCHPILOT_CACHE_DIR defaults to $XDG_CACHE_HOME/batchpilot, i.e.
~/.cache/batchpilot, the same rule as the scripts. Paths are resolved on every
call, so a changed environment takes effect at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SETUP_FIX = "run scripts/dev-setup"
# This interpreter, so that the virtualenv's batchpilot and packages run.
BATCHPILOT_CLI = (sys.executable, "-m", "batchpilot.cli.main")
# `batchpilot gate` as the gate image runs it (`batchpilot-gate`): the gate
# alone, without the operator's and the simulator's imports.
BATCHPILOT_GATE = (sys.executable, "-m", "batchpilot.cli.gate")


class StackError(RuntimeError):
    """The local stack could not be set up or started; the message says how to fix it."""


def cache_dir() -> Path:
    # An empty variable counts as unset, as in the scripts' ${VAR:-default}.
    explicit = os.environ.get("BATCHPILOT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg_cache) if xdg_cache else Path.home() / ".cache") / "batchpilot"


def _require_executable(path: Path, what: str) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise StackError(f"{what} not found at {path}: {SETUP_FIX}")
    return path


def kube_apiserver_path() -> Path:
    """The kube-apiserver binary with etcd embedded (hack/kube-apiserver)."""
    return _require_executable(cache_dir() / "bin" / "kube-apiserver-etcd", "kube-apiserver")


def kube_node_binary_path(name: str) -> Path:
    """kubelet, kube-scheduler, kube-controller-manager, kube-proxy or crictl."""
    return _require_executable(cache_dir() / "bin" / name, name)


def node_image_archive_path(name: str) -> Path:
    """The OCI image archive `name` (pause or agnhost) that scripts/build-kube-node packs."""
    path = cache_dir() / "bin" / "kube-node" / f"{name}.oci.tar"
    if not path.is_file():
        raise StackError(f"the {name} image archive not found at {path}: {SETUP_FIX}")
    return path


# Debian's packages put these at fixed paths; run by those, like the binaries
# above, so that a PATH without /usr/sbin (a non-login root shell) still works.
NODE_SYSTEM_TOOLS = {
    "containerd": "/usr/bin/containerd",
    "containerd-shim-runc-v2": "/usr/bin/containerd-shim-runc-v2",
    "ctr": "/usr/bin/ctr",
    "runc": "/usr/sbin/runc",
    "conntrack": "/usr/sbin/conntrack",
    "ip": "/usr/sbin/ip",
    "iptables": "/usr/sbin/iptables",
    "nsenter": "/usr/bin/nsenter",
}
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")


def node_system_tool_path(name: str) -> Path:
    """A Debian tool the node runs (see NODE_SYSTEM_TOOLS)."""
    path = Path(NODE_SYSTEM_TOOLS[name])
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise StackError(
            f"{name} not found at {path}: {SETUP_FIX} (installs Debian's containerd, runc, "
            "conntrack, iproute2, iptables, util-linux and containernetworking-plugins)"
        )
    return path


def cni_bin_dir() -> Path:
    """Debian's CNI plugins folder, checked for the plugins the node's network uses."""
    for plugin in CNI_PLUGINS:
        if not os.access(CNI_BIN_DIR / plugin, os.X_OK):
            raise StackError(
                f"CNI plugin {plugin} not found in {CNI_BIN_DIR}: {SETUP_FIX} "
                "(installs Debian's containernetworking-plugins)"
            )
    return CNI_BIN_DIR


def kubectl_path() -> Path:
    return _require_executable(cache_dir() / "tools" / "bin" / "kubectl", "kubectl")


def helm_path() -> Path:
    return _require_executable(cache_dir() / "tools" / "bin" / "helm", "helm")


def prometheus_path() -> Path:
    found = shutil.which("prometheus")
    if found is None:
        raise StackError(
            f"prometheus not found on PATH: {SETUP_FIX} (installs Debian's prometheus)"
        )
    return Path(found)


def openssl_path() -> Path:
    found = shutil.which("openssl")
    if found is None:
        raise StackError(f"openssl not found on PATH: {SETUP_FIX} (installs Debian's openssl)")
    return Path(found)


def run_openssl(*args: str) -> None:
    """Run `openssl args...`; raise StackError with its stderr when it fails."""
    argv = [str(openssl_path()), *args]
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise StackError(f"{' '.join(argv)} failed: {completed.stderr.strip()}")
