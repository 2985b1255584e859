"""API-server faults survived by the real `batchpilot operator` process (issue #9).

What runs: the real apiserver (etcd embedded), a real Prometheus, the
operator as a child process (kopf and all), policies in mode Recommend over
serving pods. Faults:

* the apiserver SIGKILLed (etcd with it) while the operator runs, and started
  again on the same address and data: every watch breaks without a goodbye;
  then restarted gracefully (SIGTERM), which ends the watches in order;
* 409 Conflict on the policy's status PATCHes, the first 5, then every second
  one while the spec and the pods change;
* 429 TooManyRequests with Retry-After on every second request to each path,
  of any kind, from the operator's start on.

409 and 429 come from `stack.kube_fault_proxy`, an HTTPS proxy between the
operator and the apiserver that answers as the apiserver would. Each case
must leave the operator running and its status right once the fault ends,
with every change made meanwhile (spec edits, pods added and deleted)
reflected: watches resumed, no status write lost for good. At the end, the
status writer's retry rule unit by unit.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes import client
from stack import (
    KubeAPIServer,
    create_crd,
    create_namespace,
    create_serving_pod,
    start_kube_apiserver,
)
from stack.kube_fault_proxy import KubeFaultProxy, ProxiedRequest
from test_operator_process import (
    GROUP,
    PLURAL,
    VERSION,
    create_policy,
    eventually,
    metric,
    read_policy,
)

from batchpilot.operator import handlers, kube, logs
from batchpilot.sim.sandbox.operator_process import OperatorProcess
from batchpilot.sim.sandbox.process import http_ok

REPO = Path(__file__).resolve().parent.parent
SELECTOR = {"matchLabels": {"app": "llm"}}
# Retry-After on the injected 429s: longer than the operator's 0.5 s tick and
# kopf's first backoffs (1 s), so a client that ignores it shows in the gaps.
RETRY_AFTER_S = 2
# asyncio's timers may fire a few milliseconds early.
TIMER_SLACK_S = 0.05
# Converging takes a tick or two after a fault clears (0.5 s ticks, 2 s
# policy intervals); a 429'd request waits 2 s per refusal.
CONVERGE_S = 30.0
# After an outage kopf's watches resume at their next retry and the status
# writer writes at its next: each at most its longest backoff later.
RESUMED_S = CONVERGE_S + max(*handlers.ERROR_BACKOFFS_S, handlers.STATUS_RETRY_MAX_S)
# How long the killed apiserver stays down for the log check: kopf retries its
# watches about once a second at first, the policy steps every 2 s.
OUTAGE_S = 12.0


def status_of(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return read_policy(api, namespace, name).get("status") or {}


def converged(
    api: client.ApiClient, namespace: str, name: str, *, generation: int, selected: int
) -> Callable[[], dict[str, Any] | None]:
    """A check: the status describes `generation` of the spec and `selected` Ready pods."""

    def check() -> dict[str, Any] | None:
        status = status_of(api, namespace, name)
        pods = status.get("pods") or {}
        conditions = status.get("conditions") or []
        fresh = (
            status.get("observedGeneration") == generation
            and (pods.get("selected"), pods.get("ready")) == (selected, selected)
            and conditions
            and all(c["observedGeneration"] == generation for c in conditions)
        )
        return status if fresh else None

    return check


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def add_pod(api: client.ApiClient, namespace: str, index: int) -> None:
    create_serving_pod(
        api,
        namespace,
        f"llm-{index}",
        pod_ip=f"127.0.0.{10 + index}",
        ports={"admin": 9090},
        labels={"app": "llm"},
    )


def edit_spec(api: client.ApiClient, namespace: str, name: str, ttft_ms: int) -> int:
    """Change the policy's objectives; return the new generation."""
    patched = client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"slo": {"ttftMs": ttft_ms}}}
    )
    return int(patched["metadata"]["generation"])


def healthy(operator: OperatorProcess) -> bool:
    return operator.running() and http_ok(operator.health_url)


@pytest.fixture
def own_kube_api(tmp_path: Path) -> Iterator[KubeAPIServer]:
    """An apiserver of this test's own, with the CRD and a namespace: the test kills it,
    which must not break the session's shared one."""
    kube = start_kube_apiserver(tmp_path / "kube-apiserver")
    try:
        with kube.api_client() as api:
            create_crd(api, yaml.safe_load((REPO / "crds" / "inferencepolicy.yaml").read_text()))
            create_namespace(api, "faults")
        yield kube
    finally:
        kube.stop()


