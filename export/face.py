"""Face detection, 68-point landmarks and smoothed crop rectangles for the package builder.

Detector and landmark weights ship in registry packages (docs/REFERENCE.md s.6): dlib's HOG frontal
face detector (`dlib-bin`) and the 68-point shape predictor
`shape_predictor_68_face_landmarks.dat` of `face-recognition-models` (its training data, iBUG
300-W, carries non-commercial terms). `import face_recognition_models` needs `pkg_resources`,
so the model file is located through the package's import spec without importing it.

Crop rectangle (docs/REFERENCE.md s.3, mapped to dlib's 0-based 68-point scheme): SyncTalk_2D uses
`xmin = lms[1].x`, `xmax = lms[31].x` (upper jaw contour, both sides) and `ymin = lms[52].y`
(just under the eyes), a square of side `xmax - xmin` going down past the chin. Here:
`xmin = p[1].x`, `xmax = p[15].x` (jaw contour just below the ear line), `ymin` = mean y of the
lower eyelids `p[40], p[41], p[46], p[47]`, side = `xmax - xmin`. Centre and side are smoothed
over time with a centred moving average (`SMOOTH_FRAMES` frames) so the crop does not jitter,
then rounded to int and shifted (not shrunk) to stay inside the frame.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, cast

import cv2
import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

logger = logging.getLogger(__name__)

SMOOTH_FRAMES = 5
"""Centred moving-average length for the rectangle's centre and side (frames; 0.2 s at 25 fps)."""
DETECTION_HEIGHT = 360
"""Frames are scaled to this height (px) for the HOG detector (it misses faces under ~80 px)."""
LOWER_EYELIDS = (40, 41, 46, 47)
JAW_LEFT, JAW_RIGHT = 1, 15
WEAK_THRESHOLD = -0.5
"""Detection score accepted in the second, neighbour-guided pass (dlib's default is 0)."""
NEIGHBOUR_FRAMES = 12
"""A weak detection must overlap a confident one at most this many frames away (0.5 s)."""


class FaceError(ValueError):
    """No usable face (with the frames concerned), or the landmark model is missing."""


