"""`lipsync export ...`: ONNX export and the Triton model repository.

- `lipsync export unet [--checkpoint CKPT] --output OUT.onnx [--mode ave] [--opset 17] [--seed 0]`
- `lipsync export audio-encoder [--checkpoint CKPT] --output OUT.onnx [--opset 17] [--seed 0]`
- `lipsync export model-repo --avatar NAME --onnx UNET.onnx [--audio-encoder-onnx ENC.onnx]
  [--profile cpu|gpu|both] [--repo DIR] [--replace-audio-encoder]`

Registering parsers imports neither torch, onnx nor tritonclient; the command functions do.
Exit status 0 on success, 1 on a failed parity check, 2 on bad input (the reason is logged).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from lipsync import paths
from lipsync.contract import AUDIO_MODES

if TYPE_CHECKING:  # imported for annotations only: registering must not import torch/onnx
    from export.model_repo import Profile
    from export.onnx_export import ExportResult
    from lipsync.cli import Subparsers

logger = logging.getLogger(__name__)

def register(subparsers: Subparsers) -> None:
    """Add `lipsync export unet | audio-encoder | model-repo`."""
    export_parser = subparsers.add_parser(
        "export", help="offline side: ONNX export, Triton model repository"
    )
    export_sub = export_parser.add_subparsers(
        dest="export_command", metavar="WHAT", required=True
    )
    _register_unet(export_sub)
    _register_audio_encoder(export_sub)
    _register_model_repo(export_sub)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="SyncTalk_2D checkpoint (.pth); omitted -> seeded UNTRAINED weights (warned)",
    )
    parser.add_argument("--output", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the untrained init (default 0)"
    )


def _register_unet(export_sub: Subparsers) -> None:
    parser = export_sub.add_parser(
        "unet",
        help="export the unet_328 with pre/post-processing in the graph (uint8 in, uint8 out)",
    )
    _add_common(parser)
    parser.add_argument(
        "--mode", choices=AUDIO_MODES, default="ave", help="audio features (default ave)"
    )
    parser.add_argument(
        "--no-parity", action="store_true", help="skip the ONNX Runtime vs PyTorch smoke check"
    )
    parser.set_defaults(func=_cmd_unet)


def _register_audio_encoder(export_sub: Subparsers) -> None:
    parser = export_sub.add_parser(
        "audio-encoder", help="export the AVE audio encoder (mel [N,80,16] -> feature [N,512])"
    )
    _add_common(parser)
    parser.set_defaults(func=_cmd_audio_encoder)


def _register_model_repo(export_sub: Subparsers) -> None:
    parser = export_sub.add_parser(
        "model-repo",
        help="write an avatar's UNet (and the audio encoder) into the Triton model repositories",
        description=(
            "Publish a new version of the avatar's UNet as lipsync_<avatar> (config.pbtxt + "
            "ONNX, plus model.py for the CPU profile), and optionally of the audio encoder as "
            "audio_encoder, in Triton model repositories (model_repository/README.md). "
            "Defaults: model_repository/cpu and model_repository/gpu."
        ),
    )
    parser.add_argument(
        "--avatar", required=True, help="avatar name; the model is lipsync_<avatar>"
    )
    parser.add_argument("--onnx", required=True, type=Path, help="the UNet exported to ONNX")
    parser.add_argument(
        "--audio-encoder-onnx", type=Path, default=None, help="the audio encoder exported to ONNX"
    )
    parser.add_argument("--profile", choices=("cpu", "gpu", "both"), default="both")
    parser.add_argument(
        "--repo",
        type=Path,
        default=None,
        help=(
            "model repository for a single profile; with --profile both, the folder that gets "
            "cpu/ and gpu/ (default: model_repository/cpu and model_repository/gpu)"
        ),
    )
    add_replace_audio_encoder(parser)
    parser.set_defaults(func=_cmd_model_repo)


def add_replace_audio_encoder(parser: argparse.ArgumentParser) -> None:
    """The `--replace-audio-encoder` flag (also on `lipsync package build / demo`)."""
    parser.add_argument(
        "--replace-audio-encoder",
        action="store_true",
        help=(
            "replace a repository's audio_encoder of other weights; every avatar's live-audio "
            "features come from it (default: refuse)"
        ),
    )


def _summary(rows: list[tuple[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("item", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _weights_rows(result: ExportResult) -> list[tuple[str, str]]:
    size_mib = result.path.stat().st_size / 2**20
    return [
        ("path", str(result.path)),
        ("size", f"{size_mib:.1f} MiB"),
        ("mode", result.mode),
        ("opset", str(result.opset)),
        ("weights", "trained" if result.weights.trained else "UNTRAINED (seeded random init)"),
        ("source", result.weights.source),
        ("checkpoint sha256", result.weights.sha256 or "-"),
    ]


def _cmd_unet(args: argparse.Namespace) -> int:
    from export.checkpoint import CheckpointError, load_unet
    from export.onnx_export import check_unet_parity, example_unet_inputs, export_unet_module

    try:
        unet, weights = load_unet(args.checkpoint, mode=args.mode, seed=args.seed)
        result = export_unet_module(unet, weights, args.output, opset=args.opset)
    except (CheckpointError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    rows = _weights_rows(result)
    status = 0
    if not args.no_parity:
        crop, audio = example_unet_inputs(args.mode, batch=2, seed=1)
        report = check_unet_parity(unet, result.path, crop, audio)
        verdict = "ok" if report.ok else "FAILED"
        rows.append(
            (
                "parity (ORT vs PyTorch)",
                f"{verdict}: max {report.max_abs_lsb} LSB, "
                f"{100 * report.fraction_within_1:.3f}% within 1 LSB of {report.values} values",
            )
        )
        status = 0 if report.ok else 1
    _summary(rows, "UNet exported")
    return status


def _cmd_audio_encoder(args: argparse.Namespace) -> int:
    from export.checkpoint import CheckpointError
    from export.onnx_export import export_audio_encoder

    try:
        result = export_audio_encoder(
            args.checkpoint, args.output, opset=args.opset, seed=args.seed
        )
    except (CheckpointError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    _summary(_weights_rows(result), "Audio encoder exported")
    return 0


def _repo_for(profile: Profile, repo: Path | None, both: bool) -> Path:
    if repo is None:
        return paths.MODEL_REPOSITORY_CPU if profile == "cpu" else paths.MODEL_REPOSITORY_GPU
    return repo / profile if both else repo


def _cmd_model_repo(args: argparse.Namespace) -> int:
    from export.model_repo import write_audio_encoder_model, write_avatar_model
    from lipsync.contract import avatar_model_name

    profiles: list[Profile] = ["cpu", "gpu"] if args.profile == "both" else [args.profile]
    try:
        name = avatar_model_name(args.avatar)
        for profile in profiles:
            repo = _repo_for(profile, args.repo, args.profile == "both")
            if args.audio_encoder_onnx is not None:
                written = write_audio_encoder_model(
                    repo, args.audio_encoder_onnx, profile, replace=args.replace_audio_encoder
                )
                logger.info("%s profile: %s", profile, written.version_dir)
            written = write_avatar_model(repo, name, args.onnx, profile)
            logger.info("%s profile: %s", profile, written.version_dir)
    except ValueError as exc:  # ModelRepoError, or an unusable avatar name
        logger.error("%s", exc)
        return 2
    return 0
