"""`lipsync gateway` and `lipsync up` as a user runs them: help texts, clear errors for busy
ports, and `lipsync up` end to end in a subprocess (demo avatar present, CPU Triton, gateway on
free ports): it becomes ready, serves a frame, and Ctrl-C (SIGINT) stops the gateway, then
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

from lipsync.paths import REPO_ROOT
from lipsync.triton_local import free_ports, port_in_use
from tests.up_process import ENV, start_up


def lipsync(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lipsync", *args],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout,
    )


def test_top_level_help_lists_the_commands() -> None:
    out = lipsync("--help")
    assert out.returncode == 0, out.stderr
    assert "gateway" in out.stdout and "up" in out.stdout
    assert "the main job" in out.stdout


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
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (loopback)
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
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/api/avatars/demo/frames/0.jpg", timeout=30) as resp:
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
    http, grpc_port = free_ports(2)
    log_path = tmp_path / "gateway.log"
    env = {**ENV, "LIPSYNC_JPEG_QUALITY": "70", "LIPSYNC_HTTP_PORT": "1"}  # CLI wins over env
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lipsync", "gateway", "--host", "127.0.0.1",
             "--triton-url", triton_server.grpc_url, "--http-port", str(http),
             "--grpc-port", str(grpc_port), "--packages-root", str(gateway_packages_root)],
            cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
        )
    try:
        deadline = time.monotonic() + 120
        status, ready = 0, None
        while time.monotonic() < deadline and proc.poll() is None and status != 200:
            time.sleep(0.5)
            status, ready = _get_json(f"http://127.0.0.1:{http}/readyz")
        assert status == 200 and ready["avatars"] == ["demo"], (ready, log_path.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "q70" in text, "LIPSYNC_JPEG_QUALITY from the environment (the context logs its JPEG quality)"
    assert f"web page http://127.0.0.1:{http}/" in text
    assert not port_in_use(http) and not port_in_use(grpc_port)
