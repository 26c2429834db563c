"""The avatar-package format (version 1): manifest, writer and validating loader.

A package is one folder (`packages/<name>/`) holding what the gateway needs to serve frame i
with no per-frame disk I/O or parsing (the format is written down in `packages/README.md`):

| file            | content                                                                 |
| --------------- | ----------------------------------------------------------------------- |
| `manifest.json` | `PackageManifest` (this module), written last                            |
| `frames.npy`    | u8[N, H, W, 3] BGR full video frames at `fps`, memory-mapped read-only   |
| `rects.npy`     | i32[N, 4] crop rectangles (x1, y1, x2, y2) in px, square, inside the frame |
| `landmarks.npy` | f32[N, 68, 2] face landmarks (x, y) in px (dlib 68-point scheme)         |
| `aud_ave.npy`   | f32[M, 512] padded audio features (docs/REFERENCE.md s.4), memory-mapped     |
| `audio.wav`     | the source audio, 16 kHz mono PCM16                                      |

`load_package` validates everything (schema, file presence, confinement to the folder, sizes,
sha256 checksums, dtypes and shapes, rectangles, feature rows against the audio length) and
either returns a complete `AvatarPackage` or raises `PackageError` naming the file, what was
expected and what was found. `write_package` is the one writer (used by the builder and the
tests), so both always agree with the loader.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import threading
import wave
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lipsync import __version__
from lipsync.audio import AudioError, feature_rows_for_samples
from lipsync.contract import (
    FEATURE_DIM,
    MANIFEST_NAME,
    NAME_PATTERN,
    SAMPLE_RATE,
    VIDEO_FPS,
    avatar_model_name,
    is_avatar_model_name,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
LANDMARK_POINTS: Final = 68

DEFAULT_FILES: dict[str, str] = {
    "frames": "frames.npy",
    "rects": "rects.npy",
    "landmarks": "landmarks.npy",
    "features": "aud_ave.npy",
    "audio": "audio.wav",
}


class PackageError(Exception):
    """A package that is missing, corrupt, incomplete or inconsistent; the message says which
    file, what was expected and what was found."""


class LoadCancelled(PackageError):
    """`load_package` stopped because its ``cancel`` event was set (its caller went away)."""


def check_cancel(cancel: threading.Event | None, where: str) -> None:
    """Raise `LoadCancelled` if ``cancel`` is set; ``where`` says how far the work got."""
    if cancel is not None and cancel.is_set():
        raise LoadCancelled(f"loading cancelled {where}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    """One data file: its path relative to the package folder, size and sha256."""

    path: str = Field(min_length=1, description="relative POSIX path inside the package folder")
    size_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class PackageFiles(_Strict):
    """The data files of a package (see the module table)."""

    frames: FileEntry
    rects: FileEntry
    landmarks: FileEntry
    features: FileEntry
    audio: FileEntry


class WeightsSource(_Strict):
    """Where one network's weights came from (`export.checkpoint.WeightsInfo` plus the ONNX)."""

    trained: bool
    source: str = Field(description="checkpoint path, or 'untrained (seed N)'")
    sha256: str | None = Field(default=None, description="sha256 of the checkpoint file")
    onnx_sha256: str | None = Field(default=None, description="sha256 of the exported ONNX file")


class WeightsManifest(_Strict):
    """Weights the avatar was built with; `trained` is true only when both networks are."""

    trained: bool
    mode: Literal["ave"] = "ave"
    unet: WeightsSource
    audio_encoder: WeightsSource


class SourceMedia(_Strict):
    """The media the package was built from (names only, no absolute paths)."""

    video: str
    audio: str
    video_fps: float = Field(gt=0, description="frame rate of the source video (fps)")
    video_frames: int = Field(ge=1)
    video_width: int = Field(ge=1)
    video_height: int = Field(ge=1)
    audio_sample_rate: int = Field(ge=1, description="sample rate of the source audio (Hz)")
    notes: str = ""


