"""Unit tests of `lipsync.frames` (docs/REFERENCE.md s.2) with hand-checkable cases."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from lipsync.frames import (
    audio_window,
    crop_328,
    face_patch,
    inner_320,
    mask_inner,
    paste_back,
    paste_back_region,
    pingpong_index,
)


def _noise(shape: tuple[int, ...], seed: int = 0) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_crop_328_of_a_328_rect_is_the_slice_itself() -> None:
    # A 328 x 328 rectangle needs no resize: INTER_CUBIC at scale 1 is the identity.
    frame = _noise((400, 500, 3))
    crop = crop_328(frame, (10, 20, 338, 348))
    assert crop.shape == (328, 328, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, frame[20:348, 10:338])


def test_crop_328_is_bicubic_resize_of_the_rect() -> None:
    frame = _noise((144, 176, 3), seed=1)
    rect = (40, 30, 120, 110)  # 80 x 80 square
    expected = cv2.resize(frame[30:110, 40:120], (328, 328), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(crop_328(frame, rect), expected)
    # a constant region stays constant under bicubic resampling
    flat = np.full((144, 176, 3), (10, 20, 30), dtype=np.uint8)
    assert np.all(crop_328(flat, rect) == np.array([10, 20, 30], dtype=np.uint8))


@pytest.mark.parametrize("rect", [(-1, 0, 50, 50), (0, 0, 177, 50), (50, 50, 50, 60), (0, 100, 40, 145)])
def test_crop_328_refuses_rect_outside_frame(rect: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="not inside the 176x144 frame"):
        crop_328(np.zeros((144, 176, 3), np.uint8), rect)


def test_inner_320_is_the_4_to_324_view() -> None:
    crop = _noise((328, 328, 3), seed=2)
    inner = inner_320(crop)
    assert inner.shape == (320, 320, 3)
    assert np.shares_memory(inner, crop)
    assert inner[0, 0].tolist() == crop[4, 4].tolist()
    assert inner[319, 319].tolist() == crop[323, 323].tolist()
    with pytest.raises(ValueError):
        inner_320(np.zeros((320, 320, 3), np.uint8))


def test_mask_inner_blacks_x5_314_y5_309_inclusive() -> None:
    inner = np.full((320, 320, 3), 200, dtype=np.uint8)
    masked = mask_inner(inner)
    assert np.all(inner == 200), "input must not change"
    zero = np.all(masked == 0, axis=2)
    assert zero.sum() == (314 - 5 + 1) * (309 - 5 + 1) == 310 * 305
    # corners of the rectangle (x, y) -> [y, x]
    assert zero[5, 5] and zero[5, 314] and zero[309, 5] and zero[309, 314]
    # just outside it
    assert not zero[4, 5] and not zero[5, 4] and not zero[5, 315] and not zero[310, 5]
    # the same pixels the reference fills with cv2.rectangle(img, (5, 5, 310, 305), 0, -1)
    ref = inner.copy()
    cv2.rectangle(ref, (5, 5, 310, 305), (0, 0, 0), -1)
    np.testing.assert_array_equal(masked, ref)


def test_audio_window_rows_i_minus_8_to_i_plus_7_with_zero_padding() -> None:
    m = 10
    feats = np.repeat(np.arange(1, m + 1, dtype=np.float32)[:, None], 512, axis=1)  # row r = r+1
    # i = 3: rows -5..10; rows -5..-1 and 10 are outside [0, 10) -> 0
    w = audio_window(feats, 3)
    assert w.shape == (16, 512) and w.dtype == np.float32
    assert w[:, 0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]
    assert np.all(w == w[:, :1]), "every column of a row is that row's value"
    # i = 8 in a long array: exactly rows 0..15
    long = np.repeat(np.arange(1, 41, dtype=np.float32)[:, None], 512, axis=1)
    assert audio_window(long, 8)[:, 0].tolist() == list(range(1, 17))
    # far outside: all zero
    assert not audio_window(feats, 100).any()
    # works on a read-only memmap-like view and does not alias it
    ro = feats.copy()
    ro.setflags(write=False)
    out = audio_window(ro, 9)
    assert not np.shares_memory(out, ro)


def test_paste_back_identity_model_restores_the_frame() -> None:
    # With a 328 rect every resize is the identity, so pasting the unchanged inner crop
    # back must give the frame bit-exactly.
    frame = _noise((360, 400, 3), seed=3)
    rect = (30, 16, 358, 344)
    crop = crop_328(frame, rect)
    out = paste_back(frame, rect, crop, inner_320(crop).copy())
    np.testing.assert_array_equal(out, frame)


def test_paste_back_writes_pred_inside_and_keeps_outside() -> None:
    frame = _noise((360, 400, 3), seed=4)
    original = frame.copy()
    rect = (30, 16, 358, 344)
    crop = crop_328(frame, rect)
    pred = np.full((320, 320, 3), 77, dtype=np.uint8)
    out = paste_back(frame, rect, crop, pred)
    np.testing.assert_array_equal(frame, original)  # input untouched
    assert out is not frame
    # inside: crop[4:324] -> frame[16+4 : 16+324, 30+4 : 30+324]
    assert np.all(out[20:340, 34:354] == 77)
    # the 4-px ring of the crop keeps the crop's own pixels
    np.testing.assert_array_equal(out[16:20, 30:358], frame[16:20, 30:358])
    # outside the rectangle nothing changes
    mask = np.ones(frame.shape[:2], bool)
    mask[16:344, 30:358] = False
    np.testing.assert_array_equal(out[mask], frame[mask])


def test_paste_back_resizes_back_to_the_rect_size() -> None:
    frame = _noise((144, 176, 3), seed=5)
    rect = (40, 30, 120, 110)
    crop = crop_328(frame, rect)
    pred = _noise((320, 320, 3), seed=6)
    expected_crop = crop.copy()
    expected_crop[4:324, 4:324] = pred
    out = paste_back(frame, rect, crop, pred)
    np.testing.assert_array_equal(
        out[30:110, 40:120], cv2.resize(expected_crop, (80, 80), interpolation=cv2.INTER_CUBIC)
    )
    with pytest.raises(ValueError, match="prediction must be uint8"):
        paste_back(frame, rect, crop, pred.astype(np.float32))


@pytest.mark.parametrize(
    "region",
    [(32, 16, 128, 112), (40, 30, 120, 110), (0, 0, 176, 144), (32, 16, 176, 144)],
    ids=["aligned", "exactly-the-rect", "whole-frame", "to-the-corner"],
)
def test_paste_back_region_equals_the_full_paste_back_cut_to_the_region(
    region: tuple[int, int, int, int],
) -> None:
    frame = _noise((144, 176, 3), seed=7)
    original = frame.copy()
    rect = (40, 30, 120, 110)
    crop = crop_328(frame, rect)
    pred = _noise((320, 320, 3), seed=8)
    x0, y0, x1, y1 = region
    out = paste_back_region(frame, rect, crop, pred, region)
    assert out.shape == (y1 - y0, x1 - x0, 3) and out.flags.c_contiguous
    assert not np.shares_memory(out, frame)
    np.testing.assert_array_equal(out, paste_back(frame, rect, crop, pred)[y0:y1, x0:x1])
    np.testing.assert_array_equal(frame, original)  # input untouched


def test_a_reused_scratch_crop_gives_the_same_pixels_as_a_fresh_one() -> None:
    """The compositor's per-thread scratch (no whole-crop copy per frame): stale pixels of an
    earlier frame never leak into the next one."""
    scratch = _noise((328, 328, 3), seed=10)  # an earlier frame's leftovers
    frame = _noise((144, 176, 3), seed=11)
    for rect, region in [((40, 30, 120, 110), (32, 16, 128, 112)), ((0, 0, 90, 70), (0, 0, 96, 80))]:
        crop = crop_328(frame, rect)
        pred = _noise((320, 320, 3), seed=rect[2])
        expected = paste_back(frame, rect, crop, pred)
        x0, y0, x1, y1 = region
        out = paste_back_region(frame, rect, crop, pred, region, scratch=scratch)
        np.testing.assert_array_equal(out, expected[y0:y1, x0:x1])
        w, h = rect[2] - rect[0], rect[3] - rect[1]
        reused = face_patch(crop, pred, w, h, scratch=scratch)
        np.testing.assert_array_equal(reused, face_patch(crop, pred, w, h))
    with pytest.raises(ValueError, match="scratch must be uint8"):
        face_patch(crop, pred, 10, 10, scratch=np.empty((320, 320, 3), np.uint8))


def test_face_patch_resizes_into_a_strided_destination_and_leaves_the_rest() -> None:
    """``out=`` (the composite's rectangle view: paste back without a second copy) gets the
    same pixels as a fresh patch; the pixels around the view are untouched."""
    frame = _noise((144, 176, 3), seed=12)
    rect = (40, 30, 120, 110)
    crop = crop_328(frame, rect)
    pred = _noise((320, 320, 3), seed=13)
    canvas = _noise((100, 120, 3), seed=14)
    before = canvas.copy()
    view = canvas[7:87, 13:93]  # 80 x 80, rows strided
    got = face_patch(crop, pred, 80, 80, out=view)
    assert got is view
    np.testing.assert_array_equal(view, face_patch(crop, pred, 80, 80))
    outside = np.ones(canvas.shape[:2], bool)
    outside[7:87, 13:93] = False
    np.testing.assert_array_equal(canvas[outside], before[outside])
    with pytest.raises(ValueError, match="out must be uint8"):
        face_patch(crop, pred, 80, 80, out=canvas[:80, :79])


@pytest.mark.parametrize("region", [(48, 16, 128, 112), (32, 16, 119, 112), (0, 0, 177, 144)])
def test_paste_back_region_refuses_a_region_that_cuts_the_face_or_leaves_the_frame(
    region: tuple[int, int, int, int],
) -> None:
    frame = _noise((144, 176, 3), seed=9)
    rect = (40, 30, 120, 110)
    crop = crop_328(frame, rect)
    with pytest.raises(ValueError, match=r"does not contain the face|not inside the 176x144 frame"):
        paste_back_region(frame, rect, crop, _noise((320, 320, 3)), region)


def test_pingpong_index() -> None:
    assert [pingpong_index(i, 4) for i in range(11)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2]
    assert [pingpong_index(i, 2) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [pingpong_index(i, 1) for i in range(3)] == [0, 0, 0]
    assert pingpong_index(5, 100) == 5
    with pytest.raises(ValueError):
        pingpong_index(-1, 4)
    with pytest.raises(ValueError):
        pingpong_index(0, 0)
