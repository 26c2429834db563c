"""The GPU-host deployment: docker-compose.yml, .env.example and the gateway image's Dockerfile.

No Docker engine runs here, so the compose file is checked by Debian's `docker-compose config`
(the real parser and validator of the compose format), the Dockerfile by hadolint and by
reading its instructions, and the image's command by running it here with only the runtime
dependencies importable, against the real CPU Triton. The model-control restriction the compose
file gives Triton is proven by starting the real local tritonserver with exactly those flags.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from gateway.config import GatewaySettings
from lipsync.paths import REPO_ROOT
from perf.servers import child_process

COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_PERF = REPO_ROOT / "docker" / "compose.perf.yml"
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

CONTROL_KEY_VAR = "LIPSYNC_TRITON_CONTROL_KEY"
TEST_CONTROL_KEY = "5f0c2d9e8b7a6f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c"
"""A key of the shape `openssl rand -hex 32` makes, put into the env file the tests use."""

RESTRICTED_FLAG = re.compile(
    r"--(?P<flag>grpc-restricted-protocol|http-restricted-api)="
    r"(?P<protocols>[a-z,-]+):(?P<header>[A-Za-z0-9-]+)=(?P<key>.+)"
)
"""Triton's `--grpc-restricted-protocol` / `--http-restricted-api` value:
`<protocol>[,<protocol>...]:<header>=<key>` (Triton's "Limit Endpoint Access")."""


def _tool(name: str) -> str:
    """A command from the venv's bin folder or PATH (installed by scripts/setup.sh)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is not installed; run scripts/setup.sh"
    return found


def example_env(**values: str) -> str:
    """.env.example's text with the control key set to `TEST_CONTROL_KEY` and `values`
    (NAME=value) replacing the listed defaults."""
    values = {CONTROL_KEY_VAR: TEST_CONTROL_KEY, **values}
    lines = ENV_EXAMPLE.read_text().splitlines()
    for name, value in values.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{name}=")]
        assert len(hits) == 1, f".env.example lists {name} {len(hits)} times"
        lines[hits[0]] = f"{name}={value}"
    return "\n".join(lines) + "\n"


def run_compose_config(env_text: str, *extra_files: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose --env-file ENV -f docker-compose.yml [-f EXTRA...] config` with `env_text`
    as ENV and nothing else from this process's environment."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    files = [arg for f in (COMPOSE, *extra_files) for arg in ("-f", str(f))]
    with tempfile.NamedTemporaryFile("w", suffix=".env") as env_file:
        env_file.write(env_text)
        env_file.flush()
        return subprocess.run(
            [_tool("docker-compose"), "--env-file", env_file.name, *files, "config"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )


def compose_config(env_text: str | None = None, *extra_files: Path) -> dict[str, Any]:
    """The resolved compose model, parsed (`example_env()` by default); fails with
    docker-compose's stderr if it refuses the files."""
    proc = run_compose_config(example_env() if env_text is None else env_text, *extra_files)
    assert proc.returncode == 0, f"docker-compose config refused the file:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, published port, container port) of each published port of a resolved
    compose service; the address is "" when the port binds every interface."""
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.append((entry.get("host_ip", ""), int(entry["published"]), int(entry["target"])))
        else:  # "[HOST_IP:]PUBLISHED:TARGET[/PROTO]"
            *host, published, target = str(entry).split("/")[0].split(":")
            ports.append((host[0] if host else "", int(published), int(target)))
    return ports


def restricted_flags(command: list[str]) -> dict[str, re.Match[str]]:
    """Triton's restricted-protocol flags in a command, by flag name (each at most once)."""
    found: dict[str, re.Match[str]] = {}
    for arg in command:
        match = RESTRICTED_FLAG.fullmatch(arg)
        if match:
            assert match["flag"] not in found, f"{match['flag']} given twice: {command}"
            found[match["flag"]] = match
    return found


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


def test_settings_flow_from_the_env_file() -> None:
    cfg = compose_config(example_env(GATEWAY_HTTP_PORT="9085", TRITON_GPU_DEVICE="3",
                                     LIPSYNC_JPEG_QUALITY="70"))
    gateway = cfg["services"]["gateway"]
    assert {p["target"]: p["published"] for p in gateway["ports"]}[8085] == 9085
    assert gateway["environment"]["LIPSYNC_JPEG_QUALITY"] == "70"
    devices = cfg["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["device_ids"] == ["3"]


def test_env_example_lists_exactly_the_variables_the_compose_file_uses() -> None:
    text = COMPOSE.read_text() + COMPOSE_PERF.read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}", text))
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


# ----------------------------------------------------------------------------- Triton not exposed


def test_compose_refuses_to_start_without_the_control_key() -> None:
    """.env.example as shipped (empty key) and a file without the variable are both refused,
    with a message that says how to make the key."""
    without = "\n".join(line for line in example_env().splitlines()
                        if not line.startswith(f"{CONTROL_KEY_VAR}="))
    for env_text in (ENV_EXAMPLE.read_text(), without):
        proc = run_compose_config(env_text)
        assert proc.returncode != 0, "docker-compose accepted the file without the control key"
        assert CONTROL_KEY_VAR in proc.stderr and "openssl rand -hex 32" in proc.stderr, proc.stderr


def test_triton_publishes_no_port_and_sits_on_an_internal_network() -> None:
    cfg = compose_config()
    triton, gateway = cfg["services"]["triton"], cfg["services"]["gateway"]
    assert published_ports(triton) == [], f"Triton publishes {published_ports(triton)}"
    assert "network_mode" not in triton, "Triton must not share the host's network"
    internal = {name for name, net in cfg["networks"].items() if (net or {}).get("internal")}
    assert set(triton["networks"]) and set(triton["networks"]) <= internal, (
        f"Triton is on {set(triton['networks'])}, internal networks are {internal}")
    # the gateway reaches Triton on that network and serves clients on another one
    assert set(triton["networks"]) <= set(gateway["networks"])
    assert set(gateway["networks"]) - internal, "the gateway has no network its ports publish on"
    assert {(p, t) for _, p, t in published_ports(gateway)} == {(50051, 50051), (8085, 8085)}
    assert gateway["environment"]["LIPSYNC_TRITON_URL"] == "triton:8001"


def test_triton_model_control_needs_the_key_only_the_gateway_gets() -> None:
    cfg = compose_config()
    triton, gateway = cfg["services"]["triton"], cfg["services"]["gateway"]
    flags = restricted_flags(triton["command"])
    assert set(flags) == {"grpc-restricted-protocol", "http-restricted-api"}, triton["command"]
    for match in flags.values():
        assert "model-repository" in match["protocols"].split(","), match[0]
        # the gateway's own calls (readiness, model config, statistics, inference) stay open
        assert not {"health", "inference", "model-config", "statistics"} & set(
            match["protocols"].split(",")), match[0]
        assert match["header"] == "lipsync-model-control"
        assert match["key"] == TEST_CONTROL_KEY
    assert gateway["environment"][CONTROL_KEY_VAR] == TEST_CONTROL_KEY
    holders = [name for name, svc in cfg["services"].items()
               if TEST_CONTROL_KEY in json.dumps(svc)]
    assert sorted(holders) == ["gateway", "triton"]


def test_perf_override_publishes_triton_on_loopback_only() -> None:
    cfg = compose_config(example_env(TRITON_GRPC_PORT="18001", TRITON_METRICS_PORT="18002"),
                         COMPOSE_PERF)
    triton = cfg["services"]["triton"]
    assert sorted(published_ports(triton)) == [("127.0.0.1", 18001, 8001), ("127.0.0.1", 18002, 8002)]
    assert set(restricted_flags(triton["command"])) == {"grpc-restricted-protocol",
                                                         "http-restricted-api"}


@pytest.mark.triton
def test_compose_restriction_flags_on_the_real_server(demo_package: Any, start_triton: Any) -> None:
    """The local tritonserver started with the compose file's restriction flags: model control
    without the key (or with a wrong one) is refused on gRPC and HTTP, with it a model loads;
    inference, model config and statistics (what the gateway calls besides load) need none."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from lipsync.contract import (
        AUDIO_ENCODER_MODEL,
        ENCODER_FEATURE,
        ENCODER_MEL,
        avatar_model_name,
    )
    from lipsync.paths import MODEL_REPOSITORY_CPU

    command = compose_config()["services"]["triton"]["command"]
    flags = restricted_flags(command)
    header = flags["grpc-restricted-protocol"]["header"]
    server = start_triton(MODEL_REPOSITORY_CPU, load_models=(AUDIO_ENCODER_MODEL,),
                          extra_args=[m[0] for m in flags.values()])
    unet = avatar_model_name(demo_package.manifest.name)
    grpc_key = {f"triton-grpc-protocol-{header}": TEST_CONTROL_KEY}  # Triton prefixes gRPC's
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        refused: list[tuple[str, Any]] = [
            ("load", lambda h: client.load_model(unet, headers=h)),
            ("unload", lambda h: client.unload_model(AUDIO_ENCODER_MODEL, headers=h)),
            ("index", lambda h: client.get_model_repository_index(headers=h)),
            ("shared memory", lambda h: client.get_system_shared_memory_status(headers=h)),
            ("trace", lambda h: client.get_trace_settings(headers=h)),
            ("logging", lambda h: client.get_log_settings(headers=h)),
        ]
        wrong = {f"triton-grpc-protocol-{header}": "0" * 64}
        unprefixed = {header: TEST_CONTROL_KEY}
        for what, call in refused:
            for headers in (None, wrong, unprefixed):
                with pytest.raises(InferenceServerException, match="restricted"):
                    call(headers)
                    pytest.fail(f"gRPC {what} passed with headers {headers}")
        for key in (None, "0" * 64):
            req = urllib.request.Request(
                f"{server.http_url}/v2/repository/models/{unet}/load", data=b"{}", method="POST",
                headers={header: key} if key else {})
            with pytest.raises(urllib.error.HTTPError) as refused_http:
                urllib.request.urlopen(req, timeout=30)
            assert refused_http.value.code == 403
        assert client.is_model_ready(AUDIO_ENCODER_MODEL), "a refused unload unloaded the model"
        assert not client.is_model_ready(unet), "a refused load loaded the model"

        # inference, model config and statistics need no key
        mel = grpcclient.InferInput(ENCODER_MEL.name, list(ENCODER_MEL.batch_shape(2)),
                                    ENCODER_MEL.triton_dtype)
        mel.set_data_from_numpy(np.zeros(ENCODER_MEL.batch_shape(2), ENCODER_MEL.dtype))
        result = client.infer(AUDIO_ENCODER_MODEL, [mel])
        assert result.as_numpy(ENCODER_FEATURE.name).shape == ENCODER_FEATURE.batch_shape(2)
        assert client.get_model_config(AUDIO_ENCODER_MODEL).config.name == AUDIO_ENCODER_MODEL
        assert client.get_inference_statistics(AUDIO_ENCODER_MODEL).model_stats

        # with the key: gRPC loads the model, HTTP answers the repository index
        client.load_model(unet, headers=grpc_key)
        assert client.is_model_ready(unet)
        index = urllib.request.Request(f"{server.http_url}/v2/repository/index", data=b"{}",
                                       method="POST", headers={header: TEST_CONTROL_KEY})
        with urllib.request.urlopen(index, timeout=30) as resp:
            names = {m["name"] for m in json.load(resp)}
        assert {unet, AUDIO_ENCODER_MODEL} <= names
    finally:
        client.close()
    assert server.log_file is not None
    assert TEST_CONTROL_KEY not in server.log_file.read_text(), "Triton logged the control key"


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
    health = next(i["value"] for i in stage if i["instruction"] == "HEALTHCHECK")
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
    launch = [sys.executable, "-c", launcher, *cmd[1:]]
    with child_process(launch, env, log_path, cwd=tmp_path) as proc:
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
    # the healthcheck fails once the gateway is gone
    gone = subprocess.run([sys.executable, *health_cmd[1:]], env=env, capture_output=True, timeout=30)
    assert gone.returncode != 0
