"""`gateway.batching.CoalescingInference` in the gateway over the in-process fake Triton (identity
UNet, max batch size 8): frames rendered together go to Triton as one request per model, each
frame gets its own row of the answer, failures reach every frame of the batch, a cancelled frame
does not hold the others, and ``triton_coalesce=False`` sends one request per frame."""
from __future__ import annotations

import asyncio
import gc
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.batching import CoalescingInference
from gateway.context import GatewayContext
from gateway.errors import TritonUnavailable
from gateway.frame_request import FrameRequest
from gateway.triton_shm import FrameArena
from tests.fake_gateway import on_fake_context
from tests.fake_triton import FakeTriton, fake_triton
from tests.reference_frames import identity_composite

T = TypeVar("T")
AVATAR = "synthetic"
MODEL = f"lipsync_{AVATAR}"


def on_fake(make_package: Callable[..., Path], body: Callable[[GatewayContext, FakeTriton], Awaitable[T]],
            **settings: Any) -> T:
    frames = np.random.default_rng(1).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8)
    root = make_package(name=AVATAR, frames=frames).parent
    return on_fake_context(root, fake_triton(MODEL, loaded=("audio_encoder",)), body, **settings)


async def render_all(ctx: GatewayContext, frame_ids: list[int]) -> list[Any]:
    return await asyncio.gather(
        *(ctx.pipeline.render(FrameRequest(AVATAR, i), protocol="grpc") for i in frame_ids),
        return_exceptions=True,
    )


def test_frames_rendered_together_share_one_request_and_get_their_own_rows(
    make_package: Callable[..., Path],
) -> None:
    async def body(ctx: GatewayContext, fake: FakeTriton) -> None:
        assert isinstance(ctx.pipeline.inference, CoalescingInference)
        avatar = ctx.store.get(AVATAR)
        for ids, sizes in (([0, 3, 5, 7, 9], [5]), (list(range(11)), [8, 3])):  # max batch size 8
            before = len(fake.inputs)
            frames = await render_all(ctx, ids)
            sent = [x for model, x in fake.inputs[before:] if model == MODEL]
            assert [len(crop) for crop, _ in sent] == sizes
            for frame_id, frame in zip(ids, frames, strict=True):
                assert frame.frame_id == frame_id
                v = frame.video_frame
                assert frame.jpeg == ctx.pipeline.encoder.encode(
                    identity_composite(avatar.frames[v], avatar.rects[v])
                )
            # the request holds the frames' own crops, in the callers' order
            crops = np.concatenate([crop for crop, _ in sent])
            np.testing.assert_array_equal(crops, avatar.inners[[avatar.video_index(i) for i in ids]])

    on_fake(make_package, body)


def test_a_failed_batch_fails_each_of_its_frames(make_package: Callable[..., Path]) -> None:
    async def body(ctx: GatewayContext, fake: FakeTriton) -> None:
        fake.loaded.discard(MODEL)  # Triton lost the model: the request fails
        results = await render_all(ctx, [1, 2, 3])
        assert fake.count("infer", MODEL) == 1
        assert all(isinstance(r, TritonUnavailable) for r in results), results
        assert "Request for unknown model" in str(results[0])

    on_fake(make_package, body)


def test_a_cancelled_frame_does_not_hold_the_others(make_package: Callable[..., Path]) -> None:
    async def body(ctx: GatewayContext, fake: FakeTriton) -> None:
        fake.hold_inference = asyncio.Event()
        tasks = [
            asyncio.create_task(ctx.pipeline.render(FrameRequest(AVATAR, i), protocol="ws"))
            for i in (1, 2, 3)
        ]
        while fake.count("infer", MODEL) == 0:
            await asyncio.sleep(0)
        tasks[1].cancel()  # its client went away while the batch was in Triton
        fake.hold_inference.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError)
        assert [getattr(f, "frame_id", f) for f in (done[0], done[2])] == [1, 3]
        assert fake.count("infer", MODEL) == 1 and ctx.pipeline.admission.in_flight == 0

    on_fake(make_package, body)


@pytest.mark.parametrize("coalesce", [True, False])
def test_the_setting_turns_coalescing_off(make_package: Callable[..., Path], coalesce: bool) -> None:
    async def body(ctx: GatewayContext, fake: FakeTriton) -> None:
        await render_all(ctx, [0, 1, 2, 3])
        assert fake.count("infer", MODEL) == (1 if coalesce else 4)
        assert isinstance(ctx.pipeline.inference, CoalescingInference) is coalesce

    on_fake(make_package, body, triton_coalesce=coalesce)


def test_a_batch_is_written_straight_into_shared_memory_cells() -> None:
    """With ``stage`` (the gateway's Triton shared-memory arena), the frames' inputs go row by
    row into the arena's cells and the inner client gets those cells as its inputs (it sends them
    without a copy); each frame still gets its own row, and every cell comes back after."""
    arena = FrameArena(8, f"lipsync_test_{secrets.token_hex(4)}")
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 256, (5, 320, 320, 3), dtype=np.uint8)
    windows = rng.standard_normal((5, 16, 512), dtype=np.float32)
    firsts: list[int | None] = []

    class IdentityOnCells:
        """The inner client: the identity UNet, answering in the cells it was given."""

        async def infer_unet(
            self, model: str, crop: NDArray[np.uint8], window: NDArray[np.float32]
        ) -> NDArray[np.uint8]:
            first = arena.staged_first(crop, window)
            firsts.append(first)
            assert first is not None, "the inputs were not written into the arena's cells"
            np.testing.assert_array_equal(window, windows)
            pred = arena.prediction(first, len(crop))
            pred[:] = crop
            return pred

        async def infer_audio_encoder(self, model: str, mel: NDArray[np.float32]) -> NDArray[np.float32]:
            raise AssertionError("not called")

    async def main() -> list[NDArray[np.uint8]]:
        coalescer = CoalescingInference(IdentityOnCells(), lambda model: 8, arena.stage)
        return await asyncio.gather(
            *(coalescer.infer_unet(MODEL, crops[k : k + 1], windows[k : k + 1]) for k in range(5))
        )

    try:
        rows = asyncio.run(main())
        assert firsts == [0], "one request, inputs in cells 0..4"
        for k, row in enumerate(rows):
            np.testing.assert_array_equal(row, crops[k : k + 1])
        assert arena.free_cells == 3, "the answer's rows hold their cells"
        del rows, row
        gc.collect()
        assert arena.free_cells == 8
    finally:
        arena.close()
