"""A real single-node Kubernetes cluster, in a network namespace of its own.

What runs: the project's kube-apiserver (etcd embedded), kube-controller-manager,
kube-scheduler, kubelet and kube-proxy (iptables mode), all v1.33.13 from
scripts/build-kube-node and scripts/build-kube-apiserver, with Debian's
containerd 1.6, runc and CNI plugins (bridge + host-local). Pods run for real:
the pause image and agnhost (Kubernetes' e2e test server) come as local OCI
archives, imported into the node's containerd; no registry is reachable.

Network: every component runs inside a network namespace created here
(`bp-node-<pid>-<n>`, entered with `nsenter --net`: `ip netns exec` would
remount /sys and lose the cgroup mounts the kubelet needs), joined to the host
by a veth pair on a private /30 in 10.251.0.0/16. The test process reaches the
apiserver at the node's end of that /30; pods and ClusterIPs only from inside
the namespace (Cluster.exec_in_node). Nothing leaves the machine: the namespace
has no default route (the Service range is routed into a bridge with no ports,
so the node itself can reach ClusterIPs), forwarding out of it is dropped
inside it, and the host drops forwarding to and from the veth. No cluster DNS.

Root only: the node creates namespaces, mounts, cgroups and iptables rules, and
the kubelet writes host sysctls. Before creating anything a cluster writes what
it will create into a ledger under /run/batchpilot-node; stop() removes exactly
that, and so does the next start after a crashed run: processes, mounts under
its workdir, its cgroup root (`/bp-node-...` in every hierarchy: the kubelet's
kubepods go under it, so two clusters never share pod cgroups), the namespace,
the veth, the host's iptables rules. The last cluster to stop restores the
sysctls the kubelet changed and removes the host folders the first one found
missing (/run/netns and the like), when empty.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import ipaddress
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import kubernetes
import yaml

from batchpilot.sim.sandbox.apiserver import KubeAPIServer, start_kube_apiserver, write_kubeconfig
from batchpilot.sim.sandbox.process import POLL_INTERVAL_S, ManagedProcess, ServerExited, Stoppable
from batchpilot.sim.sandbox.tools import (
    NODE_SYSTEM_TOOLS,
    StackError,
    cni_bin_dir,
    kube_node_binary_path,
    node_image_archive_path,
    node_system_tool_path,
    run_openssl,
)

NAME_PREFIX = "bp-node-"
LEDGER_DIR = Path("/run/batchpilot-node")
NETNS_DIR = Path("/run/netns")
# Private and unlikely to clash: each cluster takes one /30 of it, the host end
# first, the node's second.
LINK_BLOCK = ipaddress.IPv4Network("10.251.0.0/16")
# Both exist only inside the node's namespace, so every cluster uses the same.
POD_CIDR = "10.252.0.0/24"
SERVICE_CIDR = "10.96.0.0/24"
KUBERNETES_SERVICE_IP = "10.96.0.1"
# The kubelet's setupKernelTunables writes these host-wide (none is per network
# namespace) when it starts, and never puts them back.
KUBELET_SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
# Host folders the node's software creates outside its workdir, whatever its
# configuration says: `ip netns` (/run/netns, a mount), the containerd shims
# (their sockets in /run/containerd/s), go-cni's result cache (/var/lib/cni),
# the kubelet's container log links (/var/log/containers; its pod logs go to
# the workdir) and its device manager's socket (a constant path).
HOST_PATHS = (
    "/run/netns",
    "/run/containerd",
    "/var/lib/cni",
    "/var/log/containers",
    "/var/lib/kubelet",
)
DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")
# Start to a Ready node: 8-9 s measured here (the first start after the build
# too), 17 s on another machine; the shared 2 cores can triple that.
START_TIMEOUT_S = 120.0
# Every command here (ip, iptables, ctr, crictl) answers in well under a second;
# an image import of agnhost (50 MB) takes a few.
COMMAND_TIMEOUT_S = 60.0
# Waits for the ledger lock: another run holds it while it starts or
# dismantles a cluster, a few seconds.
LOCK_TIMEOUT_S = 120.0
# SIGKILLed processes are gone within milliseconds; cgroups empty soon after.
KILL_TIMEOUT_S = 10.0
# The components run iptables, conntrack, mount and runc by name.
COMPONENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_names = itertools.count(1)


def _run(argv: Sequence[str], *, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run a command; its stdout, or StackError with its stderr."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise StackError(f"{shlex.join(argv)} did not finish in {timeout_s:.0f} s") from error
    if done.returncode != 0:
        raise StackError(f"{shlex.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls(names: Sequence[str] = KUBELET_SYSCTLS) -> dict[str, str]:
    """Current values of the host sysctls `names` (the kubelet's by default)."""
    return {name: _sysctl_path(name).read_text().strip() for name in names}


def _process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # starttime is field 22 of stat(5); after the ")" that ends the command
    # name (which may hold spaces) it is the 20th.
    return int(stat.rsplit(")", 1)[1].split()[19])


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers, named, unified)."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, after = line.split(" - ", 1)
        if after.split()[0] in ("cgroup", "cgroup2"):
            mounts.append(Path(_unescape(before.split()[4])))
    return mounts


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    return field.encode().decode("unicode_escape")


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or under `root`, in mount order."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = _unescape(line.split(" - ", 1)[0].split()[4])
        if mount_point == str(root) or mount_point.startswith(prefix):
            found.append(Path(mount_point))
    return found


