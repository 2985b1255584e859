"""End to end on a real node: the Helm-installed operator steering the gates of
examples/vllm-deployment.yaml through examples/policy-auto.yaml.

test_e2e_operator.py tells this story with processes on loopback; here every
piece runs as the docs say to run it, on the single-node cluster of
stack.node (kubelet, containerd, kube-proxy; no registry, no DNS):

- examples/vllm-deployment.yaml, 2 replicas and its Service, made runnable
  by stack.workloads.simulated: the gate sidecar from the local gate image as
  shipped, the engine container running `batchpilot sim serve` (the
  calibrated simulator) where vLLM would listen, at TIME_SCALE;
- examples/policy-auto.yaml's Secret (a random token) and InferencePolicy,
  adapted for test time only: Recommend first, the objectives divided by
  TIME_SCALE, 5 s control steps over a 10 s window, a one-step canary;
- Prometheus in the node's network namespace running the documented job
  (examples/prometheus/scrape-config.yaml), its relabelling as shipped;
  Debian's Prometheus has no Kubernetes discovery, so PodDiscovery writes
  what `role: pod` would discover into a file_sd file, listing the pods as a
  `prometheus` ServiceAccount with the rights the example names;
- `helm install` of helm/batchpilot with the operator image imported into
  containerd, watching the serving namespace, querying that Prometheus;
- `batchpilot sim load` inside the node's namespace, through the Service's
  ClusterIP, shifting from short to long outputs at SHIFT_S.

test_recommend_then_auto runs the workload with the policy in Recommend (the
operator-off baseline), then in Auto, and writes the timeline (shift -> first
gate change -> every gate on the new setting, in wall seconds), goodput
before/after the shift and `kubectl get infpol` to $BATCHPILOT_E2E_CLUSTER_OUT
(default out/e2e-cluster.json), printed as a table. Then faults, in module
order, each under light load where it needs metrics: the operator pod deleted
mid-rollout, a rolling update of the serving Deployment, a `helm upgrade`
that rolls the operator, a kubelet restart, and last the documented
uninstall.

Time: the engines run TIME_SCALE simulated seconds per wall second; the
policy's objectives and the gates measure wall time; `sim load` reports
scenario seconds.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from stack.checks import condition_statuses, eventually, metric_sum
from stack.node import Cluster
from stack.workloads import (
    CALIBRATION,
    Images,
    SimEngine,
    calibration_configmap,
    short_to_long_scenario,
    simulated,
)

from batchpilot.contract.gate_api import APPLIED_ANNOTATION, KNOBS_ANNOTATION
from batchpilot.contract.knobs import Knobs, knobs_summary
from batchpilot.operator.gates import AppliedRecord
from batchpilot.operator.kube import GROUP, PLURAL, VERSION
from batchpilot.sim.load import OK, SHED, RequestRecord, summarize
from batchpilot.sim.sandbox.kube import unique_name
from batchpilot.sim.sandbox.prometheus import PrometheusServer, start_prometheus_in_namespace
from batchpilot.sim.sandbox.tools import helm_path, kubectl_path
from batchpilot.sim.scenario import ScenarioSlo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHART = ROOT / "helm" / "batchpilot"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CALIBRATION.exists(), reason=f"needs the shared calibration data at {CALIBRATION}"
    ),
]

# -- the workload, as in test_e2e_operator ------------------------------------------
TIME_SCALE = 2.0
SHIFT_S = 40.0
DURATION_S = 120.0
KV_CACHE_TOKENS = 20_000
SLO_TTFT_MS, SLO_TPOT_MS = 24_000, 800
# The engines' ceilings: what examples/policy-auto.yaml declares in spec.engine
# and examples/vllm-deployment.yaml passes to vLLM.
MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS = 512, 8192
SCENARIO = short_to_long_scenario(
    "e2e-cluster-short-to-long",
    max_num_seqs=MAX_NUM_SEQS,
    max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    kv_cache_tokens=KV_CACHE_TOKENS,
    slo_ttft_ms=SLO_TTFT_MS,
    slo_tpot_ms=SLO_TPOT_MS,
    shift_s=SHIFT_S,
    duration_s=DURATION_S,
)
# Light, steady traffic for the faults: every pod completes requests in every
# window (the canary's per-pod scores and MetricsAvailable need that).
LIGHT_SCENARIO = f"""
name: e2e-cluster-light
seed: 11
engine:
  calibration: {CALIBRATION}
  model: meta-llama/Meta-Llama-3.1-8B
  system: h100_sxm
  kv_cache_tokens: {KV_CACHE_TOKENS}
  max_num_seqs: {MAX_NUM_SEQS}
  max_num_batched_tokens: {MAX_NUM_BATCHED_TOKENS}
replicas: 2
slo: {{ttft_ms: {SLO_TTFT_MS}, tpot_ms: {SLO_TPOT_MS}}}
workload:
  - duration_s: 3600
    synthetic:
      arrival: {{process: poisson, rate_rps: 2}}
      prompt_tokens: {{dist: lognormal, p50: 200, p90: 400, max: 1000}}
      output_tokens: {{dist: lognormal, p50: 8, p90: 16, max: 32}}
"""
# The policy in wall time: 5 s steps over a 10 s window (ten 1 s scrapes).
INTERVAL_S = 5
CANARY_INTERVALS = 1
REACTION_STEPS = 8
KV_BAND = (0.75 * KV_CACHE_TOKENS, 1.25 * KV_CACHE_TOKENS)
ADMIN_PORT = 9090
RELEASE = "batchpilot"
# Pods start in ~10 s here; the operator's imports take 4-7 s on two busy cores.
START_TIMEOUT_S = 120.0
# A deleted CRD goes once the apiserver removed the objects stored under it:
# a second or two here.
CRD_GONE_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 60.0
# Steps watched after a fault settled: a churning record, version or Event shows within two.
QUIET_STEPS = 2
STEPS_METRIC = "batchpilot_operator_control_step_duration_seconds_count"


def _load_examples() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    secret, policy = yaml.safe_load_all((EXAMPLES / "policy-auto.yaml").read_text())
    deployment, service = yaml.safe_load_all((EXAMPLES / "vllm-deployment.yaml").read_text())
    return secret, policy, deployment, service


SECRET, POLICY, DEPLOYMENT, SERVICE = _load_examples()
POLICY_NAME = POLICY["metadata"]["name"]
APP_SELECTOR = "app.kubernetes.io/name=" + DEPLOYMENT["metadata"]["name"]
SLO_WALL_MS = {"ttftMs": round(SLO_TTFT_MS / TIME_SCALE), "tpotMs": round(SLO_TPOT_MS / TIME_SCALE)}


def policy_body() -> dict[str, Any]:
    """examples/policy-auto.yaml's policy, adapted to test time only."""
    body = copy.deepcopy(POLICY)
    spec = body["spec"]
    spec["mode"] = "Recommend"
    spec["slo"].update(SLO_WALL_MS)
    spec["metrics"].update({"windowSeconds": 10, "stalenessSeconds": 10})
    spec["behavior"].update(
        {
            "intervalSeconds": INTERVAL_S,
            "stabilizationWindowSeconds": 10,
            "canary": {"enabled": True, "intervals": CANARY_INTERVALS},
        }
    )
    return body


