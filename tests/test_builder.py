"""The package builder and the demo avatar, on real media (carphone clip, LibriVox speech, dlib)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import dlib
import numpy as np
import onnxruntime as ort
import pytest
import soundfile
from numpy.typing import NDArray

from export.demo import demo_speech_path, demo_video_path
from export.face import format_frame_ranges, shape_predictor_path
from export.model_repo import served_version
from export.package_builder import BuildError, build_package, read_audio_16k_mono
from export.video import decode_video, source_index
from lipsync.audio import load_wav_16k_mono, mel_spectrogram, mel_windows
from lipsync.contract import (
    AUDIO_ENCODER_MODEL,
    ENCODER_FEATURE,
    ENCODER_MEL,
    FEATURE_DIM,
    MANIFEST_NAME,
    MEL_WINDOW,
    VIDEO_FPS,
    avatar_model_name,
)
from lipsync.package import AvatarPackage
from lipsync.paths import MODEL_REPOSITORY_CPU, MODEL_REPOSITORY_GPU, REPO_ROOT
from tests.fixtures_packages import served_version_number
from tests.fixtures_triton import UntrainedOnnx


def _read_all(path: Path) -> tuple[list[NDArray[np.uint8]], float]:
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(np.asarray(frame, dtype=np.uint8))
    cap.release()
    return frames, fps


def _write_video(path: Path, frames: list[NDArray[np.uint8]], fps: float) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()


def _iou_and_cover(rect: NDArray[np.int32], box: NDArray[np.int32]) -> tuple[float, float]:
    iw = max(0, min(rect[2], box[2]) - max(rect[0], box[0]))
    ih = max(0, min(rect[3], box[3]) - max(rect[1], box[1]))
    inter = iw * ih
    area_r = (rect[2] - rect[0]) * (rect[3] - rect[1])
    area_b = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area_r + area_b - inter), inter / area_r


# ------------------------------------------------------------------------------- demo avatar


def test_demo_frames_are_the_clip_at_25_fps(demo_package: AvatarPackage) -> None:
    source, source_fps = _read_all(demo_video_path())
    assert len(source) == 120 and source_fps == pytest.approx(29.97, abs=0.01)
    m = demo_package.manifest
    assert m.frame_count == math.floor(len(source) * 25 / source_fps) == 100
    assert (m.width, m.height, m.fps) == (176, 144, 25.0)
    for j in (0, 1, 5, 50, 99):  # nearest source frame in time
        np.testing.assert_array_equal(demo_package.frames[j], source[round(j * source_fps / 25)])
    assert m.source.video == "carphone_pristine.mp4" and m.source.video_frames == 120
    assert m.weights.trained is False


def test_demo_rectangles_inside_the_frame_and_on_the_face(demo_package: AvatarPackage) -> None:
    rects = demo_package.rects
    assert rects.shape == (100, 4) and rects.dtype == np.int32
    assert (rects[:, 0] >= 0).all() and (rects[:, 1] >= 0).all()
    assert (rects[:, 2] <= 176).all() and (rects[:, 3] <= 144).all()
    np.testing.assert_array_equal(rects[:, 2] - rects[:, 0], rects[:, 3] - rects[:, 1])
    sides = rects[:, 2] - rects[:, 0]
    assert sides.min() >= 30 and sides.max() <= 80  # the carphone face is ~45-55 px wide
    # smoothed: the centre moves by at most a few px from one frame to the next
    centres = (rects[:, :2] + rects[:, 2:]) / 2
    assert np.abs(np.diff(centres, axis=0)).max() <= 4
    # an independent dlib detection (2x upsampled, default threshold) overlaps each rectangle
    detector = dlib.get_frontal_face_detector()
    checked = 0
    for i in range(0, 100, 9):
        rgb = cv2.cvtColor(demo_package.frames[i], cv2.COLOR_BGR2RGB)
        dets = detector(rgb, 1)
        if not dets:
            continue
        d = max(dets, key=lambda r: r.area())
        iou, cover = _iou_and_cover(rects[i], np.array([d.left(), d.top(), d.right(), d.bottom()]))
        assert iou > 0.3 and cover > 0.5, (i, rects[i].tolist(), d, iou, cover)
        checked += 1
    assert checked >= 8
    # landmarks: mouth (points 48-67) inside the rectangle
    mouth = demo_package.landmarks[:, 48:68]
    inside = (
        (mouth[..., 0] >= rects[:, None, 0])
        & (mouth[..., 0] <= rects[:, None, 2])
        & (mouth[..., 1] >= rects[:, None, 1])
        & (mouth[..., 1] <= rects[:, None, 3])
    )
    assert inside.mean() > 0.98


def test_demo_features_are_the_encoder_on_the_speech(demo_package: AvatarPackage) -> None:
    speech = load_wav_16k_mono(demo_speech_path())
    np.testing.assert_array_equal(load_wav_16k_mono(demo_package.audio_path), speech)
    n_mel = mel_spectrogram(speech).shape[1]
    frames = int((n_mel - MEL_WINDOW) / 80 * VIDEO_FPS) + 2  # 80 mel frames per second
    feats = demo_package.features
    assert feats.shape == (frames + 2, FEATURE_DIM) == (demo_package.manifest.feature_rows, 512)
    # the rows are the audio encoder (the model served from the CPU repository) on the mel windows
    encoder = served_version(MODEL_REPOSITORY_CPU, AUDIO_ENCODER_MODEL)
    assert encoder is not None
    session = ort.InferenceSession(str(encoder.onnx_path), providers=["CPUExecutionProvider"])
    windows = mel_windows(mel_spectrogram(speech))
    for rows in (slice(0, 8), slice(frames - 8, frames)):
        expected = session.run([ENCODER_FEATURE.name], {ENCODER_MEL.name: windows[rows]})[0]
        np.testing.assert_allclose(feats[1:-1][rows], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(feats[0], feats[1])
    np.testing.assert_array_equal(feats[-1], feats[-2])
    assert float(np.std(feats[1:-1], axis=0).mean()) > 0  # speech gives varying rows


def test_demo_models_are_in_both_repositories(demo_package: AvatarPackage) -> None:
    from lipsync.package import sha256_file

    weights = demo_package.manifest.weights
    for repo in (MODEL_REPOSITORY_CPU, MODEL_REPOSITORY_GPU):
        unet = served_version(repo, demo_package.manifest.model_name)
        encoder = served_version(repo, AUDIO_ENCODER_MODEL)
        assert unet is not None and encoder is not None
        assert sha256_file(unet.onnx_path) == weights.unet.onnx_sha256
        assert encoder.onnx_path.is_file()


# --------------------------------------------------------------------------------- builder


def test_no_face_video_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _, xx = np.mgrid[0:144, 0:176]
    frames = [
        ((rng.integers(0, 256, (144, 176, 3)) // 2) + ((xx + 3 * i) % 128)[..., None]).astype(
            np.uint8
        )
        for i in range(25)
    ]
    video = tmp_path / "noface.mp4"
    _write_video(video, frames, 25.0)
    packages = tmp_path / "packages"
    (packages / "existing").mkdir(parents=True)
    before = sorted(p.relative_to(packages) for p in packages.rglob("*"))
    cmd = [
        sys.executable,
        "-m",
        "lipsync",
        "package",
        "build",
        "--video",
        str(video),
        "--audio",
        str(demo_speech_path()),
        "--name",
        "noface",
        "--packages-root",
        str(packages),
        "--model-repo-cpu",
        str(tmp_path / "cpu"),
        "--model-repo-gpu",
        str(tmp_path / "gpu"),
    ]
    env = dict(os.environ, COLUMNS="400")
    result = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "no face found in frames 0-24 of noface.mp4 (25 of 25 frames" in output
    assert sorted(p.relative_to(packages) for p in packages.rglob("*")) == before
    assert not (tmp_path / "cpu").exists() and not (tmp_path / "gpu").exists()


def test_bad_checkpoint_fails_after_detection_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "unet.pth"
    bad.write_bytes(b"not a checkpoint")
    packages = tmp_path / "packages"
    with pytest.raises(BuildError, match=r"cannot build package 'carphone'.*unet\.pth"):
        build_package(
            demo_video_path(),
            demo_speech_path(),
            "carphone",
            packages,
            checkpoint=bad,
            model_repo_cpu=tmp_path / "cpu",
            model_repo_gpu=tmp_path / "gpu",
            progress=False,
        )
    assert not packages.exists()  # not even the packages root it created
    assert not (tmp_path / "cpu").exists()


def test_existing_package_is_not_replaced_without_force(tmp_path: Path) -> None:
    (tmp_path / "alice").mkdir()
    with pytest.raises(BuildError, match="already exists"):
        build_package(demo_video_path(), demo_speech_path(), "alice", tmp_path)
    with pytest.raises(BuildError, match=r"avatar name '\.\./evil' is not usable"):
        build_package(demo_video_path(), demo_speech_path(), "../evil", tmp_path)
    with pytest.raises(BuildError, match="--fps must be 25"):
        build_package(demo_video_path(), demo_speech_path(), "bob", tmp_path, fps=30.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice"]


def test_video_resampling_picks_the_nearest_frame(tmp_path: Path) -> None:
    # 50 fps source whose frame k is uniformly grey at level 4k: at 25 fps frame j is source 2j
    frames = [np.full((48, 64, 3), 4 * k, dtype=np.uint8) for k in range(40)]
    video = tmp_path / "grey50.mp4"
    _write_video(video, frames, 50.0)
    decoded = decode_video(video, fps=25.0, progress=False)
    assert decoded.frames.shape == (20, 48, 64, 3) and decoded.source_frames == 40
    source, _ = _read_all(video)
    for j in range(20):
        np.testing.assert_array_equal(decoded.frames[j], source[2 * j])
    levels = decoded.frames.reshape(20, -1).mean(axis=1)
    assert np.all(np.diff(levels) > 3)  # distinct source frames, in order
    # 50 fps -> 125 fps repeats frames: j -> round(j * 50 / 125)
    slow = decode_video(video, fps=125.0, progress=False)
    assert len(slow.frames) == math.floor(40 * 125 / 50)
    assert [source_index(j, 29.97, 25) for j in range(6)] == [0, 1, 2, 4, 5, 6]


def test_video_rescale_keeps_aspect(tmp_path: Path) -> None:
    decoded = decode_video(demo_video_path(), height=288, progress=False)
    assert decoded.frames.shape == (100, 288, 352, 3)
    assert (decoded.source_width, decoded.source_height) == (176, 144)


def test_audio_conversion_to_16k_mono(tmp_path: Path) -> None:
    import librosa

    speech = load_wav_16k_mono(demo_speech_path())
    stereo = np.stack([librosa.resample(speech, orig_sr=16000, target_sr=44100)] * 2, axis=1)
    flac = tmp_path / "speech.flac"
    soundfile.write(flac, stereo, 44100)
    pcm, rate = read_audio_16k_mono(flac)
    assert rate == 44100 and pcm.dtype == np.int16
    assert abs(len(pcm) - len(speech)) <= 1
    n = min(len(pcm), len(speech))
    assert np.corrcoef(pcm[:n] / 32768.0, speech[:n])[0, 1] > 0.99


def test_landmark_model_ships_in_the_wheel() -> None:
    assert shape_predictor_path().stat().st_size > 90_000_000
    assert format_frame_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_build_with_checkpoints_records_them(tmp_path: Path, demo_package: AvatarPackage) -> None:
    """`--checkpoint` / `--audio-encoder` files are used (features differ from the untrained
    demo's) and recorded (trained, sha256) in the manifest; `verify` accepts the result."""
    import torch

    from export.checkpoint import load_audio_encoder, load_unet
    from lipsync.package import load_package, sha256_file

    unet, _ = load_unet(None, seed=3)
    encoder, _ = load_audio_encoder(None, seed=3)
    torch.save(unet.state_dict(), tmp_path / "unet.pth")
    torch.save(encoder.state_dict(), tmp_path / "encoder.pth")
    path = build_package(
        demo_video_path(),
        demo_speech_path(),
        "ckpt",
        tmp_path / "packages",
        checkpoint=tmp_path / "unet.pth",
        audio_encoder=tmp_path / "encoder.pth",
        model_repo_cpu=tmp_path / "cpu",
        model_repo_gpu=None,
        progress=False,
    ).path
    pkg = load_package(path)
    w = pkg.manifest.weights
    assert w.trained and w.unet.trained and w.audio_encoder.trained
    assert w.unet.sha256 == sha256_file(tmp_path / "unet.pth")
    assert w.audio_encoder.sha256 == sha256_file(tmp_path / "encoder.pth")
    served = served_version(tmp_path / "cpu", avatar_model_name("ckpt"))
    assert served is not None and w.unet.onnx_sha256 == sha256_file(served.onnx_path)
    assert not (tmp_path / "gpu").exists()
    assert pkg.features.shape == demo_package.features.shape
    assert not np.allclose(pkg.features, demo_package.features)
    np.testing.assert_array_equal(pkg.rects, demo_package.rects)  # same clip, same detector

    verify = [sys.executable, "-m", "lipsync", "package", "verify"]
    env = dict(os.environ, COLUMNS="400")
    ok = subprocess.run(
        [*verify, str(path)], cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=120
    )
    assert (
        ok.returncode == 0
        and "OK (format 1)" in ok.stdout + ok.stderr
        and "weights trained" in ok.stdout + ok.stderr
    )
    (path / "rects.npy").unlink()
    bad = subprocess.run(
        [*verify, str(path)], cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 1 and "rects.npy (rects) is missing" in bad.stdout + bad.stderr


# ------------------------------------------------------------------- publishing a build


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first second of the demo clip (30 frames at 29.97 fps): a fast build."""
    frames, fps = _read_all(demo_video_path())
    clip = tmp_path_factory.mktemp("clip") / "short.mp4"
    _write_video(clip, frames[:30], fps)
    return clip


def test_a_rebuild_replaces_the_package_in_one_step(
    short_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rebuilding an avatar swaps the package in atomically, holding the packages root's lock:
    a reader never finds it missing, and a leftover of a build that died in another container
    (where every process id is 1, so temporary names derived from it collide) is no obstacle."""
    import fcntl
    import threading
    import time

    import export.package_builder as builder

    packages = tmp_path / "packages"
    kwargs: dict[str, Any] = {"model_repo_cpu": tmp_path / "cpu", "model_repo_gpu": None, "progress": False}
    first = build_package(short_clip, demo_speech_path(), "atom", packages, **kwargs).path
    leftover = packages / f".atom.old.{os.getpid()}"
    (leftover / "junk").mkdir(parents=True)

    missing: list[float] = []  # times the watcher found no package
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not (first / MANIFEST_NAME).is_file():
                missing.append(time.monotonic())
            time.sleep(0.0002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    locked_while_publishing: list[bool] = []
    swap = getattr(builder, "replace_folder", None)

    def checked_swap(new: Path, dest: Path) -> None:
        with (packages / ".lock").open("a") as lock:  # another builder would wait here
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked_while_publishing.append(False)
            except BlockingIOError:
                locked_while_publishing.append(True)
        assert swap is not None
        swap(new, dest)

    try:
        if swap is not None:
            monkeypatch.setattr(builder, "replace_folder", checked_swap)
        again = build_package(
            short_clip, demo_speech_path(), "atom", packages, overwrite=True, **kwargs
        ).path
    finally:
        stop.set()
        watcher.join()
    assert again == first and (first / MANIFEST_NAME).is_file()
    assert not missing, f"the package was missing {len(missing)} times during the rebuild"
    assert locked_while_publishing == [True]
    assert sorted(p.name for p in packages.iterdir() if p.name.startswith(".atom.")) == [
        leftover.name
    ]


def test_a_build_with_another_audio_encoder_publishes_nothing(
    short_clip: Path, tmp_path: Path, untrained_onnx: UntrainedOnnx
) -> None:
    """The shared audio encoder is replaced only on request; a refused build publishes neither
    models nor package."""
    import torch

    from export.checkpoint import load_audio_encoder
    from export.model_repo import write_audio_encoder_model

    packages, cpu = tmp_path / "packages", tmp_path / "cpu"
    kwargs: dict[str, Any] = {"model_repo_cpu": cpu, "model_repo_gpu": None, "progress": False}
    write_audio_encoder_model(cpu, untrained_onnx.audio_encoder, "cpu")  # an earlier avatar's
    encoder, _ = load_audio_encoder(None, seed=3)
    torch.save(encoder.state_dict(), tmp_path / "encoder.pth")
    other = {"audio_encoder": tmp_path / "encoder.pth", **kwargs}
    with pytest.raises(BuildError, match="already serves an audio_encoder with other weights"):
        build_package(short_clip, demo_speech_path(), "second", packages, **other)
    assert not (packages / "second").exists()
    assert served_version(cpu, avatar_model_name("second")) is None
    assert served_version_number(cpu, AUDIO_ENCODER_MODEL) == 1

    build_package(
        short_clip, demo_speech_path(), "second", packages, replace_audio_encoder=True, **other
    )
    assert (packages / "second" / MANIFEST_NAME).is_file()
    assert served_version_number(cpu, AUDIO_ENCODER_MODEL) == 2
