"""ONNX export of the UNet and the audio encoder, pre/post-processing inside the graph.

The graphs honour the model contract, `lipsync.contract` (names, dtypes, per-item dims; the first
axis is the dynamic batch axis `batch`): the UNet takes `UNET_CROP` (the BGR inner crop, uint8
HWC) and `UNET_AUDIO` and gives `UNET_PRED`, doing docs/REFERENCE.md section 2 steps 3-7 itself; the
audio encoder takes `ENCODER_MEL` and gives `ENCODER_FEATURE`. A UNet of another audio mode than
`ave` takes its own window width D (`export.models.unet.AUDIO_WINDOW_SHAPES`: 2048 for hubert,
2 x 1024 per frame; 8192 for wenet, 16 x 512 per frame); the window is reshaped row-major to the
branch's `AUDIO_BRANCH_SHAPES[mode]` exactly as SyncTalk_2D's `inference_328.py` reshapes it
(only the element count and row-major order matter; SyncTalk_2D runs wenet avatars at 20 fps,
ave/hubert at 25 fps). `pred` is `uint8(y * 255)` by truncation of the sigmoid y.

Each file carries `metadata_props`: `lipsync.kind`, `lipsync.mode`, `lipsync.trained`,
`lipsync.checkpoint_source`, `lipsync.checkpoint_sha256`, `lipsync.opset`.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn
from torch.jit._trace import TracerWarning  # its home; torch.jit re-exports it without __all__

from export.checkpoint import WeightsInfo, load_audio_encoder, load_unet
from export.models.audio_encoder import AudioEncoder
from export.models.unet import AUDIO_BRANCH_SHAPES, AUDIO_WINDOW_SHAPES, UNet328
from lipsync.contract import (
    ENCODER_FEATURE,
    ENCODER_MEL,
    INNER_SIZE,
    UNET_AUDIO,
    UNET_CROP,
    UNET_PRED,
    AudioMode,
    TensorSpec,
)
from lipsync.frames import MASK_X0, MASK_X1, MASK_Y0, MASK_Y1

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 17
BATCH_AXIS = "batch"

METADATA_PREFIX = "lipsync."


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the ONNX file, where its weights came from, the audio mode
    (`ave`/`hubert`/`wenet`, or `audio_encoder`) and the opset."""

    path: Path
    weights: WeightsInfo
    mode: str
    opset: int


def mouth_mask() -> torch.Tensor:
    """f32[1, 320, 320, 1]: 1 outside, 0 inside the rectangle x 5..314, y 5..309 (inclusive),
    i.e. what `cv2.rectangle(img, (5, 5, 310, 305), (0, 0, 0), -1)` blacks out; the bounds are
    `lipsync.frames.MASK_*`, the ones `lipsync.frames.mask_inner` applies in numpy."""
    mask = torch.ones(1, INNER_SIZE, INNER_SIZE, 1, dtype=torch.float32)
    mask[:, MASK_Y0 : MASK_Y1 + 1, MASK_X0 : MASK_X1 + 1, :] = 0.0
    return mask