# -- reading the node ------------------------------------------------------------------

# GETs from inside the node's namespace, where pod IPs and ClusterIPs are
# routed. No proxy: nothing may leave the machine. argv: URL... ; prints
# {url: [status, body] | null}.
_FETCH = """
import json, sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
out = {}
for url in sys.argv[1:]:
    try:
        with opener.open(url, timeout=3) as reply:
            out[url] = [reply.status, reply.read().decode()]
    except urllib.error.HTTPError as err:
        out[url] = [err.code, err.read().decode()]
    except Exception:
        out[url] = None
print(json.dumps(out))
"""


def fetch_in_node(cluster: Cluster, *urls: str) -> dict[str, tuple[int, str] | None]:
    done = cluster.exec_in_node([sys.executable, "-I", "-c", _FETCH, *urls])
    assert done.returncode == 0, done.stderr
    return {
        url: None if reply is None else (reply[0], reply[1])
        for url, reply in json.loads(done.stdout).items()
    }


@dataclass
class Env:
    cluster: Cluster
    api: client.ApiClient
    namespace: str
    operator_namespace: str
    workdir: Path
    service_ip: str
    values: Path
    startup: Knobs
    prometheus: PrometheusServer
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def kubectl(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            [str(kubectl_path()), f"--kubeconfig={self.cluster.kubeconfig}", *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if check:
            assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout

    def helm(self, *args: str) -> str:
        done = subprocess.run(
            [str(helm_path()), f"--kubeconfig={self.cluster.kubeconfig}", *args],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"helm {' '.join(args)}: {done.stderr}"
        return done.stdout

    # -- the serving pods and their gates --

    def serving_pods(self) -> list[client.V1Pod]:
        """Running pods of the Deployment that are not being deleted, by name."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=APP_SELECTOR).items
        return sorted(
            (
                pod
                for pod in pods
                if pod.status.phase == "Running"
                and pod.status.pod_ip
                and pod.metadata.deletion_timestamp is None
            ),
            key=lambda pod: pod.metadata.name,
        )

    def gates(self, pods: list[client.V1Pod] | None = None) -> dict[str, dict[str, Any] | None]:
        """Each pod's gate `GET /config`, None where it does not answer."""
        pods = self.serving_pods() if pods is None else pods
        urls = {
            pod.metadata.name: f"http://{pod.status.pod_ip}:{ADMIN_PORT}/config" for pod in pods
        }
        replies = fetch_in_node(self.cluster, *urls.values()) if urls else {}
        return {
            name: json.loads(reply[1]) if (reply := replies[url]) and reply[0] == 200 else None
            for name, url in urls.items()
        }

    def annotations(self, pods: list[client.V1Pod]) -> dict[str, dict[str, str]]:
        """Each pod's annotations, read now."""
        return {
            pod.metadata.name: self.core.read_namespaced_pod(
                pod.metadata.name, self.namespace
            ).metadata.annotations
            or {}
            for pod in pods
        }

    def records(self, pods: list[client.V1Pod]) -> dict[str, AppliedRecord | None]:
        return {
            name: AppliedRecord.from_json(annotations.get(APPLIED_ANNOTATION))
            for name, annotations in self.annotations(pods).items()
        }

    # -- the policy --

    def read_policy(self) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, POLICY_NAME
        )

    def status(self) -> dict[str, Any]:
        try:
            return self.read_policy().get("status") or {}
        except ApiException:
            return {}

    def patch_policy(self, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, POLICY_NAME, {"spec": spec}
        )

    def events(self) -> Counter[str]:
        """The policy's Events by reason, counting repeats."""
        uid = self.read_policy()["metadata"]["uid"]
        listed = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={POLICY_NAME}"
        )
        counts = Counter[str]()
        for event in listed.items:
            if event.involved_object.uid == uid:
                counts[event.reason] += event.count or 1
        return counts

    # -- the operator --

    def operator_pods(self) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(
            self.operator_namespace, label_selector=f"app.kubernetes.io/instance={RELEASE}"
        ).items

    def operator_running(self) -> client.V1Pod:
        """The one operator pod, Running and not being deleted, once its
        liveness endpoint answers (kopf is up)."""

        def check() -> tuple[bool, Any]:
            pods = self.operator_pods()
            live = [
                pod
                for pod in pods
                if pod.status.phase == "Running"
                and pod.status.pod_ip
                and pod.metadata.deletion_timestamp is None
            ]
            if len(live) != 1:
                return False, [(p.metadata.name, p.status.phase) for p in pods]
            healthz = f"http://{live[0].status.pod_ip}:8081/healthz"
            reply = fetch_in_node(self.cluster, healthz)[healthz]
            return reply is not None and reply[0] == 200, live[0]

        return eventually(check, "the operator pod Running and live", START_TIMEOUT_S)

    def operator_metrics(self, pod: client.V1Pod) -> str:
        url = f"http://{pod.status.pod_ip}:8080/metrics"
        reply = fetch_in_node(self.cluster, url)[url]
        assert reply is not None and reply[0] == 200, reply
        return reply[1]

    def steps(self, pod: client.V1Pod) -> float:
        return metric_sum(self.operator_metrics(pod), STEPS_METRIC)

    def wait_steps(self, pod: client.V1Pod, count: int) -> None:
        start = self.steps(pod)
        eventually(
            lambda: ((now := self.steps(pod)) >= start + count, now),
            f"{count} more control steps",
            count * INTERVAL_S * 3 + 10,
        )

    # -- load, from inside the node --

    def start_load(
        self, scenario: str, label: str, *duration: str
    ) -> tuple[subprocess.Popen[bytes], Path]:
        path = self.workdir / f"{label}.yaml"
        path.write_text(scenario)
        out = self.workdir / f"load-{label}.json"
        log = (self.workdir / f"load-{label}.log").open("wb")
        process = subprocess.Popen(
            [
                *self.cluster.nsenter_prefix(),
                sys.executable, "-m", "batchpilot.cli.main", "sim", "load", str(path),
                "--url", f"http://{self.service_ip}:80", "--json", str(out),
                "--time-scale", str(TIME_SCALE), *duration,
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        return process, out

    def finish_load(
        self, process: subprocess.Popen[bytes], out: Path, timeout_s: float
    ) -> list[dict[str, Any]]:
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"the load did not finish in {timeout_s:.0f} s")
        log = out.with_name(out.name.replace(".json", ".log"))
        assert code == 0, log.read_text()[-2000:]
        rows: list[dict[str, Any]] = json.loads(out.read_text())["requests"]
        return rows


@dataclass
class Timeline:
    """Every serving pod's gate settings and the policy's status, sampled
    every `period_s` wall seconds from `started`."""

    env: Env
    started: float
    period_s: float = 1.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    recommendations: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Timeline:
        self._thread = threading.Thread(target=self._record, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _record(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            wall_s = round(began - self.started, 2)
            try:
                pods = self.env.serving_pods()
                for name, config in self.env.gates(pods).items():
                    if config is not None:
                        self.samples.append(
                            {
                                "wall_s": wall_s,
                                "scenario_s": round(wall_s * TIME_SCALE, 1),
                                "pod": name,
                                "version": config["version"],
                                "knobs": config["knobs"],
                            }
                        )
                status = self.env.status()
            except Exception as error:  # a sample lost to a busy node is no failure
                print(f"timeline sample at {wall_s} s failed: {error!r}", file=sys.stderr)
                status = {}
            self.statuses.append(
                {
                    "wall_s": wall_s,
                    "observedGeneration": status.get("observedGeneration"),
                    "lastChangeTime": status.get("lastChangeTime"),
                    "applied": (status.get("applied") or {}).get("summary"),
                }
            )
            recommendation = status.get("recommendation")
            if recommendation and (
                not self.recommendations
                or self.recommendations[-1]["knobs"] != recommendation["knobs"]
            ):
                self.recommendations.append(
                    {
                        "wall_s": wall_s,
                        "scenario_s": round(wall_s * TIME_SCALE, 1),
                        **recommendation,
                    }
                )
            self._stop.wait(max(0.0, self.period_s - (time.monotonic() - began)))

    def changes(self) -> list[dict[str, Any]]:
        """Samples where a pod's settings changed (each pod's first sample too)."""
        last: dict[str, int] = {}
        changed = []
        for sample in self.samples:
            if last.get(sample["pod"]) != sample["version"]:
                last[sample["pod"]] = sample["version"]
                changed.append(sample)
        return changed

    def by_time(self) -> list[tuple[float, dict[str, dict[str, Any]]]]:
        grouped: dict[float, dict[str, dict[str, Any]]] = {}
        for sample in self.samples:
            grouped.setdefault(sample["wall_s"], {})[sample["pod"]] = sample
        return sorted(grouped.items())


# -- the report --------------------------------------------------------------------------

REPORT: dict[str, Any] = {
    "time_scale": TIME_SCALE,
    "shift_scenario_s": SHIFT_S,
    "duration_scenario_s": DURATION_S,
    "slo_scenario_ms": {"ttft": SLO_TTFT_MS, "tpot": SLO_TPOT_MS},
    "control_interval_wall_s": INTERVAL_S,
    "canary_intervals": CANARY_INTERVALS,
    "faults": {},
}


def report_path() -> Path:
    return Path(os.environ.get("BATCHPILOT_E2E_CLUSTER_OUT", ROOT / "out" / "e2e-cluster.json"))


def write_report() -> None:
    out = report_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(REPORT, indent=2, default=str) + "\n")


def phase_summary(rows: list[dict[str, Any]], start_s: float, end_s: float) -> dict[str, Any]:
    """The benchmark's summary over the requests that arrived in [start_s, end_s)."""
    fields = set(RequestRecord.__dataclass_fields__)
    records = [
        RequestRecord(**{k: v for k, v in row.items() if k in fields})
        for row in rows
        if start_s <= row["arrival_s"] < end_s
    ]
    summary = summarize(records, end_s - start_s, ScenarioSlo(SLO_TTFT_MS, SLO_TPOT_MS))
    summary.pop("by_url", None)
    return summary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table() -> None:
    lines = [f"e2e cluster timeline -> {report_path()}"]
    setup = REPORT.get("setup_wall_s")
    if setup:
        lines.append("setup, wall s: " + ", ".join(f"{k} {v:.1f}" for k, v in setup.items()))
    if "after_shift" in REPORT:
        lines.append(
            f"{'phase':<14}{'operator':<10}{'goodput/s':>10}{'SLO att.':>10}"
            f"{'TTFT p99':>10}{'TPOT p99':>10}{'shed':>6}"
        )
        for phase in ("before_shift", "after_shift"):
            for side in ("off", "on"):
                s = REPORT[phase][side]
                lines.append(
                    f"{phase:<14}{side:<10}{s['goodput_rps']:>10.3f}{s['slo_attainment']:>10.1%}"
                    f"{_ms(s['ttft_p99_ms']):>10}{_ms(s['tpot_p99_ms']):>10}{s['shed']:>6}"
                )
    reaction = REPORT.get("reaction")
    if reaction:
        lines.append(
            "after the shift (wall s): recommendation change "
            f"{_s(reaction['recommendation_change_after_shift_wall_s'])}, first gate change "
            f"{_s(reaction['first_change_after_shift_wall_s'])}, fleet converged "
            f"{_s(reaction['converged_after_shift_wall_s'])}, KV-sized budget "
            f"{_s(reaction['kv_band_after_shift_wall_s'])}"
        )
    if REPORT.get("settings_changes_auto"):
        lines.append("gate settings (Auto), wall s: pod version cap/tokens/discipline/deadline")
        for change in REPORT["settings_changes_auto"]:
            k = change["knobs"]
            lines.append(
                f"  {change['wall_s']:>7.1f} {change['pod']} v{change['version']} "
                f"{k['max_concurrency']}/{k['max_inflight_tokens']}/{k['discipline']}/"
                f"{k['queue_deadline_ms']}"
            )
    if REPORT.get("kubectl_get_infpol"):
        lines.append(REPORT["kubectl_get_infpol"].rstrip())
    for name, fault in REPORT["faults"].items():
        lines.append(f"fault {name}: {fault.get('summary', fault)}")
    print("\n".join(lines))


# -- the module's cluster setup ------------------------------------------------------------


def _wait_default_service_account(core: client.CoreV1Api, namespace: str) -> None:
    def check() -> tuple[bool, Any]:
        accounts = core.list_namespaced_service_account(namespace).items
        return any(a.metadata.name == "default" for a in accounts), namespace

    eventually(check, f"the default ServiceAccount in {namespace}", 60)


class PodDiscovery:
    """What `kubernetes_sd_configs: [{role: pod}]` hands Prometheus, as a
    file_sd target file, refreshed every second.

    Debian's Prometheus 2.42 is built without Kubernetes discovery ("field
    kubernetes_sd_configs not found"), so this stands in for that one block
    of the documented job: one target per declared container port of every
    pod with an IP, with the __meta_kubernetes_pod_* labels the job's
    relabel_configs read, which then run exactly as shipped. It lists the pods
    as Prometheus's own ServiceAccount, with the rights the example names
    (get/list/watch pods), so that part of the documentation is tried too.
    """

    def __init__(self, api: client.ApiClient, namespace: str, path: Path) -> None:
        self._core = client.CoreV1Api(api)
        self._namespace = namespace
        self.path = path
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def targets(self) -> list[dict[str, Any]]:
        found = []
        for pod in self._core.list_namespaced_pod(self._namespace, _request_timeout=5).items:
            if not pod.status.pod_ip:
                continue
            for container in pod.spec.containers:
                for port in container.ports or []:
                    labels = {
                        "__meta_kubernetes_namespace": pod.metadata.namespace,
                        "__meta_kubernetes_pod_name": pod.metadata.name,
                        "__meta_kubernetes_pod_ip": pod.status.pod_ip,
                        "__meta_kubernetes_pod_phase": pod.status.phase,
                        "__meta_kubernetes_pod_node_name": pod.spec.node_name or "",
                        "__meta_kubernetes_pod_container_name": container.name,
                        "__meta_kubernetes_pod_container_port_name": port.name or "",
                        "__meta_kubernetes_pod_container_port_number": str(port.container_port),
                        "__meta_kubernetes_pod_container_port_protocol": port.protocol or "TCP",
                    }
                    for key, value in (pod.metadata.labels or {}).items():
                        labels[
                            f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}"
                        ] = value
                    found.append(
                        {
                            "targets": [f"{pod.status.pod_ip}:{port.container_port}"],
                            "labels": labels,
                        }
                    )
        return found

    def refresh(self) -> None:
        # Whole files only: Prometheus reads it on every change.
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(json.dumps(self.targets(), sort_keys=True))
        scratch.replace(self.path)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.refresh()
            except Exception as error:  # the next round retries
                print(f"pod discovery failed: {error!r}", file=sys.stderr)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _prometheus_identity(
    core: client.CoreV1Api, rbac: client.RbacAuthorizationV1Api, namespace: str
) -> str:
    """A `prometheus` ServiceAccount with get/list/watch on pods (what the
    example says Prometheus needs); its token."""
    name = f"prometheus-{namespace}"
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "prometheus"}})
    rbac.create_cluster_role(
        {
            "metadata": {"name": name},
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
            ],
        }
    )
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": namespace}],
        }
    )
    token: str = core.create_namespaced_service_account_token(
        "prometheus", namespace, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    return token


def scrape_configs(targets_file: Path) -> list[dict[str, Any]]:
    """examples/prometheus/scrape-config.yaml with its discovery block read from `targets_file`."""
    jobs: list[dict[str, Any]] = yaml.safe_load(
        (EXAMPLES / "prometheus" / "scrape-config.yaml").read_text()
    )
    for job in jobs:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}], job
        job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
    return jobs


