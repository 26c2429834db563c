"""The protocols' floor: a server that answers frame requests with a ready JPEG, nothing else.

`perf.capacity --floor` runs it as one more variant, side by side with the gateways, so the
report shows what serving gRPC ``StreamInference`` and the binary WebSocket protocol costs per
frame by itself in the same run: the event loop and gRPC core CPU a gateway spends beyond it
is the frame pipeline's own (admission, Triton calls, compositing hand-offs, metrics: issue 9,
"fewer Python hops").

Per avatar package under ``LIPSYNC_PACKAGES_ROOT`` it encodes video frame 0 once with the
gateway's spliced-output encoder and settings (`gateway.jpeg.RestartIntervalEncoder`: the
bytes a spliced frame of that video frame has), and answers every request of
that avatar with it, through the gateway's own reply builders (`gateway.grpc_service.frame_response`,
`gateway.ws_protocol.encode_frame_reply`), so messages have the gateway's fields and sizes. No
Triton, no compositing, no admission control, no metrics. It serves ``/readyz`` (200) for the
harness and reads its host, ports and packages root from `gateway.config.GatewaySettings`.
A request for an unknown avatar is answered with an error reply (gRPC) or an error frame (WS).

Run: ``python -m perf.protocol_floor`` (the harness starts it; Ctrl-C stops it).
"""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from aiohttp import WSMsgType, web

from gateway.config import GatewaySettings
from gateway.grpc_service import frame_response
from gateway.jpeg import RestartIntervalEncoder
from gateway.pipeline import RenderedFrame
from gateway.ws_protocol import decode_request, encode_error_reply, encode_frame_reply
from lipsync.package import load_package
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pb_grpc

log = logging.getLogger("perf.protocol_floor")


@dataclass(frozen=True, slots=True)
class FloorFrame:
    """The reply of one avatar: its video frame 0 as JPEG and that frame's crop rectangle.

    Attributes:
        jpeg: baseline JPEG, the frame's full size.
        rect: crop rectangle ``(x1, y1, x2, y2)`` px.
        width, height: frame size (px).
    """

    jpeg: bytes
    rect: tuple[float, float, float, float]
    width: int
    height: int

    def rendered(self, avatar: str, frame_id: int) -> RenderedFrame:
        """This reply as the gateway's `RenderedFrame` for ``frame_id`` (stage times 0 ms)."""
        return RenderedFrame(avatar, frame_id, self.jpeg, self.rect, self.width, self.height,
                             0, "composite", 0.0, 0.0, 0.0, 0.0)


def floor_frames(settings: GatewaySettings) -> dict[str, FloorFrame]:
    """Every package's `FloorFrame` by avatar name (module doc).

    Raises:
        lipsync.package.PackageError: a package that does not load.
    """
    frames: dict[str, FloorFrame] = {}
    encoder = RestartIntervalEncoder(settings.jpeg_quality, settings.jpeg_subsampling,
                                     settings.jpeg_restart_px)
    for folder in sorted(p for p in Path(settings.packages_root).iterdir() if p.is_dir()):
        package = load_package(folder)
        frame = np.ascontiguousarray(package.frames[0])
        height, width = frame.shape[:2]
        x1, y1, x2, y2 = (float(c) for c in package.rects[0])
        frames[package.manifest.name] = FloorFrame(encoder.encode(frame), (x1, y1, x2, y2),
                                                   width, height)
    return frames


class FloorService(pb_grpc.OptimizedLipSyncServiceServicer):
    """``StreamInference`` answered with the avatar's `FloorFrame` (other RPCs: UNIMPLEMENTED)."""

    def __init__(self, frames: dict[str, FloorFrame]) -> None:
        self._frames = frames

    async def StreamInference(  # noqa: N802 - the proto's method name
        self, request_iterator: AsyncIterator[pb.OptimizedInferenceRequest],
        context: grpc.aio.ServicerContext[pb.OptimizedInferenceRequest, pb.OptimizedInferenceResponse],
    ) -> AsyncIterator[pb.OptimizedInferenceResponse]:
        """One reply per request, in order."""
        async for request in request_iterator:
            frame = self._frames.get(request.model_name)
            if frame is None:
                yield pb.OptimizedInferenceResponse(
                    success=False, error=f"unknown avatar {request.model_name!r}",
                    model_name=request.model_name, frame_id=request.frame_id)
            else:
                yield frame_response(frame.rendered(request.model_name, request.frame_id))


def http_app(frames: dict[str, FloorFrame]) -> web.Application:
    """``/ws`` (the binary WebSocket protocol, `gateway.ws_protocol`) and ``/readyz``."""

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type != WSMsgType.BINARY:
                continue
            req = decode_request(msg.data)
            frame = frames.get(req.avatar)
            if frame is None:
                await sock.send_bytes(encode_error_reply(req.frame_id, 0.0, f"unknown avatar {req.avatar!r}"))
            else:
                await sock.send_bytes(encode_frame_reply(req.frame_id, 0.0, frame.jpeg, frame.rect))
        return sock

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(settings: GatewaySettings) -> None:
    """Serve gRPC and HTTP on the settings' host and ports until SIGINT/SIGTERM."""
    frames = await asyncio.to_thread(floor_frames, settings)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", settings.grpc_max_send_bytes)])
    pb_grpc.add_OptimizedLipSyncServiceServicer_to_server(FloorService(frames), server)
    server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    await server.start()
    runner = web.AppRunner(http_app(frames), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.http_port).start()
    log.warning("protocol floor serving %s on gRPC %s:%d and HTTP %s:%d", ", ".join(frames),
                settings.host, settings.grpc_port, settings.host, settings.http_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await server.stop(grace=1.0)


def main() -> int:
    """Serve with `GatewaySettings` from the environment (``LIPSYNC_*``)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(serve(GatewaySettings.model_validate({})))  # reads LIPSYNC_* as the gateway does
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
