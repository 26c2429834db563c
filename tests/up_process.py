"""`lipsync up` as a subprocess on free ports, as a user runs it, and the processes it owns.

`start_up(tmp_path, packages_root, *flags)` starts it (log in ``tmp_path/up.log``, Triton's log
in ``tmp_path/triton.log``); `Up.wait_ready()` waits for ``/readyz`` 200; `Up.children()`
lists its child processes (to find, kill and check the tritonserver it supervises);
`Up.stop()` is the teardown that leaves no process behind. `start_gateway_process` starts
`lipsync gateway` the same way, against a running Triton (``--workers N``: `worker_pids` finds
its workers).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from lipsync.paths import REPO_ROOT
from lipsync.triton_local import free_ports
from tests.fixtures_triton import Process, processes

ENV = {**os.environ, "COLUMNS": "250", "LIPSYNC_LOG_LEVEL": "INFO"}
"""Environment of the subprocess: wide log lines (rich wraps at COLUMNS), INFO level."""


@dataclass
class Up:
    """A running `lipsync up` and its ports (gateway HTTP and gRPC; Triton HTTP, gRPC,
    metrics)."""

    proc: subprocess.Popen[str]
    log_path: Path
    http: int
    grpc_port: int
    triton_ports: tuple[int, int, int]

    def log(self) -> str:
        """Everything it printed so far."""
        return self.log_path.read_text()

    def ports(self) -> tuple[int, ...]:
        """Every port it was told to use."""
        return (self.http, self.grpc_port, *self.triton_ports)

    def children(self) -> list[Process]:
        """Its child processes (zombies included)."""
        return [p for p in processes() if p.ppid == self.proc.pid]

    def stop(self, timeout_s: float = 60.0) -> None:
        """Teardown: if it still runs, SIGTERM (it stops the gateway, then Triton); after
        ``timeout_s`` SIGKILL its tritonserver's process group and it (a SIGKILLed
        `lipsync up` would leave its tritonserver running: it leads its own session)."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for child in self.children():
                if child.name == "tritonserver":
                    os.killpg(child.pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        """Wait until ``/readyz`` answers 200; fail the test (with its log) if it exits or
        is not ready within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.http}/readyz"
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        pytest.fail(f"lipsync up not ready (exit status {self.proc.poll()}):\n{self.log()}")


def start_up(tmp_path: Path, packages_root: Path, *flags: str) -> Up:
    """Start ``lipsync up`` on loopback and free ports, serving ``packages_root``, with
    ``flags`` added to its command line."""
    http, grpc_port, t_http, t_grpc, t_metrics = free_ports(5)
    log_path = tmp_path / "up.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lipsync", "up", "--host", "127.0.0.1",
             "--http-port", str(http), "--grpc-port", str(grpc_port),
             "--packages-root", str(packages_root),
             "--triton-http-port", str(t_http), "--triton-grpc-port", str(t_grpc),
             "--triton-metrics-port", str(t_metrics), "--triton-log", str(tmp_path / "triton.log"),
             *flags],
            cwd=REPO_ROOT, env=ENV, stdout=log_file, stderr=subprocess.STDOUT, text=True,
        )
    return Up(proc, log_path, http, grpc_port, (t_http, t_grpc, t_metrics))


@dataclass
class GatewayProcess:
    """A running `lipsync gateway` and its ports."""

    proc: subprocess.Popen[str]
    log_path: Path
    http: int
    grpc_port: int

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def worker_pids(parent: int) -> list[int]:
    """The gateway workers (`gateway.workers`) of process ``parent``: its children started by
    multiprocessing's spawn (not its resource tracker), zombies left out."""
    pids = []
    for p in processes():
        if p.ppid != parent or p.state == "Z":
            continue
        try:
            cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes()
        except OSError:  # it exited meanwhile
            continue
        if b"spawn_main" in cmdline:
            pids.append(p.pid)
    return sorted(pids)


def start_gateway_process(
    tmp_path: Path,
    triton_url: str,
    packages_root: Path,
    env: dict[str, str] | None = None,
    *flags: str,
) -> GatewayProcess:
    """Start ``lipsync gateway`` on loopback and free ports against ``triton_url``, serving
    ``packages_root``, with ``flags`` added to its command line, its output in
    ``tmp_path/gateway.log`` (environment: `ENV`)."""
    http, grpc_port = free_ports(2)
    log_path = tmp_path / "gateway.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lipsync", "gateway", "--host", "127.0.0.1",
             "--triton-url", triton_url, "--http-port", str(http),
             "--grpc-port", str(grpc_port), "--packages-root", str(packages_root), *flags],
            cwd=REPO_ROOT, env=env or ENV, stdout=log_file, stderr=subprocess.STDOUT, text=True,
        )
    return GatewayProcess(proc, log_path, http, grpc_port)