class PackageManifest(_Strict):
    """`manifest.json` of a version-1 package.

    Frame counts: `frame_count` (N) video frames are stored; the avatar serves `feature_rows`
    (M) frames, one per audio feature row, walking the N video frames ping-pong
    (docs/REFERENCE.md s.2 step 9). `duration_s = feature_rows / fps`.
    """

    format_version: Literal[1]
    name: str = Field(pattern=NAME_PATTERN)
    fps: float = Field(description="frame rate of frames and features (fps); 25 in version 1")
    width: int = Field(ge=1, description="frame width (px)")
    height: int = Field(ge=1, description="frame height (px)")
    frame_count: int = Field(ge=1, description="N, rows of frames/rects/landmarks")
    feature_rows: int = Field(ge=1, description="M, rows of aud_ave.npy (servable frames)")
    feature_dim: Literal[512] = FEATURE_DIM
    landmark_points: Literal[68] = LANDMARK_POINTS
    landmark_scheme: Literal["dlib68"] = "dlib68"
    audio_sample_rate: Literal[16000] = SAMPLE_RATE
    audio_samples: int = Field(ge=1, description="samples in audio.wav (16 kHz)")
    duration_s: float = Field(gt=0, description="feature_rows / fps (s)")
    model_name: str = Field(description="Triton model serving this avatar: lipsync_<name>")
    weights: WeightsManifest
    files: PackageFiles
    source: SourceMedia
    created_at: dt.datetime
    builder: str = Field(description="tool and version that wrote the package")

    @field_validator("fps")
    @classmethod
    def _fps_is_25(cls, value: float) -> float:
        if value != VIDEO_FPS:
            raise ValueError(
                f"fps must be {VIDEO_FPS}: the ave audio features are cut per 25-fps frame "
                f"(docs/REFERENCE.md s.4), got {value}"
            )
        return value

    @field_validator("model_name")
    @classmethod
    def _model_name_format(cls, value: str) -> str:
        if not is_avatar_model_name(value):
            raise ValueError(f"model_name must look like lipsync_<name>, got {value!r}")
        return value


@dataclass(frozen=True)
class AvatarPackage:
    """A loaded, validated avatar package.

    Attributes:
        root: the package folder (resolved, absolute).
        manifest: the validated manifest.
        frames: u8[N, H, W, 3] BGR full frames, read-only `np.memmap` (gateway workers
            share one copy in the page cache).
        rects: i32[N, 4] (x1, y1, x2, y2) px, square, `0 <= x1 < x2 <= W`, `0 <= y1 < y2 <= H`.
        landmarks: f32[N, 68, 2] (x, y) px.
        features: f32[M, 512] `aud_ave.npy`, read-only `np.memmap`.
        audio_path: the package's 16 kHz mono PCM16 WAV.
    """

    root: Path
    manifest: PackageManifest
    frames: NDArray[np.uint8]
    rects: NDArray[np.int32]
    landmarks: NDArray[np.float32]
    features: NDArray[np.float32]
    audio_path: Path

    @property
    def name(self) -> str:
        """The avatar's name (`manifest.name`)."""
        return self.manifest.name

    @property
    def frame_count(self) -> int:
        """N stored video frames."""
        return self.manifest.frame_count

    @property
    def feature_rows(self) -> int:
        """M servable frames (rows of `aud_ave.npy`)."""
        return self.manifest.feature_rows


_G = TypeVar("_G", bound=np.generic)


def plain_view(array: NDArray[_G]) -> NDArray[_G]:
    """``array`` as a plain ``numpy.ndarray`` on the same memory, no copy.

    For the memory-mapped arrays of `load_package` and the gateway's caches: every view of a
    ``numpy.memmap`` runs ``numpy.memmap.__array_finalize__`` in Python (about 10 us per
    composited 720p frame on the gateway's hot path); a plain array's views do not."""
    return array.view(np.ndarray)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20, cancel: threading.Event | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Raises:
        LoadCancelled: ``cancel`` was set (checked before every chunk).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            check_cancel(cancel, f"while hashing {Path(path).name}")
            block = fh.read(chunk_bytes)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# validation helpers shared by the writer and the loader


