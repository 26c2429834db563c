"""Build an avatar package from a video and a speech recording (`lipsync package build`).

Steps: decode the video and resample it to 25 fps (optionally rescale, `export.video`); find the
face and 68 landmarks in every frame and derive smoothed square crop rectangles
(`export.face`); convert the audio to 16 kHz mono, compute the mel spectrogram and the 25-fps
mel windows (`lipsync.audio`, docs/REFERENCE.md s.4), run the exported audio encoder with ONNX
Runtime and pad the features (`aud_ave.npy`); export the avatar's UNet and the audio encoder to
ONNX (`export.onnx_export`); write the package (`lipsync.package.write_package`) into a
temporary folder next to the destination and check it with the loader. Then, holding the
packages root's lock (`export.publish.folder_lock`, so two builders never interleave), publish
the avatar's models into the CPU and GPU model repositories (`export.model_repo`: each a new
model version) and last the package itself (an atomic swap, `export.publish.replace_folder`).
A build that fails before publishing leaves nothing behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from export.model_repo import (
    ModelRepoError,
    Profile,
    check_audio_encoder,
    write_audio_encoder_model,
    write_avatar_model,
)
from export.publish import folder_lock, replace_folder
from lipsync import __version__
from lipsync.audio import (
    AudioError,
    float_to_pcm16,
    mel_spectrogram,
    mel_windows,
    pad_features,
    pcm16_to_float,
    to_mono_16k,
)
from lipsync.contract import (
    AUDIO_ENCODER_MODEL,
    ENCODER_FEATURE,
    ENCODER_MEL,
    VIDEO_FPS,
    avatar_model_name,
)
from lipsync.package import (
    PackageError,
    PackageManifest,
    SourceMedia,
    WeightsManifest,
    WeightsSource,
    load_package,
    sha256_file,
    write_package,
)
from lipsync.paths import MODEL_REPOSITORY_CPU, MODEL_REPOSITORY_GPU, PACKAGES_DIR

if TYPE_CHECKING:  # torch is imported lazily, by the build itself
    from export.onnx_export import ExportResult

logger = logging.getLogger(__name__)

ENCODER_BATCH = 64
"""Mel windows per ONNX Runtime call of the audio encoder."""


class BuildError(RuntimeError):
    """The package could not be built; the message says why (nothing was left behind)."""


@dataclass(frozen=True)
class BuildSummary:
    """What a build produced (logged at the end and returned by `build_package`).

    Attributes:
        path: the package folder.
        frames: N video frames stored (at 25 fps).
        feature_rows: M servable frames (rows of `aud_ave.npy`).
        duration_s: M / 25, the servable duration (s).
        face_size_px: smallest and largest crop-rectangle side over the frames (px).
        seconds: wall time of the build (s).
        trained: True only when both the UNet and the audio encoder had checkpoints.
    """

    path: Path
    frames: int
    feature_rows: int
    duration_s: float
    face_size_px: tuple[int, int]
    seconds: float
    trained: bool


def read_audio_16k_mono(path: Path) -> tuple[NDArray[np.int16], int]:
    """Read any audio file libsndfile reads (WAV, FLAC, OGG, MP3, ...) as 16 kHz mono int16.

    Returns:
        (i16[n] samples at 16 kHz, the source sample rate in Hz).

    Raises:
        AudioError: missing or unreadable file, or no samples.
    """
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise AudioError(f"{path}: cannot read audio: {exc}") from None
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: the audio file holds no samples")
    return float_to_pcm16(to_mono_16k(samples, rate)), int(rate)


def encode_audio(
    encoder_onnx: Path, pcm16: NDArray[np.int16], *, progress: bool = True
) -> NDArray[np.float32]:
    """Audio features for a 16 kHz recording with the exported AVE encoder (ONNX Runtime).

    Args:
        encoder_onnx: ONNX graph `lipsync.contract.ENCODER_MEL` f32[N, 80, 16] ->
            `ENCODER_FEATURE` f32[N, 512].
        pcm16: i16[n] mono 16 kHz.

    Returns:
        f32[F + 2, 512] padded features (`aud_ave.npy`), F = mel-derived frame count.

    Raises:
        AudioError: audio shorter than one mel window.
    """
    import onnxruntime as ort

    mel = mel_spectrogram(pcm16_to_float(pcm16.astype("<i2").tobytes()))
    windows = mel_windows(mel)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(encoder_onnx), options, providers=["CPUExecutionProvider"])
    out = np.empty((len(windows), *ENCODER_FEATURE.dims), dtype=ENCODER_FEATURE.dtype)
    with tqdm(total=len(windows), desc="audio features", unit="frame", disable=not progress) as bar:
        for start in range(0, len(windows), ENCODER_BATCH):
            batch = windows[start : start + ENCODER_BATCH]
            feeds = {ENCODER_MEL.name: batch}
            out[start : start + len(batch)] = session.run([ENCODER_FEATURE.name], feeds)[0]
            bar.update(len(batch))
    return pad_features(out)


def _weights_source(result: ExportResult) -> WeightsSource:
    """The manifest's record of one export: its weights' origin and the ONNX file's sha256."""
    w = result.weights
    return WeightsSource(
        trained=w.trained, source=w.source, sha256=w.sha256, onnx_sha256=sha256_file(result.path)
    )