def test_apiserver_killed_and_restarted(
    own_kube_api: KubeAPIServer, prometheus: Callable[..., Any], tmp_path: Path
) -> None:
    kube, namespace = own_kube_api, "faults"
    prom = prometheus([])
    with OperatorProcess(
        workdir=tmp_path,
        kubeconfig=kube.kubeconfig,
        namespaces=[namespace],
        prometheus_url=prom.url,
    ).start() as operator:
        with kube.api_client() as api:
            add_pod(api, namespace, 0)
            create_policy(api, namespace, "llm", selector=SELECTOR)
            eventually(
                converged(api, namespace, "llm", generation=1, selected=1), "the first status"
            )

        unavailable = 'batchpilot_operator_errors_total{reason="MetricsUnavailable"}'
        log_path = tmp_path / "operator.log"
        with kube.outage():  # SIGKILL: apiserver and etcd die mid-watch
            outage_log_from = log_path.stat().st_size
            # Prometheus goes too, so the next control step changes the status
            # (MetricsAvailable=False) while there is no apiserver to write it to.
            prom.stop()
            eventually(
                lambda: metric(operator.metrics_url, unavailable) >= 1,
                "a control step finding Prometheus gone while the apiserver is down",
            )
            # Long enough for kopf's watches to fail and retry several times
            # (backoffs 1, 1, 2, 3, 5 s) and the policy to step five times.
            time.sleep(OUTAGE_S)
            assert operator.running()
            with log_path.open("rb") as log:
                log.seek(outage_log_from)
                outage_log = log.read().decode(errors="replace")
        assert_one_line_per_cause(outage_log)
        # Restarted on the same address and data: the operator's kubeconfig still works.

        with kube.api_client() as api:
            # The change the operator could not write during the outage arrives...
            status = eventually(
                lambda: (
                    (s := status_of(api, namespace, "llm"))
                    and condition(s, "MetricsAvailable")["reason"] == "QueryFailed"
                    and s
                ),
                "the status the operator could not write during the outage",
                timeout_s=RESUMED_S,
            )
            assert condition(status, "Ready")["reason"] == "MetricsUnavailable"
            # ...and changes made after the restart arrive through the resumed watches.
            generation = edit_spec(api, namespace, "llm", 1500)
            add_pod(api, namespace, 1)
            add_pod(api, namespace, 2)
            client.CoreV1Api(api).delete_namespaced_pod("llm-0", namespace, grace_period_seconds=0)
            eventually(
                converged(api, namespace, "llm", generation=generation, selected=2),
                "status for the edited spec and the new pods",
                timeout_s=RESUMED_S,
            )

        # A graceful restart (SIGTERM: the apiserver ends the watches itself) as well.
        kube.restart(graceful=True)
        with kube.api_client() as api:
            generation = edit_spec(api, namespace, "llm", 1200)
            client.CoreV1Api(api).delete_namespaced_pod("llm-1", namespace, grace_period_seconds=0)
            eventually(
                converged(api, namespace, "llm", generation=generation, selected=1),
                "status for the spec and pods changed after the graceful restart",
                timeout_s=RESUMED_S,
            )
        assert generation == 3
        eventually(lambda: healthy(operator), "the operator alive and answering its probe")


def assert_one_line_per_cause(log: str) -> None:
    """Warnings and errors logged in an outage shorter than the repeat interval: each cause once."""
    assert OUTAGE_S < logs.REPEAT_INTERVAL_S
    # kopf's format: `[time] logger [LEVEL   ] message`; traceback lines have no level.
    troubles = re.findall(
        r"^\[[^]]+\] (\S+) +\[(WARNING|ERROR|CRITICAL) *\] (.*)$", log, re.MULTILINE
    )
    assert troubles, log  # the outage was noticed
    causes = Counter(
        (name, level, re.sub(r"0x[0-9a-fA-F]+|\d+", "#", message))
        for name, level, message in troubles
    )
    assert [cause for cause, lines in causes.items() if lines > 1] == [], log