def check_rects(
    rects: NDArray[np.integer[Any]], width: int, height: int, *, where: str = "rects.npy"
) -> None:
    """Check crop rectangles: i32[N, 4] (x1, y1, x2, y2), square, non-empty, inside W x H.

    Raises:
        PackageError: naming the first offending frame, its rectangle and how many are bad.
    """
    if rects.ndim != 2 or rects.shape[1] != 4:
        raise PackageError(f"{where}: expected shape [N, 4], found {list(rects.shape)}")
    x1, y1, x2, y2 = (rects[:, k].astype(np.int64) for k in range(4))
    checks = [
        (x1 < 0, "x1 < 0 (left of the frame)"),
        (y1 < 0, "y1 < 0 (above the frame)"),
        (x2 > width, f"x2 > width {width} (right of the frame)"),
        (y2 > height, f"y2 > height {height} (below the frame)"),
        ((x2 <= x1) | (y2 <= y1), "empty rectangle (x2 <= x1 or y2 <= y1)"),
        ((x2 - x1) != (y2 - y1), "not square (x2 - x1 != y2 - y1)"),
    ]
    for bad, what in checks:
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise PackageError(
                f"{where}: rectangle of frame {first} is {rects[first].tolist()} "
                f"(x1, y1, x2, y2): {what}, frame is {width}x{height} px; "
                f"{int(bad.sum())} of {len(rects)} rectangles are bad"
            )


def _check_array(
    where: str, arr: NDArray[np.generic], dtype: np.dtype[np.generic], shape: tuple[int, ...]
) -> None:
    if arr.dtype != dtype:
        raise PackageError(
            f"{where}: expected dtype {np.dtype(dtype).name}, found {arr.dtype.name}"
        )
    if tuple(arr.shape) != shape:
        raise PackageError(f"{where}: expected shape {list(shape)}, found {list(arr.shape)}")


def _expected_shapes(m: PackageManifest) -> dict[str, tuple[np.dtype[np.generic], tuple[int, ...]]]:
    return {
        "frames": (np.dtype(np.uint8), (m.frame_count, m.height, m.width, 3)),
        "rects": (np.dtype(np.int32), (m.frame_count, 4)),
        "landmarks": (np.dtype(np.float32), (m.frame_count, m.landmark_points, 2)),
        "features": (np.dtype(np.float32), (m.feature_rows, m.feature_dim)),
    }


def _confined(root: Path, rel: str, key: str) -> Path:
    """Resolve `rel` inside `root`, refusing absolute paths, `..` and symlinks leading out."""
    where = f"{MANIFEST_NAME}: files.{key}.path {rel!r}"
    if "\\" in rel:
        raise PackageError(f"{where} contains a backslash; use '/' as the path separator")
    if PurePosixPath(rel).is_absolute() or re.match(r"^[A-Za-z]:", rel):
        raise PackageError(f"{where} is absolute; paths must be relative to the package folder")
    if ".." in PurePosixPath(rel).parts:
        raise PackageError(
            f"{where} contains '..'; paths must stay inside the package folder {root}"
        )
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root):
        raise PackageError(
            f"{where} resolves to {resolved}, outside the package folder {root} (symlink?)"
        )
    return resolved


# ----------------------------------------------------------------------------------------------
# loader


def read_manifest(path: Path | str) -> PackageManifest:
    """The validated manifest of a package folder, without reading its data files (what a
    caller checks before committing to a load: name, frame count and size).

    Raises:
        PackageError: no folder, no or invalid `manifest.json`.
    """
    given = Path(path)
    if not given.is_dir():
        raise PackageError(f"package folder not found: {given}")
    return _read_manifest(given.resolve())


