"""A real kube-apiserver (v1.33, etcd embedded in the same process) on loopback.

(tests/stack/node.py runs the same server for a real node: inside the node's network
namespace, on its address, with the Node authorizer and kubelet credentials;
see start_kube_apiserver's arguments. What follows describes the loopback one.)

What runs and what does not:

* Authentication: a static token file with one admin, `admin` in group
  `system:masters`; ServiceAccount tokens from the TokenRequest API, signed with
  an EC P-256 key generated here by openssl.
* Authorization: RBAC only, as in a real cluster, so a ServiceAccount without
  bindings is denied.
* Serving: the secure port only, with the self-signed certificate the apiserver
  writes into `--cert-dir` (SANs include 127.0.0.1); that file, which holds the
  serving certificate and its CA, is the kubeconfig's CA.
* Admission: the stock default plugins. No kube-controller-manager runs, so
  nothing creates a namespace's `default` ServiceAccount, and the ServiceAccount
  admission plugin rejects every pod until it exists. Instead of turning that
  plugin off (pods would then lack the serviceAccountName and token volume a
  real cluster gives them), `batchpilot.sim.sandbox.kube.create_namespace` creates the
  ServiceAccount as the controller would. Also absent with the controller
  manager: namespace deletion (a deleted namespace stays Terminating; use
  unique names), garbage collection of ownerReferences, Deployments making
  pods. No scheduler or kubelet either: `batchpilot.sim.sandbox.kube.create_serving_pod` writes
  a Running, Ready pod status itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import secrets
import shutil
import ssl
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import kubernetes
import yaml

from .process import (
    ADDRESS_IN_USE,
    ManagedProcess,
    ServerExited,
    Stoppable,
    free_loopback_port,
    http_ok,
    start_with_port_retry,
)
from .tools import StackError, kube_apiserver_path, run_openssl

# Ready in 3.8-5.9 s (median 4.7 s, 5 runs, load average 2.5 on 2 cores);
# other engineers' builds share those cores, so allow far more.
START_TIMEOUT_S = 90.0
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "admin"


def _generate_service_account_key(workdir: Path) -> tuple[Path, Path]:
    """An EC P-256 key pair for signing and verifying ServiceAccount tokens."""
    private_key = workdir / "service-account.key"
    public_key = workdir / "service-account.pub"
    run_openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-out", str(private_key),
    )  # fmt: skip
    run_openssl("pkey", "-in", str(private_key), "-pubout", "-out", str(public_key))
    return private_key, public_key


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_file: Path,
    user: str,
    token: str | None = None,
    client_cert: tuple[Path, Path] | None = None,
    namespace: str | None = None,
) -> Path:
    """Write a kubeconfig for `server` (verified against `ca_file`) as bearer
    `token`, or with the client certificate and key `client_cert`; its
    context's default namespace is `namespace` when given.

    `user` names the kubeconfig's user and context. Mode 0600: it holds a credential.
    """
    if client_cert is None:
        credential = {"token": token}
    else:
        credential = {
            "client-certificate": str(client_cert[0]),
            "client-key": str(client_cert[1]),
        }
    context = {"cluster": "batchpilot-test", "user": user}
    if namespace is not None:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "batchpilot-test",
                "cluster": {"server": server, "certificate-authority": str(ca_file)},
            }
        ],
        "users": [{"name": user, "user": credential}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


class KubeAPIServer(Stoppable):
    """A running apiserver. Use as a context manager, or call stop()."""

    def __init__(
        self,
        *,
        workdir: Path,
        owns_workdir: bool,
        address: str,
        port: int,
        token: str,
        argv: Sequence[str],
        env: Mapping[str, str],
    ) -> None:
        self.workdir = workdir
        self.server = f"https://{address}:{port}"
        self.token = token
        """Bearer token of the admin (group system:masters)."""
        self.ca_file = workdir / "certs" / "apiserver.crt"
        self.kubeconfig = self._kubeconfig_path(ADMIN_USER)
        """The admin's kubeconfig."""
        self._owns_workdir = owns_workdir
        # Kept so that a restart runs the very same command: same ports, etcd
        # data dir, certificates and token file.
        self._argv = list(argv)
        self._env = dict(env)
        self._starts = 0
        self.process = self._launch()

    def _launch(self) -> ManagedProcess:
        self._starts += 1
        # One log per start, so a restart keeps the log of the run before it.
        suffix = "" if self._starts == 1 else f"-{self._starts}"
        log_path = self.workdir / f"kube-apiserver{suffix}.log"
        return ManagedProcess("kube-apiserver", self._argv, log_path, self._env)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.process.wait_until(self._ready, timeout_s, "ready (/readyz)")

    def _ready(self) -> bool:
        # The apiserver writes its certificate before it serves; until then, or
        # while the file is half written, there is nothing to verify against.
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file))
        except (FileNotFoundError, ssl.SSLError):
            return False
        return http_ok(
            f"{self.server}/readyz",
            headers={"Authorization": f"Bearer {self.token}"},
            ssl_context=context,
        )

    def _kubeconfig_path(self, user: str) -> Path:
        return self.workdir / f"kubeconfig-{user}"

    def kubeconfig_for(self, token: str, user: str) -> Path:
        """Write a kubeconfig that authenticates with `token`; return its path.

        `user` names the file and the kubeconfig's user entry (e.g. the
        ServiceAccount's name), so several can sit side by side.
        """
        return write_kubeconfig(
            self._kubeconfig_path(user),
            server=self.server,
            ca_file=self.ca_file,
            token=token,
            user=user,
        )

    def api_client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        """A kubernetes ApiClient loaded from a kubeconfig, as the operator loads one.

        The admin's by default; pass a ServiceAccount token for that identity.
        Close it (or use it in a `with`) when done.
        """
        if token is None:
            kubeconfig = self.kubeconfig
        else:
            token_digest = hashlib.sha256(token.encode()).hexdigest()[:12]
            kubeconfig = self.kubeconfig_for(token, f"token-{token_digest}")
        api: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(
            config_file=str(kubeconfig)
        )
        return api

    @contextlib.contextmanager
    def outage(self, *, graceful: bool = False) -> Iterator[None]:
        """Stop the server for the `with` block, then start it again and wait for /readyz.

        Without `graceful` the process is SIGKILLed, etcd with it, as a crashed
        or OOM-killed control plane goes: open watches and keep-alive
        connections break without a goodbye. With it, SIGTERM: the apiserver
        drains its requests and ends open watches (within 2 s) first. Inside the block
        connections to .server are refused. The restarted server has the same
        address, certificates, token and etcd data, so kubeconfigs and every
        object survive. Raises StackError when a port was taken meanwhile.
        """
        if graceful:
            self.process.stop()
        else:
            self.process.kill()
        yield
        self.process = self._launch()
        try:
            self.wait_ready()
        except ServerExited as error:
            if self.process.log_contains(ADDRESS_IN_USE):
                raise StackError(
                    f"kube-apiserver could not restart on {self.server} or its etcd ports: "
                    "another process took one of them while it was down; its log "
                    f"({self.process.log_path}) ends:\n{self.process.log_tail()}"
                ) from error
            raise

    def restart(self, *, graceful: bool = False) -> None:
        """Stop and start again at once; see outage()."""
        with self.outage(graceful=graceful):
            pass

    def stop(self) -> None:
        """Stop the server and delete its etcd data (and the workdir if it made it)."""
        self.process.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            for etcd_dir in self.workdir.glob("etcd-*"):
                shutil.rmtree(etcd_dir, ignore_errors=True)