def test_pod_deleted_while_the_pod_watch_was_down(
    own_kube_api: KubeAPIServer, prometheus: Callable[..., Any], tmp_path: Path
) -> None:
    """kopf re-lists pods when its watch cannot resume, and a re-list only adds to
    its index: the pod deleted meanwhile must still leave the operator's view."""
    kube, namespace = own_kube_api, "faults"
    with (
        KubeFaultProxy(kube, tmp_path) as proxy,
        OperatorProcess(
            workdir=tmp_path,
            kubeconfig=proxy.kubeconfig_for(kube.token, "operator"),
            namespaces=[namespace],
            prometheus_url=prometheus([]).url,
        ).start() as operator,
    ):
        with kube.api_client() as api:
            add_pod(api, namespace, 0)
            add_pod(api, namespace, 1)
            create_policy(api, namespace, "llm", selector=SELECTOR)
            eventually(
                converged(api, namespace, "llm", generation=1, selected=2), "the first status"
            )
        # The restart ends the pod watch; the restarted apiserver's watch cache
        # begins past that watch's resourceVersion (the status writes came
        # after the pods' last event), so the watch cannot resume: kopf lists
        # the pods again once the proxy lets its requests through.
        pod_requests = rf"/namespaces/{namespace}/pods$"
        refused = proxy.inject(429, method="GET", path=pod_requests, fraction=1.0)
        kube.restart()
        with kube.api_client() as api:
            client.CoreV1Api(api).delete_namespaced_pod("llm-0", namespace, grace_period_seconds=0)
            eventually(lambda: refused.injected >= 2, "the operator's pod watch refused")
            proxy.clear()
            resumed_at = time.monotonic()
            status = eventually(
                converged(api, namespace, "llm", generation=1, selected=1),
                "status without the pod deleted while the pod watch was down",
                timeout_s=RESUMED_S,
            )
        assert status["pods"]["ready"] == 1
        pod_requests_after = [
            r for r in proxy.requests if r.at_s >= resumed_at and r.path.endswith("/pods")
        ]
        assert any("watch=true" not in r.query for r in pod_requests_after), "no pod list"
        assert healthy(operator)


@pytest.fixture
def proxy(kube_api: KubeAPIServer, tmp_path: Path) -> Iterator[KubeFaultProxy]:
    with KubeFaultProxy(kube_api, tmp_path) as running:
        yield running


@pytest.fixture
def operator_via_proxy(
    proxy: KubeFaultProxy,
    kube_api: KubeAPIServer,
    inferencepolicy_crd: None,
    namespace: str,
    prometheus: Callable[..., Any],
    tmp_path: Path,
) -> Iterator[OperatorProcess]:
    """The operator with a kubeconfig that reaches the apiserver only through `proxy`.

    Not started: the test starts it, after setting up the faults it should meet from its start.
    """
    with OperatorProcess(
        workdir=tmp_path,
        kubeconfig=proxy.kubeconfig_for(kube_api.token, "operator"),
        namespaces=[namespace],
        prometheus_url=prometheus([]).url,
    ) as operator:
        yield operator


def test_conflicts_on_status_writes(
    proxy: KubeFaultProxy,
    operator_via_proxy: OperatorProcess,
    k8s_client: client.ApiClient,
    namespace: str,
) -> None:
    operator_via_proxy.start()
    status_writes = r"/inferencepolicies/llm/status$"
    first_five = proxy.inject(409, method="PATCH", path=status_writes, count=5)
    add_pod(k8s_client, namespace, 0)
    create_policy(k8s_client, namespace, "llm", selector=SELECTOR)
    eventually(
        converged(k8s_client, namespace, "llm", generation=1, selected=1),
        "the first status, past 5 conflicts",
        timeout_s=CONVERGE_S,
    )
    assert first_five.injected == 5

    # Every second status write conflicts while the pods and then the spec change.
    proxy.clear()
    every_second = proxy.inject(409, method="PATCH", path=status_writes, fraction=0.5)
    add_pod(k8s_client, namespace, 1)
    eventually(
        converged(k8s_client, namespace, "llm", generation=1, selected=2),
        "status with the new pod",
        timeout_s=CONVERGE_S,
    )
    generation = edit_spec(k8s_client, namespace, "llm", 1500)
    eventually(
        converged(k8s_client, namespace, "llm", generation=generation, selected=2),
        "status for the edited spec",
        timeout_s=CONVERGE_S,
    )
    assert every_second.injected >= 1
    proxy.clear()
    assert healthy(operator_via_proxy)
    # The write that a conflict refused was sent again until one got through.
    writes = [r for r in proxy.requests if r.method == "PATCH" and r.path.endswith("/llm/status")]
    assert writes[-1].injected is None


