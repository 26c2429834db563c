"""The original system's browser clients, as far as the gateway's WebSocket replies go: their
reply parser written out in Python, and their compositing (issue 14).

`parse_reply_as_original_client` follows the clients' JavaScript step by step: a ``DataView``
over the message, the bounds length read as a **byte count**, ``new Uint8Array(data, offset,
boundsLength)`` copied into a fresh (aligned) buffer and viewed as a ``Float32Array``. It is
kept apart from `gateway.ws_protocol.decode_reply` on purpose: a test that used the gateway's
own decoder could not tell whether the wire still suits those clients.
`draw_into_rectangle` is their ``drawImage(img, x1, y1, x2 - x1, y2 - y1)`` over the video frame.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class OriginalClientFrame:
    """What an original client takes from a success reply."""

    frame_id: int
    processing_ms: int
    jpeg: bytes
    bounds: tuple[float, ...]


def parse_reply_as_original_client(data: bytes) -> OriginalClientFrame | str:
    """A reply as the original clients read it: a frame, or the error message text."""
    view = memoryview(data)
    status = view[0]
    frame_id, processing_ms, length = struct.unpack_from("<III", view, 1)
    offset = 13
    payload = bytes(view[offset : offset + length])
    if status == 0:
        return payload.decode("utf-8")
    offset += length
    (bounds_length,) = struct.unpack_from("<I", view, offset)  # a byte count
    offset += 4
    raw = view[offset : offset + bounds_length]  # new Uint8Array(data, offset, boundsLength)
    aligned = bytearray(bounds_length)  # new ArrayBuffer(boundsLength), 4-aligned
    aligned[:] = raw  # .set(raw)
    bounds = np.frombuffer(bytes(aligned), dtype="<f4")  # new Float32Array(aligned)
    return OriginalClientFrame(frame_id, processing_ms, payload, tuple(float(b) for b in bounds))


def draw_into_rectangle(
    frame: NDArray[np.uint8], image: NDArray[np.uint8], bounds: tuple[float, ...]
) -> NDArray[np.uint8]:
    """``drawImage(image, x1, y1, x2 - x1, y2 - y1)`` over a copy of ``frame`` (uint8 BGR)."""
    x1, y1, x2, y2 = (round(b) for b in bounds)
    out = frame.copy()
    if image.shape[:2] != (y2 - y1, x2 - x1):  # drawImage scales to the rectangle
        out[y1:y2, x1:x2] = cv2.resize(image, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    else:
        out[y1:y2, x1:x2] = image
    return out
