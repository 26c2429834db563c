"""The gateway's Triton client: one call is one gRPC request, nothing else.

Two small interfaces, so that the model lifecycle (`gateway.model_lifecycle`), the guarded
inference facade (`gateway.inference`) and the tests' in-process fake (`tests/fake_triton.py`)
depend on behaviour, not on ``tritonclient``:

- `InferenceClient` (data plane): the UNet and the audio encoder, tensors as in
  `lipsync.contract` (docs/ARCHITECTURE.md "The Triton model contract (UNet)");
- `ControlClient` (control plane): what the lifecycle needs: server liveness, model readiness,
  ``load_model`` and the model's ``max_batch_size``.

`TritonGrpcClient` implements both (`TritonClient`) over ``tritonclient.grpc.aio``. It keeps no state besides
its channel: no readiness, no retries, no batching policy. Every call carries its own deadline;
a call past it raises `TritonDeadline`, a refused or lost connection (gRPC ``UNAVAILABLE``)
`TritonEndpointDown`, any other failure `TritonUnavailable` (all `gateway.errors`), with
Triton's status and message.

Model-control calls (``load_model``) carry the key when one is set, for a Triton whose
model-repository protocol is restricted with
``--grpc-restricted-protocol=model-repository:lipsync-model-control=<key>``: Triton expects it in
the gRPC metadata ``triton-grpc-protocol-lipsync-model-control`` (its gRPC front end prefixes
the restricted key with `GRPC_RESTRICTED_PREFIX`; over HTTP the header is the key's name alone).
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import tritonclient.grpc.aio as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from gateway.errors import TritonDeadline, TritonEndpointDown, TritonUnavailable
from lipsync.contract import ENCODER_FEATURE, ENCODER_MEL, UNET_AUDIO, UNET_CROP, UNET_PRED, TensorSpec

CONTROL_KEY_HEADER = "lipsync-model-control"
"""The restricted-protocol key name (``--grpc-restricted-protocol=...:<this>=<key>``) whose value
is `GatewaySettings.triton_control_key`."""
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"
"""What Triton's gRPC front end puts before a restricted key name to get the metadata key."""

_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    # a restarted Triton is seen within about a second
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 2_000),
]


class InferenceClient(Protocol):
    """Runs the models. Implementations: `TritonGrpcClient` (one request per call),
    `gateway.inference.GuardedInference` (lifecycle-aware), the tests' fake."""

    async def infer_unet(
        self, model: str, crop: NDArray[np.uint8], window: NDArray[np.float32]
    ) -> NDArray[np.uint8]:
        """Run an avatar's UNet.

        Args:
            model: Triton model name (``lipsync_<avatar>``).
            crop: uint8 ``[N, 320, 320, 3]`` BGR inner crops.
            window: float32 ``[N, 16, 512]`` audio windows.

        Returns:
            uint8 ``[N, 320, 320, 3]`` BGR predictions.

        Raises:
            TritonUnavailable: Triton down, model not ready, deadline passed, or a bad answer.
        """
        ...

    async def infer_audio_encoder(self, model: str, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        """Run the audio encoder: float32 ``[N, 80, 16]`` mel windows -> float32 ``[N, 512]``
        feature rows (docs/REFERENCE.md s.4).

        Raises:
            TritonUnavailable: as `infer_unet`.
        """
        ...


class ControlClient(Protocol):
    """The control-plane calls of `gateway.model_lifecycle.ModelLifecycle`.

    Every call raises `TritonDeadline` past its deadline and `TritonUnavailable` for any other
    failure (refused connection, Triton error).
    """

    url: str
    """The endpoint ``host:port``, for messages."""

    async def server_live(self) -> bool:
        """Whether the server process answers ``/v2/health/live``."""
        ...

    async def model_ready(self, model: str) -> bool:
        """Whether ``model`` is loaded and serves."""
        ...

    async def load_model(self, model: str) -> None:
        """Ask Triton (explicit model control) to load ``model``; returns once it answered."""
        ...

    async def max_batch_size(self, model: str) -> int:
        """The ``max_batch_size`` of ``model``'s config (0: no batch axis)."""
        ...


class TritonClient(InferenceClient, ControlClient, Protocol):
    """Both planes of one endpoint, plus `close`: what `gateway.context.GatewayContext` holds
    (`TritonGrpcClient`, or the tests' fake)."""

    async def close(self) -> None:
        """Release the connection."""
        ...


def describe(exc: InferenceServerException) -> str:
    """``"<status>: <message>"`` of a tritonclient error (the message alone when no status)."""
    status = exc.status()
    return f"{status}: {exc.message()}" if status else str(exc.message())


_ERROR_KINDS: dict[str, type[TritonUnavailable]] = {
    "StatusCode.DEADLINE_EXCEEDED": TritonDeadline,
    "StatusCode.UNAVAILABLE": TritonEndpointDown,
}


def _error(exc: InferenceServerException, what: str) -> TritonUnavailable:
    """The gateway error for a failed call: `TritonDeadline` for ``DEADLINE_EXCEEDED``,
    `TritonEndpointDown` for ``UNAVAILABLE`` (refused or lost connection), else
    `TritonUnavailable`."""
    kind = _ERROR_KINDS.get(str(exc.status()), TritonUnavailable)
    return kind(f"{what}: {describe(exc)}")


def _input(spec: TensorSpec, array: NDArray[Any]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.triton_dtype)
    tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=spec.dtype))
    return tensor