def build_package(
    video: Path,
    audio: Path,
    name: str,
    packages_root: Path = PACKAGES_DIR,
    *,
    checkpoint: Path | None = None,
    audio_encoder: Path | None = None,
    fps: float = VIDEO_FPS,
    height: int | None = None,
    model_repo_cpu: Path | None = MODEL_REPOSITORY_CPU,
    model_repo_gpu: Path | None = MODEL_REPOSITORY_GPU,
    overwrite: bool = False,
    replace_audio_encoder: bool = False,
    progress: bool = True,
    source_notes: str = "",
) -> BuildSummary:
    """Build `packages_root/<name>` and publish the avatar's models into the model repositories.

    Args:
        video: talking-face video (any OpenCV-readable file); every frame must show the face.
        audio: speech (any libsndfile format); converted to 16 kHz mono.
        name: avatar name (`lipsync.contract.NAME_PATTERN`); Triton model `lipsync_<name>`.
        packages_root: where packages live.
        checkpoint: SyncTalk_2D UNet checkpoint (`ave` mode); None -> seeded UNTRAINED weights.
        audio_encoder: AVE audio-encoder checkpoint; None -> seeded UNTRAINED weights.
        fps: output frame rate (fps); only 25 is accepted (SyncTalk_2D's rate, docs/REFERENCE.md s.4).
        height: rescale frames to this height (px), keeping the aspect ratio; None keeps it.
        model_repo_cpu, model_repo_gpu: model repositories to write (None skips one).
        overwrite: replace an existing package of the same name.
        replace_audio_encoder: replace a repository's `audio_encoder` of other weights (it is
            shared by every avatar; `export.model_repo.write_audio_encoder_model`).
        progress: show progress bars.
        source_notes: free text stored in the manifest (e.g. the media's licence).

    Returns:
        A `BuildSummary` (its `path` is the package folder), also logged.

    Raises:
        BuildError: any failure (bad input, no face, bad checkpoint, an audio encoder of other
            weights, ...), with the cause's message. A failure before publishing leaves no
            partial package and no new model version behind.
    """
    started = time.monotonic()
    video, audio = Path(video), Path(audio)
    try:
        model_name = avatar_model_name(name)
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    if fps != VIDEO_FPS:
        raise BuildError(
            f"--fps must be {VIDEO_FPS}: the ave audio features and the UNet's 16-row audio window "
            f"are defined per {VIDEO_FPS}-fps frame (docs/REFERENCE.md s.4), got {fps}"
        )
    packages_root = Path(packages_root)
    dest = packages_root / name
    if dest.exists() and not overwrite:
        raise BuildError(f"{dest} already exists (pass --force / overwrite=True to replace it)")
    targets: tuple[tuple[Path | None, Profile], ...] = (
        (model_repo_cpu, "cpu"),
        (model_repo_gpu, "gpu"),
    )
    repos = [(Path(repo), profile) for repo, profile in targets if repo is not None]
    created_root = not packages_root.exists()
    packages_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.building.", dir=packages_root))
    try:
        built = _build_into(
            staging,
            video,
            audio,
            name,
            model_name,
            checkpoint=checkpoint,
            audio_encoder=audio_encoder,
            fps=fps,
            height=height,
            progress=progress,
            source_notes=source_notes,
        )
        _publish(
            built, dest, repos, overwrite=overwrite, replace_audio_encoder=replace_audio_encoder
        )
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if created_root and not any(packages_root.iterdir()):
            packages_root.rmdir()  # leave the file system as it was
        if isinstance(exc, (KeyboardInterrupt, SystemExit, BuildError)):
            raise
        if isinstance(exc, Exception):
            raise BuildError(f"cannot build package {name!r}: {exc}") from exc
        raise
    shutil.rmtree(staging, ignore_errors=True)
    summary = replace(built.summary, path=dest, seconds=time.monotonic() - started)
    logger.info(
        "package %s: %d video frames, %d servable frames (%.2f s at %g fps), face %d-%d px, "
        "built in %.1f s, weights %s",
        dest,
        summary.frames,
        summary.feature_rows,
        summary.duration_s,
        fps,
        summary.face_size_px[0],
        summary.face_size_px[1],
        summary.seconds,
        "trained" if summary.trained else "UNTRAINED (mouth region will be noise)",
    )
    return summary


