"""Robustness of the gateway over gRPC, against the real CPU tritonserver and the demo avatar.

- bad input gets a precise in-band error and the next valid request still succeeds;
- bounded admission answers `overloaded` at once instead of queueing without bound;
- gRPC message size limits;
- Triton killed mid-stream (own Triton and own gateway): callers get errors promptly, readiness
  goes false (context, HealthCheck and grpc.health.v1), and after Triton restarts on the same
  ports the next requests succeed without restarting the gateway;
- Triton hung (SIGSTOP): the readiness probe notices, frames in flight fail instead of hanging,
  and it recovers on SIGCONT.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway.audio_features import CHUNK_BYTES
from lipsync.paths import MODEL_REPOSITORY_CPU
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.fixtures_gateway import ADMIN_METADATA, ADMIN_TOKEN
from tests.undecodable import UNDECODABLE, assert_undecodable, send_undecodable, served_methods
from tests.up_process import ENV, start_gateway_process
from tests.waiting import wait_until

AVATAR = "demo"


def _stub(address: str) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(address)
    return channel, pbg.OptimizedLipSyncServiceStub(channel)


@pytest.fixture(scope="module")
def stub(gateway_server: Any) -> Iterator[Any]:
    channel, s = _stub(gateway_server.grpc_address)
    with channel:
        yield s


def _ok(stub: Any, frame_id: int = 2) -> None:
    r = stub.GenerateInference(pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=frame_id), timeout=60)
    assert r.success, f"a valid request after a bad one failed: {r.error}"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.triton
@pytest.mark.parametrize(
    ("name", "which", "code", "text"),
    [
        ("nobody", "zero", "unknown_avatar", "avatar 'nobody' is not loaded (loaded: demo"),
        (
            AVATAR,
            "rows",
            "frame_out_of_range",
            "frame_id {M} is out of range for avatar 'demo' (valid: 0..{M1}",
        ),
        (AVATAR, "huge", "frame_out_of_range", "(valid: 0..{M1};"),
        (AVATAR, "negative", "frame_out_of_range", "frame_id -1 is out of range"),
        ("", "zero", "unknown_avatar", "avatar '' is not loaded"),
    ],
)
def test_bad_frame_requests_get_clear_errors(
    stub: Any, demo_package: Any, name: str, which: str, code: str, text: str
) -> None:
    m = demo_package.features.shape[0]  # M feature rows: valid frame ids 0..M-1
    frame_id = {"zero": 0, "rows": m, "huge": 10**6, "negative": -1}[which]
    text = text.format(M=m, M1=m - 1)
    r = stub.GenerateInference(pb.OptimizedInferenceRequest(model_name=name, frame_id=frame_id), timeout=30)
    assert not r.success and r.HasField("error") and not r.prediction_data
    assert r.error.startswith(f"{code}: ") and text in r.error, r.error
    assert r.frame_id == frame_id
    _ok(stub)


@pytest.mark.triton
def test_bad_frames_in_a_stream_do_not_break_it(stub: Any) -> None:
    ids = [1, -5, 2, 500, 3]
    names = [AVATAR, AVATAR, "ghost", AVATAR, AVATAR]
    out = list(
        stub.StreamInference(
            iter(
                [
                    pb.OptimizedInferenceRequest(model_name=n, frame_id=i)
                    for n, i in zip(names, ids, strict=True)
                ]
            ),
            timeout=120,
        )
    )
    assert [r.frame_id for r in out] == ids
    assert [r.success for r in out] == [True, False, False, False, True]
    assert "unknown_avatar" in out[2].error and "frame_out_of_range" in out[3].error


@pytest.mark.triton
@pytest.mark.parametrize("package_dir", ["/tmp", "..", "../../etc", "demo/../..", "/", ""])
def test_load_package_outside_root_is_refused(stub: Any, gateway_server: Any, package_dir: str) -> None:
    r = stub.LoadPackage(
        pb.LoadPackageRequest(package_name="evil", package_dir=package_dir),
        metadata=ADMIN_METADATA,
        timeout=30,
    )
    assert not r.success and r.HasField("error")
    if package_dir:
        assert r.error.startswith("package_rejected: ") and "not inside the packages root" in r.error, r.error
    else:
        assert "package_dir is required" in r.error
    assert "evil" not in stub.ListModels(pb.ListModelsRequest()).loaded_models
    _ok(stub)


@pytest.mark.triton
def test_load_package_symlink_escaping_root_is_refused(
    stub: Any, gateway_server: Any, demo_package: Any
) -> None:
    root = Path(gateway_server.settings.packages_root)
    link = root / "escape"
    link.symlink_to(Path(demo_package.root).resolve(), target_is_directory=True)  # a real package, outside
    try:
        r = stub.LoadPackage(
            pb.LoadPackageRequest(package_name="escape", package_dir="escape"),
            metadata=ADMIN_METADATA,
            timeout=30,
        )
    finally:
        link.unlink()
    assert not r.success and "not inside the packages root" in r.error
    _ok(stub)


@pytest.mark.triton
def test_load_package_not_a_package_and_reload(stub: Any, gateway_server: Any, demo_package: Any) -> None:
    root = Path(gateway_server.settings.packages_root)
    (root / "empty").mkdir(exist_ok=True)
    try:
        r = stub.LoadPackage(
            pb.LoadPackageRequest(package_dir="empty"), metadata=ADMIN_METADATA, timeout=30
        )
    finally:
        (root / "empty").rmdir()
    assert not r.success and "is not an avatar package (no manifest.json)" in r.error
    r = stub.LoadPackage(
        pb.LoadPackageRequest(package_name=AVATAR, package_dir="demo"), metadata=ADMIN_METADATA, timeout=120
    )
    assert r.success, r.error
    m = demo_package.features.shape[0]
    assert r.package_name == AVATAR and r.frame_count == m and list(r.audio_features_shape) == [m, 512]
    assert r.memory_mapped_audio and "ready" in r.message
    _ok(stub)


@pytest.mark.triton
def test_load_package_whose_model_triton_lacks_is_refused(
    stub: Any, gateway_server: Any, make_package: Any
) -> None:
    import shutil

    root = Path(gateway_server.settings.packages_root)
    folder = make_package(name="nomodel", root=root)  # valid package; no lipsync_nomodel in Triton
    try:
        r = stub.LoadPackage(
            pb.LoadPackageRequest(package_dir="nomodel"), metadata=ADMIN_METADATA, timeout=120
        )
    finally:
        shutil.rmtree(folder)
    assert not r.success and r.error.startswith("package_rejected: "), r.error
    assert "cannot serve its model 'lipsync_nomodel'" in r.error
    assert "nomodel" not in stub.ListModels(pb.ListModelsRequest()).loaded_models
    assert stub.HealthCheck(pb.HealthRequest()).healthy, "one bad package must not make the gateway unhealthy"
    _ok(stub)


# ----------------------------------------------------------------------------- limits
def test_connection_limiter_refuses_or_waits() -> None:
    """Pure asyncio: ``wait=False`` refuses at the limit, ``wait=True`` waits for a slot."""
    import asyncio

    from gateway.errors import Overloaded
    from gateway.pipeline import AdmissionControl, ConnectionLimiter

    async def scenario() -> None:
        limiter = ConnectionLimiter(2)
        await limiter.acquire(wait=False)
        await limiter.acquire(wait=False)
        with pytest.raises(Overloaded, match="this connection already has 2 frames in flight"):
            await limiter.acquire(wait=False)
        waiter = asyncio.create_task(limiter.acquire(wait=True))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        limiter.release()
        await asyncio.wait_for(waiter, 1.0)
        assert limiter.in_flight == 2

        admission = AdmissionControl(1)
        with admission.slot(), pytest.raises(Overloaded, match=r"limit 1"), admission.slot():
            pass
        assert admission.in_flight == 0

    asyncio.run(scenario())


@pytest.mark.triton
def test_global_in_flight_limit_answers_overloaded(
    start_gateway: Any, triton_server: Any, gateway_packages_root: Path
) -> None:
    gw = start_gateway(triton_server.grpc_url, gateway_packages_root, max_in_flight_total=2)
    channel, stub = _stub(gw.grpc_address)
    with channel:
        futures = [
            stub.GenerateInference.future(
                pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=i), timeout=120
            )
            for i in range(10)
        ]
        t0 = time.monotonic()
        results = [f.result() for f in futures]
        errors = [r.error for r in results if not r.success]
        assert sum(r.success for r in results) >= 2
        assert errors and all(
            e.startswith("overloaded: the gateway already has 2 frames in flight (limit 2)") for e in errors
        ), errors
        assert time.monotonic() - t0 < 60
        _ok(stub)


@pytest.mark.triton
def test_grpc_message_size_limit(stub: Any, gateway_server: Any) -> None:
    limit = gateway_server.settings.grpc_max_receive_bytes
    n = limit // CHUNK_BYTES + 10  # just over the limit
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateBatchWithAudio(pb.BatchInferenceWithAudioRequest(
            model_name=AVATAR, frame_count=n - 15, audio_chunks=[bytes(CHUNK_BYTES)] * n), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _ok(stub)


# ----------------------------------------------------------------------------- Triton outages
def _health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


class _Stream:
    """A StreamInference call fed from a thread, paced; records when each answer arrives."""

    def __init__(self, stub: Any, count: int, pace_s: float) -> None:
        self.answers: list[tuple[float, pb.OptimizedInferenceResponse]] = []
        self.sent: list[float] = []
        self._stub, self._count, self._pace_s = stub, count, pace_s
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _requests(self) -> Iterator[pb.OptimizedInferenceRequest]:
        for i in range(self._count):
            self.sent.append(time.monotonic())
            yield pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=i % 50)
            time.sleep(self._pace_s)

    def _run(self) -> None:
        try:
            for r in self._stub.StreamInference(self._requests(), timeout=300):
                self.answers.append((time.monotonic(), r))
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.error = exc


def _own_stack(start_triton: Any, start_gateway: Any, root: Path) -> tuple[Any, Any]:
    # Only the UNet is loaded at start: the gateway loads what else it needs (audio encoder).
    triton = start_triton(MODEL_REPOSITORY_CPU, model_control_mode="explicit", load_models=("lipsync_demo",))
    gateway = start_gateway(triton.grpc_url, root)
    assert gateway.ctx.ready()
    return triton, gateway


@pytest.mark.triton
def test_triton_killed_mid_stream_then_recovers(
    start_triton: Any, start_gateway: Any, gateway_packages_root: Path
) -> None:
    triton, gw = _own_stack(start_triton, start_gateway, gateway_packages_root)
    channel, stub = _stub(gw.grpc_address)
    with channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stream = _Stream(stub, count=60, pace_s=0.1)
        stream.thread.start()
        wait_until(lambda: sum(r.success for _, r in stream.answers) >= 2,
                   "2 frames of the stream", timeout_s=120)

        killed_at = time.monotonic()
        triton.kill()
        not_ready_after = wait_until(lambda: not gw.ctx.ready(), "the gateway not ready", timeout_s=5)
        stream.thread.join(timeout=60)
        assert not stream.thread.is_alive() and stream.error is None, stream.error
        assert len(stream.answers) == 60, "every request of the stream must be answered"

        failed = [(t, r) for t, r in stream.answers if not r.success]
        assert failed, "requests after the kill must fail"
        assert all(r.error.startswith("triton_unavailable: ") for _, r in failed), failed[0][1].error
        first_error_after = failed[0][0] - killed_at
        # every failed answer came promptly after its request was sent (or after the kill)
        worst = max(
            t - max(stream.sent[i], killed_at) for i, (t, r) in enumerate(stream.answers) if not r.success
        )
        assert first_error_after < 3.0 and worst < 3.0, (first_error_after, worst)
        assert not_ready_after < 3.0
        # grpc.health follows ctx.ready() as soon as it changes (pushed, no polling)
        wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   "grpc.health NOT_SERVING", timeout_s=1.0)
        h = stub.HealthCheck(pb.HealthRequest())
        assert not h.healthy and h.status.startswith("NOT_SERVING")
        t0 = time.monotonic()
        r = stub.GenerateInference(pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=1), timeout=30)
        assert not r.success and "triton_unavailable" in r.error and time.monotonic() - t0 < 3.0

        triton.start(timeout_s=180.0)  # same ports; explicit mode: the gateway reloads models
        wait_until(lambda: gw.ctx.ready(), "the gateway ready again", timeout_s=120)
        for i in range(3):
            _ok(stub, i)
        wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING,
                   "grpc.health SERVING", timeout_s=5)
        assert stub.HealthCheck(pb.HealthRequest()).healthy


@pytest.mark.triton
def test_triton_hung_fails_fast_and_recovers(
    start_triton: Any, start_gateway: Any, gateway_packages_root: Path
) -> None:
    triton, gw = _own_stack(start_triton, start_gateway, gateway_packages_root)
    channel, stub = _stub(gw.grpc_address)
    with channel:
        _ok(stub)
        os.killpg(triton.pid, signal.SIGSTOP)  # tritonserver and its Python-backend stubs
        try:
            t0 = time.monotonic()
            r = stub.GenerateInference(
                pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=3), timeout=30
            )
            took = time.monotonic() - t0
            assert not r.success and r.error.startswith("triton_unavailable: "), r.error
            # probe period 0.5 s + two probe deadlines of 1 s: about 3 s, never the 30 s deadline
            assert took < 5.0, took
            # the failed call wakes the monitor; its next probe deadline (1 s) marks the outage
            wait_until(lambda: not gw.ctx.ready(), "the gateway not ready", timeout_s=2.0)
            # grpc.health follows ctx.ready() as soon as it changes (pushed, no polling)
            wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
                       "grpc.health NOT_SERVING", timeout_s=1.0)
        finally:
            os.killpg(triton.pid, signal.SIGCONT)
        wait_until(lambda: gw.ctx.ready(), "the gateway ready again", timeout_s=60)
        _ok(stub, 4)


@pytest.mark.triton
def test_gateway_started_before_triton_becomes_ready_by_itself(
    start_triton: Any, start_gateway: Any, gateway_packages_root: Path
) -> None:
    from lipsync.triton_local import free_ports

    (port,) = free_ports(1)
    gw = start_gateway(f"127.0.0.1:{port}", gateway_packages_root)  # nothing listens there yet
    assert not gw.ctx.ready() and AVATAR in gw.ctx.store.names()
    channel, stub = _stub(gw.grpc_address)
    with channel:
        t0 = time.monotonic()
        r = stub.GenerateInference(pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=0), timeout=30)
        assert not r.success and r.error.startswith("triton_unavailable: ") and "not ready" in r.error
        assert time.monotonic() - t0 < 1.0
        assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        start_triton(
            MODEL_REPOSITORY_CPU,
            grpc_port=port,
            model_control_mode="explicit",
            load_models=("audio_encoder",),
        )
        wait_until(lambda: gw.ctx.ready(), "the gateway ready", timeout_s=120)  # lipsync_demo loaded by it
        _ok(stub)
        wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING,
                   "grpc.health SERVING", timeout_s=5)


# ----------------------------------------------------------------------------- undecodable input
@pytest.mark.triton
def test_undecodable_grpc_flood_costs_the_gateway_process_a_few_log_lines(
    triton_server: Any, gateway_packages_root: Path, tmp_path: Path
) -> None:
    """Issue 16, as a user runs it: `lipsync gateway` (real Triton, demo avatar) gets 500
    undecodable messages over every method reflection lists, unary and streaming, while a
    well-behaved client streams frames: every answer is INVALID_ARGUMENT naming the method,
    the process's log (Python and gRPC core, stdout and stderr) grows by fewer than 50 lines,
    /metrics counts 500, and the well-behaved client gets every frame."""
    env = {**ENV, "LIPSYNC_ADMIN_TOKEN": ADMIN_TOKEN}  # the admin methods decode too
    gateway = start_gateway_process(tmp_path, triton_server.grpc_url, gateway_packages_root, env)
    http, grpc_port, log_path, proc = gateway.http, gateway.grpc_port, gateway.log_path, gateway.proc

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except OSError:
            return 0, ""

    async def flood() -> tuple[list[tuple[str, grpc.StatusCode, str]], list[bool], int]:
        address = f"127.0.0.1:{grpc_port}"
        async with grpc.aio.insecure_channel(address) as channel:
            methods = await served_methods(channel)
            assert_undecodable(methods)
            done = asyncio.Event()
            served: list[bool] = []

            async def well_behaved() -> None:
                async with grpc.aio.insecure_channel(address) as good:
                    call = pbg.OptimizedLipSyncServiceStub(good).StreamInference()
                    for i in range(10_000):
                        if done.is_set() and i >= 5:
                            break
                        await call.write(pb.OptimizedInferenceRequest(model_name=AVATAR, frame_id=i % 50))
                        served.append((await call.read()).success)
                    await call.done_writing()

            client = asyncio.create_task(well_behaved())
            lines_before = len(log_path.read_text().splitlines())
            sem = asyncio.Semaphore(16)

            async def one(k: int) -> tuple[str, grpc.StatusCode, str]:
                method, client_streaming, server_streaming, _ = methods[k % len(methods)]
                async with sem:
                    bad = UNDECODABLE[k % len(UNDECODABLE)]
                    _, code, details = await send_undecodable(
                        channel, method, client_streaming, server_streaming, bad, False, ADMIN_METADATA
                    )
                return method, code, details

            results = await asyncio.gather(*(one(k) for k in range(500)))
            done.set()
            await asyncio.wait_for(client, 120)
            await asyncio.sleep(1.0)  # anything logged late is counted too
            return results, served, len(log_path.read_text().splitlines()) - lines_before

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and get("/readyz")[0] != 200:
            time.sleep(0.5)
        assert get("/readyz")[0] == 200, log_path.read_text()
        results, served, grew = asyncio.run(flood())
        metrics = get("/metrics")[1]
    finally:
        gateway.stop()
    for method, code, details in results:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert details.startswith(f"{method}: the request message does not decode"), details
    print(f"500 undecodable messages: the log grew by {grew} lines; {len(served)} frames served meanwhile")
    assert grew < 50, log_path.read_text()
    assert "Traceback" not in log_path.read_text()
    counted = sum(
        s.value for f in text_string_to_metric_families(metrics)
        if f.name == "lipsync_gateway_malformed_requests"
        for s in f.samples if s.name.endswith("_total") and s.labels["protocol"] == "grpc"
    )
    assert counted == 500
    assert len(served) >= 5 and all(served), "the well-behaved client was served throughout"