def start_kube_apiserver(
    workdir: Path | None = None,
    *,
    timeout_s: float = START_TIMEOUT_S,
    address: str = "127.0.0.1",
    command_prefix: Sequence[str] = (),
    authorization_mode: str = "RBAC",
    service_cluster_ip_range: str = "10.0.0.0/24",
    extra_args: Sequence[str] = (),
) -> KubeAPIServer:
    """Start an apiserver on free loopback ports and wait for /readyz.

    Everything it writes (certificates, keys, token file, kubeconfigs, etcd
    data, kube-apiserver.log) goes into `workdir`; without one, a temporary
    directory that stop() deletes (kept when the start fails: the error points
    at the log in it). Raises StackError (naming the fix) when a binary is
    missing or the server does not come up.

    A node (tests/stack/node.py) serves it on `address`, the node's own address, and
    runs it through `command_prefix` (nsenter into the node's fresh network
    namespace, where the ports picked free here are free too; etcd stays on
    that namespace's loopback), with its
    `authorization_mode`, Service range and `extra_args` (admission, kubelet
    client certificate); the server's self-signed certificate then names
    `address` and the first Service IP too.
    """
    binary = str(kube_apiserver_path())
    owns_workdir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="batchpilot-kube-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    signing_key, verification_key = _generate_service_account_key(workdir)
    token = secrets.token_hex(16)
    token_file = workdir / "tokens.csv"
    token_file.write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
    token_file.chmod(0o600)

    def launch() -> KubeAPIServer:
        port, etcd_client_port, etcd_peer_port = (free_loopback_port() for _ in range(3))
        etcd_client_url = f"http://127.0.0.1:{etcd_client_port}"
        argv = [
            *command_prefix,
            binary,
            f"--etcd-servers={etcd_client_url}",
            f"--bind-address={address}",
            f"--advertise-address={address}",
            f"--secure-port={port}",
            f"--cert-dir={workdir / 'certs'}",
            f"--token-auth-file={token_file}",
            f"--authorization-mode={authorization_mode}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={verification_key}",
            f"--service-account-signing-key-file={signing_key}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            # On loopback never routed: nothing there sends traffic to service IPs.
            f"--service-cluster-ip-range={service_cluster_ip_range}",
            # On SIGTERM, end open watches within 2 s: without it the shutdown
            # waits for them until its 60 s timeout (measured: 60.0 s with one
            # watch open, 1.2 s with this flag).
            "--shutdown-watch-termination-grace-period=2s",
            *extra_args,
        ]
        if ipaddress.ip_address(address).is_loopback:
            # The `kubernetes` Service's endpoint would be 127.0.0.1, which
            # Endpoints validation rejects as loopback, every 10 s in the log.
            argv.append("--endpoint-reconciler-type=none")
        env = {
            **os.environ,
            # Read by hack/kube-apiserver/main.go. A fresh data dir per attempt:
            # etcd refuses to reuse one created with other peer URLs.
            "BATCHPILOT_ETCD_DIR": tempfile.mkdtemp(prefix="etcd-", dir=workdir),
            "BATCHPILOT_ETCD_CLIENT_URL": etcd_client_url,
            "BATCHPILOT_ETCD_PEER_URL": f"http://127.0.0.1:{etcd_peer_port}",
        }
        return KubeAPIServer(
            workdir=workdir,
            owns_workdir=owns_workdir,
            address=address,
            port=port,
            token=token,
            argv=argv,
            env=env,
        )

    def wait_ready(server: KubeAPIServer) -> None:
        server.wait_ready(timeout_s)

    server = start_with_port_retry(launch, wait_ready)
    server.kubeconfig_for(token, ADMIN_USER)
    return server
