"""End to end on the real engine: `batchpilot operator` in Auto steering two
llama-server pods through a traffic shift, observed by a real Prometheus.

tests/test_e2e_operator.py's stack with the simulated engines replaced by
llama.cpp's llama-server (sim/sandbox/llama_server.py). All real processes, all
on loopback:

- the API server (stack fixtures) with the InferencePolicy CRD applied;
- two serving pods in it (POD_IPS), each backed by a llama-server listening
  on the pod's IP (ENGINE) and `batchpilot gate` in front of it on the pod's
  container port, the gate's admin API on the policy's admin port;
- Prometheus scraping every gate's admin /metrics and every llama-server's
  /metrics each second, labelled `pod` and `namespace` as a cluster's
  relabelling would, so the `llamacpp` engine kind's signals (llama-server's
  `llamacpp:*` series, the gate's latency and length histograms) are there;
- `batchpilot operator --config` pointed at that Prometheus, running as the
  Helm chart's ServiceAccount, with one InferencePolicy in Auto;
- `sim.load.replay` sending a synthetic workload through the gates: light
  short chat until SHIFT_S, then long prompts with short answers at a rate
  that overloads both engines.

Nothing is simulated or time-scaled: the latencies are llama.cpp's on this
machine's CPU, which vary with its load, so the assertions are about
direction, not numbers. The physics: llama-server runs a newly admitted
request's prefill in the same step as every running stream's next token, so
on a CPU each long prompt admitted stalls every stream for its whole prefill
(~0.25 s for 400 tokens on one core). The more requests run at once, the more
of those stalls an answer sits through: after the shift TPOT misses its
objective unless the admission limit (the gates' batch cap) comes down, which
is the direction asserted. The queue deadline's is not: the controller sets
it from the TTFT objective minus the gate's TTFT p90 less its queue-wait p90,
and under a queue seconds deep that difference says little about the prefill.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import pytest
from kubernetes import client
from stack import KubeAPIServer
from stack.chart import chart_identity_kubeconfig

from batchpilot.contract.knobs import Knobs, knobs_document
from batchpilot.operator.kube import GROUP, PLURAL, VERSION
from batchpilot.sim.llamacpp import SERVED_MODEL, ServerOptions
from batchpilot.sim.load import ERROR, OK, SHED, RequestRecord, replay, summarize
from batchpilot.sim.sandbox.fleet import GATE_TOKEN_SECRET, GatedPod, start_fleet
from batchpilot.sim.sandbox.operator_process import OperatorProcess
from batchpilot.sim.sandbox.process import http_get
from batchpilot.sim.scenario import Arrival, LengthDist, ScenarioSlo, SyntheticPhase
from batchpilot.sim.workload import Workload, phases_workload

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.engine]

POD_IPS = ("127.0.0.4", "127.0.0.5")
LABELS = {"app": "e2e-llama"}
# Small ceilings, so that a 400-token prompt is one 512-token batch and eight
# of them (prompt plus answer) fit the shared KV cache with room to spare.
ENGINE = ServerOptions(parallel=8, ctx_size=8192, batch_size=512, ubatch_size=512)
SLO_TTFT_MS, SLO_TPOT_MS = 2500, 60
# Wall seconds: short chat until SHIFT_S, long prompts until DURATION_S.
SHIFT_S, DURATION_S = 20.0, 80.0
SEED = 7
PHASES = (
    # ~1 request per second per engine of 32/32 tokens: a fraction of a core each.
    SyntheticPhase(
        duration_s=SHIFT_S,
        arrival=Arrival("poisson", 2.0, 1.0),
        prompt_tokens=LengthDist("lognormal", 32, 48, 64),
        output_tokens=LengthDist("lognormal", 32, 48, 64),
    ),
    # 4 per second per engine of ~400-token prompts: ~1 s of prefill per
    # second on a core that also serves the gates, the client, the operator.
    SyntheticPhase(
        duration_s=DURATION_S - SHIFT_S,
        arrival=Arrival("poisson", 8.0, 1.0),
        prompt_tokens=LengthDist("lognormal", 400, 480, 512),
        output_tokens=LengthDist("lognormal", 16, 32, 48),
    ),
)
INTERVAL_S = 5
POLICY_SPEC: dict[str, Any] = {
    "selector": {"matchLabels": LABELS},
    "mode": "Auto",
    "engine": {
        "kind": "llamacpp",
        "maxNumSeqs": ENGINE.parallel,
        "maxNumBatchedTokens": ENGINE.batch_size,
        "kvCacheTokens": ENGINE.ctx_size,
    },
    # The batch cap, not the default token budget, is the admission limit:
    # the budget's floor (8,192 tokens: one long prompt must always fit) is
    # more than 8 slots of these requests ever hold, so it could not bind.
    "knobs": {
        "maxConcurrency": {"min": 1},
        "queueDeadlineMs": {},
        "discipline": {"allowed": ["fcfs", "shortest-prompt-first"]},
    },
    "actuation": {"tokenSecretRef": {"name": GATE_TOKEN_SECRET}},
    # 5 s steps over a 10 s window (ten 1 s scrapes), as tests/test_e2e_operator.py.
    "metrics": {"endpoint": "default", "windowSeconds": 10, "stalenessSeconds": 10},
    "slo": {"ttftMs": SLO_TTFT_MS, "tpotMs": SLO_TPOT_MS},
    "behavior": {"intervalSeconds": INTERVAL_S, "stabilizationWindowSeconds": 10},
}
START_TIMEOUT_S = 60.0
# controller/decide.py's reason for re-deciding at once, as the status renders it.
MIX_SHIFTED = "decide: length mix shifted: re-deciding now"


@dataclass
class Timeline:
    """Gate settings and the policy's recommendation, sampled once a second during the load."""

    pods: list[GatedPod]
    read_status: Callable[[], dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)
    recommendations: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def record(self, started: float) -> None:
        while not self._stop.is_set():
            t = round(time.monotonic() - started, 1)
            for pod in self.pods:
                config = pod.read_config()
                if config is not None:
                    self.samples.append(
                        {"t": t, "pod": pod.name, "version": config["version"], **config["knobs"]}
                    )
            recommendation = self.read_status().get("recommendation")
            if recommendation and (
                not self.recommendations
                or any(
                    self.recommendations[-1][key] != recommendation[key]
                    for key in ("knobs", "reasons")
                )
            ):
                self.recommendations.append({"t": t, **recommendation})
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()

    def last_before(self, pod: str, t: float) -> dict[str, Any]:
        return [s for s in self.samples if s["pod"] == pod and s["t"] < t][-1]

    def after(self, pod: str, t: float) -> list[dict[str, Any]]:
        return [s for s in self.samples if s["pod"] == pod and s["t"] >= t]