def shape_predictor_path() -> Path:
    """Path of `shape_predictor_68_face_landmarks.dat` inside `face-recognition-models`.

    Raises:
        FaceError: when the package or the file is missing.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceError(
            "face-recognition-models is not installed: pip install 'lipsync-serving[export]' "
            "(or face-recognition-models==0.3.0)"
        )
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "models"
        / "shape_predictor_68_face_landmarks.dat"
    )
    if not path.is_file():
        raise FaceError(f"the 68-point landmark model is missing: {path}")
    return path


def format_frame_ranges(indices: list[int] | NDArray[np.integer[Any]]) -> str:
    """`[0, 1, 2, 5, 7, 8]` -> `"0-2, 5, 7-8"`."""
    idx = sorted(int(i) for i in indices)
    parts: list[str] = []
    start = prev = idx[0] if idx else 0
    for i in [*idx[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts) if idx else ""


@dataclass(frozen=True)
class FaceTrack:
    """Per-frame face detections.

    Attributes:
        boxes: i32[N, 4] detector boxes (x1, y1, x2, y2) px in frame coordinates.
        landmarks: f32[N, 68, 2] (x, y) px, dlib 68-point scheme.
    """

    boxes: NDArray[np.int32]
    landmarks: NDArray[np.float32]


Detection: TypeAlias = tuple[NDArray[np.int32], NDArray[np.float32]]
"""One face: box i32[4] (x1, y1, x2, y2) px and landmarks f32[68, 2] (x, y) px."""


class FaceLandmarker:
    """dlib HOG face detector + 68-point shape predictor.

    Args:
        detection_height: frames are resized to this height (px) before detection.
    """

    def __init__(self, detection_height: int = DETECTION_HEIGHT) -> None:
        import dlib

        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(shape_predictor_path()))
        self.detection_height = detection_height

    def _prepare(
        self, frame_bgr: NDArray[np.uint8]
    ) -> tuple[NDArray[np.uint8], NDArray[np.uint8], float]:
        rgb = cast(NDArray[np.uint8], cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB))
        h, w = rgb.shape[:2]
        scale = self.detection_height / h
        small = cv2.resize(
            rgb,
            (max(1, round(w * scale)), self.detection_height),
            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
        )
        return rgb, cast(NDArray[np.uint8], small), scale

    def _landmarks(self, rgb: NDArray[np.uint8], det: Any, scale: float) -> Detection:
        """`det`: a `dlib.rectangle` on the detection-height image (dlib ships no types)."""
        x1, y1, x2, y2 = (
            round(v / scale) for v in (det.left(), det.top(), det.right(), det.bottom())
        )
        shape = self._predictor(rgb, self._dlib.rectangle(x1, y1, x2, y2))
        points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        return np.array([x1, y1, x2, y2], dtype=np.int32), points

    def detect(self, frame_bgr: NDArray[np.uint8]) -> Detection | None:
        """Find the largest face in one frame (dlib's default detection threshold).

        Args:
            frame_bgr: u8[H, W, 3] BGR.

        Returns:
            (box i32[4] x1,y1,x2,y2 px, landmarks f32[68, 2] px) or None when no face is found
            (tried at the detection height, then with the detector's 2x upsampling).
        """
        rgb, small, scale = self._prepare(frame_bgr)
        dets = self._detector(small, 0)
        if len(dets) == 0:
            dets = self._detector(small, 1)
        if len(dets) == 0:
            return None
        return self._landmarks(rgb, max(dets, key=lambda r: r.width() * r.height()), scale)

    def detect_near(
        self,
        frame_bgr: NDArray[np.uint8],
        expected_box: NDArray[np.float64],
        threshold: float = WEAK_THRESHOLD,
    ) -> Detection | None:
        """Second chance for a frame where `detect` found nothing: accept a weaker detection
        (score >= `threshold`) only where it overlaps `expected_box` (IoU >= 0.3), the box of a
        confident detection in a nearby frame. Returns as `detect`."""
        rgb, small, scale = self._prepare(frame_bgr)
        dets, scores, _ = self._detector.run(small, 1, threshold)
        best: tuple[float, object] | None = None
        for det, score in zip(dets, scores, strict=False):
            box = (
                np.array([det.left(), det.top(), det.right(), det.bottom()], dtype=np.float64)
                / scale
            )
            if box_iou(box, expected_box) >= 0.3 and (best is None or score > best[0]):
                best = (score, det)
        return None if best is None else self._landmarks(rgb, best[1], scale)


def box_iou(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def track_faces(
    frames: NDArray[np.uint8],
    *,
    source_name: str = "video",
    progress: bool = True,
    landmarker: FaceLandmarker | None = None,
) -> FaceTrack:
    """Detect the face and its 68 landmarks in every frame.

    Pass 1 runs the detector at its default threshold on every frame. Pass 2 retries each
    frame without a face with a weaker threshold, accepting only a box that overlaps the face
    found in the nearest frame of pass 1 (within `NEIGHBOUR_FRAMES`); a video with no confident
    face anywhere is refused.

    Args:
        frames: u8[N, H, W, 3] BGR.
        source_name: used in the error message.

    Returns:
        FaceTrack with boxes i32[N, 4] and landmarks f32[N, 68, 2].

    Raises:
        FaceError: when any frame has no face, naming the frames, e.g.
            "no face found in frames 0-99 of clip.mp4 (100 of 100 frames at 25 fps)".
    """
    landmarker = landmarker or FaceLandmarker()
    n = len(frames)
    boxes = np.zeros((n, 4), dtype=np.int32)
    landmarks = np.zeros((n, 68, 2), dtype=np.float32)
    found = np.zeros(n, dtype=bool)
    for i in tqdm(range(n), desc="detect faces", unit="frame", disable=not progress):
        hit = landmarker.detect(frames[i])
        if hit is not None:
            boxes[i], landmarks[i] = hit
            found[i] = True
    confident = np.flatnonzero(found)
    retried = 0
    for i in np.flatnonzero(~found):
        if confident.size == 0:
            break
        nearest = int(confident[np.argmin(np.abs(confident - i))])
        if abs(nearest - i) > NEIGHBOUR_FRAMES:
            continue
        hit = landmarker.detect_near(frames[i], boxes[nearest].astype(np.float64))
        if hit is not None:
            boxes[i], landmarks[i] = hit
            found[i] = True
            retried += 1
    if retried:
        logger.info("%d frame(s) needed the weaker, neighbour-guided detection pass", retried)
    missing = np.flatnonzero(~found)
    if missing.size:
        frames_word = "frame" if missing.size == 1 else "frames"
        raise FaceError(
            f"no face found in {frames_word} {format_frame_ranges(missing)} of {source_name} "
            f"({missing.size} of {n} frames after resampling); every frame must show one "
            "frontal face: trim the video or pick another"
        )
    return FaceTrack(boxes=boxes, landmarks=landmarks)


def raw_rect_geometry(
    landmarks: NDArray[np.float32],
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Unsmoothed square per frame from landmarks (module doc, docs/REFERENCE.md s.3).

    Args:
        landmarks: f32[N, 68, 2].

    Returns:
        (cx, cy, side) each f64[N], px.
    """
    lms = landmarks.astype(np.float64)
    xmin, xmax = lms[:, JAW_LEFT, 0], lms[:, JAW_RIGHT, 0]
    ymin = lms[:, LOWER_EYELIDS, 1].mean(axis=1)
    side = np.maximum(xmax - xmin, 1.0)
    return (xmin + xmax) / 2.0, ymin + side / 2.0, side


def _moving_average(x: NDArray[np.float64], frames: int) -> NDArray[np.float64]:
    if frames <= 1 or len(x) < 2:
        return x
    from scipy.ndimage import uniform_filter1d

    smoothed: NDArray[np.float64] = uniform_filter1d(x, size=min(frames, len(x)), mode="nearest")
    return smoothed


def crop_rects(
    landmarks: NDArray[np.float32], width: int, height: int, smooth_frames: int = SMOOTH_FRAMES
) -> NDArray[np.int32]:
    """Smoothed, square, in-frame crop rectangles from landmarks.

    Args:
        landmarks: f32[N, 68, 2] px.
        width, height: frame size (px).
        smooth_frames: centred moving-average length (frames) for centre and side.

    Returns:
        i32[N, 4] (x1, y1, x2, y2) px with `x2 - x1 == y2 - y1`, `0 <= x1`, `x2 <= width`,
        `0 <= y1`, `y2 <= height`. A square larger than the frame is shrunk to fit.
    """
    cx, cy, side = (_moving_average(v, smooth_frames) for v in raw_rect_geometry(landmarks))
    s = np.clip(np.round(side), 2, min(width, height)).astype(np.int64)
    x1 = np.clip(np.round(cx - s / 2.0).astype(np.int64), 0, width - s)
    y1 = np.clip(np.round(cy - s / 2.0).astype(np.int64), 0, height - s)
    rects: NDArray[np.int64] = np.stack([x1, y1, x1 + s, y1 + s], axis=1)
    return rects.astype(np.int32)
