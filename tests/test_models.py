"""UNet328 / AudioEncoder: state-dict keys, shapes and dtypes equal the SyncTalk_2D reference
listings (`tests/data/reference/*.tsv`), parameter counts (docs/REFERENCE.md s.1, s.4), forward
shapes."""

from __future__ import annotations

import pytest
import torch

from export.models import AUDIO_BRANCH_SHAPES, AUDIO_MODES, AudioEncoder, UNet328
from lipsync.contract import FEATURE_DIM, INNER_SIZE, MEL_BANDS, MEL_WINDOW, AudioMode
from lipsync.paths import REFERENCE_DIR, REPO_ROOT

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def reference_listing(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Parse `REFERENCE_DIR/<name>.state_dict.tsv` into (key, shape, dtype) rows, in file order.

    The listings are committed under `tests/data/reference/`; the last test checks them against
    the team's originals where those are at hand.
    """
    path = REFERENCE_DIR / f"{name}.state_dict.tsv"
    assert path.is_file(), f"reference listing {path} is missing from the repository"
    rows = []
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["key", "shape", "dtype"], f"unexpected header in {path}"
    for line in lines[1:]:
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
        rows.append((key, dims, dtype))
    return rows


def model_listing(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) rows of a module's state dict, in order, dtype as in the TSVs."""
    return [
        (k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in module.state_dict().items()
    ]


def parameter_count(rows: list[tuple[str, tuple[int, ...], str]]) -> int:
    total = 0
    for key, shape, _ in rows:
        if not key.endswith(BUFFER_SUFFIXES):
            total += int(torch.Size(shape).numel())
    return total


@pytest.mark.parametrize("mode", AUDIO_MODES)
def test_unet_state_dict_equals_reference(mode: AudioMode) -> None:
    expected = reference_listing(f"unet_328_{mode}")
    got = model_listing(UNet328(mode))
    missing = sorted({r[0] for r in expected} - {r[0] for r in got})
    extra = sorted({r[0] for r in got} - {r[0] for r in expected})
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    assert got == expected


def test_audio_encoder_state_dict_equals_reference() -> None:
    assert model_listing(AudioEncoder()) == reference_listing("audio_encoder")


@pytest.mark.parametrize("mode", AUDIO_MODES)
def test_unet_parameter_count_matches_reference(mode: AudioMode) -> None:
    model = UNet328(mode)
    count = sum(p.numel() for p in model.parameters())
    assert count == parameter_count(reference_listing(f"unet_328_{mode}"))
    if mode in ("ave", "hubert"):
        assert count == 12_186_935  # docs/REFERENCE.md section 1


def test_audio_encoder_parameter_count() -> None:
    count = sum(p.numel() for p in AudioEncoder().parameters())
    assert count == 2_812_672  # docs/REFERENCE.md section 4
    assert count == parameter_count(reference_listing("audio_encoder"))


@pytest.mark.parametrize("mode", AUDIO_MODES)
def test_audio_branch_reaches_10x10(mode: AudioMode) -> None:
    model = UNet328(mode).eval()
    with torch.no_grad():
        out = model.audio_model(torch.randn(2, *AUDIO_BRANCH_SHAPES[mode]))
    assert out.shape == (2, 512, 10, 10)


@pytest.mark.parametrize("mode", AUDIO_MODES)
def test_unet_forward_shape_and_range(mode: AudioMode) -> None:
    torch.manual_seed(0)
    model = UNet328(mode).eval()
    with torch.no_grad():
        y = model(
            torch.rand(1, 6, INNER_SIZE, INNER_SIZE), torch.randn(1, *AUDIO_BRANCH_SHAPES[mode])
        )
    assert y.shape == (1, 3, INNER_SIZE, INNER_SIZE) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0  # sigmoid output


def test_unet_rejects_wrong_audio_shape() -> None:
    model = UNet328("ave").eval()
    with torch.no_grad(), pytest.raises(RuntimeError):
        image = torch.rand(1, 6, INNER_SIZE, INNER_SIZE)
        model(image, torch.randn(1, *AUDIO_BRANCH_SHAPES["wenet"]))


def test_audio_encoder_forward_shape() -> None:
    enc = AudioEncoder().eval()
    with torch.no_grad():
        out = enc(torch.rand(3, 1, MEL_BANDS, MEL_WINDOW) * 8 - 4)
    assert out.shape == (3, FEATURE_DIM) and out.dtype == torch.float32


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown audio mode 'deepspeech'"):
        UNet328("deepspeech")  # type: ignore[arg-type]  # on purpose

@pytest.mark.parametrize("name", ["unet_328_ave", "unet_328_hubert", "unet_328_wenet", "audio_encoder"])
def test_committed_listing_equals_shared_original(name: str) -> None:
    """The repository's copy of a listing is byte-identical to the team's original, which lives
    in the `shared/reference` folder next to the repository where the team's machines have one
    (skipped elsewhere)."""
    original = REPO_ROOT.parent / "shared" / "reference" / f"{name}.state_dict.tsv"
    if not original.is_file():
        pytest.skip(f"no shared original at {original} on this machine")
    assert (REFERENCE_DIR / original.name).read_bytes() == original.read_bytes()
