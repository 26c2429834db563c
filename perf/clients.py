"""Protocol clients for the load generator: one stream of frame requests over gRPC
`StreamInference` or over the binary WebSocket protocol, paced or as fast as possible.

A stream keeps at most `window` frames in flight. Paced at `pace_fps`, frame k is due at
``t0 + k / pace_fps`` and sent then (or as soon as the window allows); unpaced, it is sent as
soon as the window allows and is due when sent. Every frame becomes a `perf.stats.FrameRecord`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import grpc

from gateway import ws_protocol
from perf.stats import FrameRecord

log = logging.getLogger(__name__)

GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest reply the gRPC client accepts (bytes); a 720p JPEG is ~100-300 KiB."""


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What one stream asks for.

    Attributes:
        stream: stream index (0 .. N-1).
        avatar: avatar (model) name, e.g. "demo".
        frame_ids: the frames to request, in order (length = frames per stream).
        pace_fps: frames per second to pace at (25); 0 = as fast as possible.
        window: most frames in flight at once on this stream (>= 1).
        timeout_s: a reply later than this after its request aborts the stream (s).
        sample_every: keep the JPEG of every k-th frame of the stream (seq 0, k, 2k, ...) in
            its record for verification; 0 = keep none.
    """

    stream: int
    avatar: str
    frame_ids: tuple[int, ...]
    pace_fps: float
    window: int
    timeout_s: float
    sample_every: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply as a transport decoded it.

    Attributes:
        frame_id: the frame it answers (None where the transport only keeps order).
        ok: success reply.
        error: error text ("" when ok).
        server_ms: processing time the server reported (ms), NaN if none.
        jpeg_bytes: size of the returned JPEG (bytes).
        jpeg: the returned JPEG itself (a reference, not a copy); None on error.
    """

    frame_id: int | None
    ok: bool
    error: str = ""
    server_ms: float = float("nan")
    jpeg_bytes: int = 0
    jpeg: bytes | None = None


class Transport(Protocol):
    """A connected stream: send requests, receive replies (`None` = the server closed)."""

    ordered: bool
    """True when replies come in request order (gRPC StreamInference)."""

    async def send(self, avatar: str, frame_id: int) -> None: ...

    async def recv(self) -> Reply | None: ...

    async def finish(self) -> None: ...

    async def close(self) -> None: ...


class StreamAborted(RuntimeError):
    """The transport failed (connection error, timeout); the rest of the stream is lost."""


# ----------------------------------------------------------------------------- gRPC


