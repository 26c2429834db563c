"""gRPC service ``lipsync.live.v1.LiveLipSync`` (proto/live.proto): live sessions over gRPC.

One ``Stream`` call is one session (`gateway.live_service.LiveSessions.serve`). Requests are
decoded into the session's inputs: ``start`` -> `Start`, ``pcm`` -> `Pcm`, ``control`` ->
`Control` (``COMMAND_UNSPECIFIED`` or a request with no ``kind`` set is refused with a
``bad_request`` error on the next frame); the half-close of the request stream is the end of
input. Each slot comes back as one ``LiveFrame``; an error before the session has started
(unknown avatar, bad sample rate, audio before ``start``) comes back as a ``LiveFrame`` with
only ``error`` set (``jpeg`` empty): it is not a slot, and the client may send ``start`` again.

Registered beside ``optimized_lipsyncsrv.OptimizedLipSyncService`` by
`gateway.grpc_service.build_grpc_server` (health and reflection list it).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from gateway.errors import BadRequest
from gateway.live.types import SessionNotice, SlotFrame
from gateway.live_service import (
    Control,
    LiveInput,
    LiveOutput,
    LiveSessions,
    Pcm,
    Refused,
    Start,
)
from proto import live_pb2 as pb
from proto import live_pb2_grpc as pbg

if TYPE_CHECKING:  # gateway.grpc_service imports this module
    from gateway.grpc_service import Context

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LiveLipSync"].full_name
"""``lipsync.live.v1.LiveLipSync``."""

_COMMANDS = {pb.LiveControl.FLUSH: "flush", pb.LiveControl.INTERRUPT: "interrupt"}


def decode_request(request: pb.LiveRequest) -> LiveInput:
    """One ``LiveRequest`` -> the session's input (`Refused` for one it cannot use)."""
    kind = request.WhichOneof("kind")
    if kind == "start":
        return Start(request.start.avatar, request.start.sample_rate_hz)
    if kind == "pcm":
        return Pcm(request.pcm)
    if kind == "control":
        command = _COMMANDS.get(request.control.command)
        if command == "flush":
            return Control("flush")
        if command == "interrupt":
            return Control("interrupt")
        return Refused(BadRequest(
            f"LiveControl.command {request.control.command} refused: send FLUSH (1) or INTERRUPT (2)"
        ))
    return Refused(BadRequest("empty LiveRequest: set one of start, pcm, control"))


def encode_output(item: LiveOutput) -> pb.LiveFrame:
    """A slot's frame, or an error before start (a ``LiveFrame`` with only ``error``)."""
    if isinstance(item, SessionNotice):
        return pb.LiveFrame(error=item.error)
    assert isinstance(item, SlotFrame)
    return pb.LiveFrame(
        seq=item.seq,
        pts_s=item.pts_s,
        jpeg=item.frame.jpeg,
        bounds=list(item.frame.bounds),
        speaking=item.speaking,
        video_frame=item.video_frame,
        error=item.error,
        late=item.late,
    )


class LiveLipSyncService(pbg.LiveLipSyncServicer):
    """``LiveLipSync`` over the gateway's `LiveSessions`."""

    def __init__(self, live: LiveSessions) -> None:
        self.live = live

    async def Stream(
        self, request_iterator: AsyncIterator[pb.LiveRequest], context: Context
    ) -> AsyncIterator[pb.LiveFrame]:
        """One live session (module doc)."""

        async def inputs() -> AsyncIterator[LiveInput]:
            async for request in request_iterator:
                yield decode_request(request)

        async for item in self.live.serve(inputs(), "grpc"):
            yield encode_output(item)
