"""The avatar-package format: writer/loader round trip and one clear error per kind of damage."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from lipsync.contract import FEATURE_DIM, MANIFEST_NAME, avatar_model_name
from lipsync.package import AvatarPackage, PackageError, load_package, sha256_file
from tests.fixtures_packages import MakePackage, synthetic_package_arrays


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_NAME).read_text())


def _save_manifest(folder: Path, data: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2))


def _replace_array(folder: Path, key: str, array: NDArray[Any]) -> None:
    """Overwrite one array file and update its size and checksum, so only the content is wrong."""
    data = _manifest(folder)
    path = folder / data["files"][key]["path"]
    np.save(path, array, allow_pickle=False)
    data["files"][key]["size_bytes"] = path.stat().st_size
    data["files"][key]["sha256"] = sha256_file(path)
    _save_manifest(folder, data)


def test_round_trip(make_package: MakePackage) -> None:
    arrays = synthetic_package_arrays()
    folder = make_package("alice")
    pkg = load_package(folder)
    assert isinstance(pkg, AvatarPackage)
    assert pkg.name == "alice" and pkg.manifest.model_name == avatar_model_name("alice")
    assert (pkg.manifest.width, pkg.manifest.height, pkg.frame_count) == (64, 48, 10)
    np.testing.assert_array_equal(pkg.frames, arrays["frames"])
    np.testing.assert_array_equal(pkg.rects, arrays["rects"])
    np.testing.assert_array_equal(pkg.features, arrays["features"])
    assert pkg.rects.dtype == np.int32 and pkg.landmarks.dtype == np.float32
    assert isinstance(pkg.features, np.memmap) and not pkg.features.flags.writeable
    assert not pkg.frames.flags.writeable
    assert pkg.feature_rows == 24  # 1 s: int((81 - 16) / 80 * 25) + 2 + 2
    assert pkg.manifest.duration_s == pytest.approx(24 / 25)
    assert pkg.audio_path == folder.resolve() / "audio.wav"
    assert pkg.manifest.weights.trained is False


def test_missing_manifest_and_folder(tmp_path: Path, make_package: MakePackage) -> None:
    with pytest.raises(PackageError, match="package folder not found"):
        load_package(tmp_path / "nothing")
    folder = make_package()
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(PackageError, match=r"manifest\.json is missing"):
        load_package(folder)


def test_missing_file(make_package: MakePackage) -> None:
    folder = make_package()
    (folder / "aud_ave.npy").unlink()
    with pytest.raises(PackageError, match=r"aud_ave\.npy \(features\) is missing"):
        load_package(folder)


def test_wrong_shape(make_package: MakePackage) -> None:
    folder = make_package()
    _replace_array(folder, "rects", np.zeros((10, 3), dtype=np.int32))
    with pytest.raises(
        PackageError, match=r"rects\.npy: expected shape \[10, 4\], found \[10, 3\]"
    ):
        load_package(folder)


def test_wrong_dtype(make_package: MakePackage) -> None:
    folder = make_package()
    _replace_array(folder, "landmarks", np.zeros((10, 68, 2), dtype=np.float64))
    with pytest.raises(
        PackageError, match=r"landmarks\.npy: expected dtype float32, found float64"
    ):
        load_package(folder)


def test_checksum_mismatch(make_package: MakePackage) -> None:
    folder = make_package()
    path = folder / "aud_ave.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(raw))
    with pytest.raises(
        PackageError,
        match=r"aud_ave\.npy: checksum mismatch: manifest sha256 [0-9a-f]{64}, file has",
    ):
        load_package(folder)


def test_size_mismatch(make_package: MakePackage) -> None:
    folder = make_package()
    with open(folder / "frames.npy", "ab") as fh:
        fh.write(b"\0" * 7)
    with pytest.raises(
        PackageError, match=r"frames\.npy: expected \d+ bytes \(manifest\), found \d+ bytes"
    ):
        load_package(folder)


def test_rectangle_outside_frame(make_package: MakePackage) -> None:
    rects = synthetic_package_arrays()["rects"].copy()
    folder = make_package()
    rects[3] = [40, 10, 70, 40]  # 30 px square, x2 = 70 > width 64
    _replace_array(folder, "rects", rects)
    with pytest.raises(
        PackageError, match=r"rectangle of frame 3 is \[40, 10, 70, 40\].*x2 > width 64"
    ):
        load_package(folder)


def test_rectangle_not_square(make_package: MakePackage) -> None:
    rects = synthetic_package_arrays()["rects"].copy()
    folder = make_package()
    rects[5, 2] -= 1
    _replace_array(folder, "rects", rects)
    with pytest.raises(PackageError, match=r"rectangle of frame 5 .*not square"):
        load_package(folder)


@pytest.mark.parametrize(
    ("bad_path", "message"),
    [
        ("../outside.npy", r"files\.rects\.path '\.\./outside\.npy' contains '\.\.'"),
        ("sub/../../outside.npy", r"contains '\.\.'"),
        ("/etc/passwd", r"files\.rects\.path '/etc/passwd' is absolute"),
        ("C:/rects.npy", r"is absolute"),
        ("sub\\rects.npy", r"contains a backslash"),
    ],
)
def test_path_escaping_the_folder(make_package: MakePackage, bad_path: str, message: str) -> None:
    folder = make_package()
    np.save(folder.parent / "outside.npy", np.zeros((10, 4), dtype=np.int32))
    data = _manifest(folder)
    data["files"]["rects"]["path"] = bad_path
    _save_manifest(folder, data)
    with pytest.raises(PackageError, match=message):
        load_package(folder)


def test_symlink_escaping_the_folder(make_package: MakePackage) -> None:
    folder = make_package()
    outside = folder.parent / "elsewhere.npy"
    os.replace(folder / "rects.npy", outside)
    (folder / "rects.npy").symlink_to(outside)
    with pytest.raises(
        PackageError, match=r"resolves to .*elsewhere\.npy, outside the package folder"
    ):
        load_package(folder)


def test_manifest_symlink_escaping_the_folder(make_package: MakePackage) -> None:
    folder = make_package()
    outside = folder.parent / "manifest-elsewhere.json"
    os.replace(folder / MANIFEST_NAME, outside)
    (folder / MANIFEST_NAME).symlink_to(outside)
    with pytest.raises(
        PackageError, match=r"manifest\.json resolves to .*manifest-elsewhere\.json, outside"
    ):
        load_package(folder)


def test_bad_json(make_package: MakePackage) -> None:
    folder = make_package()
    (folder / MANIFEST_NAME).write_text('{"format_version": 1, "name": ')
    with pytest.raises(PackageError, match=r"manifest\.json: not valid JSON: .* line 1 column"):
        load_package(folder)


def test_schema_errors(make_package: MakePackage) -> None:
    folder = make_package()
    data = _manifest(folder)
    del data["fps"]
    data["width"] = -3
    data["surprise"] = True
    _save_manifest(folder, data)
    with pytest.raises(PackageError, match=r"invalid manifest: ") as info:
        load_package(folder)
    text = str(info.value)
    assert "fps: Field required" in text
    assert "width: Input should be greater than or equal to 1 (found -3)" in text
    assert "surprise: Extra inputs are not permitted" in text


def test_fps_must_be_25(make_package: MakePackage) -> None:
    folder = make_package()
    data = _manifest(folder)
    data["fps"] = 30.0
    _save_manifest(folder, data)
    with pytest.raises(PackageError, match=r"fps: Value error, fps must be 25.* got 30\.0"):
        load_package(folder)


def test_unsupported_format_version(make_package: MakePackage) -> None:
    folder = make_package()
    data = _manifest(folder)
    data["format_version"] = 2
    _save_manifest(folder, data)
    with pytest.raises(PackageError, match="format_version is 2, this loader reads version 1"):
        load_package(folder)


def test_feature_rows_must_match_audio(make_package: MakePackage) -> None:
    folder = make_package()
    data = _manifest(folder)
    data["feature_rows"] = 23
    _save_manifest(folder, data)
    _replace_array(folder, "features", np.zeros((23, FEATURE_DIM), dtype=np.float32))
    with pytest.raises(
        PackageError, match=r"feature_rows is 23 but \d+ audio samples give 24 rows"
    ):
        load_package(folder)


def test_non_finite_features(make_package: MakePackage) -> None:
    folder = make_package()
    feats = np.zeros((24, FEATURE_DIM), dtype=np.float32)
    feats[4, 7] = np.nan
    _replace_array(folder, "features", feats)
    with pytest.raises(PackageError, match=r"aud_ave\.npy: contains NaN"):
        load_package(folder)


def test_writer_refuses_invalid_input(make_package: MakePackage) -> None:
    rects = synthetic_package_arrays()["rects"].copy()
    rects[0] = [-2, 0, 20, 22]
    with pytest.raises(PackageError, match=r"rectangle of frame 0 .*x1 < 0"):
        make_package(rects=rects)
    with pytest.raises(
        PackageError,
        match=rf"features: expected shape \[24, {FEATURE_DIM}\], found \[20, {FEATURE_DIM}\]",
    ):
        make_package(name="short", features=np.zeros((20, FEATURE_DIM), dtype=np.float32))
    with pytest.raises(PackageError, match="invalid avatar name"):
        make_package(name="bad name!")


def test_writer_reports_manifest_errors_as_package_errors(make_package: MakePackage) -> None:
    with pytest.raises(PackageError, match=r"manifest would be invalid: fps: .*fps must be 25"):
        make_package(name="at30", fps=30.0)
    with pytest.raises(PackageError, match=r"model_name: .*must look like lipsync_<name>"):
        make_package(name="renamed", model_name="other")


def test_demo_package_is_valid(demo_package: AvatarPackage) -> None:
    """The real demo package passes every check when loaded again from disk."""
    again = load_package(demo_package.root)
    assert again.manifest == demo_package.manifest
    assert again.manifest.source.video == "carphone_pristine.mp4"
    assert (again.manifest.width, again.manifest.height) == (176, 144)
