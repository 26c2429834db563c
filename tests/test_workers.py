"""``lipsync gateway --workers 2`` against the real CPU tritonserver and the demo avatar: the
kernel spreads connections of both protocols over both workers, metrics and stats add up over
them, a package loaded and an avatar unloaded on request are so in every worker (a restarted one
included), a killed worker is restarted and the counts survive it, SIGTERM leaves no process
behind; TLS, the client token and the health port work with two workers. Without Triton (a
synthetic package): the workers stop when their supervisor is SIGKILLed.

The protocol tests themselves run against two workers through `served_gateway`
(`tests/fixtures_gateway.py`)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from gateway.workers import METRICS_DIR_PREFIX, remove_stale_metrics_dirs
from gateway.ws_protocol import FrameReply, decode_reply, encode_request
from lipsync.triton_local import free_ports
from proto import admin_pb2 as admin_pb
from proto import admin_pb2_grpc as admin_pbg
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.fixtures_gateway import (
    ADMIN_METADATA,
    CLIENT_TOKEN,
    WorkersGateway,
    bearer,
    gateway_settings,
    make_packages_root,
    start_workers_gateway,
)
from tests.fixtures_triton import alive
from tests.gateway_metrics import Samples, scrape
from tests.test_security import client_ssl, grpc_credentials
from tests.tls_files import make_tls_files
from tests.up_process import ENV, GatewayProcess, start_gateway_process, start_up, worker_pids

AVATAR = "demo"
CONNECTIONS = 16
"""Connections per protocol: all on one of two workers with probability 2 / 2**16."""


def requests_ok(samples: Samples, protocol: str) -> float:
    return samples.get(("lipsync_gateway_requests_total", (("outcome", "ok"), ("protocol", protocol))), 0.0)


def infer(stub: Any, avatar: str, frame_id: int) -> Any:
    request = pb.OptimizedInferenceRequest(model_name=avatar, frame_id=frame_id)
    return stub.GenerateInference(request, timeout=60)


TCP_ESTABLISHED, TCP_LISTEN = "01", "0A"
"""Socket states in /proc/net/tcp."""


def established(pid: int, port: int, state: str = TCP_ESTABLISHED) -> int:
    """TCP sockets in ``state`` (default: established connections) process ``pid`` holds on
    local ``port`` (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state and fields[9] in inodes:
                count += 1
    return count


def stats_of_every_worker(gw: WorkersGateway, timeout_s: float = 60.0) -> dict[int, dict[str, Any]]:
    """``/api/stats`` as each worker answers it (new connections until each answered)."""
    pids = set(gw.worker_pids())
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while set(seen) != pids:
        assert time.monotonic() < deadline, f"not every worker answered: {sorted(seen)} of {sorted(pids)}"
        stats = gw.stats()
        seen[stats["worker"]["pid"]] = stats
    return seen


@pytest.fixture
def workers_gateway(triton_server: Any, demo_package: Any, tmp_path: Path) -> Iterator[WorkersGateway]:
    """Its own ``--workers 2`` gateway (tests here kill its workers), private packages root."""
    root = make_packages_root(Path(demo_package.root), tmp_path / "packages")
    gw = start_workers_gateway(tmp_path, triton_server.grpc_url, root, 2)
    try:
        yield gw
    finally:
        if gw.process.proc.poll() is None:
            gw.stop()


@pytest.mark.triton
def test_connections_spread_over_both_workers_and_the_counts_add_up(workers_gateway: WorkersGateway) -> None:
    gw = workers_gateway
    pids = gw.worker_pids()
    before = scrape(gw.http_url)
    stats_before = gw.stats()["avatars"][AVATAR]["total_requests"]
    # a local subchannel pool each: channels to one address would share one connection
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(gw.grpc_address, options=own) for _ in range(CONNECTIONS)]
    try:
        for k, channel in enumerate(channels):  # 3 frames on each of 16 connections
            stub = pbg.OptimizedLipSyncServiceStub(channel)
            requests = [pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=k + i) for i in range(3)]
            replies = list(stub.StreamInference(iter(requests), timeout=120))
            assert all(r.success for r in replies), [r.error for r in replies]

        async def websockets() -> list[int]:
            async with aiohttp.ClientSession() as session:
                sockets = [await session.ws_connect(f"{gw.http_url}/ws") for _ in range(CONNECTIONS)]
                for k, ws in enumerate(sockets):  # 2 frames on each of 16 connections
                    for i in range(2):
                        await ws.send_bytes(encode_request(AVATAR, k + i))
                        reply = decode_reply((await ws.receive(timeout=60)).data)
                        assert isinstance(reply, FrameReply), reply
                per_worker = [established(pid, gw.process.http) for pid in pids]
                open_ws = scrape(gw.http_url)[("lipsync_gateway_ws_connections", ())]
                for ws in sockets:
                    await ws.close()
                return [*per_worker, int(open_ws)]

        grpc_per_worker = [established(pid, gw.process.grpc_port) for pid in pids]
        *ws_per_worker, open_ws = asyncio.run(websockets())
    finally:
        for channel in channels:
            channel.close()

    assert sum(grpc_per_worker) == CONNECTIONS and min(grpc_per_worker) > 0, grpc_per_worker
    assert sum(ws_per_worker) >= CONNECTIONS and min(ws_per_worker) > 0, ws_per_worker
    assert open_ws == CONNECTIONS, "open WebSockets summed over the workers"
    after = scrape(gw.http_url)
    assert requests_ok(after, "grpc") - requests_ok(before, "grpc") == 3 * CONNECTIONS
    assert requests_ok(after, "ws") - requests_ok(before, "ws") == 2 * CONNECTIONS
    frames = 5 * CONNECTIONS
    stage = ("lipsync_gateway_stage_latency_seconds_count", (("stage", "total"),))
    assert after[stage] - before.get(stage, 0.0) == frames
    assert after[("lipsync_gateway_triton_ready", ())] == 1.0
    # GetStats and /api/stats answer for the whole gateway, whichever worker answers
    for stats in stats_of_every_worker(gw).values():
        assert stats["avatars"][AVATAR]["total_requests"] - stats_before == frames
        assert stats["worker"]["workers"] == 2
    with grpc.insecure_channel(gw.grpc_address) as channel:
        totals = pbg.OptimizedLipSyncServiceStub(channel).GetStats(pb.StatsRequest(model_name=AVATAR))
    assert totals.total_requests - stats_before == frames
    assert 0 < totals.min_inference_time_ms <= totals.avg_inference_time_ms <= totals.max_inference_time_ms