def _read_manifest(root: Path) -> PackageManifest:
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackageError(
            f"{root}: {MANIFEST_NAME} is missing (not a package, or an unfinished build)"
        )
    if not manifest_path.resolve().is_relative_to(root):
        raise PackageError(
            f"{manifest_path} resolves to {manifest_path.resolve()}, outside the package folder"
        )
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PackageError(
            f"{manifest_path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise PackageError(f"{manifest_path}: JSON nested deeper than the parser goes") from None
    except UnicodeDecodeError as exc:
        raise PackageError(f"{manifest_path}: not UTF-8 text: {exc}") from None
    if not isinstance(raw, dict):
        raise PackageError(f"{manifest_path}: expected a JSON object, found {type(raw).__name__}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(
            f"{manifest_path}: format_version is {version!r}, this loader reads version {FORMAT_VERSION}"
        )
    try:
        return PackageManifest.model_validate(raw)
    except ValidationError as exc:
        raise PackageError(f"{manifest_path}: invalid manifest: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    """pydantic's errors on one line: `field.path: message (found value); ...`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
        + (
            f" (found {err['input']!r})"
            if err["type"] != "missing" and not isinstance(err["input"], dict)
            else ""
        )
        for err in exc.errors()
    )


def _check_audio(path: Path, m: PackageManifest) -> None:
    where = f"{m.files.audio.path}"
    try:
        with wave.open(str(path), "rb") as w:
            fmt = (w.getnchannels(), w.getsampwidth(), w.getframerate())
            n = w.getnframes()
    except (wave.Error, EOFError) as exc:
        raise PackageError(f"{where}: not a readable PCM WAV file: {exc}") from None
    if fmt != (1, 2, SAMPLE_RATE):
        raise PackageError(
            f"{where}: expected mono 16-bit PCM at {SAMPLE_RATE} Hz, found {fmt[0]} channel(s), "
            f"{8 * fmt[1]}-bit, {fmt[2]} Hz"
        )
    if n != m.audio_samples:
        raise PackageError(f"{where}: expected {m.audio_samples} samples (manifest), found {n}")


MEMORY_MAPPED = frozenset({"frames", "features"})
"""The arrays `load_package` memory-maps read-only (the large ones) instead of reading."""


def _same_file(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether two `os.stat` results are of the same, unchanged file (inode, size, mtime)."""
    return (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns) == (
        after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns
    )


def load_package(
    path: Path | str, *, verify_checksums: bool = True, cancel: threading.Event | None = None
) -> AvatarPackage:
    """Load and validate an avatar package folder.

    Rectangles and landmarks are read into RAM (read-only arrays); `frames.npy` and
    `aud_ave.npy` are memory-mapped read-only (`MEMORY_MAPPED`), so the processes serving one
    package (gateway workers) share one copy in the page cache; a mapped file is checked not to
    have changed since it was hashed (publication replaces a package folder by renaming it,
    never by rewriting its files in place). Nothing is returned unless every check passes.

    Checks, in order: the folder and `manifest.json` exist; the manifest is JSON, has
    `format_version` 1 and matches `PackageManifest`; every file path stays inside the folder
    (no absolute path, no `..`, no symlink leading out); every file exists with the recorded
    size and sha256 (`verify_checksums`); each array has the dtype and shape the manifest
    implies; rectangles are square and inside the frame; `feature_rows` equals the rows the
    audio length gives (docs/REFERENCE.md s.4: `int((T - 16) / 80 * 25) + 2 + 2`, T = mel frames);
    features are finite; the WAV is 16 kHz mono PCM16 with `audio_samples` samples.

    Args:
        path: the package folder.
        verify_checksums: hash every file against the manifest (default; about 1 s per GB).
        cancel: when set (by another thread), the load stops at the next check: between files,
            between 1 MiB chunks of hashing, between arrays.

    Raises:
        PackageError: with the file, what was expected and what was found.
        LoadCancelled: ``cancel`` was set.
    """
    m = read_manifest(path)
    root = Path(path).resolve()

    files: dict[str, Path] = {}
    hashed: dict[str, os.stat_result] = {}
    for key in DEFAULT_FILES:
        entry: FileEntry = getattr(m.files, key)
        file_path = _confined(root, entry.path, key)
        if not file_path.is_file():
            raise PackageError(f"{root}: {entry.path} ({key}) is missing")
        hashed[key] = file_path.stat()
        size = hashed[key].st_size
        if size != entry.size_bytes:
            raise PackageError(
                f"{entry.path}: expected {entry.size_bytes} bytes (manifest), found {size} bytes"
            )
        if verify_checksums:
            digest = sha256_file(file_path, cancel=cancel)
            if digest != entry.sha256:
                raise PackageError(
                    f"{entry.path}: checksum mismatch: manifest sha256 {entry.sha256}, file has {digest}"
                )
        files[key] = file_path

    try:
        expected_rows = feature_rows_for_samples(m.audio_samples)
    except AudioError as exc:  # fewer samples than one mel window needs
        raise PackageError(f"{MANIFEST_NAME}: audio_samples is {m.audio_samples}: {exc}") from None
    if m.feature_rows != expected_rows:
        raise PackageError(
            f"{MANIFEST_NAME}: feature_rows is {m.feature_rows} but {m.audio_samples} audio samples "
            f"give {expected_rows} rows (docs/REFERENCE.md s.4)"
        )

    arrays: dict[str, NDArray[Any]] = {}
    for key, (dtype, shape) in _expected_shapes(m).items():
        where = getattr(m.files, key).path
        check_cancel(cancel, f"before reading {where}")
        try:
            arr = np.load(
                files[key], mmap_mode="r" if key in MEMORY_MAPPED else None, allow_pickle=False
            )
        except (ValueError, OSError) as exc:
            raise PackageError(f"{where}: not a readable .npy array: {exc}") from None
        if key in MEMORY_MAPPED and not _same_file(hashed[key], files[key].stat()):
            raise PackageError(f"{where}: the file changed while the package was being loaded")
        _check_array(where, arr, dtype, shape)
        if key not in MEMORY_MAPPED:
            arr.setflags(write=False)
        arrays[key] = arr

    check_rects(arrays["rects"], m.width, m.height, where=m.files.rects.path)
    if not np.isfinite(arrays["landmarks"]).all():
        raise PackageError(f"{m.files.landmarks.path}: contains NaN or infinite values")
    if not np.isfinite(arrays["features"]).all():
        raise PackageError(f"{m.files.features.path}: contains NaN or infinite values")
    _check_audio(files["audio"], m)

    logger.debug(
        "loaded package %s: %d frames, %d feature rows", m.name, m.frame_count, m.feature_rows
    )
    return AvatarPackage(
        root=root,
        manifest=m,
        frames=arrays["frames"],
        rects=arrays["rects"],
        landmarks=arrays["landmarks"],
        features=arrays["features"],
        audio_path=files["audio"],
    )


# ----------------------------------------------------------------------------------------------
# writer


def _write_wav(path: Path, pcm16: NDArray[np.int16]) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.ascontiguousarray(pcm16, dtype="<i2").tobytes())


def write_package(
    folder: Path,
    *,
    name: str,
    frames: NDArray[np.uint8],
    rects: NDArray[np.integer[Any]],
    landmarks: NDArray[np.floating[Any]],
    features: NDArray[np.floating[Any]],
    audio_pcm16: NDArray[np.int16],
    weights: WeightsManifest,
    source: SourceMedia,
    model_name: str | None = None,
    fps: float = 25.0,
    builder: str | None = None,
) -> PackageManifest:
    """Write a version-1 package into `folder` (created; must not exist or be empty).

    Data files are written first and `manifest.json` last, so a folder without a manifest is
    never a package. The caller (the builder) writes into a temporary folder and renames it.

    Args:
        folder: destination folder.
        name: avatar name (`NAME_PATTERN`).
        frames: u8[N, H, W, 3] BGR.
        rects: int[N, 4] (x1, y1, x2, y2) px, square, inside the frame (stored as int32).
        landmarks: float[N, 68, 2] (x, y) px (stored as float32).
        features: f32[M, 512], padded (`lipsync.audio.pad_features`).
        audio_pcm16: i16[n] 16 kHz mono samples; M must equal
            `lipsync.audio.feature_rows_for_samples(n)`.
        weights: weights the avatar's model was exported with.
        source: source media description.
        model_name: Triton model name, default `lipsync_<name>`.
        fps: frame rate of frames and features (fps); must be 25 (docs/REFERENCE.md s.4).
        builder: tool/version string, default `lipsync <version>`.

    Returns:
        the manifest written.

    Raises:
        PackageError: when the inputs would not make a valid package (same checks as the loader).
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise PackageError(
            f"invalid avatar name {name!r}: use letters, digits, '_' or '-' (max 63)"
        )
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] == 0:
        raise PackageError(
            f"frames: expected u8[N>=1, H, W, 3], found {frames.dtype.name}{list(frames.shape)}"
        )
    n, height, width = frames.shape[:3]
    rects = np.asarray(rects)
    if not np.issubdtype(rects.dtype, np.integer):
        raise PackageError(f"rects: expected an integer array, found {rects.dtype.name}")
    rects = rects.astype(np.int32)
    landmarks = np.asarray(landmarks, dtype=np.float32)
    features = np.ascontiguousarray(features, dtype=np.float32)
    audio_pcm16 = np.asarray(audio_pcm16)
    if audio_pcm16.dtype != np.int16 or audio_pcm16.ndim != 1 or audio_pcm16.size == 0:
        raise PackageError(
            f"audio: expected i16[n>=1], found {audio_pcm16.dtype.name}{list(audio_pcm16.shape)}"
        )
    _check_array("rects", rects, np.dtype(np.int32), (n, 4))
    _check_array("landmarks", landmarks, np.dtype(np.float32), (n, LANDMARK_POINTS, 2))
    rows = feature_rows_for_samples(audio_pcm16.size)
    _check_array("features", features, np.dtype(np.float32), (rows, FEATURE_DIM))
    check_rects(rects, width, height, where="rects")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise PackageError(f"{folder}: destination folder is not empty")
    arrays = {"frames": frames, "rects": rects, "landmarks": landmarks, "features": features}
    entries: dict[str, FileEntry] = {}
    for key, filename in DEFAULT_FILES.items():
        target = folder / filename
        if key == "audio":
            _write_wav(target, audio_pcm16)
        else:
            np.save(target, arrays[key], allow_pickle=False)
        entries[key] = FileEntry(
            path=filename, size_bytes=target.stat().st_size, sha256=sha256_file(target)
        )

    try:
        manifest = PackageManifest(
            format_version=FORMAT_VERSION,
            name=name,
            fps=fps,
            width=width,
            height=height,
            frame_count=n,
            feature_rows=rows,
            audio_samples=int(audio_pcm16.size),
            duration_s=rows / fps,
            model_name=model_name or avatar_model_name(name),
            weights=weights,
            files=PackageFiles(**entries),
            source=source,
            created_at=dt.datetime.now(dt.UTC).replace(microsecond=0),
            builder=builder or f"lipsync {__version__}",
        )
    except ValidationError as exc:
        raise PackageError(f"{folder}: the manifest would be invalid: {_problems(exc)}") from None
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_NAME)
    return manifest