def _ready_replicas(apps: client.AppsV1Api, namespace: str, name: str, replicas: int) -> None:
    def check() -> tuple[bool, Any]:
        deployment = apps.read_namespaced_deployment_status(name, namespace)
        status = deployment.status
        done = (
            (status.observed_generation or 0) >= deployment.metadata.generation
            and status.ready_replicas == replicas
            and status.updated_replicas == replicas
            and (status.replicas or 0) == replicas
        )
        return done, status.to_dict() if not done else status

    eventually(
        check, f"Deployment {namespace}/{name} with {replicas} ready replicas", START_TIMEOUT_S
    )


@pytest.fixture(scope="module")
def env(
    cluster: Cluster, cluster_images: Images, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    began = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("e2e-cluster")
    namespace = unique_name("e2e-serving")
    operator_namespace = unique_name("batchpilot-system")
    with cluster.api_client() as api:
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        rbac = client.RbacAuthorizationV1Api(api)
        extensions = client.ApiextensionsV1Api(api)
        crd_name = f"{PLURAL}.{GROUP}"
        crd_existed = any(
            crd.metadata.name == crd_name
            for crd in extensions.list_custom_resource_definition().items
        )
        prometheus: PrometheusServer | None = None
        discovery: PodDiscovery | None = None
        prometheus_api: client.ApiClient | None = None
        try:
            for ns in (namespace, operator_namespace):
                core.create_namespace({"metadata": {"name": ns}})
            for ns in (namespace, operator_namespace):
                _wait_default_service_account(core, ns)
            core.create_namespaced_config_map(
                namespace, calibration_configmap(CALIBRATION, namespace)
            )
            secret = copy.deepcopy(SECRET)
            secret["stringData"]["token"] = secrets.token_hex(16)
            core.create_namespaced_secret(namespace, secret)
            runnable = simulated(
                DEPLOYMENT,
                images=cluster_images,
                engine=SimEngine(
                    max_num_seqs=MAX_NUM_SEQS,
                    max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                    kv_cache_tokens=KV_CACHE_TOKENS,
                    time_scale=TIME_SCALE,
                ),
            )
            apps.create_namespaced_deployment(namespace, runnable)
            service_ip = core.create_namespaced_service(namespace, SERVICE).spec.cluster_ip
            token = _prometheus_identity(core, rbac, namespace)
            assert cluster.apiserver is not None
            prometheus_api = cluster.apiserver.api_client(token=token)
            discovery = PodDiscovery(prometheus_api, namespace, workdir / "pods.json")
            _ready_replicas(apps, namespace, DEPLOYMENT["metadata"]["name"], 2)
            timings["serving pods ready"] = time.monotonic() - began
            prometheus = start_prometheus_in_namespace(
                scrape_configs(discovery.path),
                command_prefix=cluster.nsenter_prefix(),
                address=cluster.node_ip,
                workdir=workdir / "prometheus",
                expected_up=4,
            )
            timings["prometheus 4 targets up"] = time.monotonic() - began
            repository, _, tag = cluster_images.operator.rpartition(":")
            values = workdir / "values.yaml"
            values.write_text(
                yaml.safe_dump(
                    {
                        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
                        "watchNamespaces": [namespace],
                        "config": {
                            "prometheus": {"default": f"http://{cluster.node_ip}:9090"},
                            "tick_seconds": 1,
                        },
                        "rbac": {"gateTokenSecretNames": [SECRET["metadata"]["name"]]},
                        # A CRD another module applied with kubectl stays
                        # kubectl's, as docs/install.md says to install then.
                        "crds": {"enabled": not crd_existed},
                    }
                )
            )
            e = Env(
                cluster=cluster,
                api=api,
                namespace=namespace,
                operator_namespace=operator_namespace,
                workdir=workdir,
                service_ip=service_ip,
                values=values,
                startup=Knobs(),
                prometheus=prometheus,
                timings=timings,
            )
            e.helm("install", RELEASE, str(CHART), "-n", operator_namespace, "-f", str(values))
            e.operator_running()
            timings["operator live"] = time.monotonic() - began
            REPORT["setup_wall_s"] = {k: round(v, 1) for k, v in timings.items()}
            REPORT["namespace"] = namespace
            yield e
        finally:
            write_report()
            if prometheus is not None:
                prometheus.stop()
            if discovery is not None:
                discovery.stop()
            if prometheus_api is not None:
                prometheus_api.close()
            subprocess.run(
                [str(helm_path()), f"--kubeconfig={cluster.kubeconfig}", "uninstall", RELEASE,
                 "-n", operator_namespace, "--ignore-not-found", "--wait", "--timeout", "60s"],
                capture_output=True, timeout=120, check=False,
            )  # fmt: skip
            for ns in (namespace, operator_namespace):
                with contextlib.suppress(ApiException):
                    core.delete_namespace(ns)
            for delete in (rbac.delete_cluster_role_binding, rbac.delete_cluster_role):
                with contextlib.suppress(ApiException):
                    delete(f"prometheus-{namespace}")
            if not crd_existed:
                # The chart keeps the CRD on uninstall; the next release in
                # this session must not find one owned by this release.
                with contextlib.suppress(ApiException):
                    extensions.delete_custom_resource_definition(crd_name)
                # Deletion waits for the apiserver to remove the policies
                # stored under it; the next module's `kubectl apply -f crds/`
                # would find it still Terminating and fail to patch it.
                deadline = time.monotonic() + CRD_GONE_TIMEOUT_S
                while time.monotonic() < deadline:
                    try:
                        extensions.read_custom_resource_definition(crd_name)
                    except ApiException as error:
                        if error.status == 404:
                            break
                        raise
                    time.sleep(0.2)


def ensure_auto(env: Env) -> None:
    """The policy exists and runs in Auto (whatever an earlier test left)."""
    try:
        env.read_policy()
    except ApiException as error:
        assert error.status == 404
        env.custom.create_namespaced_custom_object(
            GROUP, VERSION, env.namespace, PLURAL, policy_body()
        )
    env.patch_policy({"mode": "Auto"})


def wait_observing(env: Env, pods: int = 2) -> dict[str, Any]:
    """Until the status reports fresh metrics from every pod."""

    def check() -> tuple[bool, Any]:
        status = env.status()
        reporting = (status.get("pods") or {}).get("reporting")
        return condition_statuses(status).get(
            "MetricsAvailable"
        ) == "True" and reporting == pods, status

    return eventually(check, f"fresh metrics from {pods} pods", SETTLE_TIMEOUT_S)


def wait_settled(env: Env, what: str) -> dict[str, Any]:
    """Until every serving pod's gate runs one setting, its record says so,
    and the status reports it applied and no change in progress."""

    def check() -> tuple[bool, Any]:
        pods = env.serving_pods()
        seen: dict[str, Any] = {
            "gates": env.gates(pods),
            "records": env.records(pods),
            "status": env.status(),
        }
        configs = seen["gates"]
        if len(configs) != 2 or any(c is None for c in configs.values()):
            return False, seen
        settings = {Knobs.from_mapping(c["knobs"]) for c in configs.values()}
        if len(settings) != 1:
            return False, seen
        (setting,) = settings
        recorded = all(
            r is not None and r.knobs == setting and r.version == configs[pod]["version"]
            for pod, r in seen["records"].items()
        )
        applied = (seen["status"].get("applied") or {}).get("summary")
        stable = condition_statuses(seen["status"]).get("Progressing") == "False"
        seen["setting"] = setting
        return recorded and applied == f"2/2 {knobs_summary(setting)}" and stable, seen

    return eventually(check, what, SETTLE_TIMEOUT_S)


def pin(knobs: Knobs, max_concurrency: int) -> dict[str, Any]:
    """spec.knobs that allow exactly `knobs` with `max_concurrency`: the clamp
    guard then decides the target whatever the traffic says."""
    tokens = knobs.max_inflight_tokens or KV_CACHE_TOKENS
    deadline = knobs.queue_deadline_ms or SLO_WALL_MS["ttftMs"]
    return {
        "maxConcurrency": {"min": max_concurrency, "max": max_concurrency},
        "maxInflightTokens": {"min": tokens, "max": tokens},
        "queueDeadlineMs": {"min": deadline, "max": deadline},
        "discipline": {"allowed": [knobs.discipline]},
    }


# -- 1. the story -----------------------------------------------------------------------


def run_load(env: Env, label: str) -> tuple[list[dict[str, Any]], Timeline]:
    started = time.monotonic()
    with Timeline(env, started) as timeline:
        process, out = env.start_load(SCENARIO, label)
        rows = env.finish_load(process, out, DURATION_S / TIME_SCALE + 240)
    return rows, timeline


def reaction(timeline: Timeline) -> dict[str, Any]:
    """Wall seconds from the shift to the first gate change, to every gate on
    one new setting, and to a KV-sized budget on every gate."""
    shift_wall = SHIFT_S / TIME_SCALE
    grouped = [(t, group) for t, group in timeline.by_time() if len(group) == 2]
    before = [group for t, group in grouped if t < shift_wall]
    at_shift = {pod: s["knobs"] for pod, s in before[-1].items()} if before else {}
    first_change = converged = kv_band = None
    for t, group in grouped:
        if t < shift_wall:
            continue
        knobs = {pod: s["knobs"] for pod, s in group.items()}
        if first_change is None and any(knobs[pod] != at_shift.get(pod) for pod in knobs):
            first_change = t
        if (
            first_change is not None
            and converged is None
            and len({json.dumps(k, sort_keys=True) for k in knobs.values()}) == 1
            and all(knobs[pod] != at_shift.get(pod) for pod in knobs)
        ):
            converged = t
        budgets = [k["max_inflight_tokens"] for k in knobs.values()]
        if kv_band is None and all(
            b is not None and KV_BAND[0] <= b <= KV_BAND[1] for b in budgets
        ):
            kv_band = t
    last = {s["pod"]: s for s in timeline.samples}
    recommended = next(
        (r["wall_s"] for r in timeline.recommendations if r["wall_s"] >= shift_wall), None
    )
    return {
        "shift_wall_s": shift_wall,
        "recommendation_change_after_shift_wall_s": (
            None if recommended is None else round(recommended - shift_wall, 1)
        ),
        "settings_at_shift": at_shift,
        "first_change_after_shift_wall_s": None
        if first_change is None
        else round(first_change - shift_wall, 1),
        "converged_after_shift_wall_s": None
        if converged is None
        else round(converged - shift_wall, 1),
        "kv_band_after_shift_wall_s": None if kv_band is None else round(kv_band - shift_wall, 1),
        "kv_band_tokens": KV_BAND,
        "steps_to_kv_band": None if kv_band is None else (kv_band - shift_wall) / INTERVAL_S,
        "in_band_at_end": all(
            (b := s["knobs"]["max_inflight_tokens"]) is not None and KV_BAND[0] <= b <= KV_BAND[1]
            for s in last.values()
        ),
        "deadline_at_end_ms": [s["knobs"]["queue_deadline_ms"] for s in last.values()],
    }


def test_recommend_then_auto(env: Env) -> None:
    pods = env.serving_pods()
    startup = env.gates(pods)
    assert len(startup) == 2 and all(c and c["version"] == 1 for c in startup.values()), startup
    assert all(Knobs.from_mapping(c["knobs"]) == env.startup for c in startup.values() if c)
    # The operator answers where the chart's probes and Service point.
    operator = env.operator_running()
    assert "batchpilot_operator" in env.operator_metrics(operator)

    # 1. Recommend: the operator observes and publishes; the gates keep their startup settings.
    env.custom.create_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL, policy_body())
    off_rows, off = run_load(env, "recommend")
    recommended = env.status()
    table_recommend = env.kubectl("get", "infpol", "-n", env.namespace)
    assert recommended["mode"] == "Recommend"
    assert recommended["recommendation"]["knobs"], recommended
    assert recommended["recommendation"]["reasons"]
    assert recommended["applied"] == {"summary": "not applied (mode Recommend)"}
    assert {s["version"] for s in off.samples} == {1}, "Recommend changed a gate"
    assert {s["pod"] for s in off.samples} == set(startup)

    # 2. Auto: the same workload, the operator applying its recommendations.
    env.patch_policy({"mode": "Auto"})
    on_rows, on = run_load(env, "auto")
    table = env.kubectl("get", "infpol", "-n", env.namespace)
    wide = env.kubectl("get", "infpol", "-n", env.namespace, "-o", "wide")
    auto_status = env.status()
    reasons = env.events()
    annotations = env.annotations(pods)
    metrics = env.operator_metrics(operator)

    REPORT.update(
        {
            "before_shift": {
                "off": phase_summary(off_rows, 0, SHIFT_S),
                "on": phase_summary(on_rows, 0, SHIFT_S),
            },
            "after_shift": {
                "off": phase_summary(off_rows, SHIFT_S, DURATION_S),
                "on": phase_summary(on_rows, SHIFT_S, DURATION_S),
            },
            "settings_changes_auto": on.changes(),
            "recommendations_recommend_mode": off.recommendations,
            "recommendations_auto_mode": on.recommendations,
            "reaction": reaction(on),
            "final_status": {
                k: auto_status.get(k)
                for k in ("recommendation", "applied", "model", "pods", "conditions")
            },
            "events": dict(reasons),
            "kubectl_get_infpol_recommend": table_recommend,
            "kubectl_get_infpol": table,
            "kubectl_get_infpol_wide": wide,
            "operator_metrics": [
                line
                for line in metrics.splitlines()
                if line.startswith(
                    (
                        STEPS_METRIC,
                        "batchpilot_operator_status_writes_total",
                        "batchpilot_operator_decisions_total",
                        "batchpilot_operator_actuations_total",
                    )
                )
            ],
        }
    )
    write_report()
    print_table()

    # -- what must hold ------------------------------------------------------------
    assert max(s["version"] for s in on.samples) > 1, "Auto applied nothing"
    assert reasons["SettingsApplied"] >= 1 and reasons["ModeChanged"] >= 1, reasons
    timeline = REPORT["reaction"]
    assert timeline["first_change_after_shift_wall_s"] is not None, timeline
    assert timeline["converged_after_shift_wall_s"] is not None, timeline
    assert timeline["steps_to_kv_band"] is not None, timeline
    assert timeline["steps_to_kv_band"] <= REACTION_STEPS, timeline
    assert timeline["in_band_at_end"], timeline
    assert all(
        d is not None and d <= SLO_WALL_MS["ttftMs"] for d in timeline["deadline_at_end_ms"]
    ), timeline
    after = REPORT["after_shift"]
    assert after["on"]["goodput_rps"] > after["off"]["goodput_rps"], after
    # Every pod carries the record of what was applied, and the knobs the gate's
    # Downward API fallback reads.
    for _name, notes in annotations.items():
        record = AppliedRecord.from_json(notes.get(APPLIED_ANNOTATION))
        assert record is not None and record.policy == POLICY_NAME, notes
        assert record.startup == env.startup, notes
        assert KNOBS_ANNOTATION in notes, notes
    # `kubectl get infpol` tells the story: Recommend with a batch cap, then
    # Auto with both pods and what they run.
    header, row = table_recommend.splitlines()[:2]
    assert re.split(r"\s{2,}", header.strip()) == [
        "NAME",
        "MODE",
        "PODS",
        "BATCH CAP",
        "SLO MET",
        "AGE",
    ]
    assert re.split(r"\s{2,}", row.strip())[:3] == [POLICY_NAME, "Recommend", "2/2"], row
    values = re.split(r"\s{2,}", table.splitlines()[1].strip())
    assert values[:3] == [POLICY_NAME, "Auto", "2/2"], table
    cap = auto_status["recommendation"]["knobs"].get("maxConcurrency")
    assert values[3] == (str(cap) if cap is not None else "<none>"), (table, cap)
    assert values[4] in ("True", "False", "Unknown"), table
    wide_header, wide_row = wide.splitlines()[:2]
    assert "APPLIED" in wide_header and "REASON" in wide_header, wide
    assert auto_status["applied"]["summary"] in wide_row, (wide, auto_status["applied"])


