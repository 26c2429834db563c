"""`gateway.store.AvatarStore` with packages written by `make_package` and the model lifecycle on
the in-process fake Triton: loading and precomputation, refusals, and model registration."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import pytest

from gateway.errors import FrameOutOfRange, PackageRejected, UnknownAvatar
from gateway.model_lifecycle import ModelLifecycle, ModelPhase
from gateway.store import AvatarStore
from tests.fake_triton import FakeTriton, fake_triton

T = TypeVar("T")
MakePackage = Callable[..., Path]


def run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body())


def store_on(fake: FakeTriton, root: Path) -> AvatarStore:
    return AvatarStore(root, ModelLifecycle(fake))


def test_load_precomputes_crops_and_registers_the_model(make_package: MakePackage) -> None:
    folder = make_package(name="alice")
    fake = fake_triton("lipsync_alice")

    async def body() -> None:
        store = store_on(fake, folder.parent)
        changes: list[int] = []
        store.subscribe(lambda: changes.append(len(store)))
        [avatar] = await store.load_all()
        assert (avatar.name, avatar.model, avatar.video_frames) == ("alice", "lipsync_alice", 10)
        assert avatar.feature_rows == avatar.features.shape[0] > avatar.video_frames
        assert avatar.crops.shape == (10, 328, 328, 3) and avatar.inners.shape == (10, 320, 320, 3)
        assert avatar.inners.flags.c_contiguous
        x1, y1, x2, y2 = (int(c) for c in avatar.rects[4])
        expected = cv2.resize(avatar.frames[4][y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
        np.testing.assert_array_equal(avatar.crops[4], expected)
        np.testing.assert_array_equal(avatar.inners[4], expected[4:324, 4:324])
        assert avatar.rect(4) == (float(x1), float(y1), float(x2), float(y2))
        assert isinstance(avatar.features, np.memmap)
        assert store.get("alice") is avatar and store.get("lipsync_alice") is avatar
        assert store.names() == ["alice"] and "alice" in store and changes == [1]
        assert fake.count("load_model", "lipsync_alice") == 1
        assert store._lifecycle is not None and store._lifecycle.snapshot().model_ready("lipsync_alice")
        with pytest.raises(UnknownAvatar, match=r"avatar 'bob' is not loaded \(loaded: alice\)"):
            store.get("bob")

    run(body)


def test_frame_id_ranges(make_package: MakePackage) -> None:
    folder = make_package(name="alice")

    async def body() -> None:
        avatar = await AvatarStore(folder.parent, None).load("alice")
        m = avatar.feature_rows
        avatar.check_frame_id(0)
        avatar.check_frame_id(m - 1)
        avatar.check_frame_id(m + 100, live_audio=True)
        for frame_id, live in ((m, False), (-1, False), (-1, True)):
            with pytest.raises(
                FrameOutOfRange, match=rf"frame_id {frame_id} is out of range for avatar 'alice'"
            ):
                avatar.check_frame_id(frame_id, live_audio=live)
        assert [avatar.video_index(i) for i in (0, 9, 10, 18, 19)] == [0, 9, 8, 0, 1]

    run(body)


def test_package_whose_model_triton_cannot_load_is_refused(make_package: MakePackage) -> None:
    make_package(name="alice")
    root = make_package(name="nomodel").parent
    fake = fake_triton("lipsync_alice")  # no lipsync_nomodel in the repository

    async def body() -> None:
        store = store_on(fake, root)
        loaded = await store.load_all()
        assert [a.name for a in loaded] == ["alice"], "the other package still serves"
        with pytest.raises(PackageRejected, match=r"cannot serve its model 'lipsync_nomodel' \(load_model"):
            await store.load("nomodel")
        lifecycle = store._lifecycle
        assert lifecycle is not None
        assert "lipsync_nomodel" not in lifecycle.snapshot().models, "a refused model is not kept"
        assert lifecycle.snapshot().ready and store.names() == ["alice"]

    run(body)


def test_package_is_accepted_while_triton_is_down_and_its_model_loads_later(
    make_package: MakePackage,
) -> None:
    root = make_package(name="alice").parent
    fake = fake_triton("lipsync_alice")
    fake.mode = "refused"

    async def body() -> None:
        lifecycle = ModelLifecycle(fake)
        store = AvatarStore(root, lifecycle)
        avatar = await store.load("alice")
        snap = lifecycle.snapshot()
        assert not snap.ready and snap.models[avatar.model].phase is ModelPhase.UNKNOWN
        fake.restart()
        await lifecycle.probe_once()
        await lifecycle.wait_loading()
        assert lifecycle.snapshot().model_ready("lipsync_alice")

    run(body)


def test_reload_replaces_the_avatar_and_paths_outside_the_root_are_refused(
    make_package: MakePackage, tmp_path: Path
) -> None:
    root = make_package(name="alice").parent
    outside = make_package(name="eve", root=tmp_path / "elsewhere")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "empty").mkdir()
    fake = fake_triton("lipsync_alice", "lipsync_eve")

    async def body() -> None:
        store = store_on(fake, root)
        first = await store.load("alice")
        again = await store.load(str(root / "alice"), name="alice")
        assert again is not first and store.get("alice") is again
        for path in ("..", "/tmp", "escape", str(outside), "alice/../..", ""):
            with pytest.raises(PackageRejected, match="not inside the packages root"):
                await store.load(path)
        with pytest.raises(PackageRejected, match=r"is not an avatar package \(no manifest.json\)"):
            await store.load("empty")
        assert store.names() == ["alice"]

    run(body)


def test_broken_package_is_skipped_and_rejected_with_the_loaders_reason(make_package: MakePackage) -> None:
    make_package(name="alice")
    broken = make_package(name="broken")
    for npy in broken.glob("*.npy"):
        npy.write_bytes(b"not numpy")
    fake = fake_triton("lipsync_alice", "lipsync_broken")

    async def body() -> None:
        store = store_on(fake, broken.parent)
        assert [a.name for a in await store.load_all()] == ["alice"]
        with pytest.raises(PackageRejected, match=r"package 'broken' rejected: frames.npy: expected") as err:
            await store.load("broken")
        assert str(broken.parent) not in str(err.value), "no absolute server path in the message"
        assert fake.count("load_model", "lipsync_broken") == 0, "no model for a package that does not load"

    run(body)


class RecordedSharing:
    """A `gateway.store.ChangeSharing` that records what the store shares."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, ...]] = []

    async def loaded(self, package_dir: Path, name: str) -> None:
        self.changes.append(("loaded", str(package_dir), name))

    async def unloaded(self, name: str) -> None:
        self.changes.append(("unloaded", name))


def test_loads_and_unloads_on_request_are_shared_with_the_served_name(make_package: MakePackage) -> None:
    """What a gateway worker tells its supervisor (`gateway.worker`): a load on request with the
    resolved folder and the name served (the manifest's when none was asked for), an unload by
    the avatar's name (its model name works too); the packages root and changes applied for
    another worker (``share=False``) are not shared again."""
    root = make_package(name="alice").parent
    make_package(name="bob")
    fake = fake_triton("lipsync_alice", "lipsync_bob")
    sharing = RecordedSharing()

    async def body() -> None:
        store = store_on(fake, root)
        store.share_changes(sharing)
        await store.load_all()
        assert sharing.changes == []
        await store.load("bob")
        await store.unload("lipsync_alice")
        await store.load("alice", share=False)
        await store.unload("alice", share=False)
        assert store.names() == ["bob"]

    run(body)
    assert sharing.changes == [("loaded", str((root / "bob").resolve()), "bob"), ("unloaded", "alice")]
