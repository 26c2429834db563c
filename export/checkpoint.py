"""Loading SyncTalk_2D checkpoints into `UNet328` / `AudioEncoder`, or a seeded untrained init.

Checkpoints are accepted as users have them (docs/REFERENCE.md section 1): a plain state dict, one
nested under `state_dict` or `model`, keys prefixed `module.` (DataParallel) or `_orig_mod.`
(torch.compile). The audio encoder also accepts SyncTalk_2D's `audio_visual_encoder.pth`, whose
keys lack the `audio_encoder.` prefix. Loading is strict: any missing, unexpected or mis-shaped
key raises `CheckpointError`, which for a UNet also names the audio mode the checkpoint fits.

Note: `ave` and `hubert` checkpoints have identical keys and shapes (the branches differ only in
`audio_model.conv3`'s stride), so a state dict cannot tell them apart; `--mode` decides. A
`wenet` checkpoint differs in shape and is recognised.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.models.audio_encoder import AudioEncoder
from export.models.unet import AUDIO_BRANCH_SHAPES, UNet328
from lipsync.contract import AUDIO_MODES, INNER_SIZE, MEL_BANDS, MEL_WINDOW, AudioMode
from lipsync.package import sha256_file

logger = logging.getLogger(__name__)

_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_NESTING_KEYS = ("state_dict", "model", "model_state_dict", "net")
_MAX_LISTED = 5
_CALIBRATION_BATCH = 2


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says precisely why."""


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from.

    trained: False for the seeded random initialisation (no checkpoint).
    source: the checkpoint's absolute path, or `random-init(seed=S)`.
    sha256: hex SHA-256 of the checkpoint file; None for the random initialisation.
    """

    trained: bool
    source: str
    sha256: str | None


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict (tensors on CPU, prefixes stripped).

    Uses `torch.load(weights_only=True)`: no arbitrary code runs from the file.
    Raises CheckpointError if the file is missing, unreadable, or holds no state dict.
    """
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist or is not a file")
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {checkpoint} with torch.load(weights_only=True): {exc}"
        ) from exc
    return extract_state_dict(obj, source=str(checkpoint))


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict in a loaded checkpoint object and strip `module.`/`_orig_mod.` prefixes.

    Accepts a mapping of tensors, or a mapping holding one under `state_dict`, `model`,
    `model_state_dict` or `net` (searched recursively). Non-tensor entries of a plain state dict
    are an error. Raises CheckpointError naming `source` when no state dict is found.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a mapping of tensors), got {type(obj).__name__}"
        )
    for key in _NESTING_KEYS:
        nested = obj.get(key)
        if isinstance(nested, Mapping):
            return extract_state_dict(nested, source=f"{source}[{key!r}]")
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors or not obj:
        raise CheckpointError(
            f"{source}: not a state dict: {len(non_tensors)} of {len(obj)} entries are not tensors "
            f"(e.g. {_preview(non_tensors)}), and none of {_NESTING_KEYS} holds one"
        )
    return {_strip_prefixes(str(k)): v for k, v in obj.items()}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def _preview(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... (+{more} more)" if more > 0 else "")


def _shape_table(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _mode_shapes(mode: AudioMode) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _shape_table(UNet328(mode))


def _mismatch(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Return (missing keys, unexpected keys, 'key: checkpoint [..] vs model [..]' lines)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    return missing, unexpected, shapes


def _describe(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_preview(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({_preview(shapes)})")
    return "; ".join(parts)


def fitting_modes(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The UNet audio modes whose key names and shapes equal the state dict's exactly."""
    return [m for m in AUDIO_MODES if not any(_mismatch(_mode_shapes(m), state))]


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, hint: str) -> None:
    missing, unexpected, shapes = _mismatch(_shape_table(model), state)
    if missing or unexpected or shapes:
        lead = f"{what}. {hint}" if hint else f"{what}."
        raise CheckpointError(f"{lead} Differences: {_describe(missing, unexpected, shapes)}.")
    model.load_state_dict(state, strict=True)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module, *inputs: torch.Tensor) -> None:
    """Set every BatchNorm's running mean/var to the batch statistics of `inputs`.

    A fresh BatchNorm has running mean 0 / var 1, which in eval mode makes a randomly
    initialised deep net's activations drift towards 0 or saturation; with the statistics of
    one forward pass each layer's output is normalised, so the untrained network draws
    full-range noise (as an untrained net does) instead of a flat grey. This does not make the
    weights "trained" in any sense.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the stats exactly
    model.train()
    model(*inputs)
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


def _untrained_warning(what: str, seed: int, effect: str) -> None:
    logger.warning(
        "UNTRAINED WEIGHTS: no checkpoint given, %s is randomly initialised (seed %d, "
        "BatchNorm statistics from one synthetic batch). It runs the whole pipeline but %s. "
        "Pass --checkpoint with a trained SyncTalk_2D checkpoint for real lip-sync.",
        what,
        seed,
        effect,
    )


def load_unet(
    checkpoint: Path | None, mode: AudioMode = "ave", seed: int = 0
) -> tuple[UNet328, WeightsInfo]:
    """Build `UNet328(mode)` in eval mode with the checkpoint's weights, or seeded random ones.

    checkpoint: a SyncTalk_2D UNet checkpoint (see module doc for accepted layouts), or None
    for the untrained seeded initialisation (logged as WARNING, `WeightsInfo.trained=False`).
    Raises CheckpointError when the file cannot be read or its keys/shapes differ from the
    model's; the message lists missing, unexpected and mis-shaped keys and the mode that fits.
    Raises ValueError for an unknown mode.
    """
    if mode not in AUDIO_MODES:
        raise ValueError(f"unknown audio mode {mode!r}; expected one of {AUDIO_MODES}")
    if checkpoint is None:
        with _seeded(seed):
            model = UNet328(mode)
            image = torch.rand(_CALIBRATION_BATCH, 6, INNER_SIZE, INNER_SIZE)
            audio = torch.randn(_CALIBRATION_BATCH, *AUDIO_BRANCH_SHAPES[mode])
            _calibrate_batchnorm(model, image, audio)
        _untrained_warning(f"UNet328(mode={mode!r})", seed, "draws noise in the mouth box")
        return model.eval(), WeightsInfo(False, f"random-init(seed={seed})", None)

    checkpoint = checkpoint.resolve()
    state = read_state_dict(checkpoint)
    model = UNet328(mode)
    _load_strict(
        model,
        state,
        f"checkpoint {checkpoint} does not fit UNet328(mode={mode!r})",
        _mode_hint(state),
    )
    logger.info("loaded UNet328(mode=%r) from %s", mode, checkpoint)
    return model.eval(), WeightsInfo(True, str(checkpoint), sha256_file(checkpoint))


def _mode_hint(state: Mapping[str, torch.Tensor]) -> str:
    """The sentence naming the mode(s) a mis-fitting UNet checkpoint would fit."""
    fits = fitting_modes(state)
    if not fits:
        return "It fits none of the modes " + ", ".join(AUDIO_MODES) + " (not a unet_328 checkpoint?)."
    if len(fits) == 1:
        return f"It fits mode {fits[0]!r}: pass --mode {fits[0]}."
    return (
        "It fits modes " + " or ".join(repr(m) for m in fits) + " (their keys and shapes are "
        "identical; they differ only in audio_model.conv3's stride, which a state dict does not "
        "record): pass --mode with the audio features the checkpoint was trained on."
    )


def load_audio_encoder(checkpoint: Path | None, seed: int = 0) -> tuple[AudioEncoder, WeightsInfo]:
    """Build `AudioEncoder` in eval mode with the checkpoint's weights, or seeded random ones.

    Accepts the layouts of `load_unet`, plus SyncTalk_2D's `audio_visual_encoder.pth` whose keys
    lack the `audio_encoder.` prefix. Raises CheckpointError on unreadable files and on any
    key/shape mismatch (listing them).
    """
    if checkpoint is None:
        with _seeded(seed):
            model = AudioEncoder()
            mel = torch.rand(8 * _CALIBRATION_BATCH, 1, MEL_BANDS, MEL_WINDOW) * 8.0 - 4.0
            _calibrate_batchnorm(model, mel)
        _untrained_warning("AudioEncoder", seed, "its features carry no speech information")
        return model.eval(), WeightsInfo(False, f"random-init(seed={seed})", None)

    checkpoint = checkpoint.resolve()
    state = read_state_dict(checkpoint)
    prefix = "audio_encoder."
    if not any(k.startswith(prefix) for k in state):
        state = {prefix + k: v for k, v in state.items()}
    model = AudioEncoder()
    _load_strict(model, state, f"checkpoint {checkpoint} does not fit AudioEncoder", "")
    logger.info("loaded AudioEncoder from %s", checkpoint)
    return model.eval(), WeightsInfo(True, str(checkpoint), sha256_file(checkpoint))
