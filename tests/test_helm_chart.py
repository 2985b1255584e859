"""The Helm chart renders what users and the operator expect, without a cluster.

`helm lint --strict`, `helm template` validated against the Kubernetes 1.33
schemas (kubernetes-validate, strict), the values schema, the render-time
`fail` checks, the CRD copy, and the operator configuration the chart writes.
The same rendering applied to a real API server is tests/test_helm_stack.py.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchpilot.operator.config import load_config
from batchpilot.sim.sandbox.tools import StackError, helm_path

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "batchpilot"
ALL_ON_VALUES = CHART / "ci" / "all-on-values.yaml"
KUBERNETES_VERSION = "1.33.0"
# Kinds from the Prometheus Operator: kubernetes-validate has no schema for
# them (and the test API server no CRD); promtool checks the rules instead.
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}

VALUE_SETS = {
    "default": [],
    "all-on": ["-f", str(ALL_ON_VALUES)],
}


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    try:
        return helm_path()
    except StackError as error:
        pytest.fail(str(error), pytrace=False)


def run_helm(helm_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_bin), *args], capture_output=True, text=True, timeout=60)


@functools.cache
def render(helm_bin: Path, *args: str) -> list[dict[str, Any]]:
    """The chart's objects for release batchpilot in namespace batchpilot-system.

    Cached: several tests read the same rendering and none modifies it.
    """
    result = run_helm(helm_bin, "template", "batchpilot", str(CHART),
                      "--namespace", "batchpilot-system", *args)
    assert result.returncode == 0, result.stderr
    return yaml_docs(result.stdout)


def yaml_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_error(helm_bin: Path, *args: str) -> str:
    result = run_helm(helm_bin, "template", "batchpilot", str(CHART), *args)
    assert result.returncode != 0, "expected the render to fail"
    return result.stderr


def only(docs: Sequence[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [doc for doc in docs
               if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_helm_lint_strict_passes(helm_bin: Path, value_set: str) -> None:
    result = run_helm(helm_bin, "lint", "--strict", str(CHART), *VALUE_SETS[value_set])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rendered_objects_are_valid_kubernetes_1_33(helm_bin: Path, value_set: str) -> None:
    # `helm template | kubernetes-validate --strict -k 1.33.0 -`, as a user would run it.
    rendered = run_helm(helm_bin, "template", "batchpilot", str(CHART), *VALUE_SETS[value_set])
    assert rendered.returncode == 0, rendered.stderr
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, "-"],
        input=rendered.stdout, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("ERROR")]
    # Only the Prometheus Operator kinds may go unvalidated (no schema).
    unvalidated = {match for line in lines if line.startswith("WARN")
                   for match in re.findall(r"for kind (\w+)", line)}
    assert unvalidated <= PROMETHEUS_OPERATOR_KINDS
    validated = [line for line in lines if line.startswith("INFO") and "passed" in line]
    assert len(validated) == len(yaml_docs(rendered.stdout)) - len(
        [line for line in lines if line.startswith("WARN")])


CLUSTER_WIDE_KINDS = {
    "ServiceAccount", "ConfigMap", "CustomResourceDefinition", "ClusterRole",
    "ClusterRoleBinding", "Service", "Deployment",
    # The leader election's Lease rights, in the release's namespace.
    "Role", "RoleBinding",
}


@pytest.mark.parametrize(
    ("value_args", "kinds"),
    [
        (VALUE_SETS["default"], CLUSTER_WIDE_KINDS),
        (VALUE_SETS["all-on"], CLUSTER_WIDE_KINDS | {
            "ServiceMonitor", "PrometheusRule", "PodDisruptionBudget"}),
        # Everything optional off: bring your own CRD, ServiceAccount and RBAC.
        (["--set", "crds.enabled=false", "--set", "rbac.create=false", "--set", "serviceAccount.create=false",
          "--set", "serviceAccount.name=existing", "--set", "metrics.enabled=false"],
         {"ConfigMap", "Deployment"}),
    ],
    ids=["default", "all-on", "all-off"],
)
def test_each_option_renders_its_objects(helm_bin: Path, value_args: list[str], kinds: set[str]) -> None:
    assert {doc["kind"] for doc in render(helm_bin, *value_args)} == kinds


def test_grafana_dashboard_is_valid_json_with_panels(helm_bin: Path) -> None:
    import json

    docs = render(helm_bin, "--set", "grafanaDashboard.enabled=true")
    dashboards = [doc for doc in docs if doc["kind"] == "ConfigMap"
                  and doc["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
    (content,) = dashboards[0]["data"].values()
    dashboard = json.loads(content)
    assert dashboard["panels"], "the dashboard has no panels"
    queries = " ".join(target["expr"] for panel in dashboard["panels"]
                       for target in panel.get("targets", []))
    # The gate's binding metric names, which the controller reads too.
    for metric in ("batchpilot_gate_queue_length", "batchpilot_gate_inflight_requests",
                   "batchpilot_gate_time_to_first_token_seconds_bucket",
                   "batchpilot_gate_shed_total", "batchpilot_gate_knob"):
        assert metric in queries


@pytest.mark.parametrize(
    ("set_args", "unknown_key"),
    [
        (["--set", "replicas=2"], "replicas"),
        (["--set", "image.registry=example"], "registry"),
        (["--set", "metrics.serviceMonitor.namespace=x"], "namespace"),
        (["--set", "config.log_level=DEBUG"], "log_level"),
        (["--set", "crds.install=true"], "install"),
    ],
)
def test_unknown_values_are_rejected(helm_bin: Path, set_args: list[str], unknown_key: str) -> None:
    error = render_error(helm_bin, *set_args)
    assert "additional properties" in error
    assert unknown_key in error


@pytest.mark.parametrize(
    ("set_args", "message"),
    [
        (["--set", "metrics.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"],
         "metrics.serviceMonitor.enabled=true needs metrics.enabled=true"),
        (["--set", "metrics.enabled=false", "--set", "prometheusRule.enabled=true"],
         "prometheusRule.enabled=true needs metrics.enabled=true"),
        (["--set", "serviceAccount.create=false"],
         "serviceAccount.create=false needs serviceAccount.name"),
        (["--set", "health.port=9000", "--set", "metrics.port=9000"],
         "metrics.port and health.port are both 9000"),
        (["--set", "config.prometheus.default=null", "--set", "config.prometheus.thanos=http://t:9090"],
         "config.prometheus needs an entry named default"),
    ],
)
def test_contradictory_values_fail_with_the_fix(helm_bin: Path, set_args: list[str], message: str) -> None:
    assert message in render_error(helm_bin, *set_args)


def test_metrics_disabled_removes_the_port_and_service(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "metrics.enabled=false")
    assert "Service" not in {doc["kind"] for doc in docs}
    container = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert [port["name"] for port in container["ports"]] == ["health"]
    config = yaml.safe_load(only(docs, "ConfigMap", "batchpilot-config")["data"]["config.yaml"])
    assert config["metrics_port"] == 0  # the operator's "off"


def test_values_schema_rejects_unknown_keys_at_every_level() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        if "properties" in node and node.get("additionalProperties") is not False:
            open_objects.append(path or "<root>")
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}" if path else key)
        for combinator in ("items", "additionalProperties"):
            if isinstance(node.get(combinator), dict):
                walk(node[combinator], f"{path}[]")

    walk(schema, "")
    assert open_objects == []


def _keys_without_comment(node: yaml.Node, schema: dict[str, Any], lines: list[str],
                          path: str) -> list[str]:
    missing = []
    if not isinstance(node, yaml.MappingNode):
        return missing
    properties = schema.get("properties", {})
    for key_node, value_node in node.value:
        key = key_node.value
        if key not in properties:
            continue  # a user-data map entry (labels, endpoints), not a chart key
        above = lines[key_node.start_mark.line - 1].strip() if key_node.start_mark.line else ""
        if not above.startswith("#"):
            missing.append(f"{path}{key}")
        missing += _keys_without_comment(value_node, properties[key], lines, f"{path}{key}.")
    return missing


def test_every_value_has_a_comment() -> None:
    import json

    text = (CHART / "values.yaml").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _keys_without_comment(yaml.compose(text), schema, text.splitlines(), "") == []


def test_every_value_is_in_the_schema() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])


# --- CRDs ----------------------------------------------------------------------


def test_chart_crds_are_byte_identical_to_crds_folder() -> None:
    sources = sorted((REPO / "crds").glob("*.yaml"))
    copies = sorted((CHART / "files" / "crds").glob("*.yaml"))
    assert [p.name for p in copies] == [p.name for p in sources], "run scripts/sync-chart-crds"
    for source, copy in zip(sources, copies, strict=True):
        assert copy.read_bytes() == source.read_bytes(), f"{copy} is stale: run scripts/sync-chart-crds"


def _fake_repo(tmp_path: Path) -> Path:
    (tmp_path / "crds").mkdir()
    (tmp_path / "crds" / "a.yaml").write_text("kind: A\n")
    (tmp_path / "crds" / "b.yaml").write_text("kind: B\n")
    chart_copy = tmp_path / "helm" / "batchpilot" / "files" / "crds"
    chart_copy.mkdir(parents=True)
    (chart_copy / "a.yaml").write_text("kind: A-old\n")  # stale
    (chart_copy / "gone.yaml").write_text("kind: Gone\n")  # orphaned; b.yaml missing
    return tmp_path


def _sync_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "sync-chart-crds"), *args],
                          capture_output=True, text=True, timeout=30)


def test_sync_script_reports_then_repairs_drift(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    check = _sync_script("--check", "--repo", str(repo))
    assert check.returncode == 1
    assert "stale: helm/batchpilot/files/crds/a.yaml" in check.stderr
    assert "missing: helm/batchpilot/files/crds/b.yaml" in check.stderr
    assert "orphaned: helm/batchpilot/files/crds/gone.yaml" in check.stderr

    assert _sync_script("--repo", str(repo)).returncode == 0
    chart_copy = repo / "helm" / "batchpilot" / "files" / "crds"
    assert sorted(p.name for p in chart_copy.iterdir()) == ["a.yaml", "b.yaml"]
    assert (chart_copy / "a.yaml").read_text() == "kind: A\n"
    assert _sync_script("--check", "--repo", str(repo)).returncode == 0


def _without_chart_metadata(crd: dict[str, Any]) -> dict[str, Any]:
    stripped = dict(crd)
    stripped["metadata"] = {k: v for k, v in crd["metadata"].items() if k not in ("labels", "annotations")}
    return stripped


@pytest.mark.parametrize(
    ("set_args", "expected_annotations"),
    [
        ([], {"helm.sh/resource-policy": "keep",
              "argocd.argoproj.io/sync-options": "Prune=false,Delete=false"}),
        (["--set", "crds.keep=false"], None),
    ],
)
def test_rendered_crd_is_the_source_crd_plus_chart_metadata(
    helm_bin: Path, set_args: list[str], expected_annotations: dict[str, str] | None
) -> None:
    source = yaml.safe_load((REPO / "crds" / "inferencepolicy.yaml").read_text())
    rendered = only(render(helm_bin, *set_args), "CustomResourceDefinition")
    assert _without_chart_metadata(rendered) == _without_chart_metadata(source)
    assert rendered["metadata"].get("annotations") == expected_annotations
    assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_crds_disabled_renders_no_crd(helm_bin: Path) -> None:
    kinds = {doc["kind"] for doc in render(helm_bin, "--set", "crds.enabled=false")}
    assert "CustomResourceDefinition" not in kinds


# --- the operator's configuration and pod -----------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rendered_config_is_accepted_by_the_operator(
    helm_bin: Path, value_set: str, tmp_path: Path
) -> None:
    docs = render(helm_bin, *VALUE_SETS[value_set])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if value_set == "all-on":
        values |= yaml.safe_load(ALL_ON_VALUES.read_text())
    rendered = yaml.safe_load(only(docs, "ConfigMap", "batchpilot-config")["data"]["config.yaml"])
    deployments = [doc for doc in docs if doc["kind"] == "Deployment"]
    assert len(deployments) == values["sharding"]["shards"]
    # Every credential file an endpoint names lies in a Secret the pods mount;
    # the operator checks them at start, so they are laid out under tmp_path.
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        secrets = {volume["name"] for volume in pod["volumes"] if "secret" in volume}
        mounted = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in secrets}
        for endpoint in rendered["prometheus"].values():
            for key, path in _credential_files(endpoint):
                assert str(Path(path).parent) in mounted, (key, path, mounted)
    for endpoint in rendered["prometheus"].values():
        for key, path in _credential_files(endpoint):
            local = tmp_path / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            pem = Path("/etc/ssl/certs/ca-certificates.crt").read_text()
            local.write_text(pem if key == "ca_file" else "secret")
            _set_credential_file(endpoint, key, str(local))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(rendered))
    for index, deployment in enumerate(deployments):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        # Each shard's one own setting comes from its environment.
        env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
        config = load_config(config_file, env)

        assert config.namespaces == tuple(values["watchNamespaces"])
        for name, endpoint in values["config"]["prometheus"].items():
            url = endpoint if isinstance(endpoint, str) else endpoint["url"]
            assert config.endpoint_url(name) == url
        assert config.leader_election is True
        assert config.lease_name == "batchpilot"
        assert (config.shard_index, config.shard_count) == (index, len(deployments))
        assert config.policy_selector == values["sharding"]["policySelector"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"health": config.health_port, "metrics": config.metrics_port}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert container["args"] == ["operator", "--config", "/etc/batchpilot/config.yaml"]


def _credential_files(endpoint: Any) -> list[tuple[str, str]]:
    """(key, path) of each file an endpoint's mapping form names."""
    if isinstance(endpoint, str):
        return []
    files = [(key, endpoint[key]) for key in ("bearer_token_file", "ca_file") if key in endpoint]
    if "basic_auth" in endpoint:
        files.append(("password_file", endpoint["basic_auth"]["password_file"]))
    return files


