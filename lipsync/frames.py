"""Pure frame math of one lip-sync frame (docs/REFERENCE.md section 2), on numpy arrays.

Every function here is deterministic, touches no disk, and is shared by the gateway, the
package builder, the tests and the baseline, so all of them agree on the reference semantics:

- `crop_328`:      step 2, ``F[y1:y2, x1:x2]`` resized to 328 x 328 with ``INTER_CUBIC``;
- `inner_320`:     step 3, the view ``crop[4:324, 4:324]``;
- `mask_inner`:    step 4, the mouth rectangle x 5..314, y 5..309 (inclusive) set to 0;
- `audio_window`:  step 6, feature rows i-8 .. i+7, zeros outside [0, M);
- `paste_back`:    step 8, ``crop[4:324, 4:324] = pred``, resize back with ``INTER_CUBIC``, write
                   into a copy of F;
- `paste_back_region`: step 8 into a copy of one region of F only (the spliced-JPEG path);
- `face_patch`:    step 8's pixels of the crop rectangle alone (what paste back writes there;
                   the ``face`` output);
- `pingpong_index`: step 9, 0, 1, ..., N-1, N-2, ..., 1, 0, 1, ...

Images are BGR ``uint8`` ``[H, W, 3]``; rectangles are ``(x1, y1, x2, y2)`` in pixels with
x2/y2 exclusive (numpy slice bounds).
"""
from __future__ import annotations

from typing import Any, Final, TypeAlias, cast

import cv2
import numpy as np
from numpy.typing import NDArray

from lipsync.contract import CROP_SIZE, INNER_OFFSET, INNER_SIZE, WINDOW_BEFORE, WINDOW_ROWS

MASK_X0: Final[int] = 5
MASK_X1: Final[int] = 314
MASK_Y0: Final[int] = 5
MASK_Y1: Final[int] = 309
"""Inclusive bounds of the blacked-out mouth rectangle in the inner crop (px); what
``cv2.rectangle(img, (5, 5, 310, 305), (0, 0, 0), -1)`` fills (docs/REFERENCE.md s.2 step 4)."""

RectLike: TypeAlias = tuple[int, int, int, int] | NDArray[np.integer[Any]]
"""A crop rectangle ``(x1, y1, x2, y2)`` in px: a tuple, or a row of an avatar's i32[N, 4] rects."""


def _check_frame(frame: NDArray[np.uint8]) -> None:
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(
            f"frame must be uint8 [H, W, 3] BGR, got {frame.dtype} {list(frame.shape)}"
        )


def _check_square(image: NDArray[np.uint8], side: int, what: str) -> None:
    """Raise ValueError unless `image` is ``[side, side, 3]``."""
    if image.shape != (side, side, 3):
        raise ValueError(f"{what} must be [{side}, {side}, 3], got {list(image.shape)}")


def _check_rect(frame: NDArray[np.uint8], rect: RectLike) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(v) for v in rect)
    h, w = frame.shape[:2]
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ValueError(f"rectangle (x1={x1}, y1={y1}, x2={x2}, y2={y2}) is not inside the {w}x{h} frame")
    return x1, y1, x2, y2


def crop_328(frame: NDArray[np.uint8], rect: RectLike) -> NDArray[np.uint8]:
    """Cut the face rectangle out of a frame and resize it to 328 x 328 (docs/REFERENCE.md s.2 step 2).

    Args:
        frame: full frame, uint8 ``[H, W, 3]`` BGR.
        rect: ``(x1, y1, x2, y2)`` in px, x2/y2 exclusive, inside the frame.

    Returns:
        A new uint8 ``[328, 328, 3]`` array (bicubic, ``cv2.INTER_CUBIC``).

    Raises:
        ValueError: wrong frame dtype/shape or a rectangle outside the frame.
    """
    _check_frame(frame)
    x1, y1, x2, y2 = _check_rect(frame, rect)
    region = frame[y1:y2, x1:x2]
    return cast(NDArray[np.uint8], cv2.resize(region, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC))


