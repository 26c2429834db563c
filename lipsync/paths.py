"""Well-known locations in the repository and in installed wheels.

Every default path used by the CLI, the tests and the gateway comes from here, so a reader
finds them in one place. All paths are absolute.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
"""The repository root (the folder holding `pyproject.toml`)."""

PACKAGES_DIR: Path = Path(os.environ.get("LIPSYNC_PACKAGES_DIR", REPO_ROOT / "packages"))
"""Root of the avatar packages; the demo avatar is `PACKAGES_DIR / "demo"`."""

MODEL_REPOSITORY_DIR: Path = REPO_ROOT / "model_repository"
"""The committed Python-backend model (`python_onnx/`) lives here, the generated repositories
below it."""

MODEL_REPOSITORY_CPU: Path = Path(
    os.environ.get("LIPSYNC_MODEL_REPOSITORY", MODEL_REPOSITORY_DIR / "cpu")
)
"""Generated CPU-profile model repository (Python backend + ONNX Runtime), git-ignored."""

MODEL_REPOSITORY_GPU: Path = MODEL_REPOSITORY_DIR / "gpu"
"""Generated GPU-profile model repository (onnxruntime backend + TensorRT FP16), git-ignored."""

CACHE_DIR: Path = Path(os.environ.get("LIPSYNC_CACHE_DIR", REPO_ROOT / ".cache"))
"""Scratch space for generated artefacts (ONNX files, Triton backend folder), git-ignored."""

REFERENCE_DIR: Path = REPO_ROOT / "tests" / "data" / "reference"
"""State-dict key listings (key, shape, dtype) of real SyncTalk_2D checkpoints, one
`<model>.state_dict.tsv` per model (docs/REFERENCE.md s.1, s.4)."""

SPEECH_DIR: Path = Path("/usr/share/pocketsphinx/test/data/librivox")
"""Public-domain LibriVox speech (16 kHz mono WAV) from Debian's `pocketsphinx-testdata`."""
