"""`gateway.crop_cache.CropCache` on packages written by `make_package`: the face crops are
computed once, published as a cache entry and memory-mapped (equal to computing them); an entry
that does not match its checksums is computed again; an unwritable cache falls back to RAM. And
the loader memory-maps ``frames.npy`` read-only."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gateway.crop_cache import CropCache, cache_key, compute_crops
from lipsync.package import load_package

MakePackage = Callable[..., Path]


def test_the_loader_memory_maps_the_frames_read_only(make_package: MakePackage) -> None:
    package = load_package(make_package())
    assert isinstance(package.frames, np.memmap) and isinstance(package.features, np.memmap)
    assert not package.frames.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        package.frames[0, 0, 0, 0] = 1


def test_crops_are_written_once_then_memory_mapped(make_package: MakePackage, tmp_path: Path) -> None:
    package = load_package(make_package())
    cache = CropCache(tmp_path / "crops")
    first = cache.crops(package)
    entry = cache.entry(package)
    assert entry.name == cache_key(package) and (entry / "meta.json").is_file()
    written = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    again = CropCache(tmp_path / "crops").crops(package)  # another process's view
    expected = compute_crops(package)
    for crops in (first, again):
        assert crops.mapped and isinstance(crops.crops, np.memmap) and isinstance(crops.inners, np.memmap)
        np.testing.assert_array_equal(crops.crops, expected.crops)
        np.testing.assert_array_equal(crops.inners, expected.inners)
        assert crops.inners.flags.c_contiguous and not crops.crops.flags.writeable
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == written, "not written again"


def test_a_damaged_entry_is_computed_again(
    make_package: MakePackage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    package = load_package(make_package())
    cache = CropCache(tmp_path / "crops")
    cache.crops(package)
    path = cache.entry(package) / "inners.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one pixel changed, size kept
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        crops = cache.crops(package)
    assert "is not intact (inners.npy does not match meta.json): computing it again" in caplog.text
    assert crops.mapped
    np.testing.assert_array_equal(crops.inners, compute_crops(package).inners)


def test_another_package_gets_another_entry(make_package: MakePackage, tmp_path: Path) -> None:
    a = load_package(make_package(name="alice"))
    frames = np.asarray(a.frames).copy()
    frames[:, :4] = 0  # other frames: other crops
    b = load_package(make_package(name="bob", frames=frames))
    assert cache_key(a) != cache_key(b)


def test_an_unwritable_cache_falls_back_to_ram(
    make_package: MakePackage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    package = load_package(make_package())
    root = tmp_path / "crops"
    root.write_text("a file where the cache folder should be")  # unwritable, even for root
    with caplog.at_level(logging.WARNING):
        crops = CropCache(root).crops(package)
    assert not crops.mapped
    assert "not writable" in caplog.text and "held in this process's RAM" in caplog.text
    np.testing.assert_array_equal(crops.crops, compute_crops(package).crops)
