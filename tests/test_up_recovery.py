"""`lipsync up` keeps serving when its tritonserver dies (issue 15), run as a user runs it: a
subprocess on free ports with the demo avatar.

- SIGKILL of tritonserver while a gRPC `StreamInference` call and a WebSocket stream frames:
  both get `triton_unavailable` errors only while it is down, then frames again on the same
  connections; the killed process is reaped (no zombie) and a new one runs on the same ports.
  Phase 2 (gateway side, not built yet): the restart counted in /metrics; the test ends in
  XFAIL at that last check until the gateway exports it.
- A repository that makes tritonserver exit at start: the back-off is in the log, then the
  clear message, and `lipsync up` exits 1 leaving nothing behind.
- `--triton-max-restarts 0`: once the gateway serves, a SIGKILL of tritonserver makes the
  supervisor give up; `lipsync up` stops the gateway and exits 1.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ws_protocol import FrameReply, decode_reply, encode_request
from lipsync.paths import REPO_ROOT
from lipsync.triton_local import free_ports, port_in_use
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.fixtures_triton import reaped

pytestmark = pytest.mark.triton

ENV = {**os.environ, "COLUMNS": "250", "LIPSYNC_LOG_LEVEL": "INFO"}
AVATAR = "demo"
PACE_S = 0.1
"""Seconds between two frame requests of one stream."""
RECOVERY_S = 20.0
"""Issue 15: frames again on the same connections within this long after the SIGKILL (s)."""


@dataclass
class Up:
    """A `lipsync up` subprocess and its ports."""

    proc: subprocess.Popen[str]
    log_path: Path
    http: int
    grpc_port: int
    triton_ports: tuple[int, int, int]

    def log(self) -> str:
        return self.log_path.read_text()

    def ports(self) -> tuple[int, ...]:
        return (self.http, self.grpc_port, *self.triton_ports)


def _start_up(tmp_path: Path, packages_root: Path, *extra: str) -> Up:
    http, grpc_port, t_http, t_grpc, t_metrics = free_ports(5)
    log_path = tmp_path / "up.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lipsync", "up", "--host", "127.0.0.1",
             "--http-port", str(http), "--grpc-port", str(grpc_port),
             "--packages-root", str(packages_root),
             "--triton-http-port", str(t_http), "--triton-grpc-port", str(t_grpc),
             "--triton-metrics-port", str(t_metrics), "--triton-log", str(tmp_path / "triton.log"),
             *extra],
            cwd=REPO_ROOT, env=ENV, stdout=log_file, stderr=subprocess.STDOUT, text=True,
        )
    return Up(proc, log_path, http, grpc_port, (t_http, t_grpc, t_metrics))


@pytest.fixture
def stop_up() -> Iterator[list[Up]]:
    """`lipsync up` processes a test started; killed at teardown if still running."""
    started: list[Up] = []
    yield started
    for up in started:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()


def _wait_ready(up: Up, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and up.proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{up.http}/readyz", timeout=10) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"lipsync up not ready (exit status {up.proc.poll()}):\n{up.log()}")


def _children(ppid: int) -> list[tuple[int, str, str]]:
    """(pid, command name, state) of the processes whose parent is `ppid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        head, _, rest = text.rpartition(")")
        fields = rest.split()
        if int(fields[1]) == ppid:
            found.append((int(stat.parent.name), head.split("(", 1)[1], fields[0]))
    return found


def _tritonserver_pid(up: Up) -> int:
    pids = [pid for pid, name, state in _children(up.proc.pid) if name == "tritonserver" and state != "Z"]
    assert len(pids) == 1, _children(up.proc.pid)
    return pids[0]


@dataclass
class Answers:
    """What one stream got: (time received, error text or "" for a frame)."""

    got: list[tuple[float, str]] = field(default_factory=list)
    broken: BaseException | None = None

    def frames_after(self, t: float) -> int:
        return sum(1 for when, error in self.got if when > t and not error)

    def first_frame_after(self, t: float) -> float | None:
        return next((when for when, error in self.got if when > t and not error), None)


def _grpc_stream(address: str, stop: threading.Event, answers: Answers) -> None:
    """One StreamInference call until `stop`: a request, its answer, PACE_S, the next (so a
    backlog of requests sent faster than CPU frames are made does not delay the recovery)."""
    answered = threading.Semaphore(0)

    def requests() -> Iterator[pb.OptimizedInferenceRequest]:
        i = 0
        while not stop.is_set():
            yield pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=i % 50)
            i += 1
            while not answered.acquire(timeout=0.5):
                if stop.is_set():
                    return
            time.sleep(PACE_S)

    try:
        with grpc.insecure_channel(address) as channel:
            stub = pbg.OptimizedLipSyncServiceStub(channel)
            for reply in stub.StreamInference(requests(), timeout=900):
                answers.got.append((time.monotonic(), "" if reply.success else reply.error))
                answered.release()
    except BaseException as exc:  # noqa: BLE001 - the test checks it
        answers.broken = exc


def _ws_stream(url: str, stop: threading.Event, answers: Answers) -> None:
    """One WebSocket until `stop`: a request, its answer, PACE_S, the next."""

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url}/ws", max_msg_size=64 * 2**20) as ws:
                i = 0
                while not stop.is_set():
                    await ws.send_bytes(encode_request(AVATAR, i % 50))
                    msg = await ws.receive(timeout=60)
                    assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data)
                    reply = decode_reply(msg.data)
                    error = "" if isinstance(reply, FrameReply) else reply.message
                    answers.got.append((time.monotonic(), error))
                    i += 1
                    await asyncio.sleep(PACE_S)

    try:
        asyncio.run(run())
    except BaseException as exc:  # noqa: BLE001 - the test checks it
        answers.broken = exc


def _wait(predicate: object, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def _restarts_in_metrics(http: int) -> float | None:
    """The gateway's Triton restart counter from /metrics, None when it has none (phase 2)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "lipsync_gateway_triton_restarts":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    return None


def test_streams_survive_a_sigkill_of_tritonserver(
    gateway_packages_root: Path, tmp_path: Path, stop_up: list[Up]
) -> None:
    up = _start_up(tmp_path, gateway_packages_root)
    stop_up.append(up)
    _wait_ready(up)
    stop = threading.Event()
    over_grpc, over_ws = Answers(), Answers()
    threads = [
        threading.Thread(target=_grpc_stream, args=(f"127.0.0.1:{up.grpc_port}", stop, over_grpc)),
        threading.Thread(target=_ws_stream, args=(f"http://127.0.0.1:{up.http}", stop, over_ws)),
    ]
    for thread in threads:
        thread.start()
    try:
        _wait(lambda: over_grpc.frames_after(0) >= 3 and over_ws.frames_after(0) >= 3, 120,
              "frames before the kill")
        old_pid = _tritonserver_pid(up)
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        _wait(lambda: over_grpc.frames_after(killed_at) >= 3 and over_ws.frames_after(killed_at) >= 3,
              120, "frames again after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    for name, answers in (("gRPC", over_grpc), ("WebSocket", over_ws)):
        assert answers.broken is None, f"the {name} stream broke: {answers.broken!r}"
        before = [error for when, error in answers.got if when <= killed_at]
        assert before and not any(before), f"{name}: errors before the kill: {before}"
        back_at = answers.first_frame_after(killed_at)
        assert back_at is not None
        print(f"{name}: SIGKILL -> frames again {back_at - killed_at:.1f} s")
        down = [error for when, error in answers.got if killed_at < when < back_at]
        assert down, f"{name}: no error while tritonserver was down"
        assert all(e.startswith("triton_unavailable: ") for e in down), f"{name}: {set(down)}"
        after = [error for when, error in answers.got if when >= back_at]
        assert len(after) >= 3 and not any(after), f"{name}: errors after recovery: {after}"
        assert back_at - killed_at < RECOVERY_S, f"{name}: {back_at - killed_at:.1f} s"

    assert reaped(old_pid), "the killed tritonserver was left a zombie"
    assert not [c for c in _children(up.proc.pid) if c[2] == "Z"], _children(up.proc.pid)
    assert _tritonserver_pid(up) != old_pid and port_in_use(up.triton_ports[1])
    text = up.log()
    assert f"tritonserver (pid {old_pid}) was killed by SIGKILL after running" in text, text
    assert "Its log ends with:" in text
    assert "restarting it in 1.0 s (quick failure 1 in a row; gives up at 6)" in text
    restarts = _restarts_in_metrics(up.http)

    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=90) == 0, up.log()
    assert not any(port_in_use(p) for p in up.ports())
    if restarts is None:
        pytest.xfail("phase 2: the gateway does not export Triton restarts in /metrics yet "
                     "(lipsync_gateway_triton_restarts_total)")
    assert restarts == 1


def test_a_repository_that_cannot_load_makes_up_exit_non_zero(
    broken_model_repo: Path, tmp_path: Path, stop_up: list[Up]
) -> None:
    packages = tmp_path / "packages"
    packages.mkdir()
    up = _start_up(tmp_path, packages, "--skip-demo", "--model-repository", str(broken_model_repo),
                   "--triton-max-restarts", "2", "--triton-restart-backoff-s", "0.2")
    stop_up.append(up)
    assert up.proc.wait(timeout=300) == 1, up.log()
    text = up.log()
    assert "failed to load 'lipsync_broken'" in text
    assert "restarting it in 0.2 s (quick failure 1 in a row; gives up at 3)" in text
    assert "restarting it in 0.4 s (quick failure 2 in a row; gives up at 3)" in text
    assert "gave up on tritonserver after 3 quick failures in a row (at most 2 restarts" in text
    assert text.count("starting tritonserver (models lipsync_broken") == 3
    assert not any(port_in_use(p) for p in up.ports())


def test_up_stops_the_gateway_when_triton_cannot_be_kept_running(
    gateway_packages_root: Path, tmp_path: Path, stop_up: list[Up]
) -> None:
    up = _start_up(tmp_path, gateway_packages_root, "--triton-max-restarts", "0")
    stop_up.append(up)
    _wait_ready(up)
    os.kill(_tritonserver_pid(up), signal.SIGKILL)
    assert up.proc.wait(timeout=90) == 1, up.log()
    text = up.log()
    assert "gave up on tritonserver after 1 quick failure in a row (at most 0 restarts" in text
    assert "was killed by SIGKILL" in text and "stopped the gateway" in text
    assert text.index("gateway stopped") < text.index("Triton stopped")
    assert not any(port_in_use(p) for p in up.ports())
