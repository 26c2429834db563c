"""`CoalescingInference`: one Triton request for the UNet frames that are ready together (issue 9).

Every frame of every stream calls ``infer_unet`` with a batch of one. Each Triton call costs the
gateway's event loop about as much Python as the rest of the frame together (tritonclient
request building, grpc.aio call machinery, the answer's parsing: ``perf/results/capacity.md``),
whatever its batch size. This `gateway.triton_client.InferenceClient` sits in front of the
gateway's `gateway.endpoint_pool.EndpointPool` and coalesces:

1. A single-frame call is queued per model and a flush is scheduled with ``loop.call_soon``, so
   it runs once the callbacks that are ready now have run: every frame that reaches inference
   in the same event-loop iteration joins the batch. Nothing waits on a timer; latency grows by
   at most one loop iteration.
2. The flush cuts each model's queue into batches of at most the model's ``max_batch_size``
   (`EndpointPool.max_batch_size`: the smallest an endpoint reported; the whole queue when
   unknown) and sends each as one request through the pool (routing to an endpoint, one retry
   elsewhere if it dies, that endpoint's admission, outage abort and splitting as before). A
   batch's inputs are written row by row straight into frame cells of a Triton shared-memory
   arena when ``stage`` gives some (`gateway.triton_shm.FrameArena.stage`: the endpoint whose
   arena they are sends them without copying them again), else concatenated.
3. Each caller gets its own row of the answer, uint8 ``[1, 320, 320, 3]`` (a view of the
   batch's answer), or the batch's exception. A caller cancelled meanwhile (its client went
   away) is skipped; the batch still completes for the others.

Calls with more than one frame (``GenerateBatch*``) and the audio encoder pass through
unchanged. Triton's dynamic batcher still batches the coalesced requests of other gateways.
Turned off by ``LIPSYNC_TRITON_COALESCE=0`` (`GatewaySettings.triton_coalesce`).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gateway.triton_client import InferenceClient
from gateway.triton_shm import StagedInputs


@dataclass(slots=True)
class _Waiting:
    """One queued single-frame call: its inputs and the future its caller awaits."""

    crop: NDArray[np.uint8]
    window: NDArray[np.float32]
    answer: asyncio.Future[NDArray[np.uint8]]


class CoalescingInference:
    """`InferenceClient` that coalesces single-frame UNet calls (module doc).

    Args:
        inner: the client that sends the batches (the gateway's `EndpointPool`).
        max_batch_size: ``max_batch_size(model)``, the most frames one request may hold (0:
            unknown, no limit here; ``inner`` splits if it knows better).
        stage: ``stage(n)``, shared-memory cells to write ``n`` frames' inputs into, or None
            (module doc); None: batches are concatenated.
    """

    def __init__(
        self,
        inner: InferenceClient,
        max_batch_size: Callable[[str], int],
        stage: Callable[[int], StagedInputs | None] | None = None,
    ) -> None:
        self.inner = inner
        self._max_batch_size = max_batch_size
        self._stage = stage
        self._queued: dict[str, list[_Waiting]] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Requests sent for coalesced frames (tests and benchmarks read it)."""
        self.frames = 0
        """Coalesced frames sent."""

    async def infer_unet(
        self, model: str, crop: NDArray[np.uint8], window: NDArray[np.float32]
    ) -> NDArray[np.uint8]:
        """`InferenceClient.infer_unet`; single frames are coalesced (module doc).

        Raises:
            TritonUnavailable: the batch the frame went in failed (every frame of it gets it).
        """
        if len(crop) != 1:
            return await self.inner.infer_unet(model, crop, window)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[NDArray[np.uint8]] = loop.create_future()
        self._queued.setdefault(model, []).append(_Waiting(crop, window, answer))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await answer

    async def infer_audio_encoder(self, model: str, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        """`InferenceClient.infer_audio_encoder`, passed through."""
        return await self.inner.infer_audio_encoder(model, mel)

    def _flush(self) -> None:
        """Send every queued frame, one request per model and ``max_batch_size`` frames."""
        self._flush_scheduled = False
        queued, self._queued = self._queued, {}
        for model, waiting in queued.items():
            live = [w for w in waiting if not w.answer.done()]  # cancelled callers dropped
            if not live:
                continue
            step = self._max_batch_size(model) or len(live)
            for lo in range(0, len(live), step):
                task = asyncio.ensure_future(self._send(model, live[lo : lo + step]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, model: str, batch: list[_Waiting]) -> None:
        """One request for ``batch``; each caller gets its row or the exception."""
        self.batches += 1
        self.frames += len(batch)
        staged = self._stage(len(batch)) if self._stage is not None else None
        if staged is not None:
            crops, windows = staged.crops, staged.windows
            for k, w in enumerate(batch):
                crops[k : k + 1] = w.crop
                windows[k : k + 1] = w.window
        elif len(batch) == 1:
            crops, windows = batch[0].crop, batch[0].window
        else:
            crops = np.concatenate([w.crop for w in batch])
            windows = np.concatenate([w.window for w in batch])
        try:
            pred = await self.inner.infer_unet(model, crops, windows)
        except asyncio.CancelledError:  # the gateway is stopping
            for w in batch:
                w.answer.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every frame of the batch gets it, as it would alone
            for w in batch:
                if not w.answer.done():
                    w.answer.set_exception(exc)
            return
        for k, w in enumerate(batch):
            if not w.answer.done():
                w.answer.set_result(pred[k : k + 1])
