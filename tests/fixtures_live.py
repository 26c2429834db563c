"""Fixtures and in-process fakes for the live-session tests (`gateway/live/`).

- `FakeClock`: simulated time for `gateway.live.clock.Clock` (tests advance it explicitly);
- `RecordingRenderer`: a `Renderer` that records what it was asked and can fail or hang on
  chosen slots (the real renderer, the gateway's frame pipeline, is tested with Triton);
- `FixedLatencyRenderer`, `BatchingRenderer`: renderers slower than real time on the
  simulated clock: `c` workers of a fixed latency, or a Triton-like model instance whose
  dynamic batches take longer the larger they are;
- `OrtEncoder` / `ort_encoder`: the untrained AVE audio encoder exported to ONNX (seed 0) and
  run in-process by ONNX Runtime, behind the `AudioEncoder` interface;
- `speech_path` / `speech_pcm16`: real LibriVox speech.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.live.types import RenderedFrame
from lipsync.paths import SPEECH_DIR


class FakeClock:
    """Simulated monotonic time: `advance` moves it and wakes the sleepers that are due."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        if t <= self.t:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (t, next(self._order), future))
        await future

    def advance(self, dt: float) -> None:
        self.t += dt
        while self._sleepers and self._sleepers[0][0] <= self.t:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


async def settle(rounds: int = 30) -> None:
    """Let every ready task run until the loop is quiet (fakes answer without real waiting)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class RecordingRenderer:
    """A `Renderer` whose frames name their slot: `jpeg = b"speaking:<slot>"` / `b"idle:<slot>"`.

    Args:
        video_frames: N of the fake avatar.
        fail: slots whose `render_speaking` raises.
        hang: slots whose `render_speaking` never returns (until cancelled).
    """

    def __init__(
        self, video_frames: int = 5, fail: set[int] | None = None, hang: set[int] | None = None
    ) -> None:
        self.video_frames = video_frames
        self.fail = fail or set()
        self.hang = hang or set()
        self.windows: dict[int, NDArray[np.float32]] = {}
        self.speaking_calls: list[tuple[int, int]] = []
        self.idle_calls: list[tuple[int, int]] = []
        self.cancelled: list[int] = []

    async def render_speaking(
        self, slot: int, video_frame: int, window: NDArray[np.float32]
    ) -> RenderedFrame:
        self.speaking_calls.append((slot, video_frame))
        self.windows[slot] = window
        if slot in self.fail:
            raise RuntimeError(f"triton_unavailable: slot {slot}")
        if slot in self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(slot)
                raise
        return RenderedFrame(f"speaking:{slot}".encode(), (1.0, 2.0, 3.0, 4.0))

    async def idle_frame(self, slot: int, video_frame: int) -> RenderedFrame:
        self.idle_calls.append((slot, video_frame))
        return RenderedFrame(f"idle:{slot}".encode(), (1.0, 2.0, 3.0, 4.0))


class FixedLatencyRenderer(RecordingRenderer):
    """Speaking frames take `latency_s` each on the simulated clock, at most `concurrency` at
    once (`concurrency` workers); a cancelled render frees its worker.

    Attributes:
        rendered: renders that completed.
    """

    def __init__(self, clock: FakeClock, latency_s: float, concurrency: int = 1) -> None:
        super().__init__()
        self.clock, self.latency_s = clock, latency_s
        self._workers = asyncio.Semaphore(concurrency)
        self.rendered = 0

    async def render_speaking(
        self, slot: int, video_frame: int, window: NDArray[np.float32]
    ) -> RenderedFrame:
        self.speaking_calls.append((slot, video_frame))
        async with self._workers:
            await self.clock.sleep_until(self.clock.now() + self.latency_s)
        self.rendered += 1
        return RenderedFrame(f"speaking:{slot}".encode(), (1.0, 2.0, 3.0, 4.0))


class BatchingRenderer(RecordingRenderer):
    """A Triton-like renderer on the simulated clock: one model instance with dynamic batching.

    When idle, the instance takes every queued request (at most `max_batch`) as one execution
    lasting `per_frame_s` x its size (the CPU profile's cost grows about linearly with the
    batch). A request cancelled while queued leaves the queue; one cancelled while its batch
    executes is computed anyway (Triton cannot stop an execution) and thrown away.

    Attributes:
        executions: the batch size of each execution, in order.
        thrown_away: frames computed for requests already cancelled.
    """

    def __init__(self, clock: FakeClock, per_frame_s: float, max_batch: int = 8) -> None:
        super().__init__()
        self.clock, self.per_frame_s, self.max_batch = clock, per_frame_s, max_batch
        self._queue: list[tuple[int, asyncio.Future[RenderedFrame]]] = []
        self._instance_task: asyncio.Task[None] | None = None
        self.executions: list[int] = []
        self.thrown_away = 0

    async def render_speaking(
        self, slot: int, video_frame: int, window: NDArray[np.float32]
    ) -> RenderedFrame:
        self.speaking_calls.append((slot, video_frame))
        request: asyncio.Future[RenderedFrame] = asyncio.get_running_loop().create_future()
        self._queue.append((slot, request))
        if self._instance_task is None or self._instance_task.done():
            self._instance_task = asyncio.ensure_future(self._instance())
        return await request

    async def _instance(self) -> None:
        while queued := [(slot, r) for slot, r in self._queue if not r.done()]:
            batch, self._queue = queued[: self.max_batch], queued[self.max_batch :]
            self.executions.append(len(batch))
            await self.clock.sleep_until(self.clock.now() + self.per_frame_s * len(batch))
            for slot, request in batch:
                if request.done():
                    self.thrown_away += 1
                else:
                    request.set_result(RenderedFrame(f"speaking:{slot}".encode(), (1.0, 2.0, 3.0, 4.0)))


class OrtEncoder:
    """`AudioEncoder` on ONNX Runtime (in-process, synchronous inside the coroutine)."""

    def __init__(self, onnx_path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.calls: list[int] = []

    async def encode(self, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        self.calls.append(len(mel))
        (out,) = self.session.run(["feature"], {"mel": np.ascontiguousarray(mel, dtype=np.float32)})
        return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="session")
def audio_encoder_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained AVE audio encoder (seed 0) exported to ONNX, as the package builder does."""
    from export.onnx_export import export_audio_encoder

    path = tmp_path_factory.mktemp("live_encoder") / "audio_encoder.onnx"
    export_audio_encoder(None, path, seed=0)
    return path


@pytest.fixture(scope="session")
def ort_encoder(audio_encoder_onnx: Path) -> OrtEncoder:
    return OrtEncoder(audio_encoder_onnx)


def speech_paths() -> list[Path]:
    wavs = sorted(SPEECH_DIR.glob("*.wav"))
    assert wavs, f"no LibriVox WAVs in {SPEECH_DIR} (Debian package pocketsphinx-testdata)"
    return wavs


@pytest.fixture(scope="session")
def speech_path() -> Path:
    """The shortest LibriVox recording (2.99 s, 16 kHz mono), real speech throughout."""
    return speech_paths()[1]


def speech_pcm16(path: Path) -> NDArray[np.int16]:
    """The recording as the package builder reads it: i16[n] mono 16 kHz."""
    from export.package_builder import read_audio_16k_mono

    pcm, _ = read_audio_16k_mono(path)
    return pcm


def chunks(data: bytes, size_bytes: int) -> Iterator[bytes]:
    """`data` cut into pieces of `size_bytes` (the last one shorter)."""
    for i in range(0, len(data), size_bytes):
        yield data[i : i + size_bytes]
