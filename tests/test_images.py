"""The two images as scripts/build-images builds them, run with podman as the
chart and a serving pod run them: as uid and gid 10001, on a read-only root
with no writable place but the operator's /tmp.

Needs this tree's images: scripts/build-images (seconds when nothing changed,
about 4 minutes cold on 2 cores); without them each test fails with that fix.
The gate runs with --network host so that it reaches `batchpilot sim serve` on
the host's loopback and the test reaches it; every server binds 127.0.0.1.
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from stack.images import Container, image_ref, podman, run_container
from test_faults_gate import (
    CALIBRATION,
    HEALTH_INTERVAL_S,
    TOKEN,
    Answer,
    completion,
    run,
    send,
    start_sim,
)

from batchpilot.sim.sandbox.process import http_get

pytestmark = pytest.mark.images

# readOnlyRootFilesystem: podman's --read-only alone would also mount a tmpfs
# on /tmp, /run and /var/tmp, which a pod does not get.
READ_ONLY = ("--read-only", "--read-only-tmpfs=false")
# The chart's emptyDir at /tmp, the operator's only writable place.
OPERATOR_TMP = ("--tmpfs", "/tmp")
LISTENING = re.compile(r"listening on port (\d+), admin on port (\d+)")
# A gate with nothing in flight drains at once; 30 s is the pod's grace period.
GRACE_S = 30


@pytest.mark.parametrize(("name", "writable"), [("operator", OPERATOR_TMP), ("gate", ())])
def test_image_runs_as_uid_and_gid_10001(name: str, writable: tuple[str, ...]) -> None:
    ref = image_ref(name)
    # No --user: the image's own USER must be the non-root one.
    done = podman(
        "run", "--rm", "--network", "none", *READ_ONLY, *writable, "--entrypoint", "id", ref
    )
    assert done.stdout.strip() == (
        "uid=10001(batchpilot) gid=10001(batchpilot) groups=10001(batchpilot)"
    )


def test_operator_image_runs_its_command_with_only_tmp_writable() -> None:
    ref = image_ref("operator")
    options = ("--rm", "--network", "none", *READ_ONLY, *OPERATOR_TMP)
    # podman() raises on a non-zero exit: the entrypoint runs the CLI.
    shown = podman("run", *options, ref, "operator", "--help")
    assert "Usage: batchpilot operator" in shown.stdout
    assert "--config" in shown.stdout

    # What the running operator imports, and matplotlib, which writes its
    # font cache on import: only MPLCONFIGDIR under /tmp takes it. Anywhere
    # else, matplotlib would warn on stderr, and any other write would fail.
    script = (
        "import os, batchpilot.operator.handlers, matplotlib.pyplot, sklearn.linear_model\n"
        "print(*sorted(os.listdir('/tmp')))"
    )
    loaded = podman("run", *options, "--entrypoint", "python", ref, "-c", script)
    assert loaded.stderr == ""
    assert loaded.stdout.split() == ["matplotlib"]


def _gate_ports(gate: Container) -> tuple[int, int]:
    """The proxy and admin ports the gate picked (it was given port 0), from its log."""
    gate.wait_until(lambda: LISTENING.search(gate.logs()) is not None, 30, "listening")
    match = LISTENING.search(gate.logs())
    assert match is not None
    return int(match.group(1)), int(match.group(2))


@pytest.mark.skipif(not CALIBRATION.exists(), reason=f"needs the calibration data at {CALIBRATION}")
def test_gate_image_probes_and_streams_from_an_engine_on_the_host(tmp_path: Path) -> None:
    ref = image_ref("gate")
    sim = start_sim(tmp_path)
    try:
        options = (
            *("--network", "host", *READ_ONLY, "--user", "10001"),
            *("--env", f"BATCHPILOT_GATE_TOKEN={TOKEN}"),
            *("--env", f"BATCHPILOT_GATE_HEALTH_INTERVAL_S={HEALTH_INTERVAL_S}"),
        )
        args = ("--upstream", sim.url, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
        with run_container(ref, *args, options=options) as gate:
            proxy_port, admin_port = _gate_ports(gate)
            proxy = f"http://127.0.0.1:{proxy_port}"
            admin = f"http://127.0.0.1:{admin_port}"

            def readyz() -> int | None:
                answer = http_get(admin + "/readyz")
                return None if answer is None else answer[0]

            gate.wait_until(lambda: readyz() == 200, 30, "ready")
            assert http_get(admin + "/livez") == (200, b"ok\n")

            async def one_stream() -> Answer:
                async with aiohttp.ClientSession() as session:
                    return await send(session, proxy, completion(16))

            answer = run(one_stream())
            assert answer.complete_stream, answer
            assert answer.token_events() == 16

            metrics = http_get(admin + "/metrics")
            assert metrics is not None and metrics[0] == 200
            unlabelled = {
                sample.name: sample.value
                for family in text_string_to_metric_families(metrics[1].decode())
                for sample in family.samples
                if not sample.labels
            }
            assert unlabelled["batchpilot_gate_admitted_total"] == 1

            # Readiness follows the engine, so a pod without one takes no traffic.
            sim.process.stop()
            gate.wait_until(lambda: readyz() == 503, 10, "unready without its engine")

            # The gate is PID 1: SIGTERM must reach its handler, drain, and exit 0
            # (not 137 after the grace period, as an ignored SIGTERM would).
            assert gate.stop(GRACE_S) == 0
            assert "gate stopped" in gate.logs()
    finally:
        sim.process.stop()
