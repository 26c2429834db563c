"""The model contract: every fact the offline side, Triton and the gateway must agree on.

Each constant here is stated once; the exporter (`export/onnx_export.py`), the model-repository
writer (`export/model_repo.py`), the package format (`lipsync/package.py`), the frame math
(`lipsync/frames.py`), the audio front end (`lipsync/audio.py`), the gateway, `perf/` and the
tests import it from here. The semantics behind the numbers are in `docs/REFERENCE.md`
(sections cited per constant) and the wire contract in `docs/ARCHITECTURE.md` ("The Triton
model contract"); the words used for them are in `docs/GLOSSARY.md`.

The UNet contract (pre- and post-processing live inside the exported graph, so the wire carries
uint8 images, not float tensors)::

    crop   UINT8 [N, 320, 320, 3]  BGR inner crop of the 328 face crop     (UNET_CROP)
    audio  FP32  [N, 16, 512]      16-row audio feature window ("ave")     (UNET_AUDIO)
    pred   UINT8 [N, 320, 320, 3]  BGR prediction, uint8(y * 255)          (UNET_PRED)

The audio-encoder contract (live audio and the package builder)::

    mel      FP32 [N, 80, 16]  mel window, 16 mel frames = 200 ms          (ENCODER_MEL)
    feature  FP32 [N, 512]     one feature row per 40 ms video frame       (ENCODER_FEATURE)

``N`` is the dynamic batch axis (ONNX dynamic axis ``batch``; Triton ``max_batch_size`` > 0).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

import numpy as np

# --------------------------------------------------------------------------- frame geometry
CROP_SIZE: Final[int] = 328
"""Side of the resized face crop (px), docs/REFERENCE.md s.2 step 2."""
INNER_OFFSET: Final[int] = 4
"""Offset of the model's inner crop inside the 328 crop (px): ``crop[4:324, 4:324]`` (s.2 step 3)."""
INNER_SIZE: Final[int] = 320
"""Side of the model input and output (px), s.2 step 3."""

# --------------------------------------------------------------------------- audio timing
VIDEO_FPS: Final[int] = 25
"""Output frame rate (fps): one feature row and one 40 ms audio chunk per frame (s.2 step 9, s.4)."""
SAMPLE_RATE: Final = 16_000
"""Sample rate of every audio signal the model sees (Hz), s.4."""
MEL_BANDS: Final[int] = 80
"""Mel bands of the spectrogram (s.4)."""
MEL_WINDOW: Final[int] = 16
"""Mel frames per audio-encoder window (16 frames = 200 ms at 80 mel frames/s), s.4."""
FEATURE_DIM: Final = 512
"""Width of one audio feature row (the AVE encoder's output), s.4."""
WINDOW_ROWS: Final[int] = 16
"""Feature rows in one frame's audio window: rows ``i-8 .. i+7`` (s.2 step 6)."""
WINDOW_BEFORE: Final[int] = 8
"""Rows of past context in the window (rows ``i-8 .. i-1``)."""
WINDOW_AFTER: Final[int] = WINDOW_ROWS - WINDOW_BEFORE - 1
"""Rows of lookahead in the window (rows ``i+1 .. i+7``): 7, i.e. 280 ms of future audio."""


AudioMode = Literal["ave", "hubert", "wenet"]
"""The audio-feature family a UNet was trained with; the UNet contract's `UNET_AUDIO` is the
``ave`` one (the others' window widths: `export.models.unet.AUDIO_WINDOW_SHAPES`)."""
AUDIO_MODES: Final[tuple[AudioMode, ...]] = get_args(AudioMode)
"""Every `AudioMode`, ``ave`` first (the default)."""