# -- 2. faults -----------------------------------------------------------------------------


def test_operator_pod_deleted_mid_rollout(env: Env) -> None:
    """`kubectl delete pod` of the operator while one gate (the canary) runs a
    new setting and the other not yet: the Deployment's replacement must
    finish the change once, never apply it twice, and keep the status current."""
    ensure_auto(env)
    load, _out = env.start_load(LIGHT_SCENARIO, "operator-delete", "--duration", "140")
    began = time.monotonic()
    try:
        # Hold the fleet where it is: the light load would otherwise walk the
        # controller through new settings, a canary and a stabilization window each.
        first = next(c for c in env.gates().values() if c is not None)
        current = Knobs.from_mapping(first["knobs"])
        env.patch_policy({"knobs": pin(current, current.max_concurrency or MAX_NUM_SEQS)})
        wait_observing(env)
        settled = wait_settled(env, "every pod on one setting before the fault")
        settled_before_s = time.monotonic() - began
        before: Knobs = settled["setting"]
        pods = env.serving_pods()
        versions = {name: c["version"] for name, c in settled["gates"].items()}
        target_cap = 24 if before.max_concurrency != 24 else 32
        target = Knobs.from_mapping({**before.to_mapping(), "max_concurrency": target_cap})
        events_before = env.events()
        old = env.operator_running()
        generation_before = env.read_policy()["metadata"]["generation"]
        env.patch_policy({"knobs": pin(before, target_cap)})
        patched = time.monotonic()

        def partly_changed() -> tuple[bool, Any]:
            configs = env.gates(pods)
            moved = [p for p, c in configs.items() if c and c["version"] > versions[p]]
            return len(moved) == 1, configs

        at_delete = eventually(
            partly_changed, "the canary gate changed, the other not yet", SETTLE_TIMEOUT_S
        )
        deleted_at = time.monotonic()
        deleted_wall = datetime.now(UTC)
        env.core.delete_namespaced_pod(old.metadata.name, env.operator_namespace)
        new = env.operator_running()
        assert new.metadata.name != old.metadata.name
        replaced_s = time.monotonic() - deleted_at
        settled_after = wait_settled(env, "every pod on one setting after the restart")
        settled_s = time.monotonic() - deleted_at
        setting = settled_after["setting"]
        after_versions = {p: c["version"] for p, c in settled_after["gates"].items()}
        # Quiet: the replacement keeps stepping and changes nothing more.
        env.wait_steps(new, QUIET_STEPS)
        quiet = env.gates(pods)
        status = env.status()
        policy = env.read_policy()
        events_after = env.events()
    finally:
        load.kill()
        load.wait()
    delta = {reason: events_after[reason] - events_before.get(reason, 0) for reason in events_after}
    delta = {reason: count for reason, count in delta.items() if count}
    moved = sorted(p for p, c in at_delete.items() if c and c["version"] > versions[p])
    REPORT["faults"]["operator_pod_deleted"] = {
        "summary": (
            f"deleted with {moved} changed; replacement live after {replaced_s:.1f} s, "
            f"fleet on {knobs_summary(setting)} after {settled_s:.1f} s; "
            f"version increments { ({p: after_versions[p] - versions[p] for p in versions}) }; "
            f"Events since the patch {delta}"
        ),
        "settled_before_s": round(settled_before_s, 1),
        "patch_to_delete_s": round(deleted_at - patched, 1),
        "replacement_live_s": round(replaced_s, 1),
        "settled_s": round(settled_s, 1),
        "target": knobs_summary(target),
        "setting": knobs_summary(setting),
        "events_delta": delta,
    }
    write_report()
    print_table()
    assert Knobs.from_mapping(at_delete[moved[0]]["knobs"]) == target, at_delete
    assert setting in (target, before), settled_after
    # No duplicate actuation: each gate changed once (to the target), or the
    # canary was rolled back and the other gate never moved.
    increments = {p: after_versions[p] - versions[p] for p in versions}
    if setting == target:
        assert increments == {p: 1 for p in versions}, increments
    else:
        assert increments[moved[0]] == 2 and sum(increments.values()) == 2, increments
    assert {p: c and c["version"] for p, c in quiet.items()} == after_versions, quiet
    # At most one Event per changing step (canary start, rollout); a deletion
    # may lose one, never add one; no Warning.
    assert set(delta) <= {"SettingsApplied"}, delta
    assert delta.get("SettingsApplied", 0) <= 2, delta
    # The replacement writes the status: it describes the patched spec, and the
    # last change is the replacement's own rollout.
    assert generation_before < policy["metadata"]["generation"] == status["observedGeneration"]
    assert condition_statuses(status)["Ready"] == "True", status
    if setting == target:
        changed = datetime.fromisoformat(status["lastChangeTime"].replace("Z", "+00:00"))
        assert changed >= deleted_wall.replace(microsecond=0), (
            status["lastChangeTime"],
            deleted_wall,
        )