def test_throttling_with_retry_after(
    proxy: KubeFaultProxy,
    operator_via_proxy: OperatorProcess,
    namespace: str,
    k8s_client: client.ApiClient,
) -> None:
    # From the operator's first request on, every second request to each path
    # is refused with Retry-After: its discovery, listings, watches, its
    # patches and status writes all meet the throttle.
    throttle = proxy.inject(429, fraction=0.5, retry_after_s=RETRY_AFTER_S)
    add_pod(k8s_client, namespace, 0)
    create_policy(k8s_client, namespace, "llm", selector=SELECTOR)
    started = time.monotonic()
    operator = operator_via_proxy.start()
    eventually(
        converged(k8s_client, namespace, "llm", generation=1, selected=1),
        "the first status while throttled",
        timeout_s=CONVERGE_S,
    )
    add_pod(k8s_client, namespace, 1)
    generation = edit_spec(k8s_client, namespace, "llm", 1500)
    eventually(
        converged(k8s_client, namespace, "llm", generation=generation, selected=2),
        "status for the new pod and the edited spec while throttled",
        timeout_s=CONVERGE_S,
    )
    proxy.clear()
    ended = time.monotonic()
    assert healthy(operator)
    operator.stop()  # no more requests: what follows reads a finished record

    during = [r for r in proxy.requests if started <= r.at_s <= ended]
    refused = [r for r in during if r.injected == 429]
    assert throttle.injected == len(refused)
    assert any(r.path.endswith("/inferencepolicies/llm/status") for r in refused)
    assert any(r.method == "GET" and "watch=true" in r.query for r in refused)
    # Backing off: a refused request came back no sooner than its Retry-After.
    # Each of the operator's request streams (a watch, a listing, the status
    # writer, the patches of one policy) sends one request at a time, so the
    # next request with the same method, path and query is the retry. (kopf's
    # pod listing and the operator's own, podledger.py's, share a path.)
    retries = {
        rejected: next(
            (r for r in proxy.requests if r.at_s > rejected.at_s and same_request(r, rejected)),
            None,
        )
        for rejected in refused
    }
    gaps = [retry.at_s - rejected.at_s for rejected, retry in retries.items() if retry is not None]
    assert min(gaps) >= RETRY_AFTER_S - TIMER_SLACK_S
    # The refused status writes were all sent again (and converged, above).
    assert all(retries[r] for r in refused if r.path.endswith("/status"))
    # No hot loop: a few requests per second over the whole throttled run,
    # start-up included (2.1-2.5/s measured in 3 runs).
    rate = len(during) / (ended - started)
    assert rate < 5, f"{len(during)} requests in {ended - started:.1f} s"


def same_request(one: ProxiedRequest, other: ProxiedRequest) -> bool:
    return (one.method, one.path, one.query) == (other.method, other.path, other.query)


def test_injected_answers_are_the_apiservers(
    proxy: KubeFaultProxy, kube_api: KubeAPIServer, k8s_client: client.ApiClient, namespace: str
) -> None:
    """A 409 from the proxy is, body and all, the 409 the apiserver sends for a stale update;
    a 429 carries a Retry-After that a client can honour."""
    core = client.CoreV1Api(k8s_client)
    stale = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c"))
    )
    core.patch_namespaced_config_map("c", namespace, {"data": {"k": "v"}})
    with pytest.raises(client.ApiException) as real:
        core.replace_namespaced_config_map("c", namespace, stale)

    proxy.inject(409, method="PUT", path=r"/configmaps/c$", count=1)
    proxy.inject(429, method="GET", path=r"/configmaps/c$", count=1, retry_after_s=RETRY_AFTER_S)
    kubeconfig = proxy.kubeconfig_for(kube_api.token, "admin")
    with kubernetes.config.new_client_from_config(config_file=str(kubeconfig)) as via_proxy:
        fresh = client.CoreV1Api(via_proxy).read_namespaced_config_map("c", namespace)
        with pytest.raises(client.ApiException) as injected:
            client.CoreV1Api(via_proxy).replace_namespaced_config_map("c", namespace, fresh)
    assert injected.value.status == real.value.status == 409
    assert json.loads(injected.value.body) == json.loads(real.value.body)
    # The kubernetes client itself waits out a 429 with Retry-After on a GET (urllib3
    # retries it), so the read above succeeded on its second try, 2 s later.
    reads = [r for r in proxy.requests if r.method == "GET"]
    assert [r.injected for r in reads] == [429, None]
    assert reads[1].at_s - reads[0].at_s >= RETRY_AFTER_S - TIMER_SLACK_S


# -- the status writer's retry rule, unit by unit (no stack) ---------------------


@pytest.mark.parametrize(
    ("status", "retry_after_s", "failures", "delay_s"),
    [
        (409, None, 1, 0.0),  # a conflict: again at the next tick
        (409, None, 9, 0.0),
        (None, None, 1, 1.0),  # API server unreachable: 1 s, doubling
        (None, None, 3, 4.0),
        (503, None, 7, 30.0),  # at most 30 s
        (429, 2.0, 1, 2.0),  # never before Retry-After
        (429, 2.0, 3, 4.0),  # nor before the backoff
        (429, None, 1, 1.0),
    ],
)
def test_status_retry_delay(
    status: int | None, retry_after_s: float | None, failures: int, delay_s: float
) -> None:
    error = kube.KubeError("refused", status=status, retry_after_s=retry_after_s)
    assert handlers._status_retry_delay(error, failures) == delay_s


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("2", 2.0), ("0", 0.0), (None, None), ("-1", None), ("inf", None), ("nan", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", None)],
)  # fmt: skip
def test_retry_after_header(header: str | None, seconds: float | None) -> None:
    error = client.ApiException(status=429)
    error.headers = {} if header is None else {"Retry-After": header}
    assert kube._retry_after(error) == seconds