# --------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a Triton model.

    Attributes:
        name: the tensor name in the ONNX graph and in Triton's config.
        dtype: numpy dtype on the wire (``np.uint8`` or ``np.float32``).
        dims: per-item shape, without the batch axis.
    """

    name: str
    dtype: type[np.generic]
    dims: tuple[int, ...]

    @property
    def triton_dtype(self) -> str:
        """Triton's wire name of the dtype (``UINT8``, ``FP32``), as ``InferInput`` takes it."""
        return _TRITON_DTYPES[np.dtype(self.dtype)]

    @property
    def config_dtype(self) -> str:
        """The ``DataType`` enum name of Triton's ``ModelConfig`` (``TYPE_UINT8``, ``TYPE_FP32``)."""
        return "TYPE_" + self.triton_dtype

    def batch_shape(self, n: int) -> tuple[int, ...]:
        """The full shape of a batch of ``n`` items: ``(n, *dims)``."""
        return (n, *self.dims)


_TRITON_DTYPES: Final[dict[np.dtype[np.generic], str]] = {
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.float32): "FP32",
}

UNET_CROP: Final = TensorSpec("crop", np.uint8, (INNER_SIZE, INNER_SIZE, 3))
"""UNet input: the BGR inner crop, HWC (s.2 step 3)."""
UNET_AUDIO: Final = TensorSpec("audio", np.float32, (WINDOW_ROWS, FEATURE_DIM))
"""UNet input: the audio feature window of an ``ave`` model (s.2 step 6). The ``hubert`` and
``wenet`` modes have other row widths (`export.models.unet.AUDIO_WINDOW`)."""
UNET_PRED: Final = TensorSpec("pred", np.uint8, (INNER_SIZE, INNER_SIZE, 3))
"""UNet output: the BGR prediction, ``uint8(y * 255)`` by truncation (s.2 step 7)."""
ENCODER_MEL: Final = TensorSpec("mel", np.float32, (MEL_BANDS, MEL_WINDOW))
"""Audio-encoder input: one mel window (s.4)."""
ENCODER_FEATURE: Final = TensorSpec("feature", np.float32, (FEATURE_DIM,))
"""Audio-encoder output: one feature row (s.4)."""

# --------------------------------------------------------------------------- names
NAME_PATTERN: Final[str] = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
"""Avatar names: letters, digits, ``_`` and ``-``, 1-63 characters, starting with a letter or
digit (they become folder names and Triton model names ``lipsync_<name>``)."""
AVATAR_MODEL_PREFIX: Final[str] = "lipsync_"
"""Prefix of an avatar's Triton model name."""
AUDIO_ENCODER_MODEL: Final[str] = "audio_encoder"
"""Triton model name of the AVE audio encoder."""
MANIFEST_NAME: Final[str] = "manifest.json"
"""File name of an avatar package's manifest (written last: a folder without it is no package)."""


def is_avatar_name(name: str) -> bool:
    """True when ``name`` matches `NAME_PATTERN`."""
    return re.fullmatch(NAME_PATTERN, name) is not None


def avatar_model_name(avatar: str) -> str:
    """Triton model name of an avatar's UNet: ``lipsync_<avatar>``.

    Raises:
        ValueError: ``avatar`` does not match `NAME_PATTERN` (the message gives the rule).
    """
    if not is_avatar_name(avatar):
        raise ValueError(
            f"avatar name {avatar!r} is not usable: use 1-63 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return AVATAR_MODEL_PREFIX + avatar


def is_avatar_model_name(model: str) -> bool:
    """True when ``model`` is ``lipsync_<valid avatar name>``."""
    return model.startswith(AVATAR_MODEL_PREFIX) and is_avatar_name(model[len(AVATAR_MODEL_PREFIX):])


# --------------------------------------------------------------------------- ports
GATEWAY_GRPC_PORT: Final[int] = 50051
"""The gateway's gRPC port (the original system's port)."""
GATEWAY_HTTP_PORT: Final[int] = 8085
"""The gateway's HTTP, WebSocket and web-page port (the original WebSocket server's port)."""
TRITON_HTTP_PORT: Final[int] = 8000
"""Triton's HTTP/REST port (Triton's default)."""
TRITON_GRPC_PORT: Final[int] = 8001
"""Triton's gRPC port (Triton's default); the gateway talks to Triton here."""
TRITON_METRICS_PORT: Final[int] = 8002
"""Triton's Prometheus metrics port (Triton's default)."""
