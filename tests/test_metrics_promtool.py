"""`promtool check metrics` on every /metrics the project serves, each from the
shipped command as its own process: the gate's admin port, `batchpilot sim
serve`, and the operator against the real API server.

Debian's promtool (2.42) also lints "metric names should not contain ':'",
which vLLM's own `vllm:*` names fail, as prometheus_client renders them too.
`sim serve` must keep vLLM's names (the controller queries them), so that one
problem is allowed for those names, and no other: a sample outside its
family, a missing HELP, a counter without `_total` all fail.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from test_faults_gate import CALIBRATION, sim_and_gate

from batchpilot.sim.sandbox.operator_process import OperatorProcess
from batchpilot.sim.sandbox.process import http_get
from batchpilot.sim.sandbox.tools import SETUP_FIX

# vLLM's names, which promtool's reserved-character lint rejects (see above).
VLLM_COLON = re.compile(r"^vllm:\S+ metric names should not contain ':'$")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(f"promtool not found on PATH: {SETUP_FIX} (installs Debian's prometheus)")
    return found


def promtool_problems(promtool: str, exposition: str) -> list[str]:
    """promtool's findings, one a line; fails on anything but "clean" (0) or "lint problems" (3)."""
    done = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30
    )
    problems = (done.stdout + done.stderr).splitlines()
    assert done.returncode in (0, 3), (done.returncode, problems)
    assert (done.returncode == 3) == bool(problems), (done.returncode, problems)
    return problems


def fetch(url: str) -> str:
    reply = http_get(url)
    assert reply is not None and reply[0] == 200, (url, reply)
    return reply[1].decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """/metrics of sim serve and of the gate in front of it ({"sim": ..., "gate": ...}),
    after generation and passed-through requests, so every family has samples to lint."""
    if not CALIBRATION.exists():
        pytest.skip(f"needs the shared calibration data at {CALIBRATION}")
    with sim_and_gate(tmp_path_factory.mktemp("promtool"), {"max_concurrency": 4}) as (sim, gate):

        async def traffic() -> None:
            url = f"http://127.0.0.1:{gate.proxy_port}"
            body = {"prompt": "hello", "max_tokens": 4, "stream": True}
            async with aiohttp.ClientSession() as client:
                for _ in range(3):
                    async with client.post(f"{url}/v1/completions", json=body) as response:
                        assert response.status == 200
                        await response.read()
                async with client.get(f"{url}/v1/models") as response:
                    assert response.status == 200

        asyncio.run(asyncio.wait_for(traffic(), 60))
        return {
            "sim": fetch(f"{sim.url}/metrics"),
            "gate": fetch(f"http://127.0.0.1:{gate.admin_port}/metrics"),
        }


def test_gate_admin_metrics_pass_promtool(promtool: str, served: dict[str, str]) -> None:
    assert "batchpilot_gate_admitted_total 3.0" in served["gate"]
    assert promtool_problems(promtool, served["gate"]) == []


def test_sim_serve_metrics_pass_promtool_but_for_vllms_own_names(
    promtool: str, served: dict[str, str]
) -> None:
    text = served["sim"]
    assert "vllm:generation_tokens_total 12.0" in text
    problems = promtool_problems(promtool, text)
    assert [line for line in problems if not VLLM_COLON.match(line)] == []
    # Every family is linted, so the one allowed problem was not the only check made.
    assert len(problems) == len(set(re.findall(r"^# TYPE (\S+)", text, flags=re.MULTILINE)))


def test_sim_serve_names_its_families_as_prometheus_client_does(served: dict[str, str]) -> None:
    """vLLM exports with prometheus_client (multiprocess mode, so no `_created`
    series): the same families declared there must read the same."""
    declared = re.findall(r"^# TYPE (\S+) (\S+)$", served["sim"], flags=re.MULTILINE)
    registry = CollectorRegistry()
    kinds: dict[str, Any] = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    for name, kind in declared:
        # prometheus_client takes a counter's name without `_total` and adds it.
        kinds[kind](
            name.removesuffix("_total") if kind == "counter" else name, "-", registry=registry
        )
    reference = re.findall(
        r"^# TYPE (\S+) (\S+)$", generate_latest(registry).decode(), flags=re.MULTILINE
    )
    assert declared == [(name, kind) for name, kind in reference if not name.endswith("_created")]
    assert ("vllm:prompt_tokens_total", "counter") in declared


def test_operator_metrics_pass_promtool(
    promtool: str, kube_api: Any, inferencepolicy_crd: None, namespace: str, tmp_path: Path
) -> None:
    # No policy selects anything here, so Prometheus is never queried: port 9 (discard).
    with OperatorProcess(
        workdir=tmp_path,
        kubeconfig=kube_api.kubeconfig,
        namespaces=[namespace],
        prometheus_url="http://127.0.0.1:9",
    ).start() as operator:
        text = fetch(operator.metrics_url)
    assert "# TYPE batchpilot_operator_decisions_total counter" in text
    assert promtool_problems(promtool, text) == []
