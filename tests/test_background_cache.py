"""`gateway.background_cache.BackgroundCache` on packages written by `make_package`, through the
store and the compositor the gateway uses: the background JPEGs are encoded once, published as
a cache entry and memory-mapped by every later store or process (no encode), byte for byte what
encoding in RAM gives (served JPEGs, spliced frames, etag); a damaged entry is encoded again with
a warning; an unwritable cache folder falls back to RAM."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gateway.background_cache import BackgroundCache, cache_key
from gateway.backgrounds import AvatarBackgrounds
from gateway.compositor import Compositor
from gateway.jpeg import RestartIntervalEncoder, SimpleJpegEncoder
from gateway.store import Avatar, AvatarStore
from lipsync.contract import INNER_SIZE
from lipsync.frames import paste_back
from lipsync.jpeg_splice import SpliceSettings
from lipsync.package import load_package
from tests.fixtures_packages import synthetic_package_arrays

MakePackage = Callable[..., Path]
WIDTH, HEIGHT, FRAMES = 250, 150, 6  # not a multiple of 16 px
WROTE = "background cache: wrote"
MAPPED = "memory-mapped from the cache"


def noisy_package(make_package: MakePackage) -> Path:
    """A package of random-noise 250x150 frames (JPEGs full of stuffed 0xFF bytes)."""
    arrays = synthetic_package_arrays(n_frames=FRAMES, width=WIDTH, height=HEIGHT)
    arrays["frames"] = np.random.default_rng(5).integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    return make_package(**arrays)


def compositor(cache_root: Path | None) -> Compositor:
    """The gateway's compositor at its defaults (q85, 4:2:0, 128 px restart intervals)."""
    return Compositor(
        SimpleJpegEncoder(85), RestartIntervalEncoder(85), splice=True,
        cache=None if cache_root is None else BackgroundCache(cache_root),
    )


def load(folder: Path, cache_root: Path | None) -> tuple[Avatar, Compositor]:
    """A fresh store (as a fresh gateway process has) loading ``folder``."""
    comp = compositor(cache_root)
    store = AvatarStore(folder.parent, None, backgrounds=comp.backgrounds)
    return asyncio.run(store.load(folder.name)), comp


def backgrounds_of(avatar: Avatar) -> AvatarBackgrounds:
    assert avatar.backgrounds is not None
    return avatar.backgrounds


def assert_same_output(avatar: Avatar, comp: Compositor, expected: AvatarBackgrounds) -> None:
    """Every served JPEG, the etag, and a spliced frame per video frame equal ``expected``'s."""
    got = backgrounds_of(avatar)
    assert got.etag == expected.etag
    preds = np.random.default_rng(9).integers(0, 256, (FRAMES, INNER_SIZE, INNER_SIZE, 3), dtype=np.uint8)
    in_ram = compositor(None)
    in_ram_avatar = dataclasses.replace(avatar, backgrounds=expected)
    for v in range(FRAMES):
        assert got.jpeg(v) == expected.jpeg(v)
        assert got.plans[v].rect == expected.plans[v].rect
        spliced = comp.composite(avatar, v, preds[v], "composite").jpeg
        assert spliced == in_ram.composite(in_ram_avatar, v, preds[v], "composite").jpeg
        whole = paste_back(avatar.frames[v], avatar.rects[v], avatar.crops[v], preds[v])
        assert spliced == in_ram.restart.encode(whole), "spliced = the whole composited frame's encode"


def test_a_second_store_maps_the_entry_instead_of_encoding(
    make_package: MakePackage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = noisy_package(make_package)
    root = tmp_path / "cache" / "backgrounds"
    with caplog.at_level(logging.INFO):
        first, _ = load(folder, root)
    assert caplog.text.count(WROTE) == 1
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    written = {p.name: p.stat().st_mtime_ns for p in entries[0].iterdir()}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second, comp = load(folder, root)  # another store: what a second or restarted worker does
    assert WROTE not in caplog.text, "the second store encoded the backgrounds again"
    assert MAPPED in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in entries[0].iterdir()} == written
    for avatar in (first, second):
        source = backgrounds_of(avatar).source
        assert source.mapped and isinstance(source.jpegs, np.memmap) and not source.jpegs.flags.writeable
    background = backgrounds_of(second).frames[0]
    assert isinstance(background.jpeg, memoryview) and background.jpeg.readonly, "a view, not a copy"
    assert comp.mode.mode == "spliced", "the start-up self-test passed on the mapped background"
    expected = AvatarBackgrounds.build(second.frames, second.rects, comp.restart.settings_for(WIDTH))
    assert_same_output(second, comp, expected)
    assert second.held_bytes == (
        second.package.frames.nbytes + second.crops.nbytes + second.inners.nbytes + expected.nbytes
    ), "mapped JPEGs count in held_bytes like the ones in RAM"