@pytest.mark.triton
def test_load_unload_and_the_counts_survive_a_killed_worker(workers_gateway: WorkersGateway) -> None:
    gw = workers_gateway
    root = gw.settings.packages_root
    shutil.copytree(root / AVATAR, root / "extra")  # not there at start: only LoadPackage loads it
    with grpc.insecure_channel(gw.grpc_address) as channel:
        stub = pbg.OptimizedLipSyncServiceStub(channel)
        request = pb.LoadPackageRequest(package_name="extra", package_dir="extra")
        loaded = stub.LoadPackage(request, metadata=ADMIN_METADATA, timeout=120)
        assert loaded.success, loaded.error
        for i in range(4):
            assert infer(stub, "extra", i).success
        # the demo avatar, loaded from the packages root at start, unloaded on request
        admin = admin_pbg.OptimizedLipSyncAdminStub(channel)
        unloaded = admin.UnloadPackage(
            admin_pb.UnloadPackageRequest(package_name=AVATAR), metadata=ADMIN_METADATA, timeout=60
        )
        assert unloaded.success, unloaded.error
    # every worker serves "extra" and not "demo" as soon as the calls returned
    for pid, stats in stats_of_every_worker(gw).items():
        assert "extra" in stats["avatars"], f"worker {pid} lacks the loaded package"
        assert AVATAR not in stats["avatars"], f"worker {pid} still serves the unloaded avatar"
    counted = requests_ok(scrape(gw.http_url), "grpc")

    victim = gw.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while victim in gw.worker_pids() or len(gw.worker_pids()) < 2:
        assert time.monotonic() < deadline, gw.process.log_path.read_text()
        time.sleep(0.2)
    pids = gw.wait_ready()
    assert victim not in pids
    while "serving again" not in gw.process.log_path.read_text():  # logged as it answers
        assert time.monotonic() < deadline, gw.process.log_path.read_text()
        time.sleep(0.2)
    log = gw.process.log_path.read_text()
    assert f"(pid {victim}) was killed by SIGKILL after serving" in log and "restarting it in 1.0 s" in log

    # the dead worker's counts stay in the totals; the restarted worker loaded "extra" too and
    # did not load "demo" again from the packages root
    assert requests_ok(scrape(gw.http_url), "grpc") == counted
    for pid, stats in stats_of_every_worker(gw).items():
        assert "extra" in stats["avatars"], f"worker {pid} (restarted?) lacks the loaded package"
        assert AVATAR not in stats["avatars"], f"worker {pid} (restarted?) serves the unloaded avatar"
        assert stats["avatars"]["extra"]["total_requests"] == 4
    with grpc.insecure_channel(gw.grpc_address) as channel:
        stub = pbg.OptimizedLipSyncServiceStub(channel)
        assert infer(stub, "extra", 9).success
    assert gw.stop() == 0, "SIGTERM: every worker stopped gracefully, exit status 0"
    assert "gateway workers stopped" in gw.process.log_path.read_text()


