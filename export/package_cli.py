"""`lipsync package ...`: build, demo, verify avatar packages.

- `lipsync package build --video V --audio A --name NAME [--checkpoint UNET.pth]
  [--audio-encoder ENC.pth] [--fps 25] [--height H] [--packages-root DIR] [--force]
  [--replace-audio-encoder]`
- `lipsync package demo [--force] [--checkpoint UNET.pth] [--audio-encoder ENC.pth]
  [--replace-audio-encoder]`
- `lipsync package verify PATH`

Registering imports neither torch nor onnx; the command functions do. Exit status 0 on
success, 1 on a failed build or an invalid package (the reason is logged), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from export.cli import add_replace_audio_encoder
from lipsync.contract import VIDEO_FPS
from lipsync.paths import MODEL_REPOSITORY_CPU, MODEL_REPOSITORY_GPU, PACKAGES_DIR

if TYPE_CHECKING:
    from lipsync.cli import Subparsers

logger = logging.getLogger(__name__)


def register(subparsers: Subparsers) -> None:
    """Add the `lipsync package` command group to the top-level `subparsers`."""
    parser = subparsers.add_parser("package", help="avatar packages: build, demo, verify")
    sub = parser.add_subparsers(dest="package_command", metavar="WHAT", required=True)

    build = sub.add_parser("build", help="build a package from a video and a speech recording")
    build.add_argument(
        "--video", type=Path, required=True, help="talking-face video (every frame shows the face)"
    )
    build.add_argument(
        "--audio",
        type=Path,
        required=True,
        help="speech (WAV/FLAC/OGG/MP3, any rate; -> 16 kHz mono)",
    )
    build.add_argument(
        "--name", required=True, help="avatar name (letters, digits, _ and -); model lipsync_NAME"
    )
    _add_weights(build)
    build.add_argument(
        "--fps",
        type=float,
        default=float(VIDEO_FPS),
        help=(
            f"output frame rate; must be {VIDEO_FPS}, the rate the audio features are defined "
            f"at (default {VIDEO_FPS})"
        ),
    )
    build.add_argument(
        "--height", type=int, default=None, help="rescale frames to this height in px (aspect kept)"
    )
    build.add_argument(
        "--force", action="store_true", help="replace an existing package of that name"
    )
    _add_locations(build)
    build.set_defaults(func=_cmd_build)

    demo = sub.add_parser(
        "demo", help="build packages/demo from the bundled real media (carphone + LibriVox)"
    )
    demo.add_argument("--force", action="store_true", help="rebuild even if a valid demo exists")
    _add_weights(demo)
    _add_locations(demo)
    demo.set_defaults(func=_cmd_demo)

    verify = sub.add_parser("verify", help="load and validate a package, print a summary")
    verify.add_argument("path", type=Path, help="package folder")
    verify.set_defaults(func=_cmd_verify)


def _add_weights(parser: argparse.ArgumentParser) -> None:
    """`--checkpoint`, `--audio-encoder` and `--replace-audio-encoder`."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="trained SyncTalk_2D UNet checkpoint (.pth, ave mode); omitted -> UNTRAINED weights",
    )
    parser.add_argument(
        "--audio-encoder",
        type=Path,
        default=None,
        help="trained AVE audio-encoder checkpoint (.pth); omitted -> UNTRAINED weights",
    )
    add_replace_audio_encoder(parser)


def _add_locations(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--packages-root", type=Path, default=PACKAGES_DIR, help=f"default {PACKAGES_DIR}"
    )
    parser.add_argument(
        "--model-repo-cpu",
        type=Path,
        default=MODEL_REPOSITORY_CPU,
        help=f"default {MODEL_REPOSITORY_CPU}",
    )
    parser.add_argument(
        "--model-repo-gpu",
        type=Path,
        default=MODEL_REPOSITORY_GPU,
        help=f"default {MODEL_REPOSITORY_GPU}",
    )


def _cmd_build(args: argparse.Namespace) -> int:
    from export.package_builder import BuildError, build_package

    try:
        build_package(
            args.video,
            args.audio,
            args.name,
            args.packages_root,
            checkpoint=args.checkpoint,
            audio_encoder=args.audio_encoder,
            fps=args.fps,
            height=args.height,
            model_repo_cpu=args.model_repo_cpu,
            model_repo_gpu=args.model_repo_gpu,
            overwrite=args.force,
            replace_audio_encoder=args.replace_audio_encoder,
        )
    except BuildError as exc:
        logger.error("%s", exc)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from export.demo import DemoMediaError, ensure_demo
    from export.package_builder import BuildError

    try:
        path = ensure_demo(
            args.packages_root,
            args.model_repo_cpu,
            args.model_repo_gpu,
            force=args.force,
            checkpoint=args.checkpoint,
            audio_encoder=args.audio_encoder,
            replace_audio_encoder=args.replace_audio_encoder,
        )
    except (BuildError, DemoMediaError) as exc:
        logger.error("%s", exc)
        return 1
    logger.info("demo avatar ready: %s", path)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from lipsync.package import PackageError, load_package

    try:
        pkg = load_package(args.path)
    except PackageError as exc:
        logger.error("invalid package: %s", exc)
        return 1
    m = pkg.manifest
    sides = pkg.rects[:, 2] - pkg.rects[:, 0]
    w = m.weights
    logger.info(
        "package %s OK (format %d): %d video frames %dx%d, %d servable frames (%.2f s at %g fps), "
        "face %d-%d px, model %s, weights %s (UNet: %s; audio encoder: %s), built %s by %s",
        pkg.root,
        m.format_version,
        m.frame_count,
        m.width,
        m.height,
        m.feature_rows,
        m.duration_s,
        m.fps,
        int(sides.min()),
        int(sides.max()),
        m.model_name,
        "trained" if w.trained else "UNTRAINED",
        w.unet.source,
        w.audio_encoder.source,
        m.created_at.isoformat(),
        m.builder,
    )
    return 0
