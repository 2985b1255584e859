"""The examples work as shipped: they apply against the real API server, the
gate sidecars' arguments are ones the gate accepts, each Deployment matches
the policy example written for it, and the GitOps files point at the chart
with values its schema accepts.

Argo CD's Application and Flux's GitRepository/HelmRelease are not applied:
the test API server has none of their CRDs and kubernetes-validate has no
schema for them. What is checked instead is what can drift on our side: the
chart path, the release values (rendered through the chart's schema) and the
cross-references between the Flux objects.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from stack import KubeAPIServer, create_crd

from batchpilot.gate.settings import load_settings
from batchpilot.sim.sandbox.tools import StackError, helm_path, kubectl_path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
GITOPS = EXAMPLES / "gitops"
CHART = REPO / "helm" / "batchpilot"
GITOPS_KINDS = {"Application", "GitRepository", "HelmRelease"}
KUBERNETES_VERSION = "1.33.0"
MANIFESTS = sorted(path.name for path in EXAMPLES.glob("*.yaml"))
WORKLOADS = ["vllm-deployment.yaml", "sglang-deployment.yaml", "llamacpp-deployment.yaml"]


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(docs: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    (match,) = [doc for doc in docs if doc["kind"] == kind]
    return match


def _tool(find: Any) -> Path:
    try:
        return find()
    except StackError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.mark.parametrize("example", MANIFESTS)
def test_example_applies_server_side(
    example: str, kubectl: Path, kube_api: KubeAPIServer, k8s_client: client.ApiClient, namespace: str
) -> None:
    crd = yaml.safe_load((REPO / "crds" / "inferencepolicy.yaml").read_text())
    try:
        create_crd(k8s_client, crd)
    except ApiException as error:
        if error.status != 409:  # 409: another test installed it already
            raise
    docs = load(EXAMPLES / example)
    result = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kube_api.kubeconfig), "apply", "--server-side",
         "--dry-run=server", "-n", namespace, "-f", str(EXAMPLES / example)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("serverside-applied (server dry run)") == len(docs), result.stdout


def test_gitops_namespace_applies_server_side(kubectl: Path, kube_api: KubeAPIServer) -> None:
    built = subprocess.run([str(kubectl), "kustomize", str(GITOPS)], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    core_objects = [doc for doc in yaml.safe_load_all(built) if doc and doc["kind"] not in GITOPS_KINDS]
    assert [doc["kind"] for doc in core_objects] == ["Namespace"]
    result = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kube_api.kubeconfig), "apply", "--server-side",
         "--dry-run=server", "-f", "-"],
        input=yaml.safe_dump_all(core_objects), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("example", WORKLOADS)
def test_workload_examples_are_valid_kubernetes_1_33(example: str) -> None:
    for doc in load(EXAMPLES / example):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# --- images: the placeholders docs/install.md builds, listed there in one place ---------


def _containers_by_example() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for example in MANIFESTS:
        for doc in load(EXAMPLES / example):
            if doc["kind"] in ("Pod", "Deployment", "StatefulSet"):
                pod = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
                found += [(example, container) for container in pod["containers"]]
    return found


def test_batchpilot_images_are_the_ones_install_md_builds_and_lists() -> None:
    install = (REPO / "docs" / "install.md").read_text()
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    built = {
        ref.rpartition("/")[2].partition(":")[0]: ref
        for ref in re.findall(r"^docker build .* -t (\S+) \.$", install, flags=re.MULTILINE)
    }
    # One placeholder registry, the chart's version: what the image table lists.
    assert built == {
        name: f"<your-registry>/batchpilot/{name}:{app_version}" for name in ("operator", "gate")
    }
    assert [ref for ref in built.values() if f"| `{ref}` |" not in install] == []

    containers = _containers_by_example()
    gates = {example: c["image"] for example, c in containers if c["name"] == "gate"}
    assert set(gates) >= {*WORKLOADS, "gate-sidecar-pod.yaml"}
    assert {example: image for example, image in gates.items() if image != built["gate"]} == {}
    # No other image of ours under another name (a registry that is not a placeholder).
    assert [
        c["image"]
        for _, c in containers
        if "batchpilot" in c["image"] and c["image"] not in built.values()
    ] == []
    # The chart is installed with the operator image built above, in every doc.
    operator_repository = built["operator"].rpartition(":")[0]
    for doc in (REPO / "README.md", REPO / "docs" / "install.md"):
        repositories = set(re.findall(r"image\.repository=(\S+)", doc.read_text()))
        assert repositories == {operator_repository}, doc.name


# --- the gate sidecar and the policy each Deployment is written for -------------------


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def flags(container: dict[str, Any]) -> dict[str, str]:
    """--name=value arguments as {name: value}; a bare --flag maps to ''."""
    parsed = {}
    for arg in container["args"]:
        assert arg.startswith("--"), f"{container['name']}: write arguments as --name=value, got {arg!r}"
        name, _, value = arg[2:].partition("=")
        parsed[name] = value
    return parsed


def separate_flags(container: dict[str, Any]) -> dict[str, str]:
    """llama-server's `--name value` arguments (it rejects --name=value) as
    {name: value}; a bare --flag maps to ''."""
    args = container["args"]
    parsed = {}
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            assert index > 0 and args[index - 1].startswith("--"), f"{container['name']}: {arg!r} follows no flag"
            continue
        assert "=" not in arg, f"{container['name']}: write {arg!r} as two arguments, --name and value"
        following = args[index + 1] if index + 1 < len(args) else "--"
        parsed[arg[2:]] = "" if following.startswith("--") else following
    return parsed


@pytest.mark.parametrize("example", WORKLOADS)
def test_gate_arguments_are_accepted_by_the_gate(example: str) -> None:
    gate = containers(one(load(EXAMPLES / example), "Deployment"))["gate"]
    overrides = {name.replace("-", "_"): value for name, value in flags(gate).items()}
    settings = load_settings(overrides, {})
    ports = {port["name"]: port["containerPort"] for port in gate["ports"]}
    assert settings.listen.endswith(f":{ports['http']}")
    assert settings.admin.endswith(f":{ports['gate-admin']}")
    mounts = {m["name"]: m["mountPath"] for m in gate["volumeMounts"]}
    assert str(settings.token_file).startswith(mounts["gate-token"] + "/")
    assert str(settings.annotations_file).startswith(mounts["podinfo"] + "/")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        assert gate[probe]["httpGet"] == {"path": path, "port": "gate-admin"}


@pytest.mark.parametrize("example", WORKLOADS)
def test_service_sends_clients_to_the_gate_not_the_engine(example: str) -> None:
    docs = load(EXAMPLES / example)
    service, deployment = one(docs, "Service"), one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    gate_ports = {p["name"] for p in containers(deployment)["gate"]["ports"]}
    assert port["targetPort"] in gate_ports - {"gate-admin"}


# (deployment example, policy example, engine container, flag for maxNumSeqs,
#  flag for maxNumBatchedTokens, flag for kvCacheTokens where the policy declares it)
PAIRS = [
    ("vllm-deployment.yaml", "policy-auto.yaml", "vllm", "max-num-seqs", "max-num-batched-tokens", None),
    ("sglang-deployment.yaml", "policy-sglang-native.yaml", "sglang", "max-running-requests",
     "chunked-prefill-size", None),
    ("llamacpp-deployment.yaml", "policy-llamacpp.yaml", "llamacpp", "parallel", "batch-size", "ctx-size"),
]


@pytest.mark.parametrize(("example", "policy_example", "engine", "seqs_flag", "tokens_flag", "kv_flag"), PAIRS)
def test_deployment_matches_its_policy_example(
    example: str, policy_example: str, engine: str, seqs_flag: str, tokens_flag: str, kv_flag: str | None
) -> None:
    deployment = one(load(EXAMPLES / example), "Deployment")
    spec = one(load(EXAMPLES / policy_example), "InferencePolicy")["spec"]
    pod = deployment["spec"]["template"]
    by_name = containers(deployment)
    engine_args = separate_flags if engine == "llamacpp" else flags
    engine_flags, gate_flags = engine_args(by_name[engine]), flags(by_name["gate"])

    if "targetRef" in spec:
        assert spec["targetRef"] == {"kind": "Deployment", "name": deployment["metadata"]["name"]}
    else:
        assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # The engine's startup flags are the ceilings the policy declares.
    assert spec["engine"]["kind"] == engine
    assert int(engine_flags[seqs_flag]) == spec["engine"]["maxNumSeqs"]
    assert int(engine_flags[tokens_flag]) == spec["engine"]["maxNumBatchedTokens"]
    if kv_flag is None:
        assert "kvCacheTokens" not in spec["engine"]
    else:
        assert int(engine_flags[kv_flag]) == spec["engine"]["kvCacheTokens"]
    # The operator reaches the gate where the policy says, with the token the gate reads.
    actuation = spec["actuation"]
    admin_port = int(gate_flags["admin"].rpartition(":")[2])
    assert admin_port == actuation.get("adminPort", 9090)
    token_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "gate-token")
    assert token_volume["secret"]["secretName"] == actuation["tokenSecretRef"]["name"]
    token_key = actuation["tokenSecretRef"].get("key", "token")
    assert gate_flags["token-file"].endswith("/" + token_key)
    assert (gate_flags.get("native") == engine) == bool(actuation.get("native"))


def test_llamacpp_example_shares_its_kv_cache_and_exports_metrics() -> None:
    by_name = containers(one(load(EXAMPLES / "llamacpp-deployment.yaml"), "Deployment"))
    engine, gate = separate_flags(by_name["llamacpp"]), flags(by_name["gate"])
    # Without --kv-unified each slot gets ctx-size / parallel tokens, and the
    # policy's kvCacheTokens would overstate what one long request can use.
    assert "kv-unified" in engine
    # The llamacpp:* series the policy's engine kind reads exist only with --metrics.
    assert "metrics" in engine
    # The gate forwards to the engine's port, which Prometheus must reach too.
    assert gate["upstream"] == f"http://127.0.0.1:{engine['port']}"
    assert engine["host"] == "0.0.0.0"
    assert {"name": "engine", "containerPort": int(engine["port"])} in by_name["llamacpp"]["ports"]


# --- GitOps -------------------------------------------------------------------------------


def _render_chart(release: str, namespace: str, values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = subprocess.run(
        [str(_tool(helm_path)), "template", release, str(CHART), "--namespace", namespace,
         "-f", str(values_file)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_argocd_application_installs_the_chart_with_valid_values(tmp_path: Path) -> None:
    application = one(load(GITOPS / "argocd-application.yaml"), "Application")
    source = application["spec"]["source"]
    assert (REPO / source["path"] / "Chart.yaml").is_file()
    chart = yaml.safe_load((REPO / source["path"] / "Chart.yaml").read_text())
    assert source["targetRevision"] == f"v{chart['version']}"
    docs = _render_chart(source["helm"]["releaseName"], application["spec"]["destination"]["namespace"],
                         source["helm"]["valuesObject"], tmp_path)
    assert {"ServiceMonitor", "PrometheusRule"} <= {doc["kind"] for doc in docs}
    assert "ServerSideApply=true" in application["spec"]["syncPolicy"]["syncOptions"]


def test_flux_bundle_is_consistent_and_installs_the_chart_with_valid_values(tmp_path: Path) -> None:
    built = subprocess.run([str(_tool(kubectl_path)), "kustomize", str(GITOPS)], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    docs = [doc for doc in yaml.safe_load_all(built) if doc]
    namespace, source, release = (one(docs, kind) for kind in ("Namespace", "GitRepository", "HelmRelease"))
    chart = release["spec"]["chart"]["spec"]
    assert chart["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"],
                                  "namespace": source["metadata"]["namespace"]}
    assert (REPO / chart["chart"] / "Chart.yaml").is_file()
    chart_meta = yaml.safe_load((REPO / chart["chart"] / "Chart.yaml").read_text())
    assert source["spec"]["ref"]["tag"] == f"v{chart_meta['version']}"
    assert release["metadata"]["namespace"] == namespace["metadata"]["name"]
    rendered = _render_chart(release["spec"]["releaseName"], release["metadata"]["namespace"],
                             release["spec"]["values"], tmp_path)
    assert "Deployment" in {doc["kind"] for doc in rendered}


def test_gitops_values_let_the_operator_read_the_example_gate_token() -> None:
    # The Auto example's Secret must be readable by the operator the GitOps
    # examples install, or its first actuation fails with TokenUnavailable.
    secret = one(load(EXAMPLES / "policy-auto.yaml"), "Secret")["metadata"]["name"]
    argo = one(load(GITOPS / "argocd-application.yaml"), "Application")["spec"]["source"]["helm"]["valuesObject"]
    flux = one(load(GITOPS / "flux-helmrelease.yaml"), "HelmRelease")["spec"]["values"]
    for values in (argo, flux):
        assert secret in values["rbac"]["gateTokenSecretNames"]
