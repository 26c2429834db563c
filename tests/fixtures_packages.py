"""Avatar-package fixtures.

- `demo_package` (session): builds `packages/demo` once from the real demo media (or reuses a
  valid one) together with its models in the generated CPU/GPU model repositories, and returns
  the loaded `AvatarPackage`.
- `make_package` (function): a factory writing a small synthetic but valid package with the
  same writer the builder uses (`lipsync.package.write_package`), for tests that need a package
  without the demo build. Its audio is one second of real LibriVox speech.
- `served_version_number(repo, model)`: the version Triton would serve (the test fails if none).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from export.model_repo import served_version
from lipsync.audio import feature_rows_for_samples, float_to_pcm16, load_wav_16k_mono
from lipsync.contract import FEATURE_DIM
from lipsync.package import (
    AvatarPackage,
    SourceMedia,
    WeightsManifest,
    WeightsSource,
    load_package,
    write_package,
)
from lipsync.paths import SPEECH_DIR

MakePackage = Callable[..., Path]


def served_version_number(repo: Path, model: str) -> int:
    """The version of `model` Triton would serve from `repo`; fails the test when there is none."""
    served = served_version(repo, model)
    assert served is not None, f"{repo} serves no version of {model}"
    return served.version


def _speech_pcm16(seconds: float) -> NDArray[np.int16]:
    wavs = sorted(SPEECH_DIR.glob("*.wav"))
    if not wavs:
        pytest.skip(f"no speech WAVs in {SPEECH_DIR} (install pocketsphinx-testdata)")
    return float_to_pcm16(load_wav_16k_mono(wavs[0])[: int(seconds * 16000)])


def synthetic_package_arrays(
    n_frames: int = 10, width: int = 64, height: int = 48, audio_seconds: float = 1.0, seed: int = 0
) -> dict[str, Any]:
    """Arrays for a valid small package: gradient frames, a centred square rectangle, landmarks
    on that square, random features with the row count the audio length implies."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    for i in range(n_frames):
        frames[i, ..., 0] = (xx * 255 // max(1, width - 1) + i) % 256
        frames[i, ..., 1] = yy * 255 // max(1, height - 1)
        frames[i, ..., 2] = (7 * i) % 256
    side = min(width, height) // 2
    x1, y1 = (width - side) // 2, (height - side) // 2
    rects = np.tile(np.array([x1, y1, x1 + side, y1 + side], dtype=np.int32), (n_frames, 1))
    landmarks = (rng.uniform(0, 1, size=(n_frames, 68, 2)) * side + np.array([x1, y1])).astype(
        np.float32
    )
    audio = _speech_pcm16(audio_seconds)
    rows = feature_rows_for_samples(audio.size)
    features = rng.standard_normal((rows, FEATURE_DIM)).astype(np.float32)
    return {
        "frames": frames,
        "rects": rects,
        "landmarks": landmarks,
        "features": features,
        "audio_pcm16": audio,
    }


def untrained_weights() -> WeightsManifest:
    """A weights record for seeded random (untrained) networks."""
    return WeightsManifest(
        trained=False,
        unet=WeightsSource(trained=False, source="untrained (seed 0)", onnx_sha256="0" * 64),
        audio_encoder=WeightsSource(
            trained=False, source="untrained (seed 0)", onnx_sha256="1" * 64
        ),
    )


@pytest.fixture
def make_package(tmp_path: Path) -> MakePackage:
    """Factory: `make_package(name="synthetic", **array_overrides) -> Path` of a valid package
    written under `tmp_path/packages/<name>`."""

    def make(name: str = "synthetic", root: Path | None = None, **overrides: Any) -> Path:
        arrays = synthetic_package_arrays()
        arrays.update(overrides)
        folder = (root or tmp_path / "packages") / name
        n, h, w = arrays["frames"].shape[:3]
        write_package(
            folder,
            name=name,
            weights=untrained_weights(),
            source=SourceMedia(
                video="synthetic gradient",
                audio="LibriVox speech (1 s)",
                video_fps=25.0,
                video_frames=n,
                video_width=w,
                video_height=h,
                audio_sample_rate=16000,
            ),
            **arrays,
        )
        return folder

    return make


@pytest.fixture(scope="session")
def demo_package() -> AvatarPackage:
    """The demo avatar (`packages/demo`), built on first use with its Triton models."""
    from export.demo import ensure_demo

    return load_package(ensure_demo())
