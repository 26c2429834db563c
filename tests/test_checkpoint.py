"""Checkpoint loading: strict loads of SyncTalk_2D-shaped state dicts (built from the reference
TSV listings), the layouts users have (nested, `module.`), precise errors, seeded untrained init."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from export.checkpoint import (
    CheckpointError,
    fitting_modes,
    load_audio_encoder,
    load_unet,
)
from export.models import AUDIO_BRANCH_SHAPES, UNet328
from lipsync.contract import INNER_SIZE
from tests.test_models import reference_listing

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def state_dict_from_tsv(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the keys, shapes and dtypes of a reference listing (a stand-in for a
    real SyncTalk_2D checkpoint, none of which can be had here)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape, dtype in reference_listing(name):
        if dtype == "int64":
            state[key] = torch.randint(0, 1000, shape, generator=gen, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen, dtype=_DTYPES[dtype])
    return state


@pytest.fixture(scope="module")
def ave_state() -> dict[str, torch.Tensor]:
    return state_dict_from_tsv("unet_328_ave")


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_tsv_state_dict_loads_strictly_into_model(ave_state: dict[str, torch.Tensor]) -> None:
    model = UNet328("ave")
    result = model.load_state_dict(ave_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_load_unet_plain_state_dict(tmp_path: Path, ave_state: dict[str, torch.Tensor]) -> None:
    path = _save(ave_state, tmp_path / "unet.pth")
    model, info = load_unet(path, mode="ave")
    assert not model.training
    assert info.trained and info.source == str(path.resolve())
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = model.state_dict()
    for key in ("inc.inconv.0.conv.0.weight", "audio_model.bn5.running_var", "outc.conv.bias"):
        assert torch.equal(loaded[key], ave_state[key]), key


@pytest.mark.parametrize(
    "layout",
    ["state_dict", "model", "module_prefix", "nested_and_module_prefix"],
)
def test_load_unet_user_layouts(
    tmp_path: Path, ave_state: dict[str, torch.Tensor], layout: str
) -> None:
    prefixed = {f"module.{k}": v for k, v in ave_state.items()}
    obj: object = {
        "state_dict": {"state_dict": ave_state, "epoch": 10},
        "model": {"model": ave_state, "optimizer_lr": 1e-3},
        "module_prefix": prefixed,
        "nested_and_module_prefix": {"state_dict": prefixed},
    }[layout]
    model, info = load_unet(_save(obj, tmp_path / "ckpt.pth"), mode="ave")
    assert info.trained
    key = "up3.conv.double_conv.1.conv.3.weight"
    assert torch.equal(model.state_dict()[key], ave_state[key])


def test_wrong_key_is_named(tmp_path: Path, ave_state: dict[str, torch.Tensor]) -> None:
    state = dict(ave_state)
    state["outc.conv.weights"] = state.pop("outc.conv.weight")
    with pytest.raises(CheckpointError) as err:
        load_unet(_save(state, tmp_path / "bad.pth"), mode="ave")
    message = str(err.value)
    assert "1 missing keys (outc.conv.weight)" in message
    assert "1 unexpected keys (outc.conv.weights)" in message
    assert "bad.pth" in message


def test_shape_mismatch_is_named(tmp_path: Path, ave_state: dict[str, torch.Tensor]) -> None:
    state = dict(ave_state)
    state["outc.conv.weight"] = torch.zeros(4, 16, 1, 1)
    with pytest.raises(
        CheckpointError, match=r"outc\.conv\.weight: checkpoint \[4, 16, 1, 1\] vs model \[3, 16, 1, 1\]"
    ):
        load_unet(_save(state, tmp_path / "shape.pth"), mode="ave")


def test_many_missing_keys_are_counted(tmp_path: Path, ave_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in ave_state.items() if not k.startswith("up5.")}
    with pytest.raises(CheckpointError, match=r"36 missing keys \(up5\..*\+31 more\)"):
        load_unet(_save(state, tmp_path / "partial.pth"), mode="ave")


def test_wenet_checkpoint_loaded_as_ave_names_wenet(tmp_path: Path) -> None:
    path = _save(state_dict_from_tsv("unet_328_wenet"), tmp_path / "wenet.pth")
    with pytest.raises(CheckpointError, match="It fits mode 'wenet': pass --mode wenet"):
        load_unet(path, mode="ave")
    _, info = load_unet(path, mode="wenet")
    assert info.trained


def test_ave_checkpoint_loaded_as_wenet_names_ave_and_hubert(
    tmp_path: Path, ave_state: dict[str, torch.Tensor]
) -> None:
    with pytest.raises(CheckpointError, match="It fits modes 'ave' or 'hubert'"):
        load_unet(_save(ave_state, tmp_path / "ave.pth"), mode="wenet")


def test_ave_and_hubert_are_indistinguishable_by_state_dict() -> None:
    # They differ only in audio_model.conv3's stride (docs/REFERENCE.md s.1): --mode has to decide.
    assert fitting_modes(state_dict_from_tsv("unet_328_hubert")) == ["ave", "hubert"]
    assert fitting_modes(state_dict_from_tsv("unet_328_wenet")) == ["wenet"]


def test_foreign_state_dict_fits_no_mode(tmp_path: Path) -> None:
    path = _save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="fits none of the modes"):
        load_unet(path)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([1, 2, 3], "expected a state dict .* got list"),
        ({"weights": "nope", "epoch": 3}, "not a state dict: 2 of 2 entries are not tensors"),
    ],
)
def test_not_a_state_dict(tmp_path: Path, obj: object, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        load_unet(_save(obj, tmp_path / "odd.pth"))


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_unet(tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_unet(garbage)


def test_untrained_unet_is_seeded_loud_and_not_degenerate(caplog: pytest.LogCaptureFixture) -> None:
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="export.checkpoint"):
        first, info = load_unet(None, mode="ave", seed=0)
    assert torch.equal(torch.get_rng_state(), before), "the seeded init must not move the global RNG"
    assert not info.trained and info.sha256 is None and info.source == "random-init(seed=0)"
    assert any("UNTRAINED" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    second, _ = load_unet(None, mode="ave", seed=0)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    # BatchNorm statistics were calibrated: the untrained net draws full-range noise, not flat grey.
    torch.manual_seed(123)
    with torch.no_grad():
        image = torch.rand(1, 6, INNER_SIZE, INNER_SIZE)
        y = first(image, torch.randn(1, *AUDIO_BRANCH_SHAPES["ave"]))
    assert float(y.std()) > 0.1
    assert float(y.min()) < 0.1 and float(y.max()) > 0.9


def test_untrained_audio_encoder_depends_on_seed() -> None:
    a, info = load_audio_encoder(None, seed=0)
    b, _ = load_audio_encoder(None, seed=1)
    assert not info.trained
    key = "audio_encoder.0.conv_block.0.weight"
    assert not torch.equal(a.state_dict()[key], b.state_dict()[key])


def test_audio_encoder_accepts_synctalk_layout(tmp_path: Path) -> None:
    # SyncTalk_2D's audio_visual_encoder.pth stores the Sequential's keys without the prefix.
    state = state_dict_from_tsv("audio_encoder")
    bare = {k.removeprefix("audio_encoder."): v for k, v in state.items()}
    model, info = load_audio_encoder(_save(bare, tmp_path / "audio_visual_encoder.pth"))
    assert info.trained
    key = "audio_encoder.11.conv_block.0.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def test_audio_encoder_wrong_key(tmp_path: Path) -> None:
    state = state_dict_from_tsv("audio_encoder")
    state["audio_encoder.13.conv_block.0.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError, match=r"1 unexpected keys \(audio_encoder\.13\.conv_block\.0\.weight\)"
    ):
        load_audio_encoder(_save(state, tmp_path / "enc.pth"))
