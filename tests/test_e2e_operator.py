"""End to end: `batchpilot operator` steering real gates in front of simulated engines.

What runs, all real processes on loopback (sim/sandbox/fleet.py starts them):

- the API server (stack fixtures) with the InferencePolicy CRD applied by kubectl;
- two serving "pods" in it (127.0.0.2, 127.0.0.3), each backed by
  `batchpilot sim serve` (the engine) and `batchpilot gate` in front of it on
  the pod's container port, the gate's admin API on the policy's admin port;
- Prometheus scraping every gate's admin /metrics and every engine's
  /metrics, with `pod` and `namespace` labels per target, as a cluster's
  relabelling would attach them;
- `batchpilot operator --config` pointed at that Prometheus, authenticated as
  the Helm chart's ServiceAccount with the chart's RBAC applied for real;
- `batchpilot sim load` replaying a time-scaled workload that shifts from
  short to long outputs (SHIFT_S), through the gates.

The same workload runs twice: with the policy in Recommend (the operator
observes and publishes, the gates keep their startup settings: the "operator
off" baseline), then in Auto. The timeline (gate settings, TTFT/TPOT p99,
goodput before/after the shift, on vs off) is written as JSON to
$BATCHPILOT_E2E_OUT (default out/e2e-operator.json) and printed as a table.

Time: the engines run TIME_SCALE simulated seconds per wall second, so the
policy's objectives are the scenario's divided by TIME_SCALE (the gate and
the controller measure wall time), and `sim load` reports scenario seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from stack import KubeAPIServer
from stack.chart import chart_identity_kubeconfig
from stack.workloads import CALIBRATION, short_to_long_scenario

from batchpilot.contract.gate_api import APPLIED_ANNOTATION
from batchpilot.contract.knobs import Knobs
from batchpilot.operator.kube import GROUP, PLURAL, VERSION
from batchpilot.sim.load import RequestRecord, summarize
from batchpilot.sim.sandbox.fleet import GATE_TOKEN_SECRET, GatedPod, start_fleet
from batchpilot.sim.sandbox.operator_process import OperatorProcess
from batchpilot.sim.sandbox.process import http_get
from batchpilot.sim.scenario import ScenarioSlo

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.stack,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CALIBRATION.exists(), reason=f"needs the shared calibration data at {CALIBRATION}"
    ),
]

POD_IPS = ("127.0.0.2", "127.0.0.3")
# Simulated seconds per wall second.
TIME_SCALE = 2.0
# Scenario seconds: short outputs until SHIFT_S, long ones after.
SHIFT_S = 40.0
DURATION_S = 140.0
KV_CACHE_TOKENS = 20_000
SLO_TTFT_MS, SLO_TPOT_MS = 24_000, 800
SCENARIO = short_to_long_scenario(
    "e2e-short-to-long",
    max_num_seqs=256,
    kv_cache_tokens=KV_CACHE_TOKENS,
    slo_ttft_ms=SLO_TTFT_MS,
    slo_tpot_ms=SLO_TPOT_MS,
    shift_s=SHIFT_S,
    duration_s=DURATION_S,
)
# The policy in wall time. 5 s steps over a 10 s window (ten 1 s scrapes).
INTERVAL_S = 5
POLICY_SPEC: dict[str, Any] = {
    "selector": {"matchLabels": {"app": "e2e-chat"}},
    "engine": {"kind": "vllm", "maxNumSeqs": 256, "maxNumBatchedTokens": 8192},
    "actuation": {"tokenSecretRef": {"name": GATE_TOKEN_SECRET}},
    "metrics": {"endpoint": "default", "windowSeconds": 10, "stalenessSeconds": 10},
    "slo": {"ttftMs": round(SLO_TTFT_MS / TIME_SCALE), "tpotMs": round(SLO_TPOT_MS / TIME_SCALE)},
    "behavior": {"intervalSeconds": INTERVAL_S, "stabilizationWindowSeconds": 10},
}
# After the shift the gates must reach a KV-sized token budget within this
# many control steps (each INTERVAL_S x TIME_SCALE scenario seconds).
REACTION_STEPS = 8
# "KV-sized": within 25% of the engines' KV capacity. Above it, admitted
# requests outgrow the cache and the engine preempts and recomputes; far
# below it, KV the engine has stays idle. The budget reserves each request's
# whole max_tokens up front, so it may sit a little above the cache.
KV_BAND = (0.75 * KV_CACHE_TOKENS, 1.25 * KV_CACHE_TOKENS)


@dataclass
class Timeline:
    """Gate settings and the policy's recommendation, sampled once per wall second during a load."""

    read_status: Callable[[], dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)
    recommendations: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def record(self, pods: list[GatedPod], started: float) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            scenario_s = round((now - started) * TIME_SCALE, 1)
            for pod in pods:
                config = pod.read_config()
                if config is not None:
                    self.samples.append(
                        {
                            "scenario_s": scenario_s,
                            "pod": pod.name,
                            "version": config["version"],
                            "knobs": config["knobs"],
                        }
                    )
            recommendation = self.read_status().get("recommendation")
            if recommendation and (
                not self.recommendations
                or self.recommendations[-1]["knobs"] != recommendation["knobs"]
            ):
                self.recommendations.append({"scenario_s": scenario_s, **recommendation})
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()


