"""`gateway.pipeline.FramePipeline` through the in-process fake Triton (identity UNet): the
composited JPEG, the window it sends, precise errors, admission, live audio, and outcome metrics
counted once per frame. The reference composite (`tests.reference_frames.identity_composite`) is
written out with OpenCV (docs/REFERENCE.md s.2 steps 2-8), independently of `lipsync.frames`.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from gateway.audio_features import (
    WINDOW_CHUNK_BYTES,
    FeatureWindow,
    WindowChunks,
    pcm_mel_windows,
)
from gateway.context import GatewayContext
from gateway.errors import (
    BadRequest,
    FrameOutOfRange,
    Overloaded,
    TritonUnavailable,
    UnknownAvatar,
)
from gateway.frame_request import FrameRequest
from lipsync.contract import avatar_model_name
from tests.fake_gateway import SYNTHETIC_AVATAR, on_fake_context, synthetic_avatar
from tests.fake_triton import FakeTriton, slice_encoder
from tests.reference_frames import identity_composite, reference_window

T = TypeVar("T")
AVATAR = SYNTHETIC_AVATAR
MODEL = avatar_model_name(AVATAR)


def counted(ctx: GatewayContext, protocol: str = "grpc") -> dict[str, float]:
    """Frames counted per outcome, plus errors per code, for ``protocol``."""
    registry = ctx.metrics.registry
    out = {}
    for outcome in ("ok", "error"):
        out[outcome] = registry.get_sample_value(
            "lipsync_gateway_requests_total", {"protocol": protocol, "outcome": outcome}
        ) or 0.0
    for code in (
        "unknown_avatar",
        "frame_out_of_range",
        "bad_request",
        "overloaded",
        "triton_unavailable",
        "internal",
    ):
        out[code] = (
            registry.get_sample_value("lipsync_gateway_errors_total", {"protocol": protocol, "code": code})
            or 0.0
        )
    return out


def on_fake(
    make_package: Callable[..., Path],
    body: Callable[[GatewayContext, FakeTriton], Awaitable[T]],
    **settings: Any,
) -> T:
    """Run ``body(ctx, fake)`` on a gateway context over the fake with the synthetic package."""
    root, fake = synthetic_avatar(make_package)

    return on_fake_context(root, fake, body, **settings)


def test_render_composites_the_identity_prediction(make_package: Callable[..., Path]) -> None:
    async def body(ctx: GatewayContext, fake: FakeTriton) -> None:
        avatar = ctx.store.get(AVATAR)
        n, m = avatar.video_frames, avatar.feature_rows
        assert m > n + 2, "the synthetic package's audio must outlast its video"
        for frame_id, v in ((3, 3), (n + 2, n - 4)):  # n + 2 shows video frame n - 4 (ping-pong)
            frame = await ctx.pipeline.render(FrameRequest(AVATAR, frame_id), protocol="grpc")
            expected = identity_composite(avatar.frames[v], avatar.rects[v])
            assert not np.array_equal(expected, avatar.frames[v]), "the check could not tell"
            assert frame.jpeg == ctx.pipeline.encoder.encode(expected)
            assert frame.rect == tuple(float(c) for c in avatar.rects[v])
            assert (frame.avatar, frame.frame_id, frame.width, frame.height) == (AVATAR, frame_id, 64, 48)
            assert min(frame.prepare_ms, frame.inference_ms, frame.composite_ms) >= 0
            assert frame.total_ms >= frame.inference_ms
            model, (crop, window) = fake.inputs[-1]
            assert model == MODEL and crop.shape == (1, 320, 320, 3) and window.shape == (1, 16, 512)
            np.testing.assert_array_equal(crop[0], avatar.inners[v])
            np.testing.assert_array_equal(window[0], reference_window(np.asarray(avatar.features), frame_id))
        assert counted(ctx)["ok"] == 2 and counted(ctx)["error"] == 0
        totals = ctx.metrics.avatar_totals(AVATAR, ctx.metrics.snapshot())
        assert totals.frames == 2 and totals.errors == 0
        assert 0 < totals.inference_ms_min <= totals.avg_inference_ms <= totals.inference_ms_max

    on_fake(make_package, body)


def test_bad_requests_get_precise_errors_counted_once(make_package: Callable[..., Path]) -> None:
    async def body(ctx: GatewayContext, fake: FakeTriton) -> None:
        avatar = ctx.store.get(AVATAR)
        m, n = avatar.feature_rows, avatar.video_frames
        cases: list[tuple[FrameRequest, type[Exception], str]] = [
            (
                FrameRequest("nobody", 0),
                UnknownAvatar,
                r"avatar 'nobody' is not loaded \(loaded: synthetic\)",
            ),
            (
                FrameRequest(AVATAR, m),
                FrameOutOfRange,
                rf"frame_id {m} is out of range for avatar 'synthetic' "
                rf"\(valid: 0..{m - 1}; {m} audio feature rows, {n} video frames",
            ),
            (FrameRequest(AVATAR, -1), FrameOutOfRange, r"frame_id -1 is out of range"),
            (
                FrameRequest(AVATAR, -1, WindowChunks(bytes(WINDOW_CHUNK_BYTES), -1)),
                FrameOutOfRange,
                r"valid: >= 0;",
            ),
            (
                FrameRequest(AVATAR, 1, WindowChunks(bytes(1000), 1)),
                BadRequest,
                rf"audio_len=1000: live audio for frame_id=1 must be {WINDOW_CHUNK_BYTES} bytes",
            ),
        ]
        for request, error, message in cases:
            with pytest.raises(error, match=message):
                await ctx.pipeline.render(request, protocol="grpc")
        fake.mode = "refused"
        await ctx.lifecycle.probe_once()
        with pytest.raises(
            TritonUnavailable, match=r"Triton at fake-triton:8001 is not ready \(.*connection refused"
        ):
            await ctx.pipeline.render(FrameRequest(AVATAR, 2), protocol="grpc")
        assert fake.count("infer") == 0, "no request reached Triton"
        assert counted(ctx) == {
            "ok": 0, "error": 6, "unknown_avatar": 1, "frame_out_of_range": 3, "bad_request": 1,
            "overloaded": 0, "triton_unavailable": 1, "internal": 0,
        }
        totals = ctx.metrics.avatar_totals(AVATAR, ctx.metrics.snapshot())
        assert totals.errors == 5 and totals.frames == 0 and totals.inference_ms_max == 0

    on_fake(make_package, body)


def test_admission_refuses_at_once_and_cancelled_frames_are_not_counted(
    make_package: Callable[..., Path],
) -> None:
    async def body(ctx: GatewayContext, fake: FakeTriton) -> None:
        fake.hold_inference = asyncio.Event()
        first = asyncio.create_task(ctx.pipeline.render(FrameRequest(AVATAR, 1), protocol="ws"))
        while fake.count("infer") == 0:
            await asyncio.sleep(0)
        with pytest.raises(Overloaded, match=r"already has 1 frames in flight \(limit 1\)"):
            await ctx.pipeline.render(FrameRequest(AVATAR, 2), protocol="ws")
        assert ctx.pipeline.admission.in_flight == 1
        fake.hold_inference.set()
        await first
        assert ctx.pipeline.admission.in_flight == 0
        fake.hold_inference = asyncio.Event()
        gone = asyncio.create_task(ctx.pipeline.render(FrameRequest(AVATAR, 3), protocol="ws"))
        while fake.count("infer") < 2:
            await asyncio.sleep(0)
        gone.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await gone
        c = counted(ctx, "ws")
        assert (c["ok"], c["error"], c["overloaded"]) == (1, 1, 1)
        assert ctx.pipeline.admission.in_flight == 0

    on_fake(make_package, body, max_in_flight_total=1)


def test_live_audio_windows(make_package: Callable[..., Path]) -> None:
    pcm = (np.random.default_rng(0).standard_normal(WINDOW_CHUNK_BYTES // 2) * 3000).astype("<i2").tobytes()

    async def body(ctx: GatewayContext, fake: FakeTriton) -> None:
        m = ctx.store.get(AVATAR).feature_rows
        # raw chunks: checked, their 16 mel windows encoded (split to the encoder's max batch
        # size, 8), the window made of the 16 feature rows; a frame id past M is fine
        await ctx.pipeline.render(FrameRequest(AVATAR, m + 5, WindowChunks(pcm, m + 5)), protocol="ws")
        mel = np.concatenate([x[0] for model, x in fake.inputs if model == "audio_encoder"])
        np.testing.assert_array_equal(mel, pcm_mel_windows(pcm, 16))
        assert fake.count("infer", "audio_encoder") == 2
        model, (_, window) = fake.inputs[-1]
        assert model == MODEL
        np.testing.assert_array_equal(window[0], slice_encoder(mel))
        # a computed window goes to the UNet as it is, without the encoder
        rows = np.random.default_rng(1).standard_normal((16, 512)).astype(np.float32)
        await ctx.pipeline.render(FrameRequest(AVATAR, 0, FeatureWindow(rows)), protocol="grpc")
        assert fake.count("infer", "audio_encoder") == 2
        np.testing.assert_array_equal(fake.inputs[-1][1][1][0], rows)
        # the encoder unloaded, and it cannot be loaded again: a precise error
        fake.models.pop("audio_encoder")
        fake.loaded.discard("audio_encoder")
        await ctx.lifecycle.probe_once()
        await ctx.lifecycle.wait_loading()
        with pytest.raises(
            TritonUnavailable, match=r"model 'audio_encoder' is not loaded in Triton \(load_model"
        ):
            await ctx.pipeline.render(FrameRequest(AVATAR, 0, WindowChunks(pcm, 0)), protocol="ws")

    on_fake(make_package, body)
