"""Independent reference code the tests compare the gateway with: docs/REFERENCE.md s.2 written
out with OpenCV and numpy (not `lipsync.frames`), plus JPEG decoding and PSNR."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from numpy.typing import NDArray

PredictFn = Callable[[NDArray[np.uint8], NDArray[np.float32]], NDArray[np.uint8]]
"""A model: ``pred_fn(inner u8[320, 320, 3], window f32[16, D]) -> pred u8[320, 320, 3]``."""


def reference_window(features: NDArray[np.float32], i: int) -> NDArray[np.float32]:
    """Rows i-8 .. i+7 of ``features``, zeros outside (docs/REFERENCE.md s.2 step 6)."""
    out = np.zeros((16, features.shape[1]), np.float32)
    for r in range(16):
        src = i - 8 + r
        if 0 <= src < len(features):
            out[r] = features[src]
    return out


def reference_composite(
    frame: NDArray[np.uint8], rect: NDArray[np.int32], pred_fn: PredictFn, window: NDArray[np.float32]
) -> NDArray[np.uint8]:
    """docs/REFERENCE.md s.2 steps 2-8: the full frame uint8 ``[H, W, 3]`` BGR with ``pred_fn``'s
    prediction for ``window`` pasted back into the crop rectangle ``rect`` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    crop = cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    crop[4:324, 4:324] = pred_fn(np.ascontiguousarray(crop[4:324, 4:324]), window)
    out = frame.copy()
    out[y1:y2, x1:x2] = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
    return out


def identity_composite(frame: NDArray[np.uint8], rect: NDArray[np.int32]) -> NDArray[np.uint8]:
    """`reference_composite` for `tests.fake_triton.identity_unet` (prediction = inner crop)."""
    return reference_composite(frame, rect, lambda inner, _window: inner, np.zeros((16, 1), np.float32))


def decode_jpeg(jpeg: bytes) -> NDArray[np.uint8]:
    """JPEG bytes -> uint8 ``[H, W, 3]`` BGR (OpenCV); fails the test when not decodable."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, f"not a decodable JPEG ({len(jpeg)} bytes)"
    return np.asarray(image, dtype=np.uint8)


def psnr(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> float:
    """PSNR (dB) of two uint8 arrays of the same shape; inf when equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))
