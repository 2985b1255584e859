"""The serving manifests of examples/, made to run on the test node.

An example Deployment names an engine image (vLLM, SGLang, llama.cpp) that
needs a GPU and a registry, neither of which the test node has. Everything
else in it runs as shipped: the gate sidecar (from the locally built gate
image), its arguments, ports, probes, volumes, security context, the
Downward API file, the preStop drain. The engine container keeps its name,
ports, probes and lifecycle and gets the simulator instead
(`batchpilot sim serve`, from the operator image, which carries the whole
distribution), listening exactly where the example's engine would: the
`--host`/`--port` it was given. So a wiring mistake of the example, such as
an engine bound to 127.0.0.1 behind a probe on the pod IP, shows on the node.

    runnable = simulated(doc, images=Images(operator=..., gate=...),
                           engine=SimEngine(max_num_seqs=512, max_num_batched_tokens=8192))

The simulator's calibration CSV reaches the pod as a ConfigMap
(`calibration_configmap`), mounted at CALIBRATION_MOUNT.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CALIBRATION_MOUNT = "/etc/batchpilot-sim"
CALIBRATION_CONFIGMAP = "batchpilot-sim-calibration"
CALIBRATION_KEY = "calibration.csv"
# Resources only a GPU node has: a pod asking for them never schedules here.
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")
GATE_CONTAINER = "gate"
# The simulator's calibration: measured vLLM step latencies, from ../shared
# (not in this repository).
CALIBRATION = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "calibration"
    / "llama3.1-8b_vllm_step_latency.csv"
)


@dataclass(frozen=True)
class Images:
    """Image references as imported into the node's containerd."""

    operator: str
    gate: str


@dataclass(frozen=True)
class SimEngine:
    """The simulated engine behind the gate: its ceilings and speed.

    The ceilings are what the example's policy declares in spec.engine, so
    the operator steers the simulator within the same bounds it would steer
    the real engine. `slowdown` x the calibrated H100 step cost keeps two CPU
    cores able to stream what the engines generate; `time_scale` runs the
    simulation faster than the wall clock.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_tokens: int = 20_000
    model: str = "meta-llama/Meta-Llama-3.1-8B"
    system: str = "h100_sxm"
    slowdown: float = 16.0
    time_scale: float = 1.0
    runtime_tunable: bool = False


def calibration_configmap(calibration: Path, namespace: str) -> dict[str, Any]:
    """The ConfigMap carrying the simulator's calibration CSV (12 KB)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CALIBRATION_CONFIGMAP, "namespace": namespace},
        "data": {CALIBRATION_KEY: calibration.read_text()},
    }


def engine_listen(args: Sequence[str]) -> tuple[str, int]:
    """The host and port an engine's arguments bind (`--host=X` or `--host X`)."""
    values: dict[str, str] = {}
    for index, arg in enumerate(args):
        for flag in ("--host", "--port"):
            if arg.startswith(f"{flag}="):
                values[flag] = arg.split("=", 1)[1]
            elif arg == flag and index + 1 < len(args):
                values[flag] = args[index + 1]
    missing = [flag for flag in ("--host", "--port") if flag not in values]
    if missing:
        raise ValueError(f"engine args {list(args)} set no {' or '.join(missing)}")
    return values["--host"], int(values["--port"])


def _sim_args(engine: SimEngine, host: str, port: int) -> list[str]:
    return [
        "sim",
        "serve",
        f"--calibration={CALIBRATION_MOUNT}/{CALIBRATION_KEY}",
        f"--model={engine.model}",
        f"--system={engine.system}",
        f"--listen={host}:{port}",
        f"--max-num-seqs={engine.max_num_seqs}",
        f"--max-num-batched-tokens={engine.max_num_batched_tokens}",
        f"--kv-cache-tokens={engine.kv_cache_tokens}",
        f"--slowdown={engine.slowdown:g}",
        f"--time-scale={engine.time_scale:g}",
        "--runtime-tunable" if engine.runtime_tunable else "--no-runtime-tunable",
    ]


def _without_gpus(container: dict[str, Any]) -> None:
    for kind in ("limits", "requests"):
        amounts = container.get("resources", {}).get(kind)
        if amounts:
            for resource in GPU_RESOURCES:
                amounts.pop(resource, None)


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Pod, or of a Deployment's pod template."""
    return workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]


