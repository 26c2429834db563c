"""The gateway's JPEG output end to end (issue 9): spliced full frames are byte-identical to
OpenCV's encode of the whole composited frame, the setting and the start-up self-test fall back
to full encodes and say so in /readyz, crop output over ``/ws?output=crop`` composites over the
background JPEGs served over HTTP (with caching headers).

Fast tier: a real `GatewayServer` whose Triton is the in-process fake (identity UNet), on a
synthetic 250x150 avatar (not a multiple of 16 px) whose face rectangles touch each corner and
edge of the frame; the expected composite is written out with OpenCV
(`tests.fake_triton.identity_composite`) and encoded here with ``cv2.imencode``. Slow tier: the
real UNet in the real CPU ``tritonserver`` on the demo avatar, its predictions recorded on the
way back from Triton.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

import gateway.compositor
from gateway.frame_request import FrameRequest
from gateway.jpeg import SimpleJpegEncoder
from gateway.server import GatewayServer
from gateway.ws_protocol import (
    CropReply,
    FrameReply,
    decode_crop_reply,
    decode_reply,
    encode_request,
)
from lipsync.jpeg_splice import read_header
from tests.fake_gateway import serve_on_fake
from tests.fake_triton import FakeTriton, fake_triton
from tests.reference_frames import decode_jpeg, identity_composite

T = TypeVar("T")
AVATAR = "wide"
WIDTH, HEIGHT = 250, 150
RECTS = np.array([
    (0, 0, 90, 90),  # top-left corner
    (160, 60, 250, 150),  # bottom-right corner: ends on both frame edges
    (80, 30, 170, 120),  # centre
    (0, 60, 90, 150),  # bottom-left corner
    (160, 0, 250, 90),  # top-right corner
    (101, 37, 172, 108),  # odd offsets
], dtype=np.int32)
"""Square face rectangles ``(x1, y1, x2, y2)`` px, one per video frame."""
RESTART_MCUS = {85: 8, 95: 16}
"""R at 250 px with the default 128 px target: q85 is 4:2:0 (16 MCUs of 16 px per row: R = 8,
128 px), q95 is 4:4:4 (32 MCUs of 8 px: R = 16, 128 px)."""
SAMPLING = {85: cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, 95: cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444}


def reference_jpeg(image: NDArray[np.uint8], quality: int, restart_mcus: int) -> bytes:
    """OpenCV's JPEG of a whole frame, written out here: quality, sampling, restart interval."""
    ok, buf = cv2.imencode(".jpg", image, [
        cv2.IMWRITE_JPEG_QUALITY, quality,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR, SAMPLING[quality],
        cv2.IMWRITE_JPEG_RST_INTERVAL, restart_mcus,
    ])
    assert ok
    return buf.tobytes()


def on_server(
    make_package: Callable[..., Path],
    body: Callable[[GatewayServer, FakeTriton], Awaitable[T]],
    **settings: Any,
) -> T:
    """Run ``body(server, fake)`` on a gateway over the fake serving the 250x150 avatar."""
    frames = np.random.default_rng(3).integers(0, 256, (len(RECTS), HEIGHT, WIDTH, 3), dtype=np.uint8)
    landmarks = np.stack(
        [np.random.default_rng(v).uniform(r[:2], r[2:], size=(68, 2)) for v, r in enumerate(RECTS)]
    ).astype(np.float32)
    root = make_package(name=AVATAR, frames=frames, rects=RECTS, landmarks=landmarks).parent
    return serve_on_fake(root, fake_triton(f"lipsync_{AVATAR}", loaded=("audio_encoder",)), body, **settings)


async def readyz_jpeg(server: GatewayServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{server.http_url}/readyz") as resp:
        body: dict[str, Any] = (await resp.json())["jpeg"]
        return body


@pytest.mark.parametrize("quality", [85, 95])
def test_spliced_frames_equal_opencvs_encode_of_the_composited_frame(
    make_package: Callable[..., Path], quality: int
) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        avatar = server.ctx.store.get(AVATAR)
        assert await readyz_jpeg(server) == {"mode": "spliced", "reason": None}
        for v in range(len(RECTS)):
            frame = await server.ctx.pipeline.render(FrameRequest(AVATAR, v), protocol="grpc")
            expected = identity_composite(avatar.frames[v], avatar.rects[v])
            assert not np.array_equal(expected, avatar.frames[v]), "the check could not tell"
            assert read_header(frame.jpeg).restart_mcus == RESTART_MCUS[quality]
            assert frame.jpeg == reference_jpeg(expected, quality, RESTART_MCUS[quality]), f"video frame {v}"
        # the same bytes over the WebSocket, whose default stays full frames
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.http_url}/ws") as ws:
            await ws.send_bytes(encode_request(AVATAR, 1))
            reply = decode_reply((await ws.receive(timeout=10)).data)
        assert isinstance(reply, FrameReply)
        assert reply.jpeg == reference_jpeg(
            identity_composite(avatar.frames[1], avatar.rects[1]), quality, RESTART_MCUS[quality]
        )

    on_server(make_package, body, jpeg_quality=quality)


