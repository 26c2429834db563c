"""The `lipsync` command line: every command registered the one way (from
`lipsync.cli.COMMAND_MODULES`, command functions `(args) -> int`, port defaults from the
contract); `lipsync gateway` and `lipsync up` as a user runs them: help texts, clear errors for
busy ports, and `lipsync up` end to end in a subprocess (demo avatar present, CPU Triton, gateway
on free ports): it becomes ready, serves a frame, and Ctrl-C (SIGINT) stops the gateway, then
Triton, leaving nothing behind."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lipsync import contract
from lipsync.cli import build_parser
from lipsync.paths import REPO_ROOT
from lipsync.triton_local import free_ports, port_in_use
from tests.up_process import ENV, start_gateway_process, start_up


def lipsync(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lipsync", *args],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout,
    )


def test_top_level_help_lists_the_commands() -> None:
    out = lipsync("--help")
    assert out.returncode == 0, out.stderr
    for command in ("export", "package", "triton", "gateway", "up"):
        assert f"\n    {command} " in out.stdout, command
    assert "the main job" in out.stdout


COMMANDS = [
    ["export", "unet", "--output", "x.onnx"],
    ["export", "audio-encoder", "--output", "x.onnx"],
    ["export", "model-repo", "--avatar", "a", "--onnx", "x.onnx"],
    ["package", "build", "--video", "v.mp4", "--audio", "a.wav", "--name", "a"],
    ["package", "demo"],
    ["package", "verify", "packages/demo"],
    ["triton"],
    ["gateway"],
    ["up"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a[:2]) for a in COMMANDS])
def test_every_command_has_one_function_style(argv: list[str]) -> None:
    import inspect

    func = build_parser().parse_args(argv).func
    signature = inspect.signature(func)
    assert [p.annotation for p in signature.parameters.values()] == ["argparse.Namespace"]
    assert signature.return_annotation == "int"


def test_registering_the_commands_imports_no_heavy_library() -> None:
    """`lipsync --help` stays fast: torch, onnx, onnxruntime and tritonclient load only when a
    command that needs them runs."""
    code = (
        "import sys\nfrom lipsync.cli import build_parser\nbuild_parser()\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'tritonclient') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_port_defaults_come_from_the_contract() -> None:
    parser = build_parser()
    triton = parser.parse_args(["triton"])
    assert (triton.http_port, triton.grpc_port, triton.metrics_port) == (
        contract.TRITON_HTTP_PORT, contract.TRITON_GRPC_PORT, contract.TRITON_METRICS_PORT,
    )
    up = parser.parse_args(["up"])
    assert (up.triton_http_port, up.triton_grpc_port, up.triton_metrics_port) == (
        contract.TRITON_HTTP_PORT, contract.TRITON_GRPC_PORT, contract.TRITON_METRICS_PORT,
    )
    out = lipsync("gateway", "--help")
    assert f"default {contract.GATEWAY_GRPC_PORT};" in out.stdout
    assert f"default {contract.GATEWAY_HTTP_PORT};" in out.stdout
    assert f"localhost:{contract.TRITON_GRPC_PORT}" in out.stdout


WRITERS = [c for c in COMMANDS if c[1:2] in (["model-repo"], ["build"], ["demo"])]


@pytest.mark.parametrize("argv", WRITERS, ids=[" ".join(a[:2]) for a in WRITERS])
def test_commands_that_write_models_can_replace_the_audio_encoder(argv: list[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(argv).replace_audio_encoder is False
    assert parser.parse_args([*argv, "--replace-audio-encoder"]).replace_audio_encoder is True


def test_gateway_help_explains_options_and_environment() -> None:
    out = lipsync("gateway", "--help")
    assert out.returncode == 0, out.stderr
    for text in ("--triton-url", "--grpc-port", "--http-port", "--packages-root", "--jpeg-quality",
                 "LIPSYNC_", "/ws", "/metrics", "OptimizedLipSyncService"):
        assert text in out.stdout, text


def test_up_help_explains_what_it_does() -> None:
    out = lipsync("up", "--help")
    assert out.returncode == 0, out.stderr
    for text in ("demo avatar", "tritonserver", "Ctrl-C", "--triton-grpc-port", "--skip-demo",
                 "UNTRAINED"):
        assert text in out.stdout, text


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", ["up", "gateway"])
def test_busy_http_port_is_a_clear_error(command: str, busy_port: int) -> None:
    extra = ["--skip-demo"] if command == "up" else ["--triton-url", "127.0.0.1:1"]
    out = lipsync(command, "--host", "127.0.0.1", "--http-port", str(busy_port), "--grpc-port", "0", *extra)
    assert out.returncode == 1
    text = out.stdout + out.stderr
    assert f"HTTP port {busy_port} is already in use" in text, text
    assert "--http-port" in text


def test_busy_triton_port_is_a_clear_error(busy_port: int) -> None:
    http, grpc_port = free_ports(2)
    out = lipsync("up", "--skip-demo", "--http-port", str(http), "--grpc-port", str(grpc_port),
                  "--triton-grpc-port", str(busy_port))
    assert out.returncode == 1
    assert f"Triton gRPC port {busy_port} is already in use" in out.stdout + out.stderr


def _get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError:
        return 0, None


@pytest.mark.triton
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_up_end_to_end_then_a_signal_stops_both(
    stop_signal: signal.Signals, gateway_packages_root: Path, tmp_path: Path
) -> None:
    up = start_up(tmp_path, gateway_packages_root)
    proc, log_path, http, grpc_port = up.proc, up.log_path, up.http, up.grpc_port
    t_http, t_grpc, t_metrics = up.triton_ports
    try:
        deadline = time.monotonic() + 240
        ready: Any = None
        while time.monotonic() < deadline and proc.poll() is None:
            status, ready = _get_json(f"http://127.0.0.1:{http}/readyz")
            if status == 200:
                break
            time.sleep(1.0)
        assert proc.poll() is None, log_path.read_text()
        assert ready and ready["ready"] is True, (ready, log_path.read_text())
        with urllib.request.urlopen(
            f"http://127.0.0.1:{http}/api/avatars/demo/frames/0.jpg", timeout=30
        ) as resp:
            assert resp.status == 200 and resp.read(2) == b"\xff\xd8"
        assert port_in_use(t_grpc) and port_in_use(grpc_port)

        proc.send_signal(stop_signal)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        up.stop()
    text = log_path.read_text()
    assert f"http://127.0.0.1:{http}/" in text, text  # the page URL is printed
    assert f"gRPC 127.0.0.1:{grpc_port}" in text  # and the gRPC address
    assert "ready: avatars demo" in text
    assert text.index("gateway stopped") < text.index("Triton stopped"), "gateway first, then Triton"
    for port in (http, grpc_port, t_http, t_grpc, t_metrics):
        assert not port_in_use(port), f"port {port} still in use after Ctrl-C"


@pytest.mark.triton
def test_gateway_command_serves_against_a_running_triton(
    triton_server: Any, gateway_packages_root: Path, tmp_path: Path
) -> None:
    env = {**ENV, "LIPSYNC_JPEG_QUALITY": "70", "LIPSYNC_HTTP_PORT": "1"}  # CLI wins over env
    gateway = start_gateway_process(tmp_path, triton_server.grpc_url, gateway_packages_root, env)
    http, grpc_port, log_path = gateway.http, gateway.grpc_port, gateway.log_path
    try:
        deadline = time.monotonic() + 120
        status, ready = 0, None
        while time.monotonic() < deadline and gateway.proc.poll() is None and status != 200:
            time.sleep(0.5)
            status, ready = _get_json(f"http://127.0.0.1:{http}/readyz")
        assert status == 200 and ready is not None and ready["avatars"] == ["demo"], (
            ready,
            log_path.read_text(),
        )
    finally:
        assert gateway.stop() == 0, log_path.read_text()
    text = log_path.read_text()
    assert "q70" in text, "LIPSYNC_JPEG_QUALITY from the environment (the context logs its JPEG quality)"
    assert f"web page http://127.0.0.1:{http}/" in text
    assert not port_in_use(http) and not port_in_use(grpc_port)