class TritonGrpcClient:
    """`InferenceClient` and `ControlClient` over ``tritonclient.grpc.aio``.

    Args:
        url: Triton gRPC endpoint ``host:port``.
        timeout_s: deadline of one inference call, queueing in Triton included (s).
        probe_timeout_s: deadline of ``server_live``, ``model_ready``, ``max_batch_size`` (s).
        load_timeout_s: deadline of ``load_model`` (s).
        control_key: the model-control key sent with ``load_model`` (None: none; module doc).
        tls: connect with TLS (`gateway.tls.triton_endpoint`).
        tls_ca: PEM file of the CAs Triton's certificate is checked against (None: the system's).

    Create it inside the running event loop; `close` it at the end.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        probe_timeout_s: float = 1.0,
        load_timeout_s: float = 120.0,
        control_key: str | None = None,
        tls: bool = False,
        tls_ca: str | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.load_timeout_s = load_timeout_s
        self._control_headers = (
            {GRPC_RESTRICTED_PREFIX + CONTROL_KEY_HEADER: control_key} if control_key else None
        )
        self._client = grpcclient.InferenceServerClient(
            url, ssl=tls, root_certificates=tls_ca, channel_args=_CHANNEL_ARGS
        )

    async def close(self) -> None:
        """Close the channel (calls in flight fail)."""
        await self._client.close()

    # ------------------------------------------------------------------ data plane
    async def _infer(
        self, model: str, inputs: list[grpcclient.InferInput], output: TensorSpec
    ) -> NDArray[Any]:
        try:
            result = await self._client.infer(
                model,
                inputs,
                outputs=[grpcclient.InferRequestedOutput(output.name)],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            raise _error(exc, f"Triton inference on {model!r} failed") from exc
        except Exception as exc:  # grpc.aio internals on a closing channel
            raise TritonUnavailable(f"Triton inference on {model!r} failed: {exc!r}") from exc
        array: NDArray[Any] | None = result.as_numpy(output.name)
        if array is None:
            raise TritonUnavailable(f"Triton answer from {model!r} has no output {output.name!r}")
        return array

    async def infer_unet(
        self, model: str, crop: NDArray[np.uint8], window: NDArray[np.float32]
    ) -> NDArray[np.uint8]:
        """`InferenceClient.infer_unet` as one request (no splitting)."""
        pred = await self._infer(model, [_input(UNET_CROP, crop), _input(UNET_AUDIO, window)], UNET_PRED)
        if pred.dtype != UNET_PRED.dtype or pred.shape != crop.shape:
            raise TritonUnavailable(
                f"model {model!r} answered {pred.dtype} {list(pred.shape)}, expected uint8 {list(crop.shape)}"
            )
        return pred

    async def infer_audio_encoder(self, model: str, mel: NDArray[np.float32]) -> NDArray[np.float32]:
        """`InferenceClient.infer_audio_encoder` as one request (no splitting)."""
        feature = await self._infer(model, [_input(ENCODER_MEL, mel)], ENCODER_FEATURE)
        expected = ENCODER_FEATURE.batch_shape(len(mel))
        if feature.shape != expected:
            raise TritonUnavailable(
                f"model {model!r} answered {list(feature.shape)}, expected {list(expected)}"
            )
        return feature.astype(np.float32, copy=False)

    # ------------------------------------------------------------------ control plane
    async def server_live(self) -> bool:
        """`ControlClient.server_live` (liveness, not ``/ready``: with strict readiness Triton
        reports not-ready while any model loads, which is no outage of the others)."""
        try:
            return bool(await self._client.is_server_live(client_timeout=self.probe_timeout_s))
        except InferenceServerException as exc:
            raise _error(exc, f"Triton at {self.url} unreachable") from exc

    async def model_ready(self, model: str) -> bool:
        """`ControlClient.model_ready`."""
        try:
            return bool(await self._client.is_model_ready(model, client_timeout=self.probe_timeout_s))
        except InferenceServerException as exc:
            raise _error(exc, f"readiness of {model!r} unknown") from exc

    async def load_model(self, model: str) -> None:
        """`ControlClient.load_model`, with the control key header when one is set."""
        try:
            await self._client.load_model(
                model, headers=self._control_headers, client_timeout=self.load_timeout_s
            )
        except InferenceServerException as exc:
            raise _error(exc, f"load_model({model!r}) failed") from exc

    async def max_batch_size(self, model: str) -> int:
        """`ControlClient.max_batch_size`, from the model's config."""
        try:
            config = await self._client.get_model_config(
                model, as_json=True, client_timeout=self.probe_timeout_s
            )
        except InferenceServerException as exc:
            raise _error(exc, f"config of {model!r} unavailable") from exc
        try:
            return int(config["config"].get("max_batch_size", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise TritonUnavailable(f"config of {model!r} has no readable max_batch_size: {exc!r}") from exc