def _netns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in_netns(name: str) -> set[int]:
    """Processes whose network namespace is `name` (what `ip netns pids` lists)."""
    inode = _netns_inode(name)
    if inode is None:
        return set()
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == inode:
            pids.add(int(entry.name))
    return pids


def _cgroup_dirs(name: str) -> list[Path]:
    """The cluster's cgroup root in every hierarchy, where it exists."""
    return [mount / name for mount in cgroup_mounts() if (mount / name).is_dir()]


def _pids_in_cgroups(name: str) -> set[int]:
    pids: set[int] = set()
    for root in _cgroup_dirs(name):
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(pid) for pid in procs.read_text().split())
    return pids


@dataclass(frozen=True)
class _Ledger:
    """What one cluster creates on the host, written before it creates it."""

    name: str
    """Network namespace, node name, cgroup root and iptables rule comment."""
    owner_pid: int
    owner_start: int
    workdir: str
    host_veth: str
    host_ip: str
    node_ip: str

    @property
    def path(self) -> Path:
        return LEDGER_DIR / f"{self.name}.json"

    def owner_alive(self) -> bool:
        return _process_start_time(self.owner_pid) == self.owner_start

    def save(self) -> None:
        self.path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> _Ledger:
        ledger = cls(**json.loads(path.read_text()))
        # Its name and workdir decide what gets killed and unmounted: refuse
        # anything this module would not have written.
        if ledger.name != path.stem or not ledger.name.startswith(NAME_PREFIX):
            raise StackError(f"{path} names cluster {ledger.name!r}; remove that file by hand")
        if not Path(ledger.workdir).is_absolute() or len(Path(ledger.workdir).parts) < 3:
            raise StackError(f"{path} has workdir {ledger.workdir!r}; remove that file by hand")
        return ledger


_HOST_RECORD = LEDGER_DIR / "host.json"


@contextlib.contextmanager
def _ledger_lock() -> Iterator[None]:
    """Hold the machine-wide lock on the ledger; on the way out, remove the
    ledger's folder if nothing is left in it."""
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        LEDGER_DIR.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(LEDGER_DIR, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"{LEDGER_DIR} stayed locked for {LOCK_TIMEOUT_S:.0f} s: another "
                            "test run is starting or stopping a cluster; try again"
                        ) from None
                    time.sleep(POLL_INTERVAL_S)
            # The last holder may have removed the folder after this open: lock
            # the one that is there now.
            try:
                current = os.stat(LEDGER_DIR).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                try:
                    yield
                finally:
                    with contextlib.suppress(OSError):
                        LEDGER_DIR.rmdir()
                return
        finally:
            os.close(fd)


def _kill_and_wait(pids_now: Callable[[], set[int]], what: str) -> None:
    """SIGKILL what `pids_now()` lists until it lists nothing."""
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while pids := pids_now():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise StackError(f"processes {sorted(pids)} in {what} survived SIGKILL")
        time.sleep(POLL_INTERVAL_S)


def _unmount_all(root: Path) -> None:
    """Unmount everything at or under `root`, the latest mount first."""
    for _ in range(100):
        mounts = mounts_under(root)
        if not mounts:
            return
        for mount in reversed(mounts):
            path = os.fsencode(mount)
            if _libc.umount2(path, 0) != 0:
                # Busy (an open file, a process's cwd): detach it now, freed
                # when the last user goes.
                _libc.umount2(path, _MNT_DETACH)
    raise StackError(f"mounts under {root} remain after 100 rounds: {mounts_under(root)}")


def _remove_cgroups(name: str) -> None:
    deadline = time.monotonic() + KILL_TIMEOUT_S
    for root in _cgroup_dirs(name):
        for directory, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError as error:
                    # A cgroup whose last process just died is busy for a moment.
                    if error.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise StackError(f"cannot remove cgroup {directory}: {error}") from error
                    time.sleep(POLL_INTERVAL_S)