def kubectl_run(kubectl: Path, kubeconfig: Path, *args: str) -> str:
    done = subprocess.run(
        [str(kubectl), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_for(check: Callable[[], Any], what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout_s:.0f} s")
        time.sleep(0.5)


def phase_summary(rows: list[dict[str, Any]], start_s: float, end_s: float) -> dict[str, Any]:
    """The benchmark's summary over the requests that arrived in [start_s, end_s)."""
    fields = {f for f in RequestRecord.__dataclass_fields__}
    records = [
        RequestRecord(**{k: v for k, v in row.items() if k in fields})
        for row in rows
        if start_s <= row["arrival_s"] < end_s
    ]
    summary = summarize(records, end_s - start_s, ScenarioSlo(SLO_TTFT_MS, SLO_TPOT_MS))
    summary.pop("by_url", None)
    return summary


@pytest.fixture
def e2e(
    kube_api: KubeAPIServer,
    k8s_client: client.ApiClient,
    inferencepolicy_crd: None,
    namespace: str,
    tmp_path: Path,
) -> Iterator[dict[str, Any]]:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(SCENARIO)
    with (
        start_fleet(
            k8s_client,
            namespace,
            scenario=scenario,
            ips=POD_IPS,
            labels={"app": "e2e-chat"},
            workdir=tmp_path,
            time_scale=TIME_SCALE,
        ) as fleet,
        OperatorProcess(
            workdir=tmp_path,
            prometheus_url=fleet.prometheus_url,
            namespaces=[namespace],
            kubeconfig=chart_identity_kubeconfig(kube_api, k8s_client, namespace),
            # Fine enough for 5 s policy intervals, with half the default's timer wake-ups.
            tick_seconds=1,
        ).start() as operator,
    ):
        yield {
            "pods": fleet.pods,
            "namespace": namespace,
            "scenario": scenario,
            "tmp": tmp_path,
            "operator": operator,
            "metrics_url": operator.metrics_url,
            "kubeconfig": kube_api.kubeconfig,
            "read_status": lambda: read_policy(k8s_client, namespace).get("status") or {},
        }


def run_load(env: dict[str, Any], label: str) -> tuple[list[dict[str, Any]], Timeline]:
    """Replay the scenario through the gates; (per-request rows, what the gates and the policy said)."""
    out = env["tmp"] / f"load-{label}.json"
    timeline = Timeline(env["read_status"])
    started = time.monotonic()
    sampler = threading.Thread(target=timeline.record, args=(env["pods"], started), daemon=True)
    sampler.start()
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "batchpilot.cli.main",
                "sim",
                "load",
                str(env["scenario"]),
                *[arg for pod in env["pods"] for arg in ("--url", pod.gate_url)],
                "--json",
                str(out),
                "--time-scale",
                str(TIME_SCALE),
            ],
            capture_output=True,
            text=True,
            timeout=DURATION_S / TIME_SCALE + 240,
            check=False,
        )
    finally:
        timeline.stop()
        sampler.join()
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())["requests"], timeline


def read_policy(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "e2e"
    )


