"""How the gate ships: the sidecar example is a valid pod wired to the gate's settings,
and the image's slim install (no operator/simulator dependencies) can run `batchpilot-gate`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "gate-sidecar-pod.yaml"
DOCKERFILE = REPO / "gate" / "Dockerfile"
# The image's own project file: the packages and dependencies it installs.
GATE_PROJECT = REPO / "gate" / "image" / "pyproject.toml"
ENTRY_MODULE = "batchpilot.cli.gate"

# What the image leaves out (see gate/Dockerfile): importing any of them from
# the `batchpilot gate` path would crash the sidecar at start.
NOT_IN_GATE_IMAGE = (
    "numpy",
    "sklearn",
    "kopf",
    "kubernetes",
    "matplotlib",
    "prometheus_api_client",
)


def test_sidecar_example_is_a_valid_pod_wired_to_the_gate() -> None:
    pod = yaml.safe_load(EXAMPLE.read_text())
    kubernetes_validate.validate(pod, "1.30", strict=True)
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    gate = containers["gate"]
    env = {item["name"]: item["value"] for item in gate["env"]}
    mounts = {m["name"]: m["mountPath"] for m in gate["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}

    token_volume = next(
        name for name, path in mounts.items() if env["BATCHPILOT_GATE_TOKEN_FILE"].startswith(path)
    )
    assert "secret" in volumes[token_volume]
    podinfo_volume = next(
        name
        for name, path in mounts.items()
        if env["BATCHPILOT_GATE_ANNOTATIONS_FILE"].startswith(path)
    )
    items = volumes[podinfo_volume]["downwardAPI"]["items"]
    assert {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}} in items

    # The gate's upstream is the engine's port; its ports match the image.
    engine_port = containers["engine"]["ports"][0]["containerPort"]
    assert f"--upstream=http://127.0.0.1:{engine_port}" in gate["args"]
    exposed = re.search(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert exposed is not None
    assert {p["containerPort"] for p in gate["ports"]} == {int(p) for p in exposed.group(1).split()}
    assert gate["securityContext"]["readOnlyRootFilesystem"] is True
    # SIGTERM reaches both containers at once: the engine must keep serving
    # until the gate has stopped, and both must be done before the SIGKILL.
    gate_done_s = float(env["BATCHPILOT_GATE_SHUTDOWN_DELAY_S"]) + float(
        env["BATCHPILOT_GATE_GRACE_PERIOD_S"]
    )
    engine_stop_s = containers["engine"]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert gate_done_s <= engine_stop_s < pod["spec"]["terminationGracePeriodSeconds"]


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1)), (
        "base must be pinned to a patch tag"
    )
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2
    user = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user and not user[-1].startswith(("0", "root"))
    assert 'ENTRYPOINT ["batchpilot-gate"]' in text


def test_gate_command_needs_none_of_the_left_out_dependencies() -> None:
    """Run the image's entry point with the left-out packages made unimportable, as in the image."""
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {NOT_IN_GATE_IMAGE!r}:\n"
        "            raise ImportError(f'{name} is not in the gate image')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"from {ENTRY_MODULE} import main\n"
        "sys.argv = ['batchpilot-gate', '--help']\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "--upstream" in done.stdout


def _shipped_modules() -> set[str]:
    """The batchpilot modules the image holds: its COPY lines, as its project maps them."""
    project = tomllib.loads(GATE_PROJECT.read_text())
    package_of = {
        folder: package for package, folder in project["tool"]["setuptools"]["package-dir"].items()
    }
    shipped = set(package_of.values())
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or words[1].startswith("--"):
            continue
        for source in words[1:-1]:
            path = REPO / source
            files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            for file in files:
                relative = file.relative_to(REPO)
                if relative.parts[0] in package_of and relative.suffix == ".py":
                    module = ".".join((package_of[relative.parts[0]], *relative.parts[1:]))
                    shipped.add(module.removesuffix(".py").removesuffix(".__init__"))
    return shipped


def test_gate_entry_point_imports_only_what_the_image_ships() -> None:
    """`batchpilot-gate`'s import closure: no controller, operator, simulator or other
    command, and none of the dependencies the image leaves out."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, json, {ENTRY_MODULE}; print(json.dumps(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    ours = {name for name in loaded if name.split(".")[0] == "batchpilot"} - {"batchpilot"}
    assert ENTRY_MODULE in ours
    assert ours <= _shipped_modules(), sorted(ours - _shipped_modules())
    for name in ours:
        assert not name.startswith(
            ("batchpilot.controller", "batchpilot.operator", "batchpilot.sim")
        ), name
    left_out = sorted(name for name in loaded if name.split(".")[0] in NOT_IN_GATE_IMAGE)
    assert not left_out, left_out


def test_gate_project_agrees_with_the_repository_project() -> None:
    gate = tomllib.loads(GATE_PROJECT.read_text())
    main = tomllib.loads((REPO / "pyproject.toml").read_text())
    for key in ("name", "version", "requires-python", "license"):
        assert gate["project"][key] == main["project"][key], key
    assert gate["project"]["scripts"] == {
        "batchpilot-gate": main["project"]["scripts"]["batchpilot-gate"]
    }
    assert gate["project"]["scripts"]["batchpilot-gate"] == f"{ENTRY_MODULE}:main"
    # Same package folders and the same bounds as the full distribution's.
    main_dirs = main["tool"]["setuptools"]["package-dir"]
    for package, folder in gate["tool"]["setuptools"]["package-dir"].items():
        assert main_dirs[package] == folder, package
    assert set(gate["tool"]["setuptools"]["packages"]) <= set(
        main["tool"]["setuptools"]["packages"]
    )
    assert set(gate["project"]["dependencies"]) <= set(main["project"]["dependencies"])
    assert not {
        re.split(r"[<>=!~ ;\[]", requirement)[0].lower().replace("-", "_")
        for requirement in gate["project"]["dependencies"]
    } & {name.lower() for name in NOT_IN_GATE_IMAGE}