def _host_rules(comment: str) -> list[list[str]]:
    """The host's filter rules tagged `comment`, as `iptables -S` prints them."""
    iptables = str(node_system_tool_path("iptables"))
    rules = []
    for line in _run([iptables, "-w", "5", "-S"]).splitlines():
        words = shlex.split(line)
        if "--comment" in words and words[words.index("--comment") + 1] == comment:
            rules.append(words)
    return rules


def _dismantle(ledger: _Ledger) -> None:
    """Remove everything `ledger` names, whatever state it is in; every step
    runs even when one fails, and the ledger goes only when all succeeded."""
    workdir = Path(ledger.workdir)
    ip = str(node_system_tool_path("ip"))
    iptables = str(node_system_tool_path("iptables"))

    def network() -> None:
        if Path("/sys/class/net", ledger.host_veth).exists():
            # Its peer inside the namespace goes with it.
            _run([ip, "link", "delete", ledger.host_veth])
        if _netns_inode(ledger.name) is not None:
            _run([ip, "netns", "delete", ledger.name])

    def host_rules() -> None:
        for rule in _host_rules(ledger.name):
            _run([iptables, "-w", "5", "-D", *rule[1:]])

    def containerd_host_files() -> None:
        # A shim that was killed leaves its socket, and a pod whose network
        # was never torn down its CNI results; both are named after the
        # sandbox, whose task folder is still in the workdir.
        tasks = workdir / "containerd" / "state" / "io.containerd.runtime.v2.task" / "k8s.io"
        for task in tasks.iterdir() if tasks.is_dir() else ():
            # containerd 1.6's shim.SocketAddress: sha256 of address/namespace/id.
            socket_key = f"{_containerd_socket(workdir)}/k8s.io/{task.name}"
            digest = hashlib.sha256(socket_key.encode()).hexdigest()
            (Path("/run/containerd/s") / digest).unlink(missing_ok=True)
            for result in Path("/var/lib/cni/results").glob(f"*-{task.name}-*"):
                result.unlink()

    def container_log_links() -> None:
        links = Path("/var/log/containers")
        if links.is_dir():
            for link in links.iterdir():
                if link.is_symlink() and os.readlink(link).startswith(str(workdir) + "/"):
                    link.unlink()

    steps: list[tuple[str, Callable[[], None]]] = [
        # Processes first: they hold the mounts, cgroups and the namespace.
        ("processes", lambda: _kill_and_wait(
            lambda: _pids_in_netns(ledger.name) | _pids_in_cgroups(ledger.name),
            f"cluster {ledger.name}",
        )),
        ("mounts", lambda: _unmount_all(workdir)),
        ("cgroups", lambda: _remove_cgroups(ledger.name)),
        ("network", network),
        ("host iptables rules", host_rules),
        ("containerd's files outside the workdir", containerd_host_files),
        ("container log links", container_log_links),
    ]  # fmt: skip
    failures = []
    for what, step in steps:
        try:
            step()
        except (StackError, OSError) as error:
            failures.append(f"{what}: {error}")
    if failures:
        raise StackError(
            f"could not remove all of cluster {ledger.name} (ledger {ledger.path}, kept "
            "so that the next start retries):\n" + "\n".join(failures)
        )
    ledger.path.unlink(missing_ok=True)


def _ledgers() -> list[_Ledger]:
    return [_Ledger.load(path) for path in sorted(LEDGER_DIR.glob(f"{NAME_PREFIX}*.json"))]


def _clear_leftovers() -> None:
    """Dismantle the clusters of runs that are gone (a crashed or killed pytest).

    Called with the ledger locked. A namespace with our prefix but no ledger
    entry was not made by this module's current code: report it, touch nothing.
    """
    recorded = set()
    for ledger in _ledgers():
        recorded.add(ledger.name)
        if not ledger.owner_alive():
            _dismantle(ledger)
    if NETNS_DIR.is_dir():
        for netns in NETNS_DIR.iterdir():
            if netns.name.startswith(NAME_PREFIX) and netns.name not in recorded:
                raise StackError(
                    f"network namespace {netns.name} looks like a leftover test node but "
                    f"{LEDGER_DIR} has no record of it, so what else it made is unknown. "
                    "Remove it by hand: "
                    f"`ip netns pids {netns.name} | xargs -r kill -9; "
                    f"ip netns delete {netns.name}`, then look for its cgroups "
                    f"(/sys/fs/cgroup/*/{netns.name}) and iptables rules "
                    f"(`iptables -S | grep {netns.name}`)"
                )


def clear_leftovers() -> None:
    """Dismantle what the clusters of crashed runs left; start_cluster does it first."""
    with _ledger_lock():
        _clear_leftovers()
        _last_out()


