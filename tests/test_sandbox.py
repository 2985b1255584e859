"""`batchpilot sandbox` and docs/try-it-locally.md, run as a new user would.

The page's shell blocks run literally, in order, in one shell session (each
block's exports carry to the next, as `eval "$(scripts/sandbox env)"` does
in a terminal); between them the test waits for what the page promises
(the policy steering both pods) and checks each command's output. The
quickstart's first step (docs/quickstart.md) runs against the same sandbox.
Only BATCHPILOT_SANDBOX_DIR differs from a user's shell, so that the test's
sandbox never meets one a user has running.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from stack.checks import eventually

from batchpilot.operator.kube import GROUP, PLURAL, VERSION
from batchpilot.sim.sandbox.process import http_get
from batchpilot.sim.sandbox.session import ADMIN_PORT, POD_LABELS, SandboxState

pytestmark = [pytest.mark.stack, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "try-it-locally.md"
QUICKSTART = REPO / "docs" / "quickstart.md"
# `up` takes 20-30 s on an idle 2-core machine; the policy's first steered
# step comes 10-20 s after it is applied (10 s interval, 20 s window).
COMMAND_TIMEOUT_S = 300
STEER_TIMEOUT_S = 120.0


def shell_blocks(page: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)


class Shell:
    """One shell session across commands: each run starts from the exports the last left."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.exports = workdir / "exports.sh"
        self.exports.write_text("")
        self.env = env

    def run(self, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        wrapped = f"source {self.exports}\n{script}\nexport -p > {self.exports}\n"
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", wrapped],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
        )  # fmt: skip
        if check:
            assert done.returncode == 0, f"{script!r} failed:\n{done.stdout}\n{done.stderr}"
        return done


@pytest.fixture
def sandbox_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {**os.environ, "BATCHPILOT_SANDBOX_DIR": str(tmp_path / "sandbox")}
    yield env
    # Whatever a failed assertion left running goes with the test.
    subprocess.run(
        [str(REPO / ".venv" / "bin" / "batchpilot"), "sandbox", "down"],
        env=env, capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False,
    )  # fmt: skip


def _policy(state: SandboxState, name: str) -> dict[str, Any]:
    with state.api_client() as api:
        policy: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, state.namespace, PLURAL, name
        )
    return policy


def _gate_limit(admin_url: str) -> int | None:
    reply = http_get(f"{admin_url}/config")
    assert reply is not None and reply[0] == 200, reply
    limit: int | None = json.loads(reply[1])["knobs"].get("max_concurrency")
    return limit


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue  # exited meanwhile
    return found