def workload() -> Workload:
    return phases_workload(PHASES, SEED)


def prometheus_query(url: str, query: str) -> list[dict[str, Any]]:
    reply = http_get(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': query})}")
    assert reply is not None and reply[0] == 200, reply
    result: list[dict[str, Any]] = json.loads(reply[1])["data"]["result"]
    return result


def read_policy(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "e2e-llama"
    )


@pytest.fixture
def llama_e2e(
    kube_api: KubeAPIServer,
    k8s_client: client.ApiClient,
    inferencepolicy_crd: None,
    namespace: str,
    tmp_path: Path,
) -> Iterator[dict[str, Any]]:
    """sim/sandbox/fleet.py's fleet with llama-server as each pod's engine, plus the operator."""
    with (
        start_fleet(
            k8s_client, namespace, ips=POD_IPS, labels=LABELS, workdir=tmp_path, llama=ENGINE
        ) as fleet,
        OperatorProcess(
            workdir=tmp_path,
            prometheus_url=fleet.prometheus_url,
            namespaces=[namespace],
            kubeconfig=chart_identity_kubeconfig(kube_api, k8s_client, namespace),
            tick_seconds=1,
        ).start() as operator,
    ):
        yield {
            "pods": fleet.pods,
            "namespace": namespace,
            "prometheus_url": fleet.prometheus_url,
            "operator": operator,
            "read_status": lambda: read_policy(k8s_client, namespace).get("status") or {},
        }


def run_load(env: dict[str, Any]) -> tuple[list[RequestRecord], Timeline]:
    """Replay the workload through the gates while sampling the gates and the policy."""
    timeline = Timeline(env["pods"], env["read_status"])
    started = time.monotonic()
    sampler = threading.Thread(target=timeline.record, args=(started,), daemon=True)
    sampler.start()
    try:
        records = asyncio.run(
            replay(
                workload(),
                [pod.gate_url for pod in env["pods"]],
                model=SERVED_MODEL,
                request_timeout_s=120.0,
            )
        )
    finally:
        timeline.stop()
        sampler.join()
    return records, timeline


def test_operator_steers_llama_server_pods_through_a_traffic_shift(
    llama_e2e: dict[str, Any], k8s_client: client.ApiClient
) -> None:
    namespace, pods = llama_e2e["namespace"], llama_e2e["pods"]
    startup = {pod.name: pod.gate_config() for pod in pods}
    assert all(config["version"] == 1 for config in startup.values()), startup
    client.CustomObjectsApi(k8s_client).create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferencePolicy",
            "metadata": {"name": "e2e-llama"},
            "spec": {
                **POLICY_SPEC,
                "actuation": {**POLICY_SPEC["actuation"], "adminPort": pods[0].admin_port},
            },
        },
    )
    records, timeline = run_load(llama_e2e)
    # The status, the events and the gates are read one after another: with the
    # operator still running, a decision may land between two reads (a clean
    # clone's run saw the queue deadline move 2375 -> 2032 ms between them).
    # Stopped, it leaves one final state to read.
    llama_e2e["operator"].stop()
    status = read_policy(k8s_client, namespace)["status"]
    applied_events = [
        event.message
        for event in client.CoreV1Api(k8s_client).list_namespaced_event(namespace).items
        if event.reason == "SettingsApplied"
    ]
    # Two 1 s scrapes after the last request finished, so the counters are final.
    time.sleep(2.0)
    prometheus_url = llama_e2e["prometheus_url"]
    processing = prometheus_query(
        prometheus_url, f'llamacpp:requests_processing{{namespace="{namespace}"}}'
    )
    (counted,) = prometheus_query(
        prometheus_url, f'sum(llamacpp:prompt_tokens_total{{namespace="{namespace}"}})'
    )
    slo = ScenarioSlo(SLO_TTFT_MS, SLO_TPOT_MS)
    chat, long = (
        summarize([r for r in records if start <= r.arrival_s < end], end - start, slo)
        for start, end in ((0.0, SHIFT_S), (SHIFT_S, DURATION_S))
    )
    # Shown when an assertion below fails: what the gates ran and why.
    print(json.dumps({"chat": chat, "long": long, "status": status}, indent=2, default=str))
    print(json.dumps(timeline.recommendations, indent=2))
    print("\n".join(applied_events))

    # -- what must hold ------------------------------------------------------------
    # Prometheus had llama-server's own series, one per pod, under the labels
    # the operator selects by, and its prompt counter carried this traffic:
    # no more than the served requests sent (shed ones never reach an engine);
    # one run counted 98.7% of it, a gap not pinned down (cached prefixes?).
    assert sorted(series["metric"]["pod"] for series in processing) == [p.name for p in pods]
    sent = sum(r.prompt_tokens for r in records if r.status == OK)
    assert 0.9 * sent <= float(counted["value"][1]) <= sent, (sent, counted)
    # Through the gates nothing failed: a request either streamed to its end
    # or was shed by its queue deadline with a 429. The light chat phase lost
    # none; the engines still served long prompts under the overload.
    failed = [(r.http_status, r.error) for r in records if r.status == ERROR]
    assert not failed, failed[:5]
    assert all(r.http_status == 429 for r in records if r.status == SHED)
    assert chat["ok"] == chat["arrived"] > 0, chat
    assert long["ok"] > 0, long

    # Auto applied new settings to both gates after the shift, and through
    # the long prompts they admitted fewer requests at once than through the
    # chat (the physics above), still below the engine's slots at the end.
    # Medians over the per-second samples: the controller also moves the cap
    # during the chat (its model predicts TPOT at each cap under overload),
    # so no single moment before the shift is the baseline.
    settled_s = SHIFT_S + 2 * INTERVAL_S  # one interval to see the shift, one to act
    chat_cap = median(cap(s) for s in timeline.samples if s["t"] < SHIFT_S and s["version"] > 1)
    for pod in pods:
        at_shift = timeline.last_before(pod.name, SHIFT_S)
        assert timeline.after(pod.name, SHIFT_S)[-1]["version"] > at_shift["version"], at_shift
        long_caps = [cap(s) for s in timeline.after(pod.name, settled_s)]
        assert median(long_caps) < chat_cap, (chat_cap, long_caps)
        final = pod.gate_config()
        assert cap(final["knobs"]) < ENGINE.parallel, final
        assert final["knobs"] != startup[pod.name]["knobs"], final
        assert knobs_document(Knobs.from_mapping(final["knobs"])) == status["applied"]["knobs"]
        # ... and said so in an Event: `chat-0: maxConcurrency 2 -> 1, ...`.
        moved = rf"\b{pod.name}: maxConcurrency \w+ -> {cap(final['knobs'])}\b"
        assert any(re.search(moved, message) for message in applied_events), applied_events
    # The policy's status shows the decision and its reasons: the operator
    # saw the length mix shift, and the cut is the TPOT objective's doing.
    assert status["applied"]["upToDate"] == len(pods), status["applied"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("True", "ModeAuto")
    assert (conditions["MetricsAvailable"]["status"], status["pods"]["reporting"]) == ("True", 2)
    after_shift = [r for r in timeline.recommendations if r["t"] >= SHIFT_S]
    assert any(MIX_SHIFTED in r["reasons"] for r in after_shift), after_shift
    first_cut = next(
        (r for r in after_shift if r["knobs"].get("maxConcurrency", ENGINE.parallel) < chat_cap),
        None,
    )
    assert first_cut is not None, after_shift
    assert any("TPOT" in reason for reason in first_cut["reasons"]), first_cut


def cap(knobs: dict[str, Any]) -> int:
    """A gate's batch cap in effect: no limit is the engine's slot count."""
    value: int | None = knobs["max_concurrency"]
    return ENGINE.parallel if value is None else value
