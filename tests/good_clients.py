"""Well-behaved clients in threads, for tests that misbehave beside them: each streams frames
of one avatar, one at a time (the next request once the answer is in), and records every answer
that is not the frame it asked for.

`WsStreamingClient` speaks the binary WebSocket protocol over a plain socket (`tests.raw_ws`);
`GrpcStreamingClient` one ``StreamInference`` call. Both stop with `finish`, after which ``ok``
(frames received) and ``errors`` (what went wrong, as text) are final.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from gateway.ws_protocol import FrameReply, decode_reply, encode_request
from proto import lipsync_pb2 as pb
from proto import lipsync_pb2_grpc as pbg
from tests.raw_ws import RawWebSocket

FRAME_IDS = 20
"""Frame ids asked for cycle through 0 .. FRAME_IDS-1 (any avatar has that many)."""


class _Streaming:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._guarded, daemon=True)

    def _guarded(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - the test reads it from `errors`
            if not self.stop.is_set():
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Stop streaming and wait for the thread."""
        self.stop.set()
        self.thread.join(timeout=30)


class WsStreamingClient(_Streaming):
    """Binary WebSocket protocol on ``/ws`` at ``host:port``, from ``source`` if given (module
    doc)."""

    def __init__(self, host: str, port: int, avatar: str, *, source: str | None = None) -> None:
        super().__init__()
        self.avatar = avatar
        self.ws = RawWebSocket.connect(host, port, source=source)
        self.thread.start()

    def _run(self) -> None:
        frame_id = 0
        while not self.stop.is_set():
            self.ws.send(encode_request(self.avatar, frame_id % FRAME_IDS))
            reply = decode_reply(self.ws.read_frame().payload)
            if isinstance(reply, FrameReply) and reply.frame_id == frame_id % FRAME_IDS:
                self.ok += 1
            else:
                self.errors.append(repr(reply)[:200])
            frame_id += 1

    def finish(self) -> None:
        super().finish()
        self.ws.close()


class GrpcStreamingClient(_Streaming):
    """One ``StreamInference`` call to ``address`` (module doc)."""

    def __init__(self, address: str, avatar: str) -> None:
        super().__init__()
        self.avatar = avatar
        self.channel = grpc.insecure_channel(address)
        self._answered = threading.Semaphore(1)
        self.thread.start()

    def _requests(self) -> Iterator[pb.OptimizedInferenceRequest]:
        frame_id = 0
        while True:
            self._answered.acquire()
            if self.stop.is_set():
                return
            yield pb.OptimizedInferenceRequest(model_name=self.avatar, frame_id=frame_id % FRAME_IDS)
            frame_id += 1

    def _run(self) -> None:
        stub = pbg.OptimizedLipSyncServiceStub(self.channel)
        for n, answer in enumerate(stub.StreamInference(self._requests())):
            if answer.success and answer.frame_id == n % FRAME_IDS:
                self.ok += 1
            else:
                self.errors.append(f"frame {answer.frame_id}: {answer.error}"[:200])
            self._answered.release()

    def finish(self) -> None:
        self.stop.set()
        self._answered.release()
        super().finish()
        self.channel.close()
