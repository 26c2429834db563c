"""An in-process Triton for the fast tier: `FakeTriton` implements the gateway's
`gateway.triton_client.TritonClient` (the `InferenceClient` and `ControlClient` protocols).

Its models are numpy functions (`identity_unet`: pred = crop; `slice_encoder`: the first 512
values of each mel window), so a test can compute the expected answer itself. The test controls
the server: `mode` (live, not_live, refused, hung), load failures per model, readiness probes
that time out (`slow_model_probes`), and calls held in flight (`hold_inference`, `hold_loads`).
It raises what `TritonGrpcClient` raises (`TritonDeadline` for a deadline, `TritonEndpointDown`
for a refused or lost connection, `TritonUnavailable` otherwise) and records every call in
`calls`. Several fakes, each with its own ``url``, stand for several Triton endpoints. No
sleeps: a "hung" Triton answers a probe with `TritonDeadline` at once, as the real client does
when its deadline passes.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from gateway.errors import TritonDeadline, TritonEndpointDown, TritonUnavailable
from lipsync.contract import AUDIO_ENCODER_MODEL, FEATURE_DIM

Mode = Literal["live", "not_live", "refused", "hung"]


def identity_unet(crop: NDArray[np.uint8], window: NDArray[np.float32]) -> NDArray[np.uint8]:
    """A UNet whose prediction is its input crop: uint8 ``[N, 320, 320, 3]``."""
    return crop.copy()


def slice_encoder(mel: NDArray[np.float32]) -> NDArray[np.float32]:
    """An audio encoder: float32 ``[N, 80, 16]`` -> the first 512 values of each window."""
    return np.ascontiguousarray(mel.reshape(len(mel), -1)[:, :FEATURE_DIM], dtype=np.float32)


@dataclass
class FakeModel:
    """One model of the fake repository.

    Attributes:
        fn: the model as a numpy function of its inputs.
        max_batch_size: what its config says.
        load_error: when set, ``load_model`` fails with this message.
    """

    fn: Callable[..., NDArray[Any]]
    max_batch_size: int = 8
    load_error: str | None = None


class FakeTriton:
    """The fake server and its client in one object (module doc).

    Args:
        models: the model repository, by Triton model name.
        loaded: models loaded at start (explicit model control loads nothing by itself).
        url: its endpoint ``host:port``.
    """

    def __init__(
        self, models: dict[str, FakeModel], loaded: tuple[str, ...] = (), url: str = "fake-triton:8001"
    ) -> None:
        self.url = url
        self.models = models
        self.loaded: set[str] = set(loaded)
        self.mode: Mode = "live"
        self.slow_model_probes = False
        self.hold_inference: asyncio.Event | None = None
        self.hold_loads: asyncio.Event | None = None
        self.calls: list[tuple[str, str]] = []
        self.inputs: list[tuple[str, tuple[NDArray[Any], ...]]] = []
        self.keep_inputs = True
        """Copy every call's inputs into `inputs`; off for long runs (a UNet crop is 300 KB)."""
        self.closed = False

    def restart(self) -> None:
        """Triton came back: live again, nothing loaded."""
        self.mode = "live"
        self.loaded.clear()

    def count(self, call: str, model: str = "") -> int:
        """How many calls of ``call`` (for ``model``, if given) were made."""
        return sum(1 for c, m in self.calls if c == call and (not model or m == model))

    def _answer_control(self) -> None:
        if self.mode == "refused":
            raise TritonEndpointDown(
                f"Triton at {self.url} unreachable: StatusCode.UNAVAILABLE: "
                "failed to connect (connection refused)"
            )
        if self.mode == "hung":
            raise TritonDeadline(
                f"Triton at {self.url} unreachable: StatusCode.DEADLINE_EXCEEDED: Deadline Exceeded"
            )

    # ------------------------------------------------------------------ ControlClient
    async def server_live(self) -> bool:
        self.calls.append(("server_live", ""))
        self._answer_control()
        return self.mode == "live"

    async def model_ready(self, model: str) -> bool:
        self.calls.append(("model_ready", model))
        self._answer_control()
        if self.slow_model_probes:
            raise TritonDeadline(
                f"readiness of {model!r} unknown: StatusCode.DEADLINE_EXCEEDED: Deadline Exceeded"
            )
        return model in self.loaded

    async def load_model(self, model: str) -> None:
        self.calls.append(("load_model", model))
        if self.hold_loads is not None:
            await self.hold_loads.wait()
        self._answer_control()
        spec = self.models.get(model)
        if spec is None:
            raise TritonUnavailable(
                f"load_model({model!r}) failed: StatusCode.INTERNAL: failed to load '{model}', "
                "no version is available"
            )
        if spec.load_error is not None:
            raise TritonUnavailable(f"load_model({model!r}) failed: StatusCode.INTERNAL: {spec.load_error}")
        self.loaded.add(model)

    async def max_batch_size(self, model: str) -> int:
        self.calls.append(("max_batch_size", model))
        self._answer_control()
        return self.models[model].max_batch_size

    async def close(self) -> None:
        self.closed = True

    # ------------------------------------------------------------------ InferenceClient
    async def _infer(self, model: str, *inputs: NDArray[Any]) -> NDArray[Any]:
        self.calls.append(("infer", model))
        if self.keep_inputs:
            self.inputs.append((model, tuple(np.array(x) for x in inputs)))
        if self.hold_inference is not None:
            await self.hold_inference.wait()
        if self.mode != "live":
            raise TritonEndpointDown(
                f"Triton inference on {model!r} failed: StatusCode.UNAVAILABLE: Socket closed"
            )
        if model not in self.loaded:
            raise TritonUnavailable(
                f"Triton inference on {model!r} failed: StatusCode.NOT_FOUND: Request for unknown model"
            )
        spec = self.models[model]
        if len(inputs[0]) > spec.max_batch_size:
            raise TritonUnavailable(f"batch of {len(inputs[0])} > max_batch_size {spec.max_batch_size}")
        return spec.fn(*inputs)

    async def infer_unet(
        self, model: str, crop: NDArray[np.uint8], window: NDArray[np.float32]
    ) -> NDArray[np.uint8]:
        return await self._infer(model, crop, window)

    async def infer_audio_encoder(self, model: str, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        return await self._infer(model, mel)


def fake_triton(
    *avatar_models: str, loaded: tuple[str, ...] = (), url: str = "fake-triton:8001"
) -> FakeTriton:
    """A fake at ``url`` with an identity UNet per Triton model name in ``avatar_models`` and
    the audio encoder (max batch 8 each)."""
    models = {m: FakeModel(identity_unet) for m in avatar_models}
    models[AUDIO_ENCODER_MODEL] = FakeModel(slice_encoder)
    return FakeTriton(models, loaded=loaded, url=url)