def _failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row["status"] not in (OK, SHED)]


def test_rolling_update_keeps_settings_and_requests(env: Env) -> None:
    """A template change rolls both serving pods under light load: each new
    pod gets the fleet's settings within one policy interval of turning Ready,
    and every admitted request completes (shed 429s allowed)."""
    ensure_auto(env)
    settled = wait_settled(env, "every pod on one setting before the rollout")
    setting: Knobs = settled["setting"]
    old_pods = {pod.metadata.name for pod in env.serving_pods()}
    # Long enough for both replacements and the old pods' 25 s drain.
    load, out = env.start_load(LIGHT_SCENARIO, "rolling-update", "--duration", "100")
    apps = client.AppsV1Api(env.api)
    name = DEPLOYMENT["metadata"]["name"]
    began = time.monotonic()
    with Timeline(env, began, period_s=0.5) as timeline:
        time.sleep(5)
        apps.patch_namespaced_deployment(
            name, env.namespace,
            {"spec": {"template": {"metadata": {"annotations": {"e2e/restartedAt": str(time.time())}}}}},
        )  # fmt: skip
        _ready_replicas(apps, env.namespace, name, 2)
        rolled_s = time.monotonic() - began

        def old_gone() -> tuple[bool, Any]:
            left = [
                p.metadata.name
                for p in env.core.list_namespaced_pod(
                    env.namespace, label_selector=APP_SELECTOR
                ).items
                if p.metadata.name in old_pods
            ]
            return not left, left

        eventually(old_gone, "the old pods gone", 90)
        rows = env.finish_load(load, out, 120)
    new_pods = env.serving_pods()
    assert not {p.metadata.name for p in new_pods} & old_pods
    # When each new pod turned Ready (API time, whole seconds) and when its gate first ran the setting.
    offset = time.time() - time.monotonic()
    took: dict[str, float | None] = {}
    for pod in new_pods:
        ready = next(c for c in pod.status.conditions if c.type == "Ready")
        ready_wall = ready.last_transition_time.timestamp() - (began + offset)
        first = next(
            (
                s["wall_s"]
                for s in timeline.samples
                if s["pod"] == pod.metadata.name and Knobs.from_mapping(s["knobs"]) == setting
            ),
            None,
        )
        took[pod.metadata.name] = None if first is None else round(first - ready_wall, 1)
    failures = _failures(rows)
    shed = sum(1 for row in rows if row["status"] == SHED)
    REPORT["faults"]["rolling_update"] = {
        "summary": (
            f"rollout done in {rolled_s:.1f} s; new pods on {knobs_summary(setting)} "
            f"{took} s after Ready; {len(rows)} requests, {shed} shed, {len(failures)} failed"
        ),
        "settings_after_ready_s": took,
        "requests": len(rows),
        "shed": shed,
        "failures": failures[:10],
    }
    write_report()
    print_table()
    assert failures == [], failures[:5]
    for pod, seconds in took.items():
        # One interval, plus the 1 s tick, the 0.5 s sampling and the
        # whole-second Ready time.
        assert seconds is not None and seconds <= INTERVAL_S + 2.5, (pod, took)
    final = env.gates(new_pods)
    assert all(c and Knobs.from_mapping(c["knobs"]) == setting for c in final.values()), final


