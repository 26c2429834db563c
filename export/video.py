"""Video decoding for the package builder: any OpenCV-readable file -> BGR frames at 25 fps.

Frame-rate conversion is nearest-frame time mapping: output frame j (time `j / fps`) takes
source frame `min(round(j * source_fps / fps), n - 1)`, for the `floor(n * fps / source_fps)`
output frames that fit in the clip's duration (`n` source frames; 120 frames at 29.97 fps ->
100 frames at 25 fps). Frames are decoded in one streaming pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import cv2
import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

logger = logging.getLogger(__name__)


class VideoError(ValueError):
    """A video that cannot be opened or decoded, or holds no frames."""


@dataclass(frozen=True)
class DecodedVideo:
    """Decoded, resampled (and optionally rescaled) video.

    Attributes:
        frames: u8[N, H, W, 3] BGR at `fps`.
        fps: output frame rate (fps).
        source_fps: frame rate reported by the container (fps).
        source_frames: frames decoded from the source.
        source_width, source_height: source frame size (px).
    """

    frames: NDArray[np.uint8]
    fps: float
    source_fps: float
    source_frames: int
    source_width: int
    source_height: int

    @property
    def width(self) -> int:
        """Output frame width (px)."""
        return int(self.frames.shape[2])

    @property
    def height(self) -> int:
        """Output frame height (px)."""
        return int(self.frames.shape[1])


def source_index(j: int, source_fps: float, fps: float) -> int:
    """Source frame shown at output frame `j`: `round(j * source_fps / fps)` (half up)."""
    return math.floor(j * source_fps / fps + 0.5)


def scaled_size(width: int, height: int, target_height: int | None) -> tuple[int, int]:
    """Output (width, height) px for a target height, keeping the aspect ratio, width even.

    Raises:
        VideoError: when `target_height` is below 16 px.
    """
    if target_height is None or target_height == height:
        return width, height
    if target_height < 16:
        raise VideoError(f"--height must be at least 16 px, got {target_height}")
    new_w = round(width * target_height / height / 2.0) * 2
    return max(2, new_w), int(target_height)


def decode_video(
    path: Path, fps: float = 25.0, height: int | None = None, *, progress: bool = True
) -> DecodedVideo:
    """Decode a video with OpenCV, resample it to `fps` and optionally rescale it to `height`.

    Args:
        path: any container/codec OpenCV's FFmpeg backend reads (mp4, avi, mov, ...).
        fps: output frame rate (fps), default 25.
        height: output height in px (aspect kept, width rounded to even), None = unchanged.
            Enlarging uses bicubic, shrinking area interpolation.
        progress: show a progress bar.

    Returns:
        DecodedVideo with u8[N, H, W, 3] BGR frames.

    Raises:
        VideoError: missing file, unreadable video, unknown frame rate or no frames.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    if fps <= 0:
        raise VideoError(f"--fps must be positive, got {fps}")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError(f"{path}: OpenCV cannot open this video (unsupported container or codec?)")
    try:
        source_fps = float(cap.get(cv2.CAP_PROP_FPS))
        if not math.isfinite(source_fps) or source_fps <= 0:
            raise VideoError(f"{path}: the container reports no frame rate ({source_fps})")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        src_w, src_h = (
            int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
        out_w, out_h = scaled_size(src_w, src_h, height)
        interp = cv2.INTER_AREA if out_h < src_h else cv2.INTER_CUBIC
        frames: list[NDArray[np.uint8]] = []
        k = 0
        last: NDArray[np.uint8] | None = None

        def resize(frame: NDArray[np.uint8]) -> NDArray[np.uint8]:
            if (out_w, out_h) == (src_w, src_h):
                return frame
            return cast(NDArray[np.uint8], cv2.resize(frame, (out_w, out_h), interpolation=interp))

        with tqdm(total=total, desc="decode video", unit="frame", disable=not progress) as bar:
            while True:
                ok, decoded = cap.read()
                if not ok:
                    break
                frame = last = cast(NDArray[np.uint8], decoded)  # 8-bit BGR
                if source_index(len(frames), source_fps, fps) == k:  # resize only kept frames
                    kept = resize(frame)
                    while source_index(len(frames), source_fps, fps) == k:
                        frames.append(kept)
                k += 1
                bar.update(1)
    finally:
        cap.release()
    if k == 0 or last is None:
        raise VideoError(f"{path}: no frames could be decoded")
    # one output frame per 1/fps inside the clip's duration (k / source_fps seconds)
    target = max(1, math.floor(k * fps / source_fps + 1e-9))
    if len(frames) < target:
        frames.extend([resize(last)] * (target - len(frames)))
    del frames[target:]
    logger.info(
        "decoded %s: %d frames %dx%d at %.3f fps -> %d frames %dx%d at %g fps",
        path.name,
        k,
        src_w,
        src_h,
        source_fps,
        len(frames),
        out_w,
        out_h,
        fps,
    )
    return DecodedVideo(
        frames=np.stack(frames),
        fps=fps,
        source_fps=source_fps,
        source_frames=k,
        source_width=src_w,
        source_height=src_h,
    )
