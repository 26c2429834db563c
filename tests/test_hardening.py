"""Issue 11's defects 2, 8, 9 and 10, each on a real `GatewayServer` (loopback) whose Triton is
the in-process fake, through the seed service's wire API only (so each test also runs against a
gateway from before the fix, where it fails):

- 2: ``LoadPackage`` is an admin call; it cannot replace another avatar, takes only valid names,
  serves one package folder under one name, stays under ``LIPSYNC_MAX_AVATAR_BYTES``, and stops
  reading when its caller goes away;
- 8: ``GetStats`` past 2^31 frames;
- 9: unusable ``package_dir`` values, batches whose answers cannot be sent, a bug while
  rendering one frame of a stream: all answered in-band;
- 10: no absolute server path in any answer a client can get.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.server import GatewayServer
from lipsync.package import SourceMedia, WeightsManifest, WeightsSource, write_package
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.fake_gateway import serve_on_fake
from tests.fake_triton import FakeModel, FakeTriton, fake_triton, identity_unet, slice_encoder
from tests.fixtures_gateway import ADMIN_TOKEN, CLIENT_TOKEN, bearer
from tests.fixtures_packages import synthetic_package_arrays

ADMIN = bearer(ADMIN_TOKEN)
INT32_MAX = 2**31 - 1
MiB = 1 << 20


def frames_of(seed: int, n: int = 10) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 64, 3), dtype=np.uint8)


def two_avatars(make_package: Any) -> Path:
    """A packages root with avatars ``alice`` and ``bob`` (different frames)."""
    make_package(name="alice", frames=frames_of(1))
    return Path(make_package(name="bob", frames=frames_of(2)).parent)


def fake_for(*avatars: str) -> FakeTriton:
    return fake_triton(*(f"lipsync_{a}" for a in avatars), loaded=("audio_encoder",))


def stub_of(channel: grpc.aio.Channel) -> Any:
    return pbg.OptimizedLipSyncServiceStub(channel)


async def video_frame(stub: Any, avatar: str, frame_id: int = 0) -> bytes:
    r = await stub.GetVideoFrame(
        pb.GetVideoFrameRequest(model_name=avatar, frame_id=frame_id, video_type="full_body")
    )
    assert r.success, r.error
    return bytes(r.frame_data)


# ----------------------------------------------------------------------------- defect 2


def test_load_package_is_an_admin_call_refused_while_admin_token_is_unset(make_package: Any) -> None:
    root = two_avatars(make_package)

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = stub_of(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadPackage(
                    pb.LoadPackageRequest(package_dir="bob", package_name="alice"), metadata=ADMIN
                )
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "set LIPSYNC_ADMIN_TOKEN" in (err.value.details() or "")
            assert (await stub.ListModels(pb.ListModelsRequest())).loaded_models == ["alice", "bob"]

    serve_on_fake(root, fake_for("alice", "bob"), body)


def test_load_package_does_not_replace_another_avatar(make_package: Any) -> None:
    root = two_avatars(make_package)

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = stub_of(channel)
            alice = await video_frame(stub, "alice")
            r = await stub.LoadPackage(
                pb.LoadPackageRequest(package_dir="bob", package_name="alice"), metadata=ADMIN
            )
            assert not r.success and r.error.startswith("package_rejected: avatar 'alice' is already served")
            assert "replace=true" in r.error
            assert await video_frame(stub, "alice") == alice, "alice still shows alice"
            # reloading an avatar from its own folder stays a plain LoadPackage
            r = await stub.LoadPackage(
                pb.LoadPackageRequest(package_dir="alice", package_name="alice"), metadata=ADMIN
            )
            assert r.success, r.error

    serve_on_fake(root, fake_for("alice", "bob"), body, admin_token=ADMIN_TOKEN)


@pytest.mark.parametrize("name", ["../alice", "a b", "x" * 64, "-dash", "é"])
def test_load_package_refuses_names_outside_the_pattern(make_package: Any, name: str) -> None:
    root = two_avatars(make_package)

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = stub_of(channel)
            r = await stub.LoadPackage(
                pb.LoadPackageRequest(package_dir="bob", package_name=name), metadata=ADMIN
            )
            assert not r.success and "is not a valid avatar name" in r.error, r.error
            assert (await stub.ListModels(pb.ListModelsRequest())).loaded_models == ["alice", "bob"]

    serve_on_fake(root, fake_for("alice", "bob"), body, admin_token=ADMIN_TOKEN)


def test_one_package_folder_is_not_loaded_twice_under_new_names(make_package: Any) -> None:
    root = two_avatars(make_package)

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = stub_of(channel)
            for k in range(3):
                r = await stub.LoadPackage(
                    pb.LoadPackageRequest(package_dir="bob", package_name=f"bob{k}"), metadata=ADMIN
                )
                assert not r.success and "is already served as avatar 'bob'" in r.error, r.error
                assert "would hold a second copy of its frames" in r.error
            assert (await stub.ListModels(pb.ListModelsRequest())).loaded_models == ["alice", "bob"]

    serve_on_fake(root, fake_for("alice", "bob"), body, admin_token=ADMIN_TOKEN)


def test_avatar_frames_held_stay_under_the_cap(make_package: Any) -> None:
    make_package(name="alice", frames=frames_of(1))
    root = Path(make_package(name="bob", root=None, frames=frames_of(2)).parent)
    one = 10 * 3 * (48 * 64 + 328 * 328 + 320 * 320)  # frames + 328 and 320 crops of 10 frames

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        assert server.ctx is not None
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = stub_of(channel)
            names = (await stub.ListModels(pb.ListModelsRequest())).loaded_models
            assert names == ["alice"], "bob did not fit at start-up"
            r = await stub.LoadPackage(pb.LoadPackageRequest(package_dir="bob"), metadata=ADMIN)
            assert not r.success and "(LIPSYNC_MAX_AVATAR_BYTES)" in r.error, r.error
            assert f"needs {one / MiB:.1f} MiB of frames" in r.error, r.error
            assert f"the cap is {1.5 * one / MiB:.1f} MiB" in r.error, r.error
        (alice,) = server.ctx.store.avatars()
        assert alice.backgrounds is not None and alice.backgrounds.nbytes > 0
        assert alice.held_bytes == one + alice.backgrounds.nbytes, "the background JPEGs count"

    serve_on_fake(
        root, fake_for("alice", "bob"), body, admin_token=ADMIN_TOKEN, max_avatar_bytes=int(1.5 * one)
    )


def test_background_jpegs_count_against_the_cap(make_package: Any) -> None:
    """A cap that fits alice's frames and crops but not her background JPEGs too: refused once
    the JPEGs are built, with what she needs in all."""
    root = Path(make_package(name="alice", frames=frames_of(1)).parent)
    one = 10 * 3 * (48 * 64 + 328 * 328 + 320 * 320)

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        assert server.ctx is not None and server.ctx.store.avatars() == [], "alice did not fit at start-up"
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            r = await stub_of(channel).LoadPackage(pb.LoadPackageRequest(package_dir="alice"), metadata=ADMIN)
        assert not r.success and "(LIPSYNC_MAX_AVATAR_BYTES)" in r.error, r.error
        assert "MiB of frames and background JPEGs in memory" in r.error, r.error

    serve_on_fake(root, fake_for("alice"), body, admin_token=ADMIN_TOKEN, max_avatar_bytes=one)


def read_bytes_so_far() -> int:
    """Bytes this process has read through read() so far (``rchar`` of /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_load_package_stops_reading_when_the_caller_goes_away(make_package: Any) -> None:
    """A package whose frames file is 8 GiB (sparse): hashing it takes many seconds; the caller
    gives up after 0.5 s, and the gateway must stop reading soon after."""
    root = Path(make_package(name="alice", frames=frames_of(1)).parent)

    def make_big() -> None:  # after start-up, which would hash it too
        big = Path(make_package(name="big", frames=frames_of(3)))
        manifest = json.loads((big / "manifest.json").read_text())
        size = 8 << 30
        with open(big / "frames.npy", "r+b") as fh:
            fh.truncate(size)
        manifest["files"]["frames"]["size_bytes"] = size
        (big / "manifest.json").write_text(json.dumps(manifest))

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        make_big()
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = stub_of(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadPackage(pb.LoadPackageRequest(package_dir="big"), metadata=ADMIN, timeout=0.5)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.5)  # the worker's next check
            before = read_bytes_so_far()
            await asyncio.sleep(1.5)
            read = read_bytes_so_far() - before
            assert read < 16 << 20, f"{read / 2**20:.0f} MiB read after the caller went away"
            assert (await stub.ListModels(pb.ListModelsRequest())).loaded_models == ["alice"]

    serve_on_fake(root, fake_for("alice", "big"), body, admin_token=ADMIN_TOKEN)


# ----------------------------------------------------------------------------- defect 8


def test_get_stats_past_two_to_the_31_frames(make_package: Any) -> None:
    root = two_avatars(make_package)

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        assert server.ctx is not None
        metrics = server.ctx.metrics
        for name in ("alice", "bob"):  # 2**31 + 5 frames of 2 ms each, in the series GetStats reads
            metrics.avatar_frames.labels(avatar=name, outcome="ok").inc(2**31 + 5)
            metrics.avatar_inference.labels(avatar=name).inc(2e-3 * (2**31 + 5))
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = stub_of(channel)
            one = await stub.GetStats(pb.StatsRequest(model_name="alice"))
            assert one.total_requests == INT32_MAX and one.avg_inference_time_ms == pytest.approx(2.0)
            both = await stub.GetStats(pb.StatsRequest())
            assert both.total_requests == INT32_MAX and both.model_name == "alice,bob"

    serve_on_fake(root, fake_for("alice", "bob"), body)


# ----------------------------------------------------------------------------- defect 9


@pytest.mark.parametrize("package_dir", ["demo\x00", "x" * 256, "alice/" + "y" * 300])
def test_unusable_package_dir_is_answered_in_band(make_package: Any, package_dir: str) -> None:
    root = two_avatars(make_package)

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            r = await stub_of(channel).LoadPackage(
                pb.LoadPackageRequest(package_dir=package_dir), metadata=ADMIN
            )
            assert not r.success and r.error.startswith("package_rejected: package_dir "), r.error
            assert "is not a usable path" in r.error

    serve_on_fake(root, fake_for("alice", "bob"), body, admin_token=ADMIN_TOKEN)


LIMIT = 8 << 20
"""A send limit small enough that noise frames of 320x240 overflow it within one batch."""


def noise_avatar(make_package: Any, flat: tuple[int, ...] = ()) -> Path:
    """Avatar ``noise``: 10 frames of 320x240 uniform noise (a JPEG of ~180 KB at quality 95),
    except the frames in ``flat`` (one grey)."""
    arrays = synthetic_package_arrays(n_frames=10, width=320, height=240)
    frames = np.random.default_rng(5).integers(0, 256, (10, 240, 320, 3), dtype=np.uint8)
    frames[list(flat)] = 128
    arrays.update(frames=frames)
    return Path(make_package(name="noise", **arrays).parent)


def test_batch_whose_answers_cannot_be_sent_is_refused_before_rendering(make_package: Any) -> None:
    root = noise_avatar(make_package)
    fake = fake_for("noise")

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(
            server.grpc_address, options=[("grpc.max_receive_message_length", -1)]
        ) as ch:
            stub = stub_of(ch)
            r = await stub.GenerateBatchInference(
                pb.BatchInferenceRequest(model_name="noise", frame_ids=[i % 24 for i in range(256)])
            )
            assert [x.success for x in r.responses] == [False]
            error = r.responses[0].error
            assert error.startswith(
                "bad_request: a batch of 256 frames of avatar 'noise' (320x240) may answer up to"
            )
            assert "over the gRPC send limit of 8 MiB" in error
            assert fake.count("infer") == 0, "refused before any frame was rendered"
            fit = int(error.split("ask for at most ")[1].split()[0])
            assert 10 <= fit < 256
            ok = await stub.GenerateBatchInference(
                pb.BatchInferenceRequest(model_name="noise", frame_ids=[i % 24 for i in range(fit)])
            )
            assert all(x.success for x in ok.responses), {x.error for x in ok.responses}
            assert ok.ByteSize() <= LIMIT
            audio = await stub.GenerateBatchWithAudio(
                pb.BatchInferenceWithAudioRequest(
                    model_name="noise", start_frame_id=8, frame_count=256, audio_chunks=[bytes(1280)] * 271
                )
            )
            assert all(not x.success and "over the gRPC send limit" in x.error for x in audio.responses)

    serve_on_fake(root, fake, body, grpc_max_send_bytes=LIMIT)


def test_batch_past_the_estimate_still_answers_in_band(make_package: Any) -> None:
    """The estimate samples frames 0, N/2 and N-1: grey here, noise elsewhere, so it is far too
    low; the rendered batch is then refused in-band instead of failing to send."""
    root = noise_avatar(make_package, flat=(0, 5, 9))

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(
            server.grpc_address, options=[("grpc.max_receive_message_length", -1)]
        ) as ch:
            ids = [1, 2, 3, 4, 6, 7, 8] * 10
            r = await stub_of(ch).GenerateBatchInference(
                pb.BatchInferenceRequest(model_name="noise", frame_ids=ids)
            )
            assert [x.frame_id for x in r.responses] == ids
            assert all(not x.success and "over the gRPC send limit" in x.error for x in r.responses)

    serve_on_fake(root, fake_for("noise"), body, grpc_max_send_bytes=LIMIT)


def test_a_bug_while_rendering_one_frame_is_answered_and_the_stream_goes_on(make_package: Any) -> None:
    root = Path(make_package(name="alice", frames=frames_of(1)).parent)
    calls = 0

    def flaky_unet(crop: NDArray[np.uint8], window: NDArray[np.float32]) -> NDArray[np.uint8]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("/secret/server/path exploded")
        return identity_unet(crop, window)

    fake = FakeTriton(
        {"lipsync_alice": FakeModel(flaky_unet), "audio_encoder": FakeModel(slice_encoder)},
        loaded=("audio_encoder",),
    )

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = stub_of(channel)

            async def requests() -> Any:
                for i in range(4):
                    yield pb.OptimizedInferenceRequest(model_name="alice", frame_id=i)
                    await asyncio.sleep(0.05)  # one at a time, so the second render is the bug

            answers = [a async for a in stub.StreamInference(requests())]
            assert [a.frame_id for a in answers] == [0, 1, 2, 3]
            assert [a.success for a in answers] == [True, False, True, True]
            assert answers[1].error == "internal: unexpected RuntimeError on the gateway (logged there)"
            again = await stub.GenerateInference(pb.OptimizedInferenceRequest(model_name="alice", frame_id=5))
            assert again.success

    serve_on_fake(root, fake, body)


# ----------------------------------------------------------------------------- defect 10


def test_no_server_paths_in_answers(make_package: Any, tmp_path: Path) -> None:
    root = two_avatars(make_package)
    arrays = synthetic_package_arrays()
    built_on = "/home/builder/checkpoints"
    write_package(
        root / "carol",
        name="carol",
        weights=WeightsManifest(
            trained=True,
            unet=WeightsSource(trained=True, source=f"{built_on}/unet_328.pth", sha256="2" * 64),
            audio_encoder=WeightsSource(trained=True, source=f"{built_on}/audio_visual_encoder.pth"),
        ),
        source=SourceMedia(
            video="v.mp4",
            audio="a.wav",
            video_fps=25.0,
            video_frames=10,
            video_width=64,
            video_height=48,
            audio_sample_rate=16000,
        ),
        **arrays,
    )
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{not json")
    secrets = (str(root), str(tmp_path), built_on)

    def clean(text: str) -> None:
        assert not any(s in text for s in secrets), text

    async def body(server: GatewayServer, _: FakeTriton) -> None:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = stub_of(channel)
            meta = await stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="alice"), metadata=ADMIN)
            assert meta.success and meta.audio_path == "alice/audio.wav"
            for package_dir in ("broken", "nowhere", str(root / "broken"), "/etc"):
                r = await stub.LoadPackage(pb.LoadPackageRequest(package_dir=package_dir), metadata=ADMIN)
                assert not r.success, package_dir
                clean(r.error.replace(package_dir, "<asked>") if package_dir.startswith("/") else r.error)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}) as session:
            async with session.get(f"{server.http_url}/api/avatars/carol") as resp:
                carol = await resp.json()
            assert carol["weights"]["unet"] == "unet_328.pth"
            assert carol["weights"]["audio_encoder"] == "audio_visual_encoder.pth"
            clean(json.dumps(carol))
        async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{server.http_url}/readyz") as resp:
            ready = await resp.text()
        assert "fake-triton" not in ready
        clean(ready)

    serve_on_fake(
        root, fake_for("alice", "bob", "carol"), body, admin_token=ADMIN_TOKEN, auth_token=CLIENT_TOKEN
    )