class GrpcTransport:
    """gRPC `OptimizedLipSyncService.StreamInference` on its own channel (one per stream)."""

    ordered = True

    def __init__(self, address: str) -> None:
        from proto import lipsync_pb2, lipsync_pb2_grpc  # generated stubs (proto/)

        self._pb2 = lipsync_pb2
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
                # its own TCP connection, as a separate client has: channels of one process to
                # one address otherwise share one, so every stream would reach one gateway worker
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self._call = lipsync_pb2_grpc.OptimizedLipSyncServiceStub(self._channel).StreamInference()

    async def send(self, avatar: str, frame_id: int) -> None:
        """Write one `OptimizedInferenceRequest` on the stream."""
        try:
            await self._call.write(
                self._pb2.OptimizedInferenceRequest(model_name=avatar, frame_id=frame_id)
            )
        except grpc.aio.AioRpcError as exc:
            raise StreamAborted(f"grpc {exc.code().name}: {exc.details()}") from exc

    async def recv(self) -> Reply | None:
        """Read the next `OptimizedInferenceResponse` (None at the end of the stream)."""
        try:
            resp = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise StreamAborted(f"grpc {exc.code().name}: {exc.details()}") from exc
        if resp is grpc.aio.EOF:
            return None
        if not resp.success:
            return Reply(resp.frame_id, False, resp.error or "success=false without error")
        jpeg = resp.prediction_data
        return Reply(resp.frame_id, True, "", float(resp.processing_time_ms), len(jpeg), jpeg)

    async def finish(self) -> None:
        """Half-close: no more requests."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._call.done_writing()

    async def close(self) -> None:
        """Cancel the call if still open and close the channel."""
        self._call.cancel()
        await self._channel.close()


# ----------------------------------------------------------------------------- WebSocket

LEGACY_BOUNDS = 4
"""Float32 bounds (x1, y1, x2, y2) in every success reply of a gateway that wrote
``bounds_len`` as a count of values (`decode_count_bounds_reply`)."""


def decode_count_bounds_reply(data: bytes | bytearray) -> ws_protocol.FrameReply | ws_protocol.ErrorReply:
    """Decode a reply of a gateway from before commit c528de5 (issue 14), which wrote the
    success reply's ``bounds_len`` as the number of float32 values (4) instead of their length
    in bytes (16); otherwise the layout is `gateway.ws_protocol`'s. The count is rewritten to
    bytes and the reply decoded by `ws_protocol.decode_reply` (error replies carry no bounds).

    Raises:
        gateway.ws_protocol.ProtocolError: the reply is malformed in either layout.
    """
    at = len(data) - 4 - 4 * LEGACY_BOUNDS  # the u32 before the last four float32 values
    if data[:1] == bytes([ws_protocol.STATUS_OK]) and at >= 0 \
            and int.from_bytes(data[at:at + 4], "little") == LEGACY_BOUNDS:
        data = bytearray(data)
        data[at:at + 4] = (4 * LEGACY_BOUNDS).to_bytes(4, "little")
    return ws_protocol.decode_reply(data)


class WsTransport:
    """The binary WebSocket protocol (`gateway/ws_protocol.py`) on one connection; with
    ``count_bounds`` the success replies' ``bounds_len`` is read as a count of values
    (`decode_count_bounds_reply`: a gateway of a revision before c528de5)."""

    ordered = False

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                 count_bounds: bool = False):
        self._session = session
        self._ws = ws
        self._decode = decode_count_bounds_reply if count_bounds else ws_protocol.decode_reply

    @classmethod
    async def connect(cls, url: str, count_bounds: bool = False) -> WsTransport:
        """Open a WebSocket to `url` (e.g. ``ws://host:8085/ws``).

        Raises:
            StreamAborted: the connection failed.
        """
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(url, max_msg_size=GRPC_MAX_MESSAGE_BYTES)
        except (aiohttp.ClientError, OSError) as exc:
            await session.close()
            raise StreamAborted(f"websocket connect to {url} failed: {exc}") from exc
        return cls(session, ws, count_bounds)

    async def send(self, avatar: str, frame_id: int) -> None:
        """Send one binary request message."""
        try:
            await self._ws.send_bytes(ws_protocol.encode_request(avatar, frame_id))
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise StreamAborted(f"websocket send failed: {exc}") from exc

    async def recv(self) -> Reply | None:
        """Receive and decode one binary reply (None when the socket closed)."""
        msg = await self._ws.receive()
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return None
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise StreamAborted(f"websocket error: {self._ws.exception()}")
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise StreamAborted(f"unexpected websocket message type {msg.type.name}")
        try:
            reply = self._decode(msg.data)
        except ws_protocol.ProtocolError as exc:
            raise StreamAborted(f"undecodable reply: {exc}") from exc
        if isinstance(reply, ws_protocol.ErrorReply):
            return Reply(reply.frame_id, False, reply.message, float(reply.processing_ms))
        return Reply(reply.frame_id, True, "", float(reply.processing_ms), len(reply.jpeg),
                     reply.jpeg)

    async def finish(self) -> None:
        """Nothing to half-close on a WebSocket."""

    async def close(self) -> None:
        """Close the socket and its session."""
        await self._ws.close()
        await self._session.close()


# ----------------------------------------------------------------------------- driver


@dataclass(slots=True)
class _Pending:
    seq: int
    frame_id: int
    due_s: float
    sent_s: float


async def drive_stream(
    spec: StreamSpec,
    transport: Transport,
    on_record: Callable[[FrameRecord], None] | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
    t0: float | None = None,
) -> list[FrameRecord]:
    """Run one stream over a connected transport and return one record per frame.

    Args:
        spec: the stream's frames, pacing and window.
        transport: a connected `GrpcTransport` or `WsTransport` (closed by the caller).
        on_record: called with each record as it completes (progress display).
        clock: monotonic clock (s).
        t0: the paced streams' common start (s on `clock`); default: now.

    Returns:
        `len(spec.frame_ids)` records in `seq` order; frames lost to a transport failure or a
        timeout are records with ``ok=False`` and the failure's text.
    """
    start = clock() if t0 is None else t0
    window = asyncio.Semaphore(max(1, spec.window))
    pending: deque[_Pending] = deque()
    by_frame: dict[int, deque[_Pending]] = {}
    records: dict[int, FrameRecord] = {}
    arrived = asyncio.Event()
    send_done = asyncio.Event()
    abort: list[str] = []

    def complete(p: _Pending, reply: Reply | None, error: str = "") -> None:
        now = clock()
        rec = FrameRecord(
            stream=spec.stream,
            seq=p.seq,
            frame_id=p.frame_id,
            due_s=p.due_s,
            sent_s=p.sent_s,
            done_s=now,
            ok=bool(reply and reply.ok),
            error=error or (reply.error if reply else "no reply"),
            server_ms=reply.server_ms if reply else float("nan"),
            jpeg_bytes=reply.jpeg_bytes if reply else 0,
            sample=reply.jpeg if reply and spec.sample_every and p.seq % spec.sample_every == 0
            else None,
        )
        records[p.seq] = rec
        window.release()
        if on_record is not None:
            on_record(rec)

    async def sender() -> None:
        try:
            for seq, frame_id in enumerate(spec.frame_ids):
                if spec.pace_fps > 0:
                    due = start + seq / spec.pace_fps
                    delay = due - clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await window.acquire()
                if abort:
                    window.release()
                    return
                now = clock()
                p = _Pending(seq, frame_id, due if spec.pace_fps > 0 else now, now)
                pending.append(p)
                by_frame.setdefault(frame_id, deque()).append(p)
                arrived.set()
                await transport.send(spec.avatar, frame_id)
            await transport.finish()
        except StreamAborted as exc:
            abort.append(str(exc))
        finally:
            send_done.set()
            arrived.set()

    async def receiver() -> None:
        while True:
            if not pending:
                if send_done.is_set():
                    return
                arrived.clear()
                await arrived.wait()
                continue
            try:
                reply = await asyncio.wait_for(transport.recv(), timeout=spec.timeout_s)
            except TimeoutError:
                abort.append(f"timeout: no reply within {spec.timeout_s:.1f} s")
                return
            except StreamAborted as exc:
                abort.append(str(exc))
                return
            if reply is None:
                abort.append("server closed the stream")
                return
            p = _match(reply)
            if p is None:
                log.warning("stream %d: reply for frame %s matches no request", spec.stream,
                            reply.frame_id)
                continue
            complete(p, reply)

    def _match(reply: Reply) -> _Pending | None:
        if transport.ordered or reply.frame_id is None:
            if not pending:
                return None
            p = pending.popleft()
            by_frame[p.frame_id].remove(p)
            return p
        queue = by_frame.get(reply.frame_id)
        if not queue:
            return None
        p = queue.popleft()
        pending.remove(p)
        return p

    send_task = asyncio.create_task(sender())
    recv_task = asyncio.create_task(receiver())
    await recv_task
    if abort:
        send_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await send_task
    reason = abort[0] if abort else "no reply"
    for p in list(pending):
        complete(p, None, reason)
    pending.clear()
    now = clock()
    for seq, frame_id in enumerate(spec.frame_ids):
        if seq not in records:
            due = start + seq / spec.pace_fps if spec.pace_fps > 0 else now
            records[seq] = FrameRecord(
                spec.stream, seq, frame_id, min(due, now), now, now, False, f"not sent: {reason}"
            )
            if on_record is not None:
                on_record(records[seq])
    return [records[i] for i in range(len(spec.frame_ids))]