def test_operator_end_to_end(
    e2e: dict[str, Any], k8s_client: client.ApiClient, kubectl: Path
) -> None:
    namespace, pods = e2e["namespace"], e2e["pods"]
    custom = client.CustomObjectsApi(k8s_client)
    startup = {pod.name: pod.gate_config() for pod in pods}
    assert all(config["version"] == 1 for config in startup.values())

    # 1. Recommend: the operator observes and publishes; the gates keep their startup settings.
    spec = {
        **POLICY_SPEC,
        "mode": "Recommend",
        "actuation": {**POLICY_SPEC["actuation"], "adminPort": pods[0].admin_port},
    }
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferencePolicy",
            "metadata": {"name": "e2e"},
            "spec": spec,
        },
    )
    off_rows, off_recorded = run_load(e2e, "recommend")
    off_timeline = off_recorded.samples
    recommended = read_policy(k8s_client, namespace)["status"]
    assert recommended["mode"] == "Recommend"
    assert recommended["recommendation"]["knobs"], recommended
    assert recommended["recommendation"]["reasons"]
    assert recommended["applied"] == {"summary": "not applied (mode Recommend)"}
    assert {sample["version"] for sample in off_timeline} == {1}, "Recommend changed a gate"
    assert all(pod.gate_config()["version"] == 1 for pod in pods)

    # 2. Auto: the same workload, the operator applying its recommendations.
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "e2e", {"spec": {"mode": "Auto"}}
    )
    on_rows, on_recorded = run_load(e2e, "auto")
    on_timeline = on_recorded.samples
    table = kubectl_run(kubectl, e2e["kubeconfig"], "get", "infpol", "-n", namespace)
    wide = kubectl_run(kubectl, e2e["kubeconfig"], "get", "infpol", "-n", namespace, "-o", "wide")
    auto_status = read_policy(k8s_client, namespace)["status"]
    events = client.CoreV1Api(k8s_client).list_namespaced_event(namespace)
    reasons = {event.reason for event in events.items}
    pod_records = {
        pod.name: (
            client.CoreV1Api(k8s_client)
            .read_namespaced_pod(pod.name, namespace)
            .metadata.annotations
            or {}
        ).get(APPLIED_ANNOTATION)
        for pod in pods
    }

    # 3. Delete: the finalizer puts the gates' startup settings back.
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "e2e")

    def gone() -> bool:
        try:
            read_policy(k8s_client, namespace)
        except ApiException as err:
            return err.status == 404
        return False

    wait_for(gone, "the policy deleted (finalizer done)", 60)
    restored = {pod.name: pod.gate_config() for pod in pods}
    annotations_after = {
        pod.name: client.CoreV1Api(k8s_client)
        .read_namespaced_pod(pod.name, namespace)
        .metadata.annotations
        or {}
        for pod in pods
    }
    operator_metrics = http_get(e2e["metrics_url"])

    report = build_report(
        off_rows,
        on_rows,
        on_recorded,
        auto_status,
        table,
        operator_metrics[1].decode() if operator_metrics else "",
    )
    report["recommendations_recommend_mode"] = off_recorded.recommendations
    write_report(report)

    # -- what must hold ------------------------------------------------------------
    # Auto moved the gates; after the shift to long outputs their in-flight
    # token budget reached the KV capacity band within REACTION_STEPS steps
    # and ended the run there, with a queue deadline inside the TTFT
    # objective: the two limits whose absence collapses the operator-off run
    # (unbounded queueing, preemptions).
    assert max(sample["version"] for sample in on_timeline) > 1, "Auto applied nothing"
    assert "SettingsApplied" in reasons and "ModeChanged" in reasons
    reaction = report["reaction"]
    assert reaction["reached_at_scenario_s"] is not None, reaction
    assert reaction["steps_after_shift"] <= REACTION_STEPS, reaction
    assert reaction["in_band_at_end"], reaction
    assert all(
        deadline is not None and deadline <= POLICY_SPEC["slo"]["ttftMs"]
        for deadline in reaction["deadline_at_end_ms"]
    ), reaction
    # Goodput after the shift: operator on beats operator off.
    assert (
        report["after_shift"]["on"]["goodput_rps"] > report["after_shift"]["off"]["goodput_rps"]
    ), report
    # Every pod carries the record of what was applied while the policy ran.
    assert all(
        record and json.loads(record)["policy"] == "e2e" for record in pod_records.values()
    ), pod_records
    # Delete restored the startup settings and removed the record.
    for pod in pods:
        assert restored[pod.name]["knobs"] == startup[pod.name]["knobs"], restored
        assert restored[pod.name]["knobs"] == Knobs().to_mapping()
        assert APPLIED_ANNOTATION not in annotations_after[pod.name]
    # `kubectl get infpol` reads well: the columns, and this policy's row.
    header, row = table.splitlines()[:2]
    assert re.split(r"\s{2,}", header.strip()) == [
        "NAME",
        "MODE",
        "PODS",
        "BATCH CAP",
        "SLO MET",
        "AGE",
    ]
    values = re.split(r"\s{2,}", row.strip())
    assert values[:3] == ["e2e", "Auto", "2/2"], row
    assert (
        values[3].isdigit()
        and int(values[3]) == auto_status["recommendation"]["knobs"]["maxConcurrency"]
    )
    assert values[4] in ("True", "False", "Unknown")
    assert "APPLIED" in wide.splitlines()[0] and "REASON" in wide.splitlines()[0]