def test_the_try_it_locally_page_runs_as_written(
    tmp_path: Path, sandbox_env: dict[str, str]
) -> None:
    directory = Path(sandbox_env["BATCHPILOT_SANDBOX_DIR"])
    shell = Shell(tmp_path, sandbox_env)
    start, connect, apply, explain, inspect, recommend, finish = shell_blocks(PAGE)

    started = shell.run(start)
    assert "ready" in started.stdout and "summarizer-vllm-1" in started.stdout, started.stdout
    state = SandboxState.read(directory)
    assert state is not None and state.supervisor_alive()
    # Idempotent: a second `up` shows the running sandbox and starts nothing.
    again = shell.run(start)
    assert "already running" in again.stdout
    assert SandboxState.read(directory) == state

    pods = shell.run(connect)
    assert re.search(r"summarizer-vllm-0\s+1/1\s+Running", pods.stdout), pods.stdout
    assert re.search(r"summarizer-vllm-1\s+1/1\s+Running", pods.stdout), pods.stdout

    applied = shell.run(apply)
    assert "inferencepolicy.batchpilot.dev/summarizer created" in applied.stdout

    # What the page promises: within a minute both pods run what the policy chose.
    def steered() -> tuple[bool, Any]:
        summary = _policy(state, "summarizer").get("status", {}).get("applied", {}).get("summary")
        limits = [_gate_limit(pod.admin_url) for pod in state.pods]
        done = bool(summary and summary.startswith("2/2")) and None not in limits
        return done, {"applied": summary, "gate limits": limits}

    eventually(steered, "the sandbox policy steering both pods", STEER_TIMEOUT_S, poll_s=1.0)
    assert all(pod.admin_url.endswith(f":{ADMIN_PORT}") for pod in state.pods)

    explained = shell.run(explain)
    assert "InferencePolicy sandbox/summarizer: mode Auto, pods 2/2 ready" in explained.stdout
    for pod in state.pods:
        assert pod.name in explained.stdout

    # Two JSON documents back to back: neither answer ends with a newline.
    printed = shell.run(inspect).stdout
    config, end = json.JSONDecoder().raw_decode(printed)
    query, _ = json.JSONDecoder().raw_decode(printed[end:].lstrip())
    assert config["knobs"].get("max_concurrency") is not None
    assert query["status"] == "success" and query["data"]["result"], query

    shell.run(recommend)
    assert _policy(state, "summarizer")["spec"]["mode"] == "Recommend"

    # docs/quickstart.md step 1, as written, against the same pods: the
    # policy's own selector (not the sandbox policy's) finds both.
    apply_recommend, read_recommendation = shell_blocks(QUICKSTART)[:2]
    shell.run(apply_recommend)

    def selected() -> tuple[bool, Any]:
        policy = _policy(state, "summarizer")
        status = policy.get("status", {})
        pods = status.get("pods", {}).get("summary")
        current = status.get("observedGeneration") == policy["metadata"]["generation"]
        return current and pods == "2/2", (status.get("observedGeneration"), pods)

    eventually(selected, "the quickstart's policy selecting both sandbox pods", STEER_TIMEOUT_S)
    assert _policy(state, "summarizer")["spec"]["selector"]["matchLabels"] == POD_LABELS
    assert "Name:         summarizer" in shell.run(read_recommendation).stdout

    status_then_down = shell.run(finish)
    assert re.search(r"gate summarizer-vllm-1 .* up", status_then_down.stdout)
    assert f"stopped the sandbox and removed {directory}" in status_then_down.stdout
    assert not directory.exists()
    assert not state.supervisor_alive()
    assert _processes_mentioning(str(directory)) == []
    assert http_get(f"{state.pods[0].admin_url}/readyz") is None

    stopped = shell.run("scripts/sandbox status", check=False)
    assert stopped.returncode == 3 and "no sandbox is running" in stopped.stdout
    assert "no sandbox was running" in shell.run("scripts/sandbox down").stdout


def test_a_taken_admin_port_is_named_and_nothing_is_left_running(
    sandbox_env: dict[str, str],
) -> None:
    directory = Path(sandbox_env["BATCHPILOT_SANDBOX_DIR"])
    with socket.socket() as squatter:
        # A listener blocks the port even for SO_REUSEADDR binds; the option
        # only lets this one start while an earlier gate's connections linger.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.3", ADMIN_PORT))
        squatter.listen()
        failed = subprocess.run(
            [str(REPO / ".venv" / "bin" / "batchpilot"), "sandbox", "up"],
            env=sandbox_env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
        )  # fmt: skip
    assert failed.returncode == 1
    assert f"port {ADMIN_PORT} on 127.0.0.3 is taken" in failed.stderr, failed.stderr
    # The supervisor stopped what it had started (the API server) and exited.
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(directory)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(directory)) == []


def test_example_policies_select_the_example_workloads_and_the_sandbox() -> None:
    """Each example policy's pods exist: its selector matches the pod template
    of an example workload (or its targetRef names one), and the sandbox's pods
    carry those labels too."""
    workloads = {}
    for path in (REPO / "examples").glob("*-deployment.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("Deployment", "StatefulSet"):
                workloads[doc["metadata"]["name"]] = doc["spec"]["template"]["metadata"]["labels"]
    policies = [
        (path.name, doc)
        for path in sorted((REPO / "examples").glob("policy-*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "InferencePolicy"
    ]
    assert policies
    for name, policy in policies:
        spec = policy["spec"]
        if "targetRef" in spec:
            assert spec["targetRef"]["name"] in workloads, name
            continue
        wanted = spec["selector"]["matchLabels"].items()
        assert any(wanted <= labels.items() for labels in workloads.values()), name
        if name in ("policy-recommend.yaml", "policy-sandbox.yaml"):
            assert wanted <= POD_LABELS.items(), name