def test_another_process_maps_the_entry(make_package: MakePackage, tmp_path: Path) -> None:
    folder = noisy_package(make_package)
    root = tmp_path / "backgrounds"
    settings = SpliceSettings(85, "420", 8)
    cache = BackgroundCache(root)
    ours = cache.jpegs(load_package(folder), settings)
    script = (
        "import json, sys; from pathlib import Path\n"
        "from gateway.background_cache import BackgroundCache\n"
        "from lipsync.jpeg_splice import SpliceSettings\n"
        "from lipsync.package import load_package\n"
        "package = load_package(Path(sys.argv[2]))\n"
        "jpegs = BackgroundCache(Path(sys.argv[1])).jpegs(package, SpliceSettings(85, '420', 8))\n"
        "print(json.dumps({'mapped': jpegs.mapped, 'file': str(jpegs.jpegs.filename),"
        " 'etag': jpegs.etag}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(root), str(folder)], check=True,
                         capture_output=True, text=True, timeout=120)
    theirs = json.loads(out.stdout.splitlines()[-1])
    assert "background cache: wrote" not in out.stderr
    assert theirs == {"mapped": True, "file": str(cache.entry(load_package(folder), settings) / "jpegs.npy"),
                      "etag": ours.etag}


def test_a_damaged_entry_is_encoded_again(
    make_package: MakePackage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = noisy_package(make_package)
    root = tmp_path / "backgrounds"
    first, comp = load(folder, root)
    path = BackgroundCache(root).entry(first.package, comp.restart.settings_for(WIDTH)) / "jpegs.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one entropy-coded bit of the last frame flipped, size kept
    path.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again, comp = load(folder, root)
    assert "is not intact (jpegs.npy does not match meta.json): computing it again" in caplog.text
    assert caplog.text.count(WROTE) == 1
    assert backgrounds_of(again).source.mapped
    expected = AvatarBackgrounds.build(again.frames, again.rects, comp.restart.settings_for(WIDTH))
    assert_same_output(again, comp, expected)


def test_an_unwritable_cache_folder_falls_back_to_ram(
    make_package: MakePackage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = noisy_package(make_package)
    root = tmp_path / "backgrounds"
    root.write_text("a file where the cache folder should be")  # unwritable, even for root
    with caplog.at_level(logging.WARNING):
        avatar, comp = load(folder, root)
    assert "background cache" in caplog.text and "not writable" in caplog.text
    assert "the background JPEGs of 'synthetic' are held in this process's RAM" in caplog.text
    assert not backgrounds_of(avatar).source.mapped
    expected = AvatarBackgrounds.build(avatar.frames, avatar.rects, comp.restart.settings_for(WIDTH))
    assert_same_output(avatar, comp, expected)


def test_the_key_covers_the_frames_and_the_settings(make_package: MakePackage) -> None:
    a = load_package(noisy_package(make_package))
    arrays = synthetic_package_arrays(n_frames=FRAMES, width=WIDTH, height=HEIGHT)
    b = load_package(make_package(name="other", **arrays))  # other frames
    base = SpliceSettings(85, "420", 8)
    keys = {
        cache_key(a, base), cache_key(b, base), cache_key(a, SpliceSettings(86, "420", 8)),
        cache_key(a, SpliceSettings(85, "444", 8)), cache_key(a, SpliceSettings(85, "420", 4)),
    }
    assert len(keys) == 5
    assert cache_key(a, base) == cache_key(load_package(a.root), base), "stable across loads"