def build_report(
    off_rows: list[dict[str, Any]],
    on_rows: list[dict[str, Any]],
    recorded: Timeline,
    auto_status: dict[str, Any],
    table: str,
    operator_metrics: str,
) -> dict[str, Any]:
    on_timeline = recorded.samples
    before = {"off": phase_summary(off_rows, 0, SHIFT_S), "on": phase_summary(on_rows, 0, SHIFT_S)}
    after = {
        "off": phase_summary(off_rows, SHIFT_S, DURATION_S),
        "on": phase_summary(on_rows, SHIFT_S, DURATION_S),
    }
    # Settings per pod over time, only where they changed.
    changes: list[dict[str, Any]] = []
    last: dict[str, int] = {}
    for sample in on_timeline:
        if last.get(sample["pod"]) != sample["version"]:
            last[sample["pod"]] = sample["version"]
            changes.append(sample)

    def in_band(pod_samples: list[dict[str, Any]]) -> bool:
        budgets = [sample["knobs"]["max_inflight_tokens"] for sample in pod_samples]
        return bool(budgets) and all(
            b is not None and KV_BAND[0] <= b <= KV_BAND[1] for b in budgets
        )

    by_time: dict[float, list[dict[str, Any]]] = {}
    for sample in on_timeline:
        by_time.setdefault(sample["scenario_s"], []).append(sample)
    reached = next(
        (
            t
            for t, group in sorted(by_time.items())
            if t >= SHIFT_S and len(group) == len(POD_IPS) and in_band(group)
        ),
        None,
    )
    last_per_pod = {sample["pod"]: sample for sample in on_timeline}
    step_s = INTERVAL_S * TIME_SCALE
    step_lines = [
        line
        for line in operator_metrics.splitlines()
        if line.startswith(
            (
                "batchpilot_operator_control_step_duration_seconds_count",
                "batchpilot_operator_control_step_duration_seconds_sum",
                "batchpilot_operator_status_writes_total",
                "batchpilot_operator_decisions_total",
                "batchpilot_operator_actuations_total",
            )
        )
    ]
    return {
        "time_scale": TIME_SCALE,
        "shift_scenario_s": SHIFT_S,
        "duration_scenario_s": DURATION_S,
        "slo_scenario_ms": {"ttft": SLO_TTFT_MS, "tpot": SLO_TPOT_MS},
        "control_interval_wall_s": INTERVAL_S,
        "before_shift": before,
        "after_shift": after,
        "settings_changes_auto": changes,
        "recommendations_auto_mode": recorded.recommendations,
        "kv_cache_tokens": KV_CACHE_TOKENS,
        "reaction": {
            "kv_band_tokens": KV_BAND,
            "reached_at_scenario_s": reached,
            "steps_after_shift": None if reached is None else (reached - SHIFT_S) / step_s,
            "in_band_at_end": in_band(list(last_per_pod.values())),
            "deadline_at_end_ms": [s["knobs"]["queue_deadline_ms"] for s in last_per_pod.values()],
        },
        "final_status": {
            key: auto_status.get(key) for key in ("recommendation", "applied", "model", "pods")
        },
        "kubectl_get_infpol": table,
        "operator_metrics": step_lines,
    }


def write_report(report: dict[str, Any]) -> None:
    out = Path(os.environ.get("BATCHPILOT_E2E_OUT", ROOT / "out" / "e2e-operator.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [
        f"e2e operator timeline -> {out}",
        f"{'phase':<14}{'operator':<10}{'goodput/s':>10}{'SLO att.':>10}{'TTFT p99':>10}{'TPOT p99':>10}{'shed':>6}",
    ]
    for phase in ("before_shift", "after_shift"):
        for side in ("off", "on"):
            s = report[phase][side]
            lines.append(
                f"{phase:<14}{side:<10}{s['goodput_rps']:>10.3f}{s['slo_attainment']:>10.1%}"
                f"{_ms(s['ttft_p99_ms']):>10}{_ms(s['tpot_p99_ms']):>10}{s['shed']:>6}"
            )
    lines.append("gate settings (Auto), scenario s: pod version cap/tokens/discipline/deadline")
    for change in report["settings_changes_auto"]:
        k = change["knobs"]
        lines.append(
            f"  {change['scenario_s']:>7.1f} {change['pod']} v{change['version']} "
            f"{k['max_concurrency']}/{k['max_inflight_tokens']}/{k['discipline']}/{k['queue_deadline_ms']}"
        )
    lines.append(report["kubectl_get_infpol"].rstrip())
    print("\n".join(lines))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
