"""`GuardedInference`: the pipeline's `InferenceClient`, one Triton endpoint behind its lifecycle.

Each call:

1. asks the endpoint's `ModelLifecycle` whether the model may be called (`ModelLifecycle.admit`):
   when the server is not live or the model not ready it fails at once with
   `TritonUnavailable`, without touching the network;
2. splits the batch to the model's ``max_batch_size`` (from its Triton config) and sends the
   parts concurrently through the endpoint's stateless client, one request each;
3. races every request against the lifecycle's outage signal, so a call in flight when Triton
   dies or hangs fails promptly (within about one probe period plus two probe deadlines, see
   `gateway.model_lifecycle`), never after the 30 s call deadline;
4. on failure, wakes the lifecycle so it probes at once instead of at its next tick.

A call aborted by the outage signal raises `TritonEndpointDown`, as does the client for a
refused or lost connection: `gateway.endpoint_pool.EndpointPool`, which holds one
`GuardedInference` per Triton endpoint, retries those on another endpoint.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from gateway.errors import TritonEndpointDown, TritonUnavailable
from gateway.model_lifecycle import ModelLifecycle
from gateway.triton_client import InferenceClient

T = TypeVar("T", bound=np.generic)
R = TypeVar("R")


class GuardedInference:
    """`InferenceClient` over one endpoint: ``client`` for the calls, ``lifecycle`` for the state.

    Args:
        client: the endpoint's stateless client (`gateway.triton_client.TritonGrpcClient`).
        lifecycle: the same endpoint's `ModelLifecycle`.
    """

    def __init__(self, client: InferenceClient, lifecycle: ModelLifecycle) -> None:
        self.client = client
        self.lifecycle = lifecycle

    async def infer_unet(
        self, model: str, crop: NDArray[np.uint8], window: NDArray[np.float32]
    ) -> NDArray[np.uint8]:
        """`InferenceClient.infer_unet`, guarded and split (module doc)."""
        return await self._split(
            model, len(crop), lambda lo, hi: self.client.infer_unet(model, crop[lo:hi], window[lo:hi])
        )

    async def infer_audio_encoder(self, model: str, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        """`InferenceClient.infer_audio_encoder`, guarded and split (module doc)."""
        return await self._split(
            model, len(mel), lambda lo, hi: self.client.infer_audio_encoder(model, mel[lo:hi])
        )

    async def _split(
        self, model: str, n: int, call: Callable[[int, int], Awaitable[NDArray[T]]]
    ) -> NDArray[T]:
        """Run ``call(lo, hi)`` on the parts of ``[0, n)``, each at most ``max_batch_size`` long."""
        step = self.lifecycle.max_batch_size(model) or n
        if step >= n:
            return await self._guarded(model, functools.partial(call, 0, n))
        parts = await asyncio.gather(
            *(
                self._guarded(model, functools.partial(call, lo, min(lo + step, n)))
                for lo in range(0, n, step)
            )
        )
        return np.concatenate(parts, axis=0)

    async def _guarded(self, model: str, request: Callable[[], Awaitable[R]]) -> R:
        """Send ``request()`` if the lifecycle admits ``model``; abort it if Triton goes down first.

        The request runs in the caller's task (no task and no `asyncio.wait` per call: this is
        on every Triton call of the event loop, issue 9); the outage signal's callback cancels
        that task, and the cancellation it caused is taken back (``Task.uncancel``) and
        answered with `TritonEndpointDown`. A cancellation from elsewhere (the caller went
        away) propagates as before.

        Raises:
            TritonUnavailable: not admitted, or the request failed (`TritonEndpointDown` when
                its connection failed or Triton went down meanwhile).
        """
        outage = self.lifecycle.admit(model)
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("GuardedInference must be called from a task")
        state = _Race()

        def abort(_: asyncio.Future[str]) -> None:
            if not state.finished:  # scheduled before the request ended, run after: too late
                state.aborted = True
                task.cancel()

        outage.add_done_callback(abort)
        try:
            try:
                result = await request()
            except BaseException as exc:
                if not state.aborted:
                    raise
                if task.uncancel() > 0 and isinstance(exc, asyncio.CancelledError):
                    raise  # cancelled from elsewhere too: the caller's cancellation wins
                raise self._down(model, outage) from None
            if state.aborted:  # the request ended anyway (it swallowed the cancellation)
                task.uncancel()
                raise self._down(model, outage)
            return result
        except TritonUnavailable:
            self.lifecycle.wake()
            raise
        finally:
            state.finished = True
            outage.remove_done_callback(abort)

    @staticmethod
    def _down(model: str, outage: asyncio.Future[str]) -> TritonEndpointDown:
        return TritonEndpointDown(f"Triton went down while {model!r} was inferring: {outage.result()}")


class _Race:
    """`GuardedInference._guarded`'s state: whether the outage aborted the request, and
    whether the request is over (a late outage callback must not cancel the task then)."""

    __slots__ = ("aborted", "finished")

    def __init__(self) -> None:
        self.aborted = False
        self.finished = False