class UnetWithPrePost(nn.Module):
    """UNet328 with docs/REFERENCE.md section 2 steps 3-7 around it (usable eagerly and for export).

    forward(crop: u8[N, 320, 320, 3] BGR, audio: f32[N, 16, D]) -> u8[N, 320, 320, 3] BGR:
    x = crop / 255; masked = x with the mouth rectangle set to 0; network input
    [x, masked] on channels (6, NCHW); audio reshaped row-major to the branch shape;
    output floor(sigmoid * 255) as uint8 (the reference's truncating `uint8(y * 255)`), NHWC.
    """

    mask: torch.Tensor  # buffer f32[1, 320, 320, 1] (`mouth_mask`)

    def __init__(self, unet: UNet328) -> None:
        super().__init__()
        self.unet = unet
        self.audio_shape: tuple[int, int, int] = AUDIO_BRANCH_SHAPES[unet.mode]
        self.register_buffer("mask", mouth_mask(), persistent=False)

    def forward(self, crop: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """crop: u8[N, 320, 320, 3] BGR; audio: f32[N, 16, D] -> pred u8[N, 320, 320, 3] BGR
        (see the class docstring for the steps)."""
        x = crop.to(torch.float32) / 255.0
        masked = x * self.mask
        image = torch.cat([x, masked], dim=3).permute(0, 3, 1, 2)
        window = audio.reshape(-1, *self.audio_shape)
        y = self.unet(image, window)
        pred = torch.floor(y * 255.0).to(torch.uint8)
        return pred.permute(0, 2, 3, 1)


class AudioEncoderWithPre(nn.Module):
    """AudioEncoder taking f32[N, 80, 16] mel windows (adds the channel axis) -> f32[N, 512]."""

    def __init__(self, encoder: AudioEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: f32[N, 80, 16] -> feature f32[N, 512]."""
        return self.encoder(mel.unsqueeze(1))


def example_unet_inputs(
    mode: AudioMode = "ave", batch: int = 2, seed: int = 0
) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """Seeded example inputs: crop u8[batch, 320, 320, 3] and audio f32[batch, 16, D].

    The crop is a smooth gradient with noise (image-like, every byte value present), the audio
    window standard-normal; used for tracing and parity smoke checks.
    """
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 255.0, INNER_SIZE, dtype=np.float32)
    base = (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2.0
    noisy = base + rng.normal(0.0, 40.0, size=(batch, INNER_SIZE, INNER_SIZE, 3))
    crop = np.clip(noisy, 0, 255).astype(np.uint8)
    audio = rng.standard_normal((batch, *AUDIO_WINDOW_SHAPES[mode])).astype(np.float32)
    return crop, audio


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the export needs opset >= {MIN_OPSET}")


def _torch_export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    output: Path,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    opset: int,
) -> None:
    input_names = [t.name for t in inputs]
    output_names = [t.name for t in outputs]
    dynamic = {name: {0: BATCH_AXIS} for name in [*input_names, *output_names]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=TracerWarning)
        torch.onnx.export(
            module,
            args,
            str(output),
            dynamo=False,  # TorchScript exporter: no onnxscript dependency, single-file output
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )


def _write_metadata(path: Path, kind: str, mode: str, weights: WeightsInfo, opset: int) -> None:
    model = onnx.load(str(path))
    props = {
        "kind": kind,
        "mode": mode,
        "trained": "true" if weights.trained else "false",
        "checkpoint_source": weights.source,
        "checkpoint_sha256": weights.sha256 or "",
        "opset": str(opset),
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    model.producer_name = "lipsync-serving"
    model.doc_string = (
        f"lipsync {kind} (mode {mode}); weights "
        f"{'TRAINED' if weights.trained else 'UNTRAINED (seeded random init)'} from {weights.source}"
    )
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _write_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    output: Path,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    opset: int,
    meta: tuple[str, str, WeightsInfo],
) -> None:
    """Export, stamp metadata and check into a temporary file beside `output`, then rename it
    over `output`: readers (Triton, the package builder) never see a half-written model."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    os.close(fd)
    partial = Path(name)
    try:
        _torch_export(module, args, partial, inputs, outputs, opset)
        kind, mode, weights = meta
        _write_metadata(partial, kind, mode, weights, opset)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The `lipsync.*` metadata_props of an exported ONNX file, prefix removed
    (kind, mode, trained, checkpoint_source, checkpoint_sha256, opset)."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key[len(METADATA_PREFIX) :]: p.value
        for p in model.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


def export_unet_module(
    unet: UNet328, weights: WeightsInfo, output: Path, opset: int = DEFAULT_OPSET
) -> ExportResult:
    """Export an already-built UNet328 (eval mode) wrapped in `UnetWithPrePost` to `output`.

    Raises ValueError for opset < 17; onnx.checker.ValidationError if the graph is invalid.
    """
    _check_opset(opset)
    wrapper = UnetWithPrePost(unet.eval()).eval()
    crop, audio = example_unet_inputs(unet.mode, batch=2)
    _write_onnx(
        wrapper,
        (torch.from_numpy(crop), torch.from_numpy(audio)),
        output,
        (UNET_CROP, UNET_AUDIO),
        (UNET_PRED,),
        opset,
        ("unet", unet.mode, weights),
    )
    logger.info("exported UNet328(mode=%s) to %s (opset %d)", unet.mode, output, opset)
    return ExportResult(path=output, weights=weights, mode=unet.mode, opset=opset)


def export_unet(
    checkpoint: Path | None,
    output: Path,
    mode: AudioMode = "ave",
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> ExportResult:
    """Load a UNet checkpoint (or the seeded untrained init when None) and export it to ONNX.

    Graph: `crop` u8[N,320,320,3] + `audio` f32[N,16,D] -> `pred` u8[N,320,320,3] (module doc).
    Raises export.checkpoint.CheckpointError for a bad or mis-fitting checkpoint, ValueError
    for an unknown mode or opset < 17.
    """
    _check_opset(opset)
    unet, weights = load_unet(checkpoint, mode=mode, seed=seed)
    return export_unet_module(unet, weights, output, opset)


def export_audio_encoder(
    checkpoint: Path | None,
    output: Path,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> ExportResult:
    """Load an audio-encoder checkpoint (or the seeded untrained init) and export it to ONNX.

    Graph: `mel` f32[N, 80, 16] -> `feature` f32[N, 512]. Raises CheckpointError / ValueError
    as `export_unet`.
    """
    _check_opset(opset)
    encoder, weights = load_audio_encoder(checkpoint, seed=seed)
    wrapper = AudioEncoderWithPre(encoder).eval()
    mel = torch.zeros(ENCODER_MEL.batch_shape(2))
    _write_onnx(
        wrapper, (mel,), output, (ENCODER_MEL,), (ENCODER_FEATURE,), opset,
        ("audio_encoder", "ave", weights),
    )
    logger.info("exported AudioEncoder to %s (opset %d)", output, opset)
    return ExportResult(path=output, weights=weights, mode="audio_encoder", opset=opset)


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime vs PyTorch on the same uint8 outputs: the largest difference (LSB), the
    fraction of values at most 1 LSB apart, and the number of values compared."""

    max_abs_lsb: int
    fraction_within_1: float
    values: int

    @property
    def ok(self) -> bool:
        """The export's parity criterion: <= 1 LSB on >= 99.9% of values and never more than 2."""
        return self.max_abs_lsb <= 2 and self.fraction_within_1 >= 0.999


def compare_pred(expected: NDArray[np.uint8], actual: NDArray[np.uint8]) -> ParityReport:
    """Compare two u8[N, 320, 320, 3] predictions. Raises ValueError on shape/dtype mismatch."""
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        raise ValueError(
            f"cannot compare {actual.dtype}{list(actual.shape)} with "
            f"{expected.dtype}{list(expected.shape)}"
        )
    diff = np.abs(expected.astype(np.int16) - actual.astype(np.int16))
    return ParityReport(
        max_abs_lsb=int(diff.max(initial=0)),
        fraction_within_1=float((diff <= 1).mean()) if diff.size else 1.0,
        values=int(diff.size),
    )


def check_unet_parity(
    unet: UNet328, onnx_path: Path, crop: NDArray[np.uint8], audio: NDArray[np.float32]
) -> ParityReport:
    """Run `UnetWithPrePost(unet)` in PyTorch and the ONNX file under ONNX Runtime (CPU) on
    crop u8[N,320,320,3] and audio f32[N,16,D]; compare the uint8 `pred` outputs."""
    import onnxruntime as ort  # heavy; only needed here

    wrapper = UnetWithPrePost(unet.eval()).eval()
    with torch.no_grad():
        expected = wrapper(torch.from_numpy(crop), torch.from_numpy(audio)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (actual,) = session.run([UNET_PRED.name], {UNET_CROP.name: crop, UNET_AUDIO.name: audio})
    return compare_pred(expected, actual)