@dataclass(frozen=True)
class _Built:
    """A build waiting to be published: the checked package folder and its two ONNX graphs."""

    summary: BuildSummary
    model_name: str
    unet_onnx: Path
    encoder_onnx: Path


def _publish(
    built: _Built,
    dest: Path,
    repos: list[tuple[Path, Profile]],
    *,
    overwrite: bool,
    replace_audio_encoder: bool,
) -> None:
    """Holding the packages root's lock: refuse a shared audio encoder of other weights before
    anything is written, publish the models (a new version each), then swap the package in.

    Raises:
        BuildError: the package appeared meanwhile (without `overwrite`), or a repository
            serves an audio encoder of other weights (without `replace_audio_encoder`).
    """
    with folder_lock(dest.parent):
        if dest.exists() and not overwrite:
            raise BuildError(f"{dest} already exists (pass --force / overwrite=True to replace it)")
        try:
            for repo, _ in repos:
                check_audio_encoder(repo, built.encoder_onnx, replace=replace_audio_encoder)
            for repo, profile in repos:
                write_audio_encoder_model(
                    repo, built.encoder_onnx, profile, replace=replace_audio_encoder
                )
                write_avatar_model(repo, built.model_name, built.unet_onnx, profile)
        except ModelRepoError as exc:
            raise BuildError(f"cannot publish {built.model_name}: {exc}") from None
        replace_folder(built.summary.path, dest)


def _build_into(
    staging: Path,
    video: Path,
    audio: Path,
    name: str,
    model_name: str,
    *,
    checkpoint: Path | None,
    audio_encoder: Path | None,
    fps: float,
    height: int | None,
    progress: bool,
    source_notes: str,
) -> _Built:
    """Everything that can fail slowly, into `staging` only: media, faces, ONNX, the package."""
    from export.face import crop_rects, track_faces
    from export.onnx_export import export_audio_encoder, export_unet
    from export.video import decode_video

    decoded = decode_video(video, fps=fps, height=height, progress=progress)
    pcm16, audio_rate = read_audio_16k_mono(audio)

    track = track_faces(decoded.frames, source_name=video.name, progress=progress)
    rects = crop_rects(track.landmarks, decoded.width, decoded.height)

    logger.info("exporting the audio encoder and the UNet to ONNX")
    enc = export_audio_encoder(audio_encoder, staging / f"{AUDIO_ENCODER_MODEL}.onnx")
    unet = export_unet(checkpoint, staging / f"{model_name}.onnx", mode="ave")
    features = encode_audio(enc.path, pcm16, progress=progress)

    weights = WeightsManifest(
        trained=unet.weights.trained and enc.weights.trained,
        unet=_weights_source(unet),
        audio_encoder=_weights_source(enc),
    )
    if not weights.trained:
        logger.warning(
            "building %r with UNTRAINED weights (%s): the mouth region will be noise until a "
            "trained SyncTalk_2D checkpoint is supplied (--checkpoint UNET.pth "
            "--audio-encoder ENC.pth)",
            name,
            ", ".join(
                k
                for k, w in (("UNet", unet.weights), ("audio encoder", enc.weights))
                if not w.trained
            ),
        )
    manifest: PackageManifest = write_package(
        staging / "package",
        name=name,
        frames=decoded.frames,
        rects=rects,
        landmarks=track.landmarks,
        features=features,
        audio_pcm16=pcm16,
        weights=weights,
        source=SourceMedia(
            video=video.name,
            audio=audio.name,
            video_fps=decoded.source_fps,
            video_frames=decoded.source_frames,
            video_width=decoded.source_width,
            video_height=decoded.source_height,
            audio_sample_rate=audio_rate,
            notes=source_notes,
        ),
        model_name=model_name,
        fps=fps,
        builder=f"lipsync package build {__version__}",
    )
    try:
        load_package(staging / "package")  # the loader's checks, before anything is published
    except PackageError as exc:
        raise BuildError(f"the built package does not pass the loader's checks: {exc}") from exc

    sides = rects[:, 2] - rects[:, 0]
    if manifest.feature_rows > manifest.frame_count:
        logger.info(
            "audio (%d frames) is longer than the video (%d frames): frames are walked ping-pong",
            manifest.feature_rows,
            manifest.frame_count,
        )
    summary = BuildSummary(
        path=staging / "package",
        frames=manifest.frame_count,
        feature_rows=manifest.feature_rows,
        duration_s=manifest.duration_s,
        face_size_px=(int(sides.min()), int(sides.max())),
        seconds=0.0,
        trained=weights.trained,
    )
    return _Built(summary, model_name, unet_onnx=unet.path, encoder_onnx=enc.path)