def _set_credential_file(endpoint: dict[str, Any], key: str, path: str) -> None:
    if key == "password_file":
        endpoint["basic_auth"][key] = path
    else:
        endpoint[key] = path


def test_shards_are_deployments_with_disjoint_selectors_and_leases(helm_bin: Path) -> None:
    docs = render(helm_bin, "--set", "sharding.shards=3", "--set", "replicaCount=2")
    deployments = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Deployment"}
    assert sorted(deployments) == [f"batchpilot-shard-{i}" for i in range(3)]
    selectors = [
        tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in deployments.values()
    ]
    # Overlapping selectors would make the Deployments fight over each other's pods.
    assert len(set(selectors)) == 3
    for deployment in deployments.values():
        assert deployment["spec"]["replicas"] == 2
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert set(deployment["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())
        # Two replicas: spread over nodes unless the user set an affinity.
        assert "podAntiAffinity" in deployment["spec"]["template"]["spec"]["affinity"]
    # One Deployment keeps the unsuffixed name and selector (both immutable on upgrade).
    single = only(render(helm_bin), "Deployment")
    assert single["metadata"]["name"] == "batchpilot"
    assert "batchpilot.dev/shard" not in single["spec"]["selector"]["matchLabels"]
    assert "affinity" not in single["spec"]["template"]["spec"]


def test_config_checksum_follows_the_config(helm_bin: Path) -> None:
    def checksum(*args: str) -> str:
        pod = only(render(helm_bin, *args), "Deployment")["spec"]["template"]
        return pod["metadata"]["annotations"]["checksum/config"]

    base = checksum()
    assert checksum("--set", "podLabels.a=b") == base
    assert checksum("--set", "config.tick_seconds=10") != base
    assert checksum("--set", "watchNamespaces={x}") != base


def test_deployment_is_a_restricted_elected_writer(helm_bin: Path) -> None:
    deployment = only(render(helm_bin), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # Leader election makes a surge pod a standby, not a second writer.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["resources"]["limits"]["memory"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


@pytest.mark.parametrize(
    ("set_args", "image"),
    [
        ([], "batchpilot/operator:0.1.0"),
        (["--set", "image.tag=dev"], "batchpilot/operator:dev"),
        (["--set", "image.digest=sha256:" + "a" * 64, "--set", "image.tag=dev"],
         "batchpilot/operator@sha256:" + "a" * 64),
    ],
)
def test_image_reference(helm_bin: Path, set_args: list[str], image: str) -> None:
    container = only(render(helm_bin, *set_args), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == image


# --- RBAC ---------------------------------------------------------------------------


def _rules(docs: Sequence[dict[str, Any]], kind: str) -> dict[str, list[dict[str, Any]]]:
    return {f"{doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}": doc["rules"]
            for doc in docs if doc["kind"] == kind}


def _grants(rules: Sequence[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {verb for rule in rules if group in rule["apiGroups"] and resource in rule["resources"]
            for verb in rule["verbs"]}


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rbac_never_grants_writes_beyond_patch(helm_bin: Path, value_set: str) -> None:
    docs = render(helm_bin, *VALUE_SETS[value_set])
    all_rules = [rule for kind in ("ClusterRole", "Role") for rules in _rules(docs, kind).values()
                 for rule in rules]
    verbs = {verb for rule in all_rules for verb in rule["verbs"]}
    assert verbs <= {"get", "list", "watch", "patch", "create", "update"}
    assert not any("*" in rule["verbs"] + rule["resources"] + rule["apiGroups"] for rule in all_rules)
    creatable = {resource for rule in all_rules if "create" in rule["verbs"] for resource in rule["resources"]}
    assert creatable == {"events", "leases"}
    updatable = {resource for rule in all_rules if "update" in rule["verbs"] for resource in rule["resources"]}
    assert updatable == {"leases"}
    # The Leases only in the release's own namespace.
    lease_roles = [key for key, rules in _rules(docs, "Role").items()
                   if _grants(rules, "coordination.k8s.io", "leases")]
    assert lease_roles == ["batchpilot-system/batchpilot-leader-election"]
    assert not any(_grants(rules, "coordination.k8s.io", "leases")
                   for rules in _rules(docs, "ClusterRole").values())


def test_cluster_wide_mode_uses_one_cluster_role(helm_bin: Path) -> None:
    docs = render(helm_bin)
    assert set(_rules(docs, "Role")) == {"batchpilot-system/batchpilot-leader-election"}
    work = _rules(docs, "ClusterRole")["/batchpilot"]
    assert _grants(work, "", "pods") == {"get", "list", "watch", "patch"}
    assert _grants(work, "batchpilot.dev", "inferencepolicies/status") == {"patch"}
    assert _grants(work, "", "secrets") == set()  # no gateTokenSecretNames, no Secret access
    discovery = _rules(docs, "ClusterRole")["/batchpilot-discovery"]
    assert _grants(discovery, "apiextensions.k8s.io", "customresourcedefinitions") == {"list", "watch"}
    # Cluster-wide kopf does not list namespaces (see kopf's namespace observer).
    assert _grants(discovery, "", "namespaces") == set()


def test_namespaced_mode_grants_work_only_in_watched_namespaces(helm_bin: Path) -> None:
    docs = render(helm_bin, "-f", str(ALL_ON_VALUES))
    roles = _rules(docs, "Role")
    del roles["batchpilot-system/batchpilot-leader-election"]
    assert set(roles) == {"serving-a/batchpilot", "serving-b/batchpilot"}
    bindings = {f"{d['metadata']['namespace']}/{d['roleRef']['name']}" for d in docs if d["kind"] == "RoleBinding"}
    assert bindings == set(roles) | {"batchpilot-system/batchpilot-leader-election"}
    for rules in roles.values():
        secrets = [rule for rule in rules if "secrets" in rule["resources"]]
        assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                            "resourceNames": ["summarizer-gate-token", "code-assist-gate-token"]}]
    cluster_roles = _rules(docs, "ClusterRole")
    assert set(cluster_roles) == {"/batchpilot-discovery"}
    assert _grants(cluster_roles["/batchpilot-discovery"], "", "namespaces") == {"list", "watch"}


# --- the image the chart runs ---------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile.operator").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_operator_image_matches_what_the_chart_expects(helm_bin: Path) -> None:
    import json

    instructions = _dockerfile_instructions()
    stages = [arg for op, arg in instructions if op == "FROM"]
    assert len(stages) == 2, "multi-stage: build, then a runtime stage without the build tools"
    base = next(arg for op, arg in instructions if op == "ARG" and arg.startswith("PYTHON_IMAGE="))
    tag = base.split("=", 1)[1].split(":", 1)[1]
    assert re.fullmatch(r"3\.11\.\d+-slim(-\w+)?", tag), f"pin python:3.11 slim by an exact tag, got {tag}"

    (user,) = [arg for op, arg in instructions if op == "USER"]
    uid = int(user.split(":")[0])
    pod = only(render(helm_bin), "Deployment")["spec"]["template"]["spec"]
    assert uid == pod["securityContext"]["runAsUser"] != 0

    exposed = {int(port) for op, arg in instructions if op == "EXPOSE" for port in arg.split()}
    ports = {port["containerPort"] for port in pod["containers"][0]["ports"]}
    assert ports == exposed

    (entrypoint,) = [json.loads(arg) for op, arg in instructions if op == "ENTRYPOINT"]
    (command,) = [json.loads(arg) for op, arg in instructions if op == "CMD"]
    assert entrypoint == ["batchpilot"]
    assert command == pod["containers"][0]["args"]  # the image alone runs what the chart runs
    env = " ".join(arg for op, arg in instructions if op == "ENV")
    assert "HOME=/tmp" in env and "MPLCONFIGDIR=/tmp/" in env  # the only writable path


@pytest.mark.parametrize(
    ("set_args", "expected", "absent"),
    [
        ([], ["kubectl -n batchpilot-system rollout status deployment/batchpilot",
              "default: http://prometheus-operated.monitoring.svc:9090",
              "add its name to\n   rbac.gateTokenSecretNames", "in every namespace"], ["crds.enabled=false"]),
        (["--set", "watchNamespaces={a,b}", "--set", "rbac.gateTokenSecretNames={t}",
          "--set", "crds.enabled=false"],
         ["InferencePolicies in: a, b", "crds.enabled=false: install the InferencePolicy CRD"],
         ["rbac.gateTokenSecretNames"]),
    ],
    ids=["default", "namespaced"],
)
def test_notes_say_what_to_do_next(
    helm_bin: Path, set_args: list[str], expected: list[str], absent: list[str]
) -> None:
    result = run_helm(helm_bin, "install", "batchpilot", str(CHART), "--namespace", "batchpilot-system",
                      "--dry-run=client", *set_args)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert [text for text in expected if text not in notes] == []
    assert [text for text in absent if text in notes] == []