def test_helm_upgrade_rolls_the_operator(env: Env) -> None:
    """`helm upgrade` with a changed config value: the checksum annotation
    rolls the operator pod; the new one resumes; the gates keep their settings."""
    ensure_auto(env)
    settled = wait_settled(env, "every pod on one setting before the upgrade")
    old = env.operator_running()
    checksum = old.metadata.annotations["checksum/config"]
    began = time.monotonic()
    env.helm(
        "upgrade", RELEASE, str(CHART), "-n", env.operator_namespace, "-f", str(env.values),
        "--set", "config.tick_seconds=2",
    )  # fmt: skip

    def rolled() -> tuple[bool, Any]:
        pods = env.operator_pods()
        names = [p.metadata.name for p in pods]
        return old.metadata.name not in names and len(pods) == 1, names

    eventually(rolled, "the old operator pod replaced", START_TIMEOUT_S)
    new = env.operator_running()
    live_s = time.monotonic() - began
    env.wait_steps(new, QUIET_STEPS)
    resumed_s = time.monotonic() - began
    config = env.core.read_namespaced_config_map(f"{RELEASE}-config", env.operator_namespace)
    after = env.gates()
    REPORT["faults"]["helm_upgrade"] = {
        "summary": f"operator pod replaced and live after {live_s:.1f} s, {QUIET_STEPS} steps by {resumed_s:.1f} s",
        "live_s": round(live_s, 1),
        "resumed_s": round(resumed_s, 1),
    }
    write_report()
    assert new.metadata.annotations["checksum/config"] != checksum
    assert "tick_seconds: 2" in next(iter(config.data.values())), config.data
    assert {p: c and c["version"] for p, c in after.items()} == {
        p: c["version"] for p, c in settled["gates"].items()
    }, after
    wait_settled(env, "the status current after the upgrade")


