"""The baseline: the seeds' architecture, reproduced to be measured against ours.

One process serving the same gRPC service (`optimized_lipsyncsrv.OptimizedLipSyncService`,
stubs from `proto/`) the way the seed documents describe their server: the avatar package
preloaded in RAM (frames, 328 crops, rectangles; features memory-mapped), the model in
**PyTorch eager** in the same process, **one frame per request, no batching**: a lock around
the model so frames from concurrent streams run one after the other, in a thread pool of 10
(the seeds' ``THREAD_POOL_SIZE``). The per-frame work is the same as ours: the
`export.onnx_export.UnetWithPrePost` graph (uint8 crop + f32 audio window in, uint8 pred out,
docs/REFERENCE.md s.2 steps 3-7), `lipsync.frames.paste_back` (step 8) and the gateway's JPEG
encoder (simplejpeg, quality 85), so only the architecture differs.

    python -m perf.baseline_server --package packages/demo --port 50061

Serves `StreamInference` (replies in request order, one frame at a time per stream),
`GenerateInference`, `HealthCheck` and `ListModels`; other RPCs answer UNIMPLEMENTED.
Untrained weights (no --checkpoint) cost exactly the same time as trained ones.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import torch
from numpy.typing import NDArray

from export.checkpoint import load_unet
from export.onnx_export import UnetWithPrePost
from gateway.jpeg import make_encoder
from lipsync.frames import audio_window, crop_328, paste_back, pingpong_index
from lipsync.package import AvatarPackage, load_package
from proto import lipsync_pb2, lipsync_pb2_grpc

if TYPE_CHECKING:
    from gateway.grpc_service import Context

log = logging.getLogger(__name__)

THREAD_POOL_SIZE = 10
"""Worker threads for the blocking per-frame work (the seeds' setting)."""


@dataclass(frozen=True)
class BaselineFrame:
    """One rendered frame: JPEG of the full frame, crop rectangle and stage times (ms)."""

    jpeg: bytes
    bounds: tuple[float, float, float, float]
    prepare_ms: float
    inference_ms: float
    composite_ms: float
    total_ms: float


class BaselineEngine:
    """The preloaded avatar and its eager PyTorch model; `render` is thread-safe.

    Args:
        package: the loaded avatar package.
        model: `UnetWithPrePost` in eval mode (crop u8[1,320,320,3], audio f32[1,16,512]
            -> pred u8[1,320,320,3]).
        jpeg_quality: JPEG quality 1..100 (85 like the gateway).
    """

    def __init__(self, package: AvatarPackage, model: UnetWithPrePost, jpeg_quality: int = 85):
        self.name = package.name
        self.package = package
        self.model = model.eval()
        self.lock = threading.Lock()
        self.encoder = make_encoder("simplejpeg", jpeg_quality)
        self.frames = package.frames
        self.rects = np.asarray(package.rects, dtype=np.int32)
        self.features = package.features
        self.crops = np.stack([crop_328(f, r) for f, r in zip(self.frames, self.rects, strict=True)])
        self.inners = np.ascontiguousarray(self.crops[:, 4:324, 4:324])
        self.requests = 0

    @property
    def feature_rows(self) -> int:
        """Servable frames M (frame ids 0 .. M-1)."""
        return int(self.features.shape[0])

    def render(self, frame_id: int) -> BaselineFrame:
        """Render one frame: prepare, eager model under the lock, paste back, JPEG.

        Raises:
            ValueError: frame_id outside 0 .. M-1.
        """
        t0 = time.perf_counter()
        if not 0 <= frame_id < self.feature_rows:
            raise ValueError(
                f"frame_id {frame_id} out of range: avatar {self.name!r} serves 0..{self.feature_rows - 1}"
            )
        v = pingpong_index(frame_id, len(self.frames))
        crop = torch.from_numpy(self.inners[v : v + 1])
        audio = torch.from_numpy(audio_window(self.features, frame_id)[None])
        t1 = time.perf_counter()
        with self.lock, torch.inference_mode():  # one frame at a time: no batching
            pred: NDArray[np.uint8] = self.model(crop, audio)[0].numpy()
            self.requests += 1
        t2 = time.perf_counter()
        frame = paste_back(self.frames[v], self.rects[v], self.crops[v], pred)
        jpeg = self.encoder.encode(frame)
        t3 = time.perf_counter()
        x1, y1, x2, y2 = (float(c) for c in self.rects[v])
        return BaselineFrame(
            jpeg, (x1, y1, x2, y2), (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3,
            (t3 - t0) * 1e3,
        )


class BaselineServicer(lipsync_pb2_grpc.OptimizedLipSyncServiceServicer):
    """The seeds' gRPC service over one `BaselineEngine`."""

    def __init__(self, engine: BaselineEngine, pool: ThreadPoolExecutor) -> None:
        self.engine = engine
        self.pool = pool
        self.started = time.monotonic()

    async def _infer(
        self, request: lipsync_pb2.OptimizedInferenceRequest
    ) -> lipsync_pb2.OptimizedInferenceResponse:
        if request.model_name != self.engine.name:
            return lipsync_pb2.OptimizedInferenceResponse(
                success=False, model_name=request.model_name, frame_id=request.frame_id,
                error=f"unknown_avatar: {request.model_name!r} (this baseline serves {self.engine.name!r})",
            )
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self.pool, self.engine.render, request.frame_id)
        except ValueError as exc:
            return lipsync_pb2.OptimizedInferenceResponse(
                success=False, model_name=request.model_name, frame_id=request.frame_id,
                error=f"frame_out_of_range: {exc}",
            )
        return lipsync_pb2.OptimizedInferenceResponse(
            success=True,
            prediction_data=out.jpeg,
            bounds=list(out.bounds),
            processing_time_ms=round(out.total_ms),
            model_name=request.model_name,
            frame_id=request.frame_id,
            prediction_shape=f"{self.engine.frames.shape[1]}x{self.engine.frames.shape[2]}x3",
            prepare_time_ms=out.prepare_ms,
            inference_time_ms=out.inference_ms,
            composite_time_ms=out.composite_ms,
            optimizations=["pytorch-eager", "preloaded-crops", "no-batching"],
        )

    async def GenerateInference(
        self, request: lipsync_pb2.OptimizedInferenceRequest, context: Context
    ) -> lipsync_pb2.OptimizedInferenceResponse:
        """One frame."""
        return await self._infer(request)

    async def StreamInference(
        self, request_iterator: AsyncIterator[lipsync_pb2.OptimizedInferenceRequest], context: Context
    ) -> AsyncIterator[lipsync_pb2.OptimizedInferenceResponse]:
        """Bidirectional stream: each request answered in order, one at a time."""
        async for request in request_iterator:
            yield await self._infer(request)

    async def HealthCheck(
        self, request: lipsync_pb2.HealthRequest, context: Context
    ) -> lipsync_pb2.HealthResponse:
        """Always healthy once serving."""
        return lipsync_pb2.HealthResponse(
            healthy=True, status="SERVING", loaded_models=1,
            uptime_seconds=int(time.monotonic() - self.started),
        )

    async def ListModels(
        self, request: lipsync_pb2.ListModelsRequest, context: Context
    ) -> lipsync_pb2.ListModelsResponse:
        """The one avatar."""
        return lipsync_pb2.ListModelsResponse(loaded_models=[self.engine.name], count=1)


def load_engine(
    package_dir: Path, checkpoint: Path | None = None, seed: int = 0, jpeg_quality: int = 85
) -> BaselineEngine:
    """Load the package and the eager model (the package's weights source decides when
    `checkpoint` is None: a trained package names its checkpoint file).

    Raises:
        lipsync.package.PackageError: invalid package.
        export.checkpoint.CheckpointError: unreadable or mismatching checkpoint.
    """
    package = load_package(package_dir)
    unet_src = package.manifest.weights.unet
    if checkpoint is None and unet_src.trained:
        checkpoint = Path(unet_src.source)
    unet, info = load_unet(checkpoint, mode=package.manifest.weights.mode, seed=seed)
    log.info("baseline model: UNet328 eager on CPU, weights %s (trained=%s), torch threads %d",
             info.source, info.trained, torch.get_num_threads())
    return BaselineEngine(package, UnetWithPrePost(unet), jpeg_quality)


async def serve(engine: BaselineEngine, host: str, port: int, ready_file: Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM; once serving, write the bound port to `ready_file`.

    Raises:
        RuntimeError: the port could not be bound.
    """
    pool = ThreadPoolExecutor(THREAD_POOL_SIZE, thread_name_prefix="baseline")
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ]
    )
    lipsync_pb2_grpc.add_OptimizedLipSyncServiceServicer_to_server(BaselineServicer(engine, pool), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind gRPC port {host}:{port} (in use?)")
    await server.start()
    log.info("baseline serving avatar %r on %s:%d (gRPC)", engine.name, host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready_file is not None:
        ready_file.write_text(f"{bound}\n")
    try:
        await stop.wait()
    finally:
        await server.stop(grace=1.0)
        pool.shutdown(wait=False, cancel_futures=True)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m perf.baseline_server` argument parser."""
    from lipsync.paths import PACKAGES_DIR

    p = argparse.ArgumentParser(prog="python -m perf.baseline_server", description=__doc__.split("\n")[0])
    p.add_argument("--package", type=Path, default=PACKAGES_DIR / "demo", help="avatar package folder")
    p.add_argument("--checkpoint", type=Path, default=None, help="UNet checkpoint (default: the package's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained weights")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061, help="gRPC port (0 = a free one)")
    p.add_argument("--jpeg-quality", type=int, default=85)
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write the bound port here once serving (for scripts)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    engine = load_engine(args.package, args.checkpoint, args.seed, args.jpeg_quality)
    asyncio.run(serve(engine, args.host, args.port, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