def simulated(workload: dict[str, Any], *, images: Images, engine: SimEngine) -> dict[str, Any]:
    """A copy of an example Pod or Deployment whose engine is the simulator and
    whose gate is the local gate image; everything else as the example ships it."""
    result = copy.deepcopy(workload)
    pod = pod_spec(result)
    engines = [c for c in pod["containers"] if c["name"] != GATE_CONTAINER]
    if len(engines) != 1 or len(engines) == len(pod["containers"]):
        names = [c["name"] for c in pod["containers"]]
        raise ValueError(f"expected one engine and one '{GATE_CONTAINER}' container, got {names}")
    for container in pod["containers"]:
        container["imagePullPolicy"] = "Never"
        if container["name"] == GATE_CONTAINER:
            container["image"] = images.gate
            continue
        host, port = engine_listen(container.get("args", []))
        container["image"] = images.operator
        container["command"] = ["batchpilot"]
        container["args"] = _sim_args(engine, host, port)
        # The engine image's own settings (a model cache, a download token)
        # mean nothing to the simulator.
        container.pop("env", None)
        _without_gpus(container)
        container.setdefault("volumeMounts", []).append(
            {"name": "sim-calibration", "mountPath": CALIBRATION_MOUNT, "readOnly": True}
        )
    pod.setdefault("volumes", []).append(
        {"name": "sim-calibration", "configMap": {"name": CALIBRATION_CONFIGMAP}}
    )
    return result


def short_to_long_scenario(
    name: str,
    *,
    max_num_seqs: int,
    kv_cache_tokens: int,
    slo_ttft_ms: int,
    slo_tpot_ms: int,
    shift_s: float,
    duration_s: float,
    max_num_batched_tokens: int = 8192,
) -> str:
    """The end-to-end tests' scenario: 6 requests/s whose outputs shift from
    short (p50 10 tokens) to long (p50 100) at `shift_s`.

    The engine runs 16x slower than an H100 (`slowdown`) so that two pods
    saturate at a few requests per second: the same queueing and KV pressure
    as a busy GPU at a request rate two shared CPU cores can stream through
    gates and a client (~1k token chunks per wall second).
    """
    return f"""
name: {name}
seed: 5
engine:
  calibration: {CALIBRATION}
  model: meta-llama/Meta-Llama-3.1-8B
  system: h100_sxm
  slowdown: 16
  kv_cache_tokens: {kv_cache_tokens}
  max_num_seqs: {max_num_seqs}
  max_num_batched_tokens: {max_num_batched_tokens}
replicas: 2
slo: {{ttft_ms: {slo_ttft_ms}, tpot_ms: {slo_tpot_ms}}}
control_interval_s: 10
workload:
  - duration_s: {shift_s:g}
    synthetic:
      arrival: {{process: poisson, rate_rps: 6}}
      prompt_tokens: {{dist: lognormal, p50: 300, p90: 900, max: 2000}}
      output_tokens: {{dist: lognormal, p50: 10, p90: 30, max: 60}}
  - duration_s: {duration_s - shift_s:g}
    synthetic:
      arrival: {{process: poisson, rate_rps: 6}}
      prompt_tokens: {{dist: lognormal, p50: 300, p90: 900, max: 2000}}
      output_tokens: {{dist: lognormal, p50: 100, p90: 200, max: 400}}
"""


def steady_fleet_scenario(name: str, seed: int) -> str:
    """Three simulated replicas under light, steady traffic for an hour.

    Short prompts and outputs at 3 requests/s over three pods: every pod
    completes requests in every 6 s window (what a canary's per-pod scores
    need) at a few percent of one core, and the objectives are far above
    what this load sees. The operator fault tests run their fleets on it.
    """
    return f"""
name: {name}
seed: {seed}
engine:
  calibration: {CALIBRATION}
  model: meta-llama/Meta-Llama-3.1-8B
  system: h100_sxm
  kv_cache_tokens: 200000
  max_num_seqs: 256
  max_num_batched_tokens: 8192
replicas: 3
slo: {{ttft_ms: 5000, tpot_ms: 500}}
workload:
  - duration_s: 3600
    synthetic:
      arrival: {{process: poisson, rate_rps: 3}}
      prompt_tokens: {{dist: lognormal, p50: 200, p90: 400, max: 1000}}
      output_tokens: {{dist: lognormal, p50: 8, p90: 16, max: 32}}
"""