@pytest.mark.triton
def test_tls_the_token_and_the_health_port_with_two_workers(
    triton_server: Any, demo_package: Any, tmp_path: Path
) -> None:
    """With TLS and a client token, both workers serve gRPC and HTTPS/WSS only to callers with
    the token, and each listens on the plain health port (reserved by the supervisor as the
    others are)."""
    root = make_packages_root(Path(demo_package.root), tmp_path / "packages")
    tls = make_tls_files(tmp_path / "tls")
    context = client_ssl(tls)
    (health_port,) = free_ports(1)
    gw = start_workers_gateway(
        tmp_path, triton_server.grpc_url, root, 2, context,
        tls_cert=tls.cert, tls_key=tls.key, auth_token=CLIENT_TOKEN, health_port=health_port,
    )
    try:
        pids = gw.worker_pids()
        assert gw.http_url.startswith("https://")
        assert [established(pid, health_port, TCP_LISTEN) for pid in pids] == [1, 1]
        own = [("grpc.use_local_subchannel_pool", 1)]  # a connection each
        creds = grpc_credentials(tls)
        channels = [grpc.secure_channel(gw.grpc_address, creds, options=own) for _ in range(CONNECTIONS)]
        try:
            for k, channel in enumerate(channels):
                stub = pbg.OptimizedLipSyncServiceStub(channel)
                request = pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=k)
                reply = stub.GenerateInference(request, metadata=bearer(CLIENT_TOKEN), timeout=120)
                assert reply.success and reply.prediction_data[:2] == b"\xff\xd8", reply.error
                with pytest.raises(grpc.RpcError) as err:
                    stub.ListModels(pb.ListModelsRequest(), timeout=30)
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
            grpc_per_worker = [established(pid, gw.process.grpc_port) for pid in pids]
        finally:
            for channel in channels:
                channel.close()
        assert min(grpc_per_worker) > 0, f"every TLS connection on one worker: {grpc_per_worker}"
        with grpc.insecure_channel(gw.grpc_address) as plain:  # plain text gets nothing
            with pytest.raises(grpc.RpcError) as err:
                pbg.OptimizedLipSyncServiceStub(plain).ListModels(
                    pb.ListModelsRequest(), metadata=bearer(CLIENT_TOKEN), timeout=5
                )
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE

        # HTTPS with the token: every worker answers (gw.stats sends it); without: 401
        assert all(stats["ready"] for stats in stats_of_every_worker(gw).values())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{gw.http_url}/api/avatars", timeout=10, context=context)
        assert refused.value.code == 401

        async def wss_frame() -> FrameReply:
            wss = gw.http_url.replace("https", "wss")
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(f"{wss}/ws?token={CLIENT_TOKEN}", ssl=context) as ws,
            ):
                await ws.send_bytes(encode_request(AVATAR, 2))
                reply = decode_reply((await ws.receive(timeout=120)).data)
            assert isinstance(reply, FrameReply), reply
            return reply

        assert asyncio.run(wss_frame()).frame_id == 2
        for _ in range(4):  # new connections: the health port answers from either worker
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=10) as resp:
                assert resp.status == 200 and json.load(resp)["ready"] is True
        assert gw.stop() == 0
    finally:
        if gw.process.proc.poll() is None:
            gw.stop()