def _first_in() -> None:
    """Record the host's state before the first live cluster changes it."""
    if _HOST_RECORD.exists():
        return
    record = {
        "sysctls": read_sysctls(),
        "created_paths": [path for path in HOST_PATHS if not os.path.lexists(path)],
    }
    _HOST_RECORD.write_text(json.dumps(record, indent=1))


def _last_out() -> None:
    """With no cluster left, put back what the first one recorded."""
    if _ledgers() or not _HOST_RECORD.exists():
        return
    record = json.loads(_HOST_RECORD.read_text())
    for name, value in record["sysctls"].items():
        _sysctl_path(name).write_text(value)
    if DEVICE_PLUGIN_SOCKET.parent.parent.as_posix() in record["created_paths"]:
        # Every kubelet here serves it; the last one has stopped.
        DEVICE_PLUGIN_SOCKET.unlink(missing_ok=True)
    for created in record["created_paths"]:
        path = Path(created)
        if not path.is_dir():
            continue
        if path == NETNS_DIR and not any(path.iterdir()):
            # `ip netns add` bind-mounts the folder on itself.
            _unmount_all(path)
        for directory, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
            # Empty folders only: anything in them is someone else's.
            with contextlib.suppress(OSError):
                os.rmdir(directory)
    _HOST_RECORD.unlink()


def _used_networks() -> list[ipaddress.IPv4Network]:
    ip = str(node_system_tool_path("ip"))
    used = []
    for entry in json.loads(_run([ip, "-j", "-4", "addr", "show"])):
        for address in entry.get("addr_info", []):
            used.append(
                ipaddress.IPv4Network(f"{address['local']}/{address['prefixlen']}", strict=False)
            )
    for route in json.loads(_run([ip, "-j", "-4", "route", "show", "table", "all"])):
        destination = route.get("dst", "default")
        if destination != "default":
            used.append(ipaddress.IPv4Network(destination, strict=False))
    for ledger in _ledgers():
        used.append(ipaddress.IPv4Network(f"{ledger.host_ip}/30", strict=False))
    return used


def _containerd_socket(workdir: Path) -> Path:
    return workdir / "containerd" / "containerd.sock"


def _new_ledger(workdir: Path) -> _Ledger:
    pid = os.getpid()
    taken = {ledger.name for ledger in _ledgers()}
    n = next(_names)
    while f"{NAME_PREFIX}{pid}-{n}" in taken or _netns_inode(f"{NAME_PREFIX}{pid}-{n}"):
        n = next(_names)
    used = _used_networks()
    subnets = list(LINK_BLOCK.subnets(new_prefix=30))
    # Spread runs over the block so that concurrent ones rarely probe the same /30.
    first = (pid * 64 + n) % len(subnets)
    for subnet in subnets[first:] + subnets[:first]:
        if not any(subnet.overlaps(other) for other in used):
            break
    else:
        raise StackError(f"no free /30 left in {LINK_BLOCK} for a test node")
    host_ip, node_ip = (str(address) for address in subnet.hosts())
    owner_start = _process_start_time(pid)
    assert owner_start is not None
    return _Ledger(
        name=f"{NAME_PREFIX}{pid}-{n}",
        owner_pid=pid,
        owner_start=owner_start,
        workdir=str(workdir),
        # Interface names have at most 15 characters.
        host_veth=f"bpv{pid}x{n}",
        host_ip=host_ip,
        node_ip=node_ip,
    )


def _preflight() -> None:
    if os.geteuid() != 0:
        raise StackError(
            "a test node needs root (it creates network namespaces, mounts, cgroups and "
            "iptables rules): run the tests as root"
        )
    mounts = cgroup_mounts()
    if not any(mount.name == "memory" for mount in mounts):
        raise StackError(
            "a test node runs the kubelet with the cgroupfs driver on cgroup v1 hierarchies, "
            "and this machine has no v1 memory controller mounted at /sys/fs/cgroup/memory"
        )
    for name in ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy", "crictl"):
        kube_node_binary_path(name)
    node_image_archive_path("pause")
    for tool in NODE_SYSTEM_TOOLS:
        node_system_tool_path(tool)
    cni_bin_dir()


def image_name(archive: Path) -> str:
    """The name `ctr images import` gives the image in an OCI archive: its
    io.containerd.image.name (scripts/build-kube-node sets it), else its
    ref.name when that is a full reference (podman's oci-archive)."""
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        member = next(
            (tar.extractfile(n) for n in ("index.json", "./index.json") if n in names), None
        )
        if member is None:
            raise StackError(f"{archive} has no index.json: not an OCI image archive")
        index = json.load(member)
    annotations = index["manifests"][0].get("annotations", {})
    name = annotations.get("io.containerd.image.name", "")
    ref = annotations.get("org.opencontainers.image.ref.name", "")
    if not name and any(mark in ref for mark in "/:@"):
        name = ref
    if not name:
        raise StackError(f"{archive} names no image (no io.containerd.image.name annotation)")
    return str(name)


