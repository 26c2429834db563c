"""`SharedMemoryUnet`: UNet calls with their tensors in system shared memory (issue 9 item 4).

Over plain gRPC every UNet frame's tensors travel inside the messages: 300 KiB of crop and
32 KiB of window out, 300 KiB of prediction back, each copied several times on both sides
(tritonclient's ``tobytes``, the protobuf message, its serialization, gRPC's slices). Measured
with the identity UNet on this machine, that is most of the gateway's cost of a Triton call
(`perf/results/capacity.md`). When the gateway and Triton share a host (and ``/dev/shm``: same
machine, or containers sharing an IPC namespace), Triton's system shared memory extension
carries them instead: the gateway writes the inputs into one POSIX shared-memory object that
Triton has registered, the request names offsets in it, and Triton writes the prediction
there too, so each message is a few hundred bytes.

Layout (`FrameArena`): the object holds ``cells`` frame cells in three parallel areas, crops
uint8 ``[cells, 320, 320, 3]``, windows float32 ``[cells, 16, 512]`` and predictions uint8
``[cells, 320, 320, 3]``, so a batch of ``n`` frames in ``n`` consecutive cells has contiguous
input and output tensors. Cells are taken per call (first fit) and given back when the
prediction the call returned is garbage collected (``weakref.finalize`` on its array): the
prediction is a view into shared memory, valid as long as anyone references it, and the cells
are not reused before. With no free run of ``n`` cells (more frames in flight than cells) a
call goes over plain gRPC instead. A caller may also take cells before the call
(`SharedMemoryUnet.stage`) and write its inputs into them directly (`gateway.batching` does,
row by row, for the frames it coalesces); a call whose inputs are those cells sends them as
they are, without copying them again. Every array handed out holds its cells
(`FrameArena.hold`): they come back when the last one is garbage collected.

Each request is a ``ModelInferRequest`` (Triton's protobuf, from ``tritonclient.grpc``) naming
the cells' offsets, serialized once per (model, frames, first cell) and kept, and sent on the
gateway's own gRPC channel as bytes: no per-frame protobuf building, and no ``InferResult``
parsing beyond the answer's output shape, which is checked.

Registration with Triton (``RegisterSystemSharedMemory``) happens at the first call and again
after Triton lost it (a restart: the call fails naming the region, or unreachable while this
channel reconnects; that call is retried over plain gRPC at once). If Triton cannot open the
object (it runs on another host, or in a container without the gateway's ``/dev/shm``), every
call goes over plain gRPC and the reason is logged; registration is tried again every
`RETRY_REGISTER_S`.

CUDA shared memory (a GPU host, Triton's CUDA shared-memory extension with
``tritonclient.utils.cuda_shared_memory``: inputs written to device memory the gateway
allocated, the prediction read back) would spare Triton's host-to-device copies too; it is not
built here: the gateway has no CUDA context and this machine no GPU (docs/ARCHITECTURE.md).

Setting: ``LIPSYNC_TRITON_SHM=system`` (default) or ``none`` (`GatewaySettings.triton_shm`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.errors import TritonDeadline, TritonUnavailable
from gateway.triton_client import CHANNEL_ARGS, TritonClient
from lipsync.contract import UNET_AUDIO, UNET_CROP, UNET_PRED

log = logging.getLogger(__name__)

RETRY_REGISTER_S = 30.0
"""After Triton refused the region, plain gRPC for this long before trying again (s)."""

_FREE, _TAKEN = b"\x01", b"\x00"


@dataclass(frozen=True, slots=True)
class StagedInputs:
    """Frame cells' input areas handed out by `FrameArena.stage` for a caller to fill.

    Attributes:
        crops: uint8 ``[n, 320, 320, 3]``, a view into shared memory.
        windows: float32 ``[n, 16, 512]``, a view into shared memory.
    """

    crops: NDArray[np.uint8]
    windows: NDArray[np.float32]


class FrameArena:
    """Frame cells in one POSIX shared-memory object (module doc).

    Args:
        cells: how many frames the object holds at once.
        name: the object's name (``/dev/shm/<name>``); unique per gateway process.

    Raises:
        ValueError: ``cells < 1``.
        OSError: the object cannot be created (no ``/dev/shm``, out of space).
    """

    def __init__(self, cells: int, name: str) -> None:
        if cells < 1:
            raise ValueError(f"need at least one frame cell, got {cells}")
        self.cells = cells
        self.crop_bytes = int(np.prod(UNET_CROP.dims)) * np.dtype(UNET_CROP.dtype).itemsize
        self.window_bytes = int(np.prod(UNET_AUDIO.dims)) * np.dtype(UNET_AUDIO.dtype).itemsize
        self.pred_bytes = int(np.prod(UNET_PRED.dims)) * np.dtype(UNET_PRED.dtype).itemsize
        self.window_at = cells * self.crop_bytes
        self.pred_at = self.window_at + cells * self.window_bytes
        self.byte_size = self.pred_at + cells * self.pred_bytes
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=self.byte_size)
        self.key = "/" + self._shm.name.lstrip("/")
        """The key Triton opens (``shm_open`` name)."""
        buf = self._shm.buf
        self.crops: NDArray[np.uint8] = np.ndarray((cells, *UNET_CROP.dims), UNET_CROP.dtype, buffer=buf)
        self.windows: NDArray[np.float32] = np.ndarray(
            (cells, *UNET_AUDIO.dims), UNET_AUDIO.dtype, buffer=buf, offset=self.window_at
        )
        self._buf = buf
        self._base: int = self.crops.__array_interface__["data"][0]
        self._free = bytearray(_FREE * cells)
        """One byte per cell: `_FREE` or `_TAKEN` (a run of free cells is a substring search)."""
        self._holders = [0] * cells
        """Per cell: how many arrays hold it (`hold`)."""
        self._lock = threading.Lock()

    def take(self, n: int) -> int | None:
        """The first cell of ``n`` free consecutive cells, now taken; None when there is no run.

        Give them to the arrays that use them with `hold`: they come back when the last of
        those is garbage collected."""
        with self._lock:
            first = self._free.find(_FREE * n)
            if first < 0:
                return None
            self._free[first : first + n] = _TAKEN * n
            return first

    def hold(self, first: int, n: int, view: NDArray[Any]) -> None:
        """Keep taken cells ``first .. first + n - 1`` taken while ``view`` (or any view of it)
        is referenced: each cell goes back when the last array holding it is garbage collected
        (any thread)."""
        with self._lock:
            for cell in range(first, first + n):
                self._holders[cell] += 1
        weakref.finalize(view, self._release, first, n)

    def _release(self, first: int, n: int) -> None:
        with self._lock:
            for cell in range(first, first + n):
                self._holders[cell] -= 1
                if self._holders[cell] == 0:
                    self._free[cell] = _FREE[0]

    def prediction(self, first: int, n: int) -> NDArray[np.uint8]:
        """uint8 ``[n, 320, 320, 3]``, a view of cells ``first ..``'s prediction area, holding
        the cells (`hold`): they go back to the arena when it (and every view of it) and every
        other array holding them are garbage collected."""
        view: NDArray[np.uint8] = np.ndarray(
            (n, *UNET_PRED.dims),
            UNET_PRED.dtype,
            buffer=self._buf,
            offset=self.pred_at + first * self.pred_bytes,
        )
        self.hold(first, n, view)
        return view

    def stage(self, n: int) -> StagedInputs | None:
        """Take ``n`` consecutive cells for a caller to write ``n`` frames' inputs into directly
        (the coalesced frames of `gateway.batching`: no batch array assembled and then copied
        into the cells); None when there is no free run.

        Returns:
            Views of the cells' input areas, each holding the cells (`hold`); `staged_first`
            recognises them when they come back as a call's inputs.
        """
        first = self.take(n)
        if first is None:
            return None
        staged = StagedInputs(self.crops[first : first + n], self.windows[first : first + n])
        self.hold(first, n, staged.crops)
        self.hold(first, n, staged.windows)
        return staged

    def staged_first(self, crop: NDArray[np.uint8], window: NDArray[np.float32]) -> int | None:
        """The first cell when ``crop`` and ``window`` are exactly the input areas of held cells
        ``first .. first + len(crop) - 1`` (views from `stage`, or slices of them); else None
        (the inputs must be copied into cells of their own)."""
        n = len(crop)
        first, rest = divmod(crop.__array_interface__["data"][0] - self._base, self.crop_bytes)
        window_at = self.window_at + first * self.window_bytes
        if (
            rest
            or not 0 <= first <= self.cells - n
            or crop.shape != (n, *UNET_CROP.dims)
            or window.shape != (n, *UNET_AUDIO.dims)
            or crop.dtype != UNET_CROP.dtype
            or window.dtype != UNET_AUDIO.dtype
            or not (crop.flags.c_contiguous and window.flags.c_contiguous)
            or window.__array_interface__["data"][0] - self._base != window_at
        ):
            return None
        with self._lock:
            held = all(self._holders[cell] > 0 for cell in range(first, first + n))
        return first if held else None

    @property
    def free_cells(self) -> int:
        """Cells not taken now."""
        with self._lock:
            return self._free.count(_FREE)

    def close(self) -> None:
        """Unmap and unlink the object (views still referenced keep their pages alive)."""
        self.crops, self.windows = np.empty(0, np.uint8), np.empty(0, np.float32)
        self._buf = memoryview(b"")
        with contextlib.suppress(BufferError):  # a prediction view still referenced keeps the mapping
            self._shm.close()
        with contextlib.suppress(FileNotFoundError):  # someone removed the name already
            self._shm.unlink()


_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _describe(exc: grpc.aio.AioRpcError) -> str:
    """``"<status>: <details>"`` of a failed call."""
    return f"{exc.code()}: {exc.details()}"


def _shm_parameters(params: Any, region: str, byte_size: int, offset: int) -> None:
    """Fill a tensor's ``parameters`` map with Triton's shared-memory keys."""
    params["shared_memory_region"].string_param = region
    params["shared_memory_byte_size"].int64_param = byte_size
    params["shared_memory_offset"].int64_param = offset


class SharedMemoryUnet:
    """`TritonClient` of one Triton endpoint sending UNet tensors through system shared memory
    (module doc); each endpoint of `gateway.endpoint_pool.EndpointPool` has its own region.

    Args:
        plain: the endpoint's plain gRPC client (`TritonGrpcClient`): the control calls, the
            audio encoder, and the UNet whenever shared memory is not usable. Closed by `close`.
        url: the Triton gRPC endpoint ``host:port``.
        cells: frame cells of the arena (frames in Triton or being composited at once).
        timeout_s: deadline of one inference call (s).

    Create it inside the running event loop; `close` it at the end.

    Raises:
        OSError: the shared-memory object cannot be created.
    """

    def __init__(self, plain: TritonClient, url: str, *, cells: int, timeout_s: float = 30.0) -> None:
        self.plain = plain
        self.url = url
        self.timeout_s = timeout_s
        self.region = f"lipsync_gateway_{secrets.token_hex(6)}"
        self.arena = FrameArena(cells, self.region)
        self._channel = grpc.aio.insecure_channel(
            url, options=CHANNEL_ARGS
        )  # the plain client's reconnect pace
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._infer_bytes: Any = self._channel.unary_unary(
            _MODEL_INFER,
            request_serializer=None,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        self._requests: dict[tuple[str, int, int], bytes] = {}
        self._registered = False
        self._refused_at: float | None = None
        self._register_lock = asyncio.Lock()
        self.status = "not registered yet"
        """Why calls go over plain gRPC, or ``registered``."""

    async def infer_unet(
        self, model: str, crop: NDArray[np.uint8], window: NDArray[np.float32]
    ) -> NDArray[np.uint8]:
        """`InferenceClient.infer_unet` through shared memory when usable, else plain gRPC.

        Returns:
            uint8 ``[N, 320, 320, 3]``, a view into shared memory (module doc) or an array.

        Raises:
            TritonUnavailable: as `InferenceClient.infer_unet`.
        """
        n = len(crop)
        if window.shape[1:] != UNET_AUDIO.dims or not await self._ready():
            return await self.plain.infer_unet(model, crop, window)
        arena = self.arena
        first = arena.staged_first(crop, window)
        staged = first is not None  # the caller wrote the inputs into our cells (`stage`)
        if first is None:
            first = arena.take(n)
            if first is None:  # more frames in flight than cells
                return await self.plain.infer_unet(model, crop, window)
        pred = arena.prediction(first, n)  # holds the cells from here: freed with it
        try:
            if not staged:
                arena.crops[first : first + n] = crop
                arena.windows[first : first + n] = window
            await self._infer(model, first, n)
        except _RegionLost:
            del pred
            return await self.plain.infer_unet(model, crop, window)
        except BaseException:
            del pred  # not kept alive by the traceback
            raise
        return pred

    def stage(self, n: int) -> StagedInputs | None:
        """Cells of this endpoint's arena for ``n`` frames' inputs, written by the caller and
        passed back to `infer_unet` as its ``crop`` and ``window`` (`FrameArena.stage`); None
        while calls go over plain gRPC or when no run of ``n`` cells is free."""
        return self.arena.stage(n) if self._registered else None

    async def infer_audio_encoder(self, model: str, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        """`InferenceClient.infer_audio_encoder` over plain gRPC (32 KiB per row: no gain)."""
        return await self.plain.infer_audio_encoder(model, mel)

    async def server_live(self) -> bool:
        """`ControlClient.server_live` of the plain client."""
        return await self.plain.server_live()

    async def model_ready(self, model: str) -> bool:
        """`ControlClient.model_ready` of the plain client."""
        return await self.plain.model_ready(model)

    async def load_model(self, model: str) -> None:
        """`ControlClient.load_model` of the plain client."""
        await self.plain.load_model(model)

    async def max_batch_size(self, model: str) -> int:
        """`ControlClient.max_batch_size` of the plain client."""
        return await self.plain.max_batch_size(model)

    def _request(self, model: str, first: int, n: int) -> bytes:
        """The serialized ``ModelInferRequest`` of ``n`` frames from cell ``first`` (cached)."""
        key = (model, first, n)
        found = self._requests.get(key)
        if found is None:
            arena = self.arena
            request = service_pb2.ModelInferRequest(model_name=model)
            for spec, at, size in (
                (UNET_CROP, 0, arena.crop_bytes),
                (UNET_AUDIO, arena.window_at, arena.window_bytes),
            ):
                tensor = request.inputs.add(
                    name=spec.name, datatype=spec.triton_dtype, shape=spec.batch_shape(n)
                )
                _shm_parameters(tensor.parameters, self.region, n * size, at + first * size)
            output = request.outputs.add(name=UNET_PRED.name)
            _shm_parameters(
                output.parameters, self.region, n * arena.pred_bytes, arena.pred_at + first * arena.pred_bytes
            )
            found = self._requests[key] = request.SerializeToString()
        return found

    async def _infer(self, model: str, first: int, n: int) -> None:
        try:
            answer = await self._infer_bytes(self._request(model, first, n), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            message = _describe(exc)
            # Triton restarted (it lost the registration, or this channel has not reconnected
            # yet): this call goes over plain gRPC, the next registers again
            if "shared memory" in message.lower() or exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._registered = False
                self.status = f"lost: {message}"
                log.warning(
                    "shared-memory call to Triton failed (%s); plain gRPC, then registering again", message
                )
                raise _RegionLost from exc
            kind = TritonDeadline if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else TritonUnavailable
            raise kind(f"Triton inference on {model!r} failed: {message}") from exc
        except Exception as exc:  # grpc.aio internals on a closing channel
            raise TritonUnavailable(f"Triton inference on {model!r} failed: {exc!r}") from exc
        shapes = [list(o.shape) for o in answer.outputs if o.name == UNET_PRED.name]
        if shapes != [list(UNET_PRED.batch_shape(n))]:
            raise TritonUnavailable(
                f"model {model!r} answered outputs {[(o.name, list(o.shape)) for o in answer.outputs]}, "
                f"expected {UNET_PRED.name} {list(UNET_PRED.batch_shape(n))}"
            )

    async def _ready(self) -> bool:
        """Whether the region is registered with Triton; registers it when due."""
        return self._registered or await self._register()

    async def _register(self) -> bool:
        """Register the region unless Triton refused it less than `RETRY_REGISTER_S` ago;
        whether it is registered now."""
        if self._refused_at is not None and time.monotonic() - self._refused_at < RETRY_REGISTER_S:
            return False
        async with self._register_lock:
            if self._registered:
                return True
            try:
                await self._stub.SystemSharedMemoryUnregister(
                    service_pb2.SystemSharedMemoryUnregisterRequest(name=self.region), timeout=self.timeout_s
                )
                await self._stub.SystemSharedMemoryRegister(
                    service_pb2.SystemSharedMemoryRegisterRequest(
                        name=self.region, key=self.arena.key, offset=0, byte_size=self.arena.byte_size
                    ),
                    timeout=self.timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.status = f"Triton unreachable: {_describe(exc)}"  # try again next call
                    return False
                first_refusal = not self.status.startswith("refused")
                self._refused_at = time.monotonic()
                self.status = f"refused by Triton: {_describe(exc)}"
                log.log(
                    logging.WARNING if first_refusal else logging.DEBUG,
                    "Triton cannot use the gateway's shared memory %s (%s): UNet tensors go over "
                    "gRPC (asked again every %.0f s); is Triton on another host or without this /dev/shm?",
                    self.arena.key,
                    _describe(exc),
                    RETRY_REGISTER_S,
                )
                return False
            self._registered, self._refused_at, self.status = True, None, "registered"
            log.info(
                "UNet tensors through system shared memory %s (%d frame cells, %.0f MiB)",
                self.arena.key,
                self.arena.cells,
                self.arena.byte_size / 2**20,
            )
            return True

    async def close(self) -> None:
        """Unregister the region (best effort), close both channels, unlink the object."""
        if self._registered:
            try:
                await self._stub.SystemSharedMemoryUnregister(
                    service_pb2.SystemSharedMemoryUnregisterRequest(name=self.region), timeout=2.0
                )
            except grpc.aio.AioRpcError as exc:
                log.debug("unregistering %s failed: %s", self.region, _describe(exc))
        await self._channel.close()
        self.arena.close()
        await self.plain.close()


class _RegionLost(Exception):
    """Triton no longer knows the region; the call is sent again over plain gRPC."""