def test_kubelet_restart_leaves_pods_running(env: Env) -> None:
    """The kubelet restarted: containers keep running (same IDs, no
    restarts), the node is Ready again, the gates keep their settings, and
    the operator keeps stepping."""
    ensure_auto(env)
    settled = wait_settled(env, "every pod on one setting before the kubelet restart")

    def containers() -> dict[str, Any]:
        found = {}
        for ns in (env.namespace, env.operator_namespace):
            for pod in env.core.list_namespaced_pod(ns).items:
                for c in pod.status.container_statuses or []:
                    found[f"{pod.metadata.name}/{c.name}"] = (c.container_id, c.restart_count)
        return found

    before = containers()
    began = time.monotonic()
    env.cluster.restart_kubelet()
    ready_s = time.monotonic() - began
    operator = env.operator_running()
    env.wait_steps(operator, QUIET_STEPS)
    after = containers()
    gates = env.gates()
    node = env.core.read_node(env.cluster.node_name)
    REPORT["faults"]["kubelet_restart"] = {
        "summary": f"node Ready again {ready_s:.1f} s after the restart; containers unchanged: {after == before}",
        "ready_s": round(ready_s, 1),
    }
    write_report()
    assert after == before, (before, after)
    assert [c.status for c in node.status.conditions if c.type == "Ready"] == ["True"]
    assert {p: c and c["version"] for p, c in gates.items()} == {
        p: c["version"] for p, c in settled["gates"].items()
    }, gates
    wait_settled(env, "the status current after the kubelet restart")


