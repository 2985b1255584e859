"""The Helm chart's own RBAC, applied for real, as the identity an operator runs under."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from kubernetes import client

from batchpilot.sim.sandbox.apiserver import KubeAPIServer
from batchpilot.sim.sandbox.fleet import GATE_TOKEN_SECRET
from batchpilot.sim.sandbox.kube import service_account_token, unique_name
from batchpilot.sim.sandbox.tools import helm_path, kubectl_path

CHART = Path(__file__).resolve().parents[2] / "helm" / "batchpilot"
RBAC_KINDS = frozenset(
    {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
)


def chart_identity_kubeconfig(
    kube: KubeAPIServer,
    api: client.ApiClient,
    namespace: str,
    *,
    helm: Path | None = None,
    kubectl: Path | None = None,
) -> Path:
    """A kubeconfig for the Helm chart's own ServiceAccount, its RBAC applied for real.

    An operator run under it, not as an admin, also proves the chart grants
    enough for the whole loop (watch, status, pods, Events, the gate token
    Secret `gate-token`).
    """
    helm, kubectl = helm or helm_path(), kubectl or kubectl_path()
    rendered = subprocess.run(
        [str(helm), "template", unique_name("operator"), str(CHART), "--namespace", namespace,
         "--set", f"watchNamespaces={{{namespace}}}",
         "--set", f"rbac.gateTokenSecretNames={{{GATE_TOKEN_SECRET}}}"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    rbac = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc and doc["kind"] in RBAC_KINDS]
    subprocess.run(
        [str(kubectl), "--kubeconfig", str(kube.kubeconfig), "apply", "--server-side", "-f", "-"],
        input=yaml.safe_dump_all(rbac), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    (account,) = [doc["metadata"]["name"] for doc in rbac if doc["kind"] == "ServiceAccount"]
    return kube.kubeconfig_for(service_account_token(api, namespace, account), account)