def inner_320(crop328: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Return the model's inner crop ``crop328[4:324, 4:324]`` (docs/REFERENCE.md s.2 step 3).

    Args:
        crop328: uint8 ``[328, 328, 3]`` BGR.

    Returns:
        A **view** uint8 ``[320, 320, 3]`` (not contiguous; ``np.ascontiguousarray`` it before
        sending it anywhere).

    Raises:
        ValueError: the input is not ``[328, 328, 3]``.
    """
    _check_square(crop328, CROP_SIZE, "crop")
    end = INNER_OFFSET + INNER_SIZE
    return crop328[INNER_OFFSET:end, INNER_OFFSET:end]


def mask_inner(inner: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Black out the mouth rectangle of an inner crop (docs/REFERENCE.md s.2 step 4).

    Args:
        inner: uint8 ``[320, 320, 3]`` BGR.

    Returns:
        A new uint8 ``[320, 320, 3]`` array: a copy with x in [5, 314], y in [5, 309]
        (inclusive) set to 0. The model graph does this itself; this function serves the
        ``masked_regions`` video type, tests and the baseline.

    Raises:
        ValueError: the input is not ``[320, 320, 3]``.
    """
    _check_square(inner, INNER_SIZE, "inner crop")
    masked = inner.copy()
    masked[MASK_Y0 : MASK_Y1 + 1, MASK_X0 : MASK_X1 + 1] = 0
    return masked


def audio_window(features: NDArray[np.float32], i: int) -> NDArray[np.float32]:
    """The 16-row audio feature window of frame ``i`` (docs/REFERENCE.md s.2 step 6).

    Args:
        features: float32 ``[M, 512]`` (the padded ``aud_ave.npy``, possibly a memmap).
        i: frame index; any integer (rows outside [0, M) are zeros).

    Returns:
        A new float32 ``[16, 512]`` array holding rows ``i-8 .. i+7``; rows outside
        ``[0, M)`` are zero.

    Raises:
        ValueError: ``features`` is not 2-D.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [M, D], got {list(features.shape)}")
    m, dim = features.shape
    out = np.zeros((WINDOW_ROWS, dim), dtype=np.float32)
    lo = i - WINDOW_BEFORE
    hi = lo + WINDOW_ROWS
    src_lo, src_hi = max(lo, 0), min(hi, m)
    if src_lo < src_hi:
        out[src_lo - lo : src_hi - lo] = features[src_lo:src_hi]
    return out


def paste_back(
    frame: NDArray[np.uint8],
    rect: RectLike,
    crop328: NDArray[np.uint8],
    pred320: NDArray[np.uint8],
) -> NDArray[np.uint8]:
    """Composite the model output into the full frame (docs/REFERENCE.md s.2 step 8).

    ``crop = crop328.copy(); crop[4:324, 4:324] = pred320``; the crop is resized back to
    ``(x2-x1, y2-y1)`` with ``cv2.INTER_CUBIC`` and written into a copy of ``frame`` at the
    rectangle.

    Args:
        frame: full frame, uint8 ``[H, W, 3]`` BGR (not modified).
        rect: ``(x1, y1, x2, y2)`` px, x2/y2 exclusive.
        crop328: the frame's uint8 ``[328, 328, 3]`` crop (not modified).
        pred320: the model output, uint8 ``[320, 320, 3]`` BGR.

    Returns:
        A new uint8 ``[H, W, 3]`` frame.

    Raises:
        ValueError: wrong shapes/dtypes or a rectangle outside the frame.
    """
    _check_frame(frame)
    x1, y1, x2, y2 = _check_rect(frame, rect)
    out = frame.copy()
    out[y1:y2, x1:x2] = face_patch(crop328, pred320, x2 - x1, y2 - y1)
    return out


def face_patch(
    crop328: NDArray[np.uint8],
    pred320: NDArray[np.uint8],
    width: int,
    height: int,
    *,
    scratch: NDArray[np.uint8] | None = None,
    out: NDArray[np.uint8] | None = None,
) -> NDArray[np.uint8]:
    """The pixels paste back writes into the crop rectangle (docs/REFERENCE.md s.2 step 8).

    ``crop328`` with ``pred320`` written at ``[4:324, 4:324]``, resized (``INTER_CUBIC``) to
    ``width x height`` px. Written into the rectangle of the video frame (no resize: it has
    the rectangle's size) it gives `paste_back`'s composite exactly.

    Args:
        crop328: the frame's uint8 ``[328, 328, 3]`` crop (not modified).
        pred320: the model output, uint8 ``[320, 320, 3]`` BGR.
        width, height: the crop rectangle's size ``x2 - x1``, ``y2 - y1`` (px).
        scratch: a uint8 ``[328, 328, 3]`` C-contiguous buffer to assemble the pasted crop in
            (overwritten; a caller reuses one per thread), else a new one is allocated. Only
            the crop's 4 px border is copied from ``crop328``, the inside is ``pred320``.
        out: a uint8 ``[height, width, 3]`` destination, e.g. the rectangle's view of a
            composite (rows may be strided, pixels packed): the resize writes into it, no
            intermediate array and no second copy; else a new array is returned.

    Returns:
        ``out`` when given, else a new uint8 ``[height, width, 3]`` array.

    Raises:
        ValueError: wrong shapes or dtypes.
    """
    _check_square(crop328, CROP_SIZE, "crop")
    if pred320.dtype != np.uint8:
        raise ValueError(f"prediction must be uint8, got {pred320.dtype} {list(pred320.shape)}")
    _check_square(pred320, INNER_SIZE, "prediction")
    if scratch is None:
        crop = np.empty((CROP_SIZE, CROP_SIZE, 3), np.uint8)
    elif scratch.shape != (CROP_SIZE, CROP_SIZE, 3) or scratch.dtype != np.uint8:
        raise ValueError(f"scratch must be uint8 [328, 328, 3], got {scratch.dtype} {list(scratch.shape)}")
    else:
        crop = scratch
    lo, hi = INNER_OFFSET, INNER_OFFSET + INNER_SIZE
    crop[:lo] = crop328[:lo]
    crop[hi:] = crop328[hi:]
    crop[lo:hi, :lo] = crop328[lo:hi, :lo]
    crop[lo:hi, hi:] = crop328[lo:hi, hi:]
    crop[lo:hi, lo:hi] = pred320
    if out is None:
        return cast(NDArray[np.uint8], cv2.resize(crop, (width, height), interpolation=cv2.INTER_CUBIC))
    if out.shape != (height, width, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 [{height}, {width}, 3], got {out.dtype} {list(out.shape)}")
    written = cv2.resize(crop, (width, height), dst=out, interpolation=cv2.INTER_CUBIC)
    if written is not out:  # OpenCV could not write in place (a layout it cannot wrap): copy
        out[...] = written
    return out


def paste_back_region(
    frame: NDArray[np.uint8],
    rect: RectLike,
    crop328: NDArray[np.uint8],
    pred320: NDArray[np.uint8],
    region: tuple[int, int, int, int],
    *,
    scratch: NDArray[np.uint8] | None = None,
) -> NDArray[np.uint8]:
    """Paste back (docs/REFERENCE.md s.2 step 8) into one region of the frame only, not a full copy.

    The result equals ``paste_back(frame, rect, crop328, pred320)[y0:y1, x0:x1]`` exactly; it
    touches only the region (e.g. the MCU-aligned rectangle of `lipsync.jpeg_splice.aligned_rect`
    around the face rectangle), so its cost does not grow with the frame size: the frame's
    pixels around the face rectangle are copied, the face patch is resized straight into the
    rectangle (`face_patch` ``out=``).

    Args:
        frame: full frame, uint8 ``[H, W, 3]`` BGR (not modified).
        rect: the face rectangle ``(x1, y1, x2, y2)`` px, x2/y2 exclusive.
        crop328: the frame's uint8 ``[328, 328, 3]`` crop (not modified).
        pred320: the model output, uint8 ``[320, 320, 3]`` BGR.
        region: ``(x0, y0, x1, y1)`` px, x1/y1 exclusive, inside the frame and containing `rect`.
        scratch: as in `face_patch`.

    Returns:
        A new C-contiguous uint8 ``[y1 - y0, x1 - x0, 3]`` array.

    Raises:
        ValueError: wrong shapes/dtypes, a rectangle outside the frame, or a region that does
            not contain the face rectangle.
    """
    _check_frame(frame)
    x1, y1, x2, y2 = _check_rect(frame, rect)
    rx0, ry0, rx1, ry1 = _check_rect(frame, region)
    if not (rx0 <= x1 and ry0 <= y1 and x2 <= rx1 and y2 <= ry1):
        raise ValueError(
            f"region (x0={rx0}, y0={ry0}, x1={rx1}, y1={ry1}) does not contain the face "
            f"rectangle (x1={x1}, y1={y1}, x2={x2}, y2={y2})"
        )
    out = np.empty((ry1 - ry0, rx1 - rx0, 3), np.uint8)
    # the frame's pixels around the face rectangle (the rectangle itself is overwritten below)
    out[: y1 - ry0] = frame[ry0:y1, rx0:rx1]
    out[y2 - ry0 :] = frame[y2:ry1, rx0:rx1]
    out[y1 - ry0 : y2 - ry0, : x1 - rx0] = frame[y1:y2, rx0:x1]
    out[y1 - ry0 : y2 - ry0, x2 - rx0 :] = frame[y1:y2, x2:rx1]
    face_patch(crop328, pred320, x2 - x1, y2 - y1, scratch=scratch,
               out=out[y1 - ry0 : y2 - ry0, x1 - rx0 : x2 - rx0])
    return out


def pingpong_index(i: int, n: int) -> int:
    """Video frame shown at output frame ``i`` when walking ``n`` frames ping-pong (s.2 step 9).

    The sequence is 0, 1, ..., n-1, n-2, ..., 1, 0, 1, ... (period ``2n-2``); with ``n == 1``
    it is always 0.

    Raises:
        ValueError: ``i < 0`` or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"need at least one video frame, got n={n}")
    if i < 0:
        raise ValueError(f"frame index must be >= 0, got {i}")
    if n == 1:
        return 0
    period = 2 * n - 2
    k = i % period
    return k if k < n else period - k