@pytest.mark.triton
def test_up_with_two_workers_relays_the_triton_supervisor(demo_package: Any, tmp_path: Path) -> None:
    """``lipsync up --workers 2``: both workers show the Triton supervisor (its restarts counted
    once, not once per worker) and follow it when tritonserver is killed and restarted; SIGTERM
    stops the workers, then Triton, and leaves nothing behind."""
    root = make_packages_root(Path(demo_package.root), tmp_path / "packages")
    up = start_up(tmp_path, root, "--workers", "2", "--skip-demo")
    try:
        up.wait_ready()
        gw = WorkersGateway(GatewayProcess(up.proc, up.log_path, up.http, up.grpc_port), gateway_settings(
            "unused:1", root, workers=2, grpc_port=up.grpc_port, http_port=up.http))
        pids = gw.wait_ready()
        samples = scrape(gw.http_url)
        assert samples[("lipsync_gateway_triton_restarts_total", ())] == 0
        state = "lipsync_gateway_triton_supervisor_state"
        running = (state, ((state, "running"),))
        assert samples[running] == 1

        triton = next(p for p in up.children() if p.name == "tritonserver")
        os.kill(triton.pid, signal.SIGKILL)
        deadline = time.monotonic() + 240
        while True:  # each worker follows the relayed status: one restart, ready again
            assert time.monotonic() < deadline, up.log()
            seen = stats_of_every_worker(gw)
            samples = scrape(gw.http_url)
            if all(s["ready"] for s in seen.values()) and samples.get(
                ("lipsync_gateway_triton_restarts_total", ())
            ) == 1:
                break
            time.sleep(1.0)
        assert sorted(seen) == pids, "the workers themselves were not restarted"
        with urllib.request.urlopen(f"{gw.http_url}/readyz", timeout=10) as resp:
            supervisor = json.load(resp)["triton_supervisor"]
        assert supervisor["restarts"] == 1 and supervisor["state"] == "running"
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=90) == 0, up.log()
    finally:
        up.stop()
    log = up.log()
    assert log.index("gateway workers stopped") < log.index("Triton stopped"), "workers first, then Triton"
    assert not [p for p in pids if Path(f"/proc/{p}").exists()], "no worker left behind"


def test_workers_stop_when_their_supervisor_is_killed(make_package: Any, tmp_path: Path) -> None:
    """No worker outlives a SIGKILLed supervisor: each sees its pipe close and stops, and the
    ports are free again (no Triton: the workers serve, not ready). The metrics folder it could
    not remove is removed by the next supervisor's sweep, a running supervisor's is kept."""
    root = make_package().parent
    tmp_dir = tmp_path / "tmp"  # its TMPDIR: where it makes its metrics folder
    tmp_dir.mkdir()
    env = {**ENV, "TMPDIR": str(tmp_dir)}
    gw = start_gateway_process(tmp_path, "127.0.0.1:1", root, env, "--workers", "2")
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while "2 gateway workers serving" not in gw.log_path.read_text():
            assert gw.proc.poll() is None and time.monotonic() < deadline, gw.log_path.read_text()
            time.sleep(0.2)
        pids = worker_pids(gw.proc.pid)
        assert len(pids) == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.http}/healthz", timeout=10) as resp:
            assert resp.status == 200
        gw.proc.kill()
        gw.proc.wait()
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, f"workers {pids} outlived their supervisor"
            time.sleep(0.2)
    finally:
        gw.stop()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    for port in (gw.http, gw.grpc_port):
        with socket.socket() as sock:
            # SO_REUSEADDR: a closed connection's TIME_WAIT on the port does not count; a
            # socket still listening there would
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # nobody holds it any more
            sock.listen()

    left = list(tmp_dir.glob(f"{METRICS_DIR_PREFIX}{gw.proc.pid}-*"))
    assert len(left) == 1 and any(left[0].iterdir()), "the killed supervisor's metrics files"
    running = tmp_dir / f"{METRICS_DIR_PREFIX}{os.getpid()}-x"  # this process runs
    running.mkdir()
    assert remove_stale_metrics_dirs(str(tmp_dir)) == [str(left[0])]
    assert not left[0].exists() and running.exists()
