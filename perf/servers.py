"""Child processes for the benchmarks: run one in its own process group, wait for an HTTP
endpoint, and start the gateway (`lipsync gateway`) on free ports with a given environment.
Used by `perf.compare` and `perf.capacity`."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def wait_http_ok(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float, log_path: Path) -> None:
    """Poll `url` every 0.5 s until it answers 200.

    Raises:
        RuntimeError: `proc` exited, or no 200 within `timeout_s`; with the tail of `log_path`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready within {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def child_process(cmd: Sequence[str], env: Mapping[str, str], log_path: Path,
                  cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a child in its own process group (stdout and stderr to `log_path`); on exit
    SIGTERM the group, then SIGKILL it after 20 s."""
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(list(cmd), env=dict(env), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=cwd)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@dataclass(frozen=True, slots=True)
class GatewayHandle:
    """A gateway started by `start_gateway`.

    Attributes:
        grpc_address: ``127.0.0.1:PORT`` of its gRPC server.
        http_address: ``127.0.0.1:PORT`` of its HTTP/WebSocket server.
        pid: the process started (with workers: their parent).
        log_path: where its output goes.
    """

    grpc_address: str
    http_address: str
    pid: int
    log_path: Path


def gateway_environment(triton_grpc: str, packages_root: Path, timeout_s: float, grpc_port: int,
                        http_port: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The gateway's environment: `base` (default this process's) without any ``LIPSYNC_*``,
    plus where Triton, the ports and the avatars are, the Triton call deadline and log level
    WARNING."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith("LIPSYNC_")}
    env.update({
        "LIPSYNC_TRITON_URL": triton_grpc, "LIPSYNC_HOST": "127.0.0.1",
        "LIPSYNC_GRPC_PORT": str(grpc_port), "LIPSYNC_HTTP_PORT": str(http_port),
        "LIPSYNC_PACKAGES_ROOT": str(packages_root),
        # a loaded 2-core machine can take > 1.5 s for a batch of 8: measure, do not time out
        "LIPSYNC_TRITON_TIMEOUT_S": str(timeout_s),
        "LIPSYNC_LOG_LEVEL": "WARNING",
    })
    return env


@contextlib.contextmanager
def start_gateway(triton_grpc: str, packages_root: Path, workdir: Path, timeout_s: float, *,
                  extra_env: Mapping[str, str] | None = None, name: str = "gateway",
                  base_env: Mapping[str, str] | None = None,
                  ready_timeout_s: float = 180.0,
                  module: Sequence[str] = ("lipsync", "gateway")) -> Iterator[GatewayHandle]:
    """Our gateway (`python -m lipsync gateway`; ``module``: ``python -m`` arguments of another
    server reading the same settings, e.g. ``("perf.protocol_floor",)``) on free ports until
    the block ends.

    It runs in `workdir` (so no ``.env`` of the caller's folder applies) with
    `gateway_environment` plus `extra_env`, logs to ``workdir/<name>.log``, and is ready when
    ``/readyz`` answers 200.

    Raises:
        RuntimeError: it exited or was not ready within `ready_timeout_s`.
    """
    from lipsync.triton_local import free_ports

    grpc_port, http_port = free_ports(2)
    env = gateway_environment(triton_grpc, packages_root, timeout_s, grpc_port, http_port, base_env)
    env.update(extra_env or {})
    log_path = workdir / f"{name}.log"
    with child_process([sys.executable, "-m", *module], env, log_path, cwd=workdir) as proc:
        wait_http_ok(f"http://127.0.0.1:{http_port}/readyz", proc, ready_timeout_s, log_path)
        yield GatewayHandle(f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", proc.pid, log_path)