class Cluster(Stoppable):
    """A running single-node cluster. Use as a context manager, or call stop().

    .apiserver is the KubeAPIServer (admin token, .kubeconfig, .api_client());
    .node_name the one node; .node_ip its address, reachable from the host.
    """

    def __init__(self, ledger: _Ledger) -> None:
        self._ledger = ledger
        self.name = ledger.name
        self.node_name = ledger.name
        self.node_ip = ledger.node_ip
        self.host_ip = ledger.host_ip
        self.host_veth = ledger.host_veth
        self.workdir = Path(ledger.workdir)
        self.netns_path = NETNS_DIR / ledger.name
        self.containerd_socket = _containerd_socket(self.workdir)
        self.apiserver: KubeAPIServer | None = None
        self._processes: dict[str, ManagedProcess] = {}
        self._stopped = False

    # -- what tests use --------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (group system:masters)."""
        return self._api().kubeconfig

    @property
    def server(self) -> str:
        return self._api().server

    def api_client(self) -> kubernetes.client.ApiClient:
        """The admin's ApiClient; close it (or use it in a `with`) when done."""
        return self._api().api_client()

    def nsenter_prefix(self) -> list[str]:
        """Runs the command after it inside the node's network namespace."""
        return [str(node_system_tool_path("nsenter")), f"--net={self.netns_path}", "--"]

    def exec_in_node(
        self, argv: Sequence[str], *, timeout_s: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the node's network namespace, where pod IPs and
        ClusterIPs are routed; the result whatever its exit code."""
        try:
            return subprocess.run(
                [*self.nsenter_prefix(), *argv],
                capture_output=True, text=True, timeout=timeout_s, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as error:
            raise StackError(
                f"{shlex.join(argv)} in {self.name}: no answer in {timeout_s:.0f} s"
            ) from error

    def import_image(self, archive: Path) -> str:
        """Import an OCI image archive into the node's containerd (`ctr -n k8s.io
        images import`); return the image's name, for a pod's `image`."""
        _run(
            [
                str(node_system_tool_path("ctr")),
                f"--address={self.containerd_socket}",
                "--namespace=k8s.io",
                "images",
                "import",
                str(archive),
            ]
        )
        return image_name(archive)

    def crictl(self, *args: str) -> str:
        """Run crictl against the node's containerd; its stdout."""
        endpoint = f"unix://{self.containerd_socket}"
        return _run(
            [
                str(kube_node_binary_path("crictl")),
                f"--runtime-endpoint={endpoint}",
                f"--image-endpoint={endpoint}",
                "--timeout=30s",
                *args,
            ]
        )

    def pids(self) -> set[int]:
        """Every process of the cluster: in its namespace or its cgroups."""
        return _pids_in_netns(self.name) | _pids_in_cgroups(self.name)

    def restart_kubelet(self, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """Stop the kubelet (SIGTERM, as `systemctl restart kubelet` does) and
        start it again with the same arguments; return once it has posted a
        Ready node status after its start. Pods keep running meanwhile:
        containerd and the shims hold them. The old log is kept as
        kubelet.log.1."""
        process = self._processes["kubelet"]
        # nsenter execs the kubelet, so the process's own argv is the kubelet's.
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        process.stop()
        process.log_path.rename(process.log_path.with_name("kubelet.log.1"))
        # The node status stores whole seconds: start in a second the old
        # kubelet did not live in, so that its heartbeats cannot count.
        started = int(time.time()) + 1
        time.sleep(max(0.0, started - time.time()))
        self._launch("kubelet", argv)

        def ready_since_restart() -> bool:
            core = kubernetes.client.CoreV1Api(api)
            node = core.read_node(self.node_name, _request_timeout=5)
            ready = [c for c in node.status.conditions or () if c.type == "Ready"]
            return (
                bool(ready)
                and ready[0].status == "True"
                and ready[0].last_heartbeat_time.timestamp() >= started
            )

        with self.api_client() as api:
            deadline = time.monotonic() + timeout_s
            self._wait(ready_since_restart, "Ready again after a kubelet restart", deadline)

    # -- start -----------------------------------------------------------------

    def _api(self) -> KubeAPIServer:
        if self.apiserver is None:
            raise StackError(f"cluster {self.name} has no apiserver running")
        return self.apiserver

    def _start(self, deadline: float) -> None:
        self._create_network()
        pki = self._write_pki()
        self._write_containerd_config()
        self._launch("containerd", [
            str(node_system_tool_path("containerd")),
            f"--config={self.workdir / 'containerd' / 'config.toml'}",
        ])  # fmt: skip
        self.apiserver = start_kube_apiserver(
            self.workdir / "apiserver",
            timeout_s=max(deadline - time.monotonic(), 1.0),
            address=self.node_ip,
            command_prefix=self.nsenter_prefix(),
            authorization_mode="Node,RBAC",
            service_cluster_ip_range=SERVICE_CIDR,
            extra_args=[
                "--enable-admission-plugins=NodeRestriction",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",
            ],
        )
        self._wait(self.containerd_socket.exists, "containerd serving", deadline, ("containerd",))
        self.import_image(node_image_archive_path("pause"))
        kubeconfigs = {
            user: write_kubeconfig(
                self.workdir / f"kubeconfig-{user}",
                server=self.apiserver.server,
                ca_file=self.apiserver.ca_file,
                user=user,
                client_cert=(pki / f"{user}.crt", pki / f"{user}.key"),
            )
            for user in ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy")
        }
        self._start_node_agents(kubeconfigs, pki)
        with self.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            self._wait(lambda: self._node_ready(core), "node Ready and schedulable", deadline)

    def _launch(self, component: str, argv: Sequence[str]) -> None:
        # A proxy from the environment would take the components' calls to
        # the apiserver and kubelet, and nothing is routed to it from here.
        env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}
        self._processes[component] = ManagedProcess(
            component,
            [*self.nsenter_prefix(), *argv],
            self.workdir / f"{component}.log",
            {**env, "PATH": COMPONENT_PATH},
        )

    def _wait(
        self,
        ready: Callable[[], bool],
        what: str,
        deadline: float,
        components: Sequence[str] | None = None,
    ) -> None:
        """Poll `ready` until `deadline`; fail at once when a component exits."""
        while True:
            for name in components or list(self._processes):
                process = self._processes[name]
                if not process.running():
                    raise ServerExited(
                        f"{name} exited before {what}; its log ({process.log_path}) "
                        f"ends:\n{process.log_tail()}"
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                logs = ", ".join(str(process.log_path) for process in self._processes.values())
                raise StackError(f"cluster {self.name}: not {what} in time; logs: {logs}")
            time.sleep(POLL_INTERVAL_S)

    def _create_network(self) -> None:
        ip = str(node_system_tool_path("ip"))
        iptables = str(node_system_tool_path("iptables"))
        name, veth = self.name, self.host_veth
        _run([ip, "netns", "add", name])
        _run([ip, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name])
        _run([ip, "addr", "add", f"{self.host_ip}/30", "dev", veth])
        _run([ip, "link", "set", veth, "up"])
        # The host forwards nothing to or from the node, even when something
        # turns ip_forward on meanwhile (podman's networks do).
        for direction in ("-i", "-o"):
            _run([
                iptables, "-w", "5", "-I", "FORWARD", direction, veth,
                "-m", "comment", "--comment", name, "-j", "DROP",
            ])  # fmt: skip
        inside = [ip, "-n", name]
        _run([*inside, "link", "set", "lo", "up"])
        _run([*inside, "addr", "add", f"{self.node_ip}/30", "dev", "eth0"])
        _run([*inside, "link", "set", "eth0", "up"])
        # No default route. The node's own connections to ClusterIPs need a
        # route before kube-proxy's DNAT rewrites them; a bridge with no ports
        # swallows whatever no Service claims.
        _run([*inside, "link", "add", "svc-sink", "type", "bridge"])
        _run([*inside, "link", "set", "svc-sink", "up"])
        _run([*inside, "route", "add", SERVICE_CIDR, "dev", "svc-sink"])
        # The bridge CNI plugin turns forwarding on in the namespace; pods may
        # still not reach past the node (the host end of the veth).
        _run([
            *self.nsenter_prefix(), iptables, "-w", "5", "-I", "FORWARD", "-o", "eth0",
            "-j", "DROP",
        ])  # fmt: skip

    def _write_pki(self) -> Path:
        """A CA and the client certificates of the kubelet, the apiserver's
        kubelet client and the controllers, all EC P-256."""
        pki = self.workdir / "pki"
        pki.mkdir()
        new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        run_openssl(
            "req", "-x509", "-new", *new_key, "-days", "3650",
            "-subj", f"/CN={self.name}-ca",
            "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"),
        )  # fmt: skip
        subjects = {
            # The Node authorizer and NodeRestriction know a kubelet by these.
            "kubelet": f"/O=system:nodes/CN=system:node:{self.node_name}",
            # system:masters: the kubelet's webhook authorization lets it read
            # logs and exec.
            "apiserver-kubelet-client": "/O=system:masters/CN=kube-apiserver-kubelet-client",
            # The users Kubernetes' bootstrap RBAC binds the components' roles to.
            "kube-scheduler": "/CN=system:kube-scheduler",
            "kube-controller-manager": "/CN=system:kube-controller-manager",
            "kube-proxy": "/CN=system:kube-proxy",
        }
        for user, subject in subjects.items():
            run_openssl(
                "req", "-x509", "-new", *new_key, "-days", "365", "-subj", subject,
                "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
                "-addext", "basicConstraints=critical,CA:FALSE",
                "-addext", "keyUsage=critical,digitalSignature",
                "-addext", "extendedKeyUsage=clientAuth",
                "-keyout", str(pki / f"{user}.key"), "-out", str(pki / f"{user}.crt"),
            )  # fmt: skip
        return pki

    def _write_containerd_config(self) -> None:
        base = self.workdir / "containerd"
        cni_conf = self.workdir / "cni" / "net.d"
        cni_conf.mkdir(parents=True)
        # Unix socket paths are limited to 108 bytes; the shims' ttrpc socket
        # adds ".ttrpc".
        if len(str(self.containerd_socket)) > 100:
            raise StackError(
                f"workdir {self.workdir} is too deep for containerd's socket "
                f"({self.containerd_socket}); use a shorter one"
            )
        sandbox_image = image_name(node_image_archive_path("pause"))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{base / "root"}"
state = "{base / "state"}"

[grpc]
  address = "{self.containerd_socket}"

# Its default, /opt/containerd, is outside the workdir.
[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"

[{cri}]
  sandbox_image = "{sandbox_image}"
  # Root lacks CAP_SYS_RESOURCE here: negative OOM scores fail.
  restrict_oom_score_adj = true
  # Pod network namespaces under the workdir, not /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  BinaryName = "{node_system_tool_path("runc")}"
  # runc's state, by default in /run/containerd/runc.
  Root = "{base / "runc"}"
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{cni_bin_dir()}"
  conf_dir = "{cni_conf}"
"""
        base.mkdir(exist_ok=True)
        (base / "config.toml").write_text(config)
        network = {
            "cniVersion": "1.0.0",
            "name": "bp-pods",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    # Nothing beyond the node to masquerade to.
                    "ipMasq": False,
                    # A pod reaching itself through a Service.
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        # Its default, /var/lib/cni/networks, is outside the workdir.
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                }
            ],
        }
        (cni_conf / "10-bp-pods.conflist").write_text(json.dumps(network, indent=1))

    def _start_node_agents(self, kubeconfigs: dict[str, Path], pki: Path) -> None:
        api = self._api()
        kubelet_dir = self.workdir / "kubelet"
        kubelet_config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "cgroupDriver": "cgroupfs",
            # Created below in every hierarchy; kubepods goes under it.
            "cgroupRoot": f"/{self.name}",
            "failSwapOn": False,
            "failCgroupV1": False,
            # Root lacks CAP_SYS_RESOURCE here: the default -999 fails.
            "oomScoreAdj": 0,
            # The images were imported by hand; no registry gives them back.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            # The machine's disk is shared with builds: the default 10-15%
            # free thresholds would evict the tests' pods over others' files.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            # No cluster DNS, and no host resolver settings copied into pods.
            "resolvConf": "",
            # Both default to host folders.
            "podLogsDir": str(self.workdir / "pod-logs"),
            "volumePluginDir": str(kubelet_dir / "volume-plugins"),
        }
        (self.workdir / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config))
        proxy_config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(kubeconfigs["kube-proxy"])},
            "hostnameOverride": self.node_name,
            "bindAddress": self.node_ip,
            "clusterCIDR": POD_CIDR,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # NodePorts on the node's address only, not on its loopback.
            "nodePortAddresses": ["primary"],
            # Zero leaves the host's conntrack table size (a module parameter,
            # shared by every namespace) and timeouts as they are.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }
        (self.workdir / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy_config))
        # The kubelet refuses a cgroup root that does not exist. A v1 cpuset
        # cgroup starts with no CPUs or memory nodes: copy its parent's.
        for mount in cgroup_mounts():
            (mount / self.name).mkdir(exist_ok=True)
            if (mount / "cpuset.cpus").exists():
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (mount / self.name / knob).write_text((mount / knob).read_text())
        self._launch("kube-controller-manager", [
            str(kube_node_binary_path("kube-controller-manager")),
            f"--kubeconfig={kubeconfigs['kube-controller-manager']}",
            f"--authentication-kubeconfig={kubeconfigs['kube-controller-manager']}",
            f"--authorization-kubeconfig={kubeconfigs['kube-controller-manager']}",
            "--bind-address=127.0.0.1",
            # One of each: no election to wait for.
            "--leader-elect=false",
            # Each controller acts as its own ServiceAccount, as in kubeadm's clusters.
            "--use-service-account-credentials=true",
            f"--root-ca-file={api.ca_file}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            # The CNI config fixes the one node's pod range.
            "--allocate-node-cidrs=false",
            # Its default is a host folder, which it creates.
            f"--flex-volume-plugin-dir={self.workdir / 'kube-controller-manager-volume-plugins'}",
            f"--cluster-name={self.name}",
        ])  # fmt: skip
        self._launch("kube-scheduler", [
            str(kube_node_binary_path("kube-scheduler")),
            f"--kubeconfig={kubeconfigs['kube-scheduler']}",
            f"--authentication-kubeconfig={kubeconfigs['kube-scheduler']}",
            f"--authorization-kubeconfig={kubeconfigs['kube-scheduler']}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
        ])  # fmt: skip
        self._launch("kubelet", [
            str(kube_node_binary_path("kubelet")),
            f"--config={self.workdir / 'kubelet.yaml'}",
            f"--kubeconfig={kubeconfigs['kubelet']}",
            f"--root-dir={kubelet_dir}",
            # Its default is /var/lib/kubelet/pki, whatever the root dir.
            f"--cert-dir={kubelet_dir / 'pki'}",
            f"--node-ip={self.node_ip}",
            f"--hostname-override={self.node_name}",
        ])  # fmt: skip
        self._launch("kube-proxy", [
            str(kube_node_binary_path("kube-proxy")),
            f"--config={self.workdir / 'kube-proxy.yaml'}",
        ])  # fmt: skip

    def _node_ready(self, core: kubernetes.client.CoreV1Api) -> bool:
        try:
            node = core.read_node(self.node_name, _request_timeout=5)
            # Pods are refused until the controller manager made this.
            core.read_namespaced_service_account("default", "default", _request_timeout=5)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return False
            raise
        conditions = (node.status.conditions if node.status else None) or []
        ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
        # The node lifecycle controller lifts not-ready's NoSchedule taint a
        # moment after Ready; until then nothing schedules.
        taints = (node.spec.taints if node.spec else None) or []
        blocking = [taint for taint in taints if taint.effect == "NoSchedule"]
        return ready and not blocking

    # -- stop ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything and remove all the cluster made outside its logs.
        Safe to call twice. Raises StackError naming what could not be removed."""
        if self._stopped:
            return
        self._stopped = True
        agents = [
            self._processes[name]
            for name in ("kube-controller-manager", "kube-scheduler", "kube-proxy", "kubelet")
            if name in self._processes
        ]
        for process in agents:
            process.terminate()
        if self.apiserver is not None:
            self.apiserver.process.terminate()
        for process in agents:
            process.stop()
        containerd = self._processes.get("containerd")
        if containerd is not None and containerd.running():
            # With the kubelet gone nothing recreates them: containerd stops
            # every pod and unmounts its root, shm and network namespace. If
            # it cannot, _dismantle kills and unmounts what is left.
            with contextlib.suppress(StackError):
                self.crictl("rmp", "--all", "--force")
            containerd.stop()
        if self.apiserver is not None:
            self.apiserver.stop()
        with _ledger_lock():
            _dismantle(self._ledger)
            _last_out()
        # Image layers and pod data: tens of MB a run. The logs stay.
        for bulky in ("containerd", "kubelet", "pod-logs", "cni"):
            shutil.rmtree(self.workdir / bulky, ignore_errors=True)


def start_cluster(workdir: Path, *, timeout_s: float = START_TIMEOUT_S) -> Cluster:
    """Start a single-node cluster whose files (logs, configs, certificates,
    containerd's and the kubelet's state) go under `workdir`, new or empty;
    return once the node is Ready and schedulable and the default
    ServiceAccount exists.

    First dismantles what crashed runs left (see the module's docstring).
    Raises StackError naming the cause and its fix; everything started so far
    is then removed again.
    """
    deadline = time.monotonic() + timeout_s
    _preflight()
    workdir = workdir.resolve()
    # Everything mounted under it is unmounted at stop: it must be the node's alone.
    if workdir.exists() and any(workdir.iterdir()):
        raise StackError(f"a node's workdir must be new or empty: {workdir} is not")
    workdir.mkdir(parents=True, exist_ok=True)
    with _ledger_lock():
        _clear_leftovers()
        ledger = _new_ledger(workdir)
        _first_in()
        ledger.save()
    cluster = Cluster(ledger)
    try:
        cluster._start(deadline)
    except BaseException:
        with contextlib.suppress(StackError):
            cluster.stop()
        raise
    return cluster