def test_uninstall_restores_startup_settings(env: Env) -> None:
    """docs/install.md "Uninstalling": delete the policies (their finalizer
    restores the gates), then `helm uninstall`. The CRD stays."""
    ensure_auto(env)
    pods = env.serving_pods()
    began = time.monotonic()
    env.kubectl(
        "delete", "inferencepolicies", "--all", "--all-namespaces", "--wait", "--timeout=60s"
    )
    deleted_s = time.monotonic() - began
    env.helm("uninstall", RELEASE, "-n", env.operator_namespace, "--wait", "--timeout", "90s")
    gates = env.gates(pods)
    annotations = env.annotations(pods)
    crd = client.ApiextensionsV1Api(env.api).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    REPORT["faults"]["uninstall"] = {
        "summary": (
            f"policies deleted in {deleted_s:.1f} s; gates "
            f"{ {p: c and (c['version'], c['source']) for p, c in gates.items()} }; CRD kept"
        ),
    }
    write_report()
    print_table()
    for name, config in gates.items():
        assert config is not None, name
        assert Knobs.from_mapping(config["knobs"]) == env.startup, config
        assert config["knobs"] == config["startup_knobs"], config
        assert (
            APPLIED_ANNOTATION not in annotations[name]
            and KNOBS_ANNOTATION not in annotations[name]
        )
    assert env.operator_pods() == [] or all(
        p.metadata.deletion_timestamp for p in env.operator_pods()
    )
    assert crd.metadata.annotations.get("helm.sh/resource-policy") == "keep"
    assert (
        env.custom.list_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL)["items"]
        == []
    )