def test_splicing_off_encodes_the_full_frame_with_the_configured_encoder(
    make_package: Callable[..., Path],
) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        avatar = server.ctx.store.get(AVATAR)
        assert await readyz_jpeg(server) == {
            "mode": "full",
            "reason": "splicing is off (LIPSYNC_JPEG_SPLICE=0)",
        }
        frame = await server.ctx.pipeline.render(FrameRequest(AVATAR, 2), protocol="grpc")
        expected = SimpleJpegEncoder(85).encode(identity_composite(avatar.frames[2], avatar.rects[2]))
        assert frame.jpeg == expected
        assert read_header(frame.jpeg).restart_mcus == 0

    on_server(make_package, body, jpeg_quality=85, jpeg_splice=False)


def test_a_failed_self_test_falls_back_to_full_frames_and_says_why(
    make_package: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    checked: list[tuple[int, ...]] = []

    def mismatch(background: Any, frame: Any, box: tuple[int, ...], settings: Any) -> str:
        checked.append(box)
        return (
            "quantization tables (DQT; a different JPEG quality?) differ between the background "
            "and the rectangle encoder"
        )

    monkeypatch.setattr(gateway.compositor, "check_splice", mismatch)

    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        avatar = server.ctx.store.get(AVATAR)
        assert checked == [tuple(RECTS[0])], "the self-test ran on the avatar's first video frame"
        jpeg = await readyz_jpeg(server)
        assert jpeg["mode"] == "full"
        assert jpeg["reason"].startswith(
            "spliced JPEG self-test failed on avatar 'wide': quantization tables"
        )
        frame = await server.ctx.pipeline.render(FrameRequest(AVATAR, 1), protocol="grpc")
        assert frame.jpeg == SimpleJpegEncoder(85).encode(
            identity_composite(avatar.frames[1], avatar.rects[1])
        )

    with caplog.at_level(logging.ERROR, logger="gateway.compositor"):
        on_server(make_package, body, jpeg_quality=85)
    assert any("self-test failed on avatar 'wide'" in r.getMessage() for r in caplog.records)


def test_crop_output_over_the_backgrounds_gives_the_full_frame(make_package: Callable[..., Path]) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        avatar = server.ctx.store.get(AVATAR)
        n, m = avatar.video_frames, avatar.feature_rows
        url = server.http_url
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/api/avatars/{AVATAR}") as resp:
                template = (await resp.json())["backgrounds_url"]
            assert template.startswith(f"/api/avatars/{AVATAR}/backgrounds/{{video_frame}}.jpg?v=")
            backgrounds = []
            for v in range(n):
                async with session.get(url + template.format(video_frame=v)) as resp:
                    assert resp.status == 200 and resp.content_type == "image/jpeg"
                    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
                    backgrounds.append(decode_jpeg(await resp.read()))
            frame_ids = [0, 1, 4, n + 2, m - 1]  # n + 2 shows video frame n - 4 (ping-pong)
            async with session.ws_connect(f"{url}/ws?output=crop") as ws:
                replies = []
                for frame_id in frame_ids:
                    await ws.send_bytes(encode_request(AVATAR, frame_id))
                    replies.append(decode_crop_reply((await ws.receive(timeout=10)).data))
                await ws.send_bytes(encode_request(AVATAR, m))
                error = decode_crop_reply((await ws.receive(timeout=10)).data)
            async with aiohttp.ClientSession() as full_session, full_session.ws_connect(f"{url}/ws") as ws:
                await ws.send_bytes(encode_request(AVATAR, frame_ids[-1]))
                full_reply = decode_reply((await ws.receive(timeout=10)).data)
        assert not isinstance(error, CropReply) and error.code == "frame_out_of_range"
        for frame_id, reply in zip(frame_ids, replies, strict=True):
            assert isinstance(reply, CropReply) and reply.frame_id == frame_id
            v = avatar.video_index(frame_id)
            assert reply.video_frame == v
            x1, y1, x2, y2 = (int(c) for c in avatar.rects[v])
            assert reply.bounds == (x1, y1, x2, y2)
            composite = identity_composite(avatar.frames[v], avatar.rects[v])
            # the face JPEG is the face rectangle of the composite, encoded alone
            assert reply.jpeg == server.ctx.pipeline.compositor.plain.encode(
                np.ascontiguousarray(composite[y1:y2, x1:x2])
            )
            picture = backgrounds[v].copy()
            picture[y1:y2, x1:x2] = decode_jpeg(reply.jpeg)
            diff = np.abs(
                picture.astype(np.int16)
                - decode_jpeg(server.ctx.pipeline.encoder.encode(composite)).astype(np.int16)
            )
            assert diff.mean() < 3.0, f"frame {frame_id}: mean difference {diff.mean():.2f} grey levels"
        last = replies[-1]
        assert isinstance(full_reply, FrameReply) and isinstance(last, CropReply)
        assert len(last.jpeg) < len(full_reply.jpeg) / 2

    on_server(make_package, body, jpeg_quality=95)


def test_background_endpoint_caching_and_errors(make_package: Callable[..., Path]) -> None:
    async def body(server: GatewayServer, fake: FakeTriton) -> None:
        assert server.ctx is not None
        avatar = server.ctx.store.get(AVATAR)
        assert avatar.backgrounds is not None
        base = f"{server.http_url}/api/avatars/{AVATAR}/backgrounds"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/2.jpg") as resp:
                assert resp.status == 200
                assert resp.headers["Cache-Control"] == "no-cache", "an unversioned URL is revalidated"
                etag = resp.headers["ETag"]
                body_bytes = await resp.read()
            assert body_bytes == avatar.backgrounds.jpeg(2)
            np.testing.assert_allclose(
                decode_jpeg(body_bytes), avatar.frames[2], atol=60
            )  # the video frame, JPEG noise aside
            async with session.get(f"{base}/2.jpg", headers={"If-None-Match": etag}) as resp:
                assert resp.status == 304 and resp.headers["ETag"] == etag and not await resp.read()
            async with session.get(f"{base}/3.jpg", headers={"If-None-Match": etag}) as resp:
                assert resp.status == 200 and resp.headers["ETag"] != etag
            for path, status, code in [
                (f"{base}/{len(RECTS)}.jpg", 400, "frame_out_of_range"),
                (f"{base}/-1.jpg", 400, "frame_out_of_range"),
                (f"{base}/x.jpg", 400, "bad_request"),
                (f"{server.http_url}/api/avatars/nobody/backgrounds/0.jpg", 404, "unknown_avatar"),
                (f"{server.http_url}/ws?output=faces", 400, "bad_request"),
            ]:
                async with session.get(path) as resp:
                    assert resp.status == status, path
                    assert (await resp.json())["error"] == code, path

    on_server(make_package, body)


# ----------------------------------------------------------------------------- real UNet


class RecordingInference:
    """The gateway's own inference client, keeping every prediction it returns (by model)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.preds: list[NDArray[np.uint8]] = []

    async def infer_unet(
        self, model: str, crop: NDArray[np.uint8], window: NDArray[np.float32]
    ) -> NDArray[np.uint8]:
        pred = await self.inner.infer_unet(model, crop, window)
        self.preds.append(np.array(pred))
        return pred

    async def infer_audio_encoder(self, model: str, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        result: NDArray[np.float32] = await self.inner.infer_audio_encoder(model, mel)
        return result


def reference_paste(
    frame: NDArray[np.uint8], rect: NDArray[np.int32], pred: NDArray[np.uint8]
) -> NDArray[np.uint8]:
    """docs/REFERENCE.md s.2 steps 2, 3, 8 written out with OpenCV for a given prediction."""
    x1, y1, x2, y2 = (int(c) for c in rect)
    crop = cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    crop[4:324, 4:324] = pred
    out = frame.copy()
    out[y1:y2, x1:x2] = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
    return out


@pytest.mark.triton
def test_real_unet_spliced_frames_equal_opencvs_encode(
    start_gateway: Any, triton_server: Any, gateway_packages_root: Path, demo_package: Any
) -> None:
    quality = 85
    running = start_gateway(triton_server.grpc_url, gateway_packages_root, jpeg_quality=quality)
    pipeline = running.ctx.pipeline
    recorder = RecordingInference(pipeline.inference)
    pipeline.inference = recorder
    n = demo_package.frames.shape[0]
    width = demo_package.frames.shape[2]
    assert width == 176, "R below assumes the 176 px demo: 11 MCUs of 16 px per row, R = 11"
    for frame_id in (0, n // 2, n + 3):
        frame = running.call(lambda fid=frame_id: pipeline.render(FrameRequest("demo", fid), protocol="grpc"))
        v = frame.video_frame
        pred = recorder.preds[-1][0]
        expected = reference_paste(demo_package.frames[v], demo_package.rects[v], pred)
        assert not np.array_equal(pred, running.ctx.store.get("demo").inners[v]), (
            "the real UNet changed the mouth"
        )
        assert frame.jpeg == reference_jpeg(expected, quality, 11), f"frame {frame_id}"
    assert running.ctx.jpeg_mode().mode == "spliced"
