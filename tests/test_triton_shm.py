"""`gateway.triton_shm`: the frame-cell arena (fast tier) and UNet calls through system shared
memory against the real CPU ``tritonserver`` (slow tier): the same predictions as plain gRPC,
registration again after a Triton restart, nothing left in ``/dev/shm``."""
from __future__ import annotations

import asyncio
import gc
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.frame_request import FrameRequest
from gateway.triton_shm import FrameArena
from lipsync.paths import MODEL_REPOSITORY_CPU
from tests.waiting import wait_until

SHM = Path("/dev/shm")


def arena(cells: int) -> FrameArena:
    return FrameArena(cells, f"lipsync_test_{secrets.token_hex(4)}")


def test_cells_are_taken_in_runs_and_come_back_with_the_prediction() -> None:
    a = arena(6)
    try:
        assert (a.take(2), a.take(3)) == (0, 2)
        assert a.take(2) is None, "one cell left: no run of two"
        pred = a.prediction(0, 2)
        assert pred.shape == (2, 320, 320, 3) and pred.dtype == np.uint8
        row = pred[1:2]  # what one caller of a coalesced batch keeps
        del pred
        gc.collect()
        assert a.free_cells == 1, "a view of the prediction still holds its cells"
        del row
        gc.collect()
        assert a.free_cells == 3 and a.take(3) is None, "cells 0-1 and 5 are free, not in one run"
        assert a.take(2) == 0
    finally:
        a.close()


def test_staged_inputs_are_recognised_and_hold_their_cells_until_the_prediction_is_gone() -> None:
    a = arena(4)
    try:
        staged = a.stage(3)
        assert staged is not None and a.free_cells == 1 and a.stage(2) is None
        assert a.staged_first(staged.crops, staged.windows) == 0
        assert a.staged_first(staged.crops[1:], staged.windows[1:]) == 1, "a part of a split batch"
        assert a.staged_first(staged.crops[:2], staged.windows[1:3]) is None, "rows do not match"
        assert a.staged_first(np.array(staged.crops), staged.windows) is None, "a copy is no cell"
        assert a.staged_first(a.crops[3:4], a.windows[3:4]) is None, "cell 3 is not held"
        pred = a.prediction(0, 3)
        del staged
        gc.collect()
        assert a.free_cells == 1, "the prediction still holds the cells"
        del pred
        gc.collect()
        assert a.free_cells == 4
    finally:
        a.close()


def test_areas_do_not_overlap_and_the_object_is_unlinked_at_close() -> None:
    a = arena(3)
    name = a.key.lstrip("/")
    assert (SHM / name).exists() and a.byte_size == 3 * (2 * 320 * 320 * 3 + 16 * 512 * 4)
    a.crops[:] = 1
    a.windows[:] = 2.0
    pred = a.prediction(0, 3)
    pred[:] = 3
    assert int(a.crops.sum()) == a.crops.size and float(a.windows.min()) == 2.0
    assert a.take(10) is None
    del pred
    a.close()
    assert not (SHM / name).exists()


@pytest.mark.triton
def test_unet_through_shared_memory_survives_a_triton_restart(
    start_triton: Any, start_gateway: Any, gateway_packages_root: Path
) -> None:
    triton = start_triton(MODEL_REPOSITORY_CPU, model_control_mode="explicit", load_models=("lipsync_demo",))
    shm_gw = start_gateway(triton.grpc_url, gateway_packages_root)
    plain_gw = start_gateway(triton.grpc_url, gateway_packages_root, triton_shm="none")
    (transport,) = shm_gw.ctx.shared_memory()  # one endpoint, one region
    assert plain_gw.ctx.shared_memory() == []
    key = transport.arena.key.lstrip("/")

    def render(gw: Any, frame_id: int) -> Any:
        return gw.call(lambda: gw.ctx.pipeline.render(FrameRequest("demo", frame_id), protocol="grpc"))

    def decoded(jpeg: bytes) -> Any:
        import cv2

        return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)

    first = render(shm_gw, 5)
    assert transport.status == "registered"
    same = render(plain_gw, 5)
    # same JPEG path on both: any difference is the prediction's (ONNX Runtime on one frame)
    assert np.abs(decoded(first.jpeg) - decoded(same.jpeg)).mean() < 0.25, (
        "shared memory carried the same prediction"
    )

    def render_together(gw: Any, frame_ids: list[int]) -> list[Any]:
        async def together() -> list[Any]:
            return list(await asyncio.gather(
                *(gw.ctx.pipeline.render(FrameRequest("demo", i), protocol="grpc") for i in frame_ids)
            ))
        return gw.call(together)

    # coalesced into one request whose inputs are written straight into the arena's cells
    assert transport.stage(3) is not None, "registered: cells for a batch's inputs"
    for staged, copied in zip(render_together(shm_gw, [8, 9, 10]), render_together(plain_gw, [8, 9, 10]),
                              strict=True):
        assert np.abs(decoded(staged.jpeg) - decoded(copied.jpeg)).mean() < 0.25, (
            "inputs staged in shared memory: the same predictions as over gRPC"
        )

    triton.kill()
    triton.start(180.0)
    wait_until(  # reloaded by the lifecycle
        lambda: shm_gw.ctx.lifecycle.snapshot().model_ready("lipsync_demo"),
        "the gateway to see the model again",
        timeout_s=120,
        step_s=0.5,
    )
    after = render(shm_gw, 6)  # the region is gone from Triton: this call goes over plain gRPC
    assert after.jpeg and transport.status.startswith(("lost", "registered"))
    render(shm_gw, 7)
    assert transport.status == "registered", "registered again after the restart"
    shm_gw.stop()
    assert not (SHM / key).exists(), "the gateway unlinked its shared memory"


@pytest.mark.triton
def test_a_triton_that_cannot_open_the_memory_gets_plain_grpc(triton_server: Any, demo_package: Any) -> None:
    """Triton on another host cannot open the gateway's object: emulated by unlinking its name
    before the first call; the UNet answers over plain gRPC, the same prediction."""
    import asyncio

    from gateway.triton_client import TritonGrpcClient
    from gateway.triton_shm import SharedMemoryUnet
    from lipsync.frames import audio_window, crop_328, inner_320

    crop = inner_320(crop_328(demo_package.frames[0], demo_package.rects[0]))[None].copy()
    window = audio_window(np.asarray(demo_package.features), 0)[None]
    model = demo_package.manifest.model_name

    async def run() -> tuple[Any, Any, str, Any]:
        plain = TritonGrpcClient(triton_server.grpc_url)
        shm = SharedMemoryUnet(plain, triton_server.grpc_url, cells=4)
        try:
            (SHM / shm.arena.key.lstrip("/")).unlink()
            refused = np.array(await shm.infer_unet(model, crop, window))
            status = shm.status
            expected = await plain.infer_unet(model, crop, window)
            return refused, expected, status, shm.arena.free_cells
        finally:
            await shm.close()  # closes the plain client too

    refused, expected, status, free = asyncio.run(run())
    assert status.startswith("refused by Triton"), status
    assert np.abs(refused.astype(np.int16) - expected.astype(np.int16)).max() <= 1
    assert free == 4, "no cell was taken for a call that went over gRPC"
