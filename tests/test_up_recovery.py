"""`lipsync up` keeps serving when its tritonserver dies (issue 15), run as a user runs it: a
subprocess on free ports with the demo avatar.

- SIGKILL of tritonserver while a gRPC `StreamInference` call and a WebSocket stream frames:
  both get `triton_unavailable` errors only while it is down, then frames again on the same
  connections; the killed process is reaped (no zombie) and a new one runs on the same ports;
  the restart is counted in /metrics and /readyz gives the count and the last exit's reason.
- A repository that makes tritonserver exit at start: the back-off is in the log, then the
  clear message, and `lipsync up` exits 1 leaving nothing behind.
- Ctrl-C (or SIGTERM) while it waits to restart tritonserver: `lipsync up` exits at once
  leaving no process.
- `--triton-max-restarts 0`: once the gateway serves, a SIGKILL of tritonserver makes the
  supervisor give up; `lipsync up` stops the gateway and exits 1.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest

from gateway.ws_protocol import FrameReply, decode_reply, encode_request
from lipsync.triton_local import port_in_use
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.fixtures_triton import reaped
from tests.gateway_metrics import scrape
from tests.up_process import Up, start_up
from tests.waiting import wait_until

pytestmark = pytest.mark.triton

AVATAR = "demo"
PACE_S = 0.1
"""Seconds between an answer and the next frame request of one stream."""
RECOVERY_S = 20.0
"""Issue 15: frames again on the same connections within this long after the SIGKILL (s)."""


@pytest.fixture
def started() -> Iterator[list[Up]]:
    """`lipsync up` processes a test started; stopped at teardown if still running."""
    ups: list[Up] = []
    yield ups
    for up in ups:
        up.stop()


def _tritonserver_pid(up: Up) -> int:
    pids = [p.pid for p in up.children() if p.name == "tritonserver" and p.state != "Z"]
    assert len(pids) == 1, up.children()
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
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{url}/ws", max_msg_size=64 * 2**20) as ws,
        ):
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


def test_streams_survive_a_sigkill_of_tritonserver(
    gateway_packages_root: Path, tmp_path: Path, started: list[Up]
) -> None:
    up = start_up(tmp_path, gateway_packages_root)
    started.append(up)
    up.wait_ready()
    stop = threading.Event()
    over_grpc, over_ws = Answers(), Answers()
    threads = [
        threading.Thread(target=_grpc_stream, args=(f"127.0.0.1:{up.grpc_port}", stop, over_grpc)),
        threading.Thread(target=_ws_stream, args=(f"http://127.0.0.1:{up.http}", stop, over_ws)),
    ]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: over_grpc.frames_after(0) >= 3 and over_ws.frames_after(0) >= 3,
                   "frames before the kill", timeout_s=120)
        old_pid = _tritonserver_pid(up)
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: over_grpc.frames_after(killed_at) >= 3 and over_ws.frames_after(killed_at) >= 3,
                   "frames again after the kill", timeout_s=120)
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
    assert not [p for p in up.children() if p.state == "Z"], up.children()
    assert _tritonserver_pid(up) != old_pid and port_in_use(up.triton_ports[1])
    text = up.log()
    assert f"tritonserver (pid {old_pid}) was killed by SIGKILL after running" in text, text
    assert "Its log ends with:" in text
    assert "restarting it in 1.0 s (quick failure 1 in a row; gives up at 6)" in text
    restarts = scrape(f"http://127.0.0.1:{up.http}").get(("lipsync_gateway_triton_restarts_total", ()))
    with urllib.request.urlopen(f"http://127.0.0.1:{up.http}/readyz", timeout=10) as resp:
        supervisor = json.loads(resp.read())["triton_supervisor"]

    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=90) == 0, up.log()
    assert not any(port_in_use(p) for p in up.ports())
    assert restarts == 1
    assert supervisor["restarts"] == 1 and supervisor["state"] == "running" and not supervisor["restarting"]
    assert f"tritonserver (pid {old_pid}) was killed by SIGKILL" in supervisor["last_exit"]["reason"]


def _up_on_broken_repo(tmp_path: Path, repo: Path, started: list[Up], *flags: str) -> Up:
    """`lipsync up` on a repository tritonserver cannot load, no avatar, no demo build."""
    packages = tmp_path / "packages"
    packages.mkdir()
    up = start_up(tmp_path, packages, "--skip-demo", "--model-repository", str(repo), *flags)
    started.append(up)
    return up


def test_a_repository_that_cannot_load_makes_up_exit_non_zero(
    broken_model_repo: Path, tmp_path: Path, started: list[Up]
) -> None:
    up = _up_on_broken_repo(tmp_path, broken_model_repo, started,
                            "--triton-max-restarts", "2", "--triton-restart-backoff-s", "0.2")
    assert up.proc.wait(timeout=300) == 1, up.log()
    text = up.log()
    assert "failed to load 'lipsync_broken'" in text
    assert "restarting it in 0.2 s (quick failure 1 in a row; gives up at 3)" in text
    assert "restarting it in 0.4 s (quick failure 2 in a row; gives up at 3)" in text
    assert "gave up on tritonserver after 3 quick failures in a row (at most 2 restarts" in text
    assert text.count("starting tritonserver (models lipsync_broken") == 3
    assert not any(port_in_use(p) for p in up.ports())


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_a_backoff_stops_up_promptly(
    stop_signal: signal.Signals, broken_model_repo: Path, tmp_path: Path, started: list[Up]
) -> None:
    up = _up_on_broken_repo(tmp_path, broken_model_repo, started,
                            "--triton-restart-backoff-s", "300", "--triton-restart-backoff-max-s", "300")
    deadline = time.monotonic() + 180
    while "restarting it in 300.0 s" not in up.log() and time.monotonic() < deadline:
        assert up.proc.poll() is None, up.log()
        time.sleep(0.2)
    assert not up.children(), f"the failed tritonserver was not reaped: {up.children()}"
    t0 = time.monotonic()
    up.proc.send_signal(stop_signal)
    assert up.proc.wait(timeout=60) == 0, up.log()
    assert time.monotonic() - t0 < 10.0, "lipsync up waited for the back-off"
    assert "Triton stopped" in up.log()
    assert not any(port_in_use(p) for p in up.ports())


def test_up_stops_the_gateway_when_triton_cannot_be_kept_running(
    gateway_packages_root: Path, tmp_path: Path, started: list[Up]
) -> None:
    up = start_up(tmp_path, gateway_packages_root, "--triton-max-restarts", "0")
    started.append(up)
    up.wait_ready()
    os.kill(_tritonserver_pid(up), signal.SIGKILL)
    assert up.proc.wait(timeout=90) == 1, up.log()
    text = up.log()
    assert "gave up on tritonserver after 1 quick failure in a row (at most 0 restarts" in text
    assert "was killed by SIGKILL" in text and "stopped the gateway" in text
    assert text.index("gateway stopped") < text.index("Triton stopped")
    assert not any(port_in_use(p) for p in up.ports())
