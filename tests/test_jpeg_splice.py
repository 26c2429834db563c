"""`lipsync.jpeg_splice`: the spliced partial JPEG is byte-identical to a full encode.

Real frames: the demo clip (`carphone_pristine.mp4`, 176x144) decoded by the package builder's
decoder, at its own size and upscaled (bicubic, as `--height` does) to 880x720, 1280x720 and an
odd 881x719. The composite is the real paste back (`lipsync.frames.paste_back`) of a synthetic
prediction (the inner crop mirrored and tinted) into face boxes at the centre, the corners and
each edge of the frame.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from lipsync.frames import crop_328, inner_320, paste_back, paste_back_region
from lipsync.jpeg_splice import (
    JpegSpliceError,
    McuGrid,
    SplicedBackground,
    SplicePlan,
    SpliceSettings,
    Subsampling,
    aligned_rect,
    check_splice,
    encode_bgr,
    header_mismatch,
    interval_starts,
    read_header,
    restart_mcus_for,
    splice,
    splice_region,
)

SIZES = [(176, 144), (880, 720), (1280, 720), (881, 719)]
"""Frame sizes (width, height) px: the clip, its 720p builds, and one not a multiple of 16."""

BOXES = {
    "centre": (0.37, 0.30, 0.63, 0.62),
    "top-left": (0.0, 0.0, 0.27, 0.3),
    "top-right": (0.73, 0.0, 1.0, 0.3),
    "bottom-left": (0.0, 0.7, 0.27, 1.0),
    "bottom-right": (0.73, 0.7, 1.0, 1.0),
    "left-edge": (0.0, 0.35, 0.25, 0.65),
    "right-edge": (0.75, 0.35, 1.0, 0.65),
    "top-edge": (0.4, 0.0, 0.62, 0.28),
    "bottom-edge": (0.4, 0.72, 0.62, 1.0),
}
"""Face boxes as fractions of the frame (x0, y0, x1, y1); 0 and 1 touch the frame edges."""


@pytest.fixture(scope="module")
def clip() -> NDArray[np.uint8]:
    """Four frames of the demo clip, uint8 [4, 144, 176, 3] BGR."""
    from export.demo import demo_video_path
    from export.video import decode_video

    return decode_video(demo_video_path(), progress=False).frames[[0, 30, 60, 90]]


def _frame(clip: NDArray[np.uint8], k: int, size: tuple[int, int]) -> NDArray[np.uint8]:
    frame = clip[k]
    if size == (frame.shape[1], frame.shape[0]):
        return np.ascontiguousarray(frame)
    return cv2.resize(frame, size, interpolation=cv2.INTER_CUBIC)


def _box(name: str, size: tuple[int, int]) -> tuple[int, int, int, int]:
    w, h = size
    fx0, fy0, fx1, fy1 = BOXES[name]
    return round(fx0 * w), round(fy0 * h), round(fx1 * w), round(fy1 * h)


def _prediction(crop: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """A synthetic UNet output: the inner crop mirrored left-right and tinted (natural texture
    that really differs from the frame)."""
    mirrored = inner_320(crop)[:, ::-1].astype(np.int16)
    return np.clip(mirrored + np.array([40, -30, 20], np.int16), 0, 255).astype(np.uint8)


def _composite(frame: NDArray[np.uint8], box: tuple[int, int, int, int]) -> NDArray[np.uint8]:
    crop = crop_328(frame, box)
    return paste_back(frame, box, crop, _prediction(crop))


def _psnr(a: NDArray[Any], b: NDArray[Any]) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _restart_choices(width: int, subsampling: Subsampling) -> Iterator[int]:
    """R = 1, 8, one MCU row, and an R that does not divide the row (intervals wrap)."""
    cols = McuGrid.of(width, 16, SpliceSettings(85, subsampling, 1)).cols
    yield from (1, 8, cols)
    yield next(r for r in (3, 5, 7, 9) if cols % r)


# --------------------------------------------------------------------------- byte identity
@pytest.mark.parametrize("quality", [85, 95])
@pytest.mark.parametrize("subsampling", ["420", "444"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_spliced_jpeg_is_byte_identical_to_encoding_the_composited_frame(
    clip: NDArray[np.uint8], size: tuple[int, int], subsampling: Subsampling, quality: int
) -> None:
    failures = []
    for k, restart in enumerate(_restart_choices(size[0], subsampling)):
        settings = SpliceSettings(quality, subsampling, restart)
        frame = _frame(clip, k, size)
        background = SplicedBackground.encode(frame, settings)
        assert background.grid.wraps == (background.grid.cols % restart != 0)
        for name in BOXES:
            box = _box(name, size)
            composited = _composite(frame, box)
            rect = aligned_rect(box, background.grid)
            x0, y0, x1, y1 = rect
            assert x0 <= box[0] and y0 <= box[1] and box[2] <= x1 and box[3] <= y1
            crop = crop_328(frame, box)
            region = paste_back_region(frame, box, crop, _prediction(crop), rect)
            spliced = splice_region(background, rect, region, settings)
            full = encode_bgr(composited, settings)
            assert not np.array_equal(composited[y0:y1, x0:x1], frame[y0:y1, x0:x1])
            assert spliced != background.jpeg, "the face change must reach the stream"
            if spliced != full:
                failures.append(f"R={restart} box {name} {box} rect {rect}")
    assert not failures, "spliced != full encode for: " + "; ".join(failures)


def test_splice_at_422_and_of_the_whole_frame(clip: NDArray[np.uint8]) -> None:
    """4:2:2 (16x8 MCUs), and a rectangle that is the whole frame (first and last interval)."""
    cases: list[tuple[tuple[int, int], Subsampling]] = [((881, 719), "422"), ((176, 144), "420")]
    for size, subsampling in cases:
        settings = SpliceSettings(85, subsampling, 4)
        frame = _frame(clip, 1, size)
        background = SplicedBackground.encode(frame, settings)
        for box in [_box("centre", size), (0, 0, *size)]:
            composited = _composite(frame, box)
            rect = aligned_rect(box, background.grid)
            x0, y0, x1, y1 = rect
            spliced = splice_region(background, rect, composited[y0:y1, x0:x1].copy(), settings)
            assert spliced == encode_bgr(composited, settings), (size, subsampling, box)


@pytest.mark.parametrize("size", [(880, 720), (881, 719)], ids=["880x720", "881x719"])
def test_spliced_jpeg_decodes_to_the_composited_frame(clip: NDArray[np.uint8], size: tuple[int, int]) -> None:
    settings = SpliceSettings(85, "420", restart_mcus_for(size[0], "420"))
    frame = _frame(clip, 2, size)
    background = SplicedBackground.encode(frame, settings)
    box = _box("centre", size)
    composited = _composite(frame, box)
    rect = aligned_rect(box, background.grid)
    x0, y0, x1, y1 = rect
    decoded = cv2.imdecode(
        np.frombuffer(splice_region(background, rect, composited[y0:y1, x0:x1].copy(), settings), np.uint8),
        cv2.IMREAD_COLOR,
    )
    assert decoded is not None and decoded.shape == composited.shape
    bx0, by0, bx1, by1 = box
    assert _psnr(decoded, composited) > 35
    assert _psnr(decoded[by0:by1, bx0:bx1], composited[by0:by1, bx0:bx1]) > 33
    # the face really changed: the decoded box is far from the background's box
    assert _psnr(decoded[by0:by1, bx0:bx1], frame[by0:by1, bx0:bx1]) < 25


# --------------------------------------------------------------------------- geometry
def test_mcu_grid_of_720p_and_odd_frames() -> None:
    g = McuGrid.of(1280, 720, SpliceSettings(85, "420", 8))
    assert (g.cols, g.rows, g.intervals, g.wraps, g.band_rows) == (80, 45, 450, False, 1)
    g = McuGrid.of(880, 720, SpliceSettings(85, "420", 8))  # 55 MCUs a row: R=8 wraps
    assert (g.cols, g.rows, g.intervals, g.wraps, g.band_rows) == (55, 45, 310, True, 8)
    g = McuGrid.of(881, 719, SpliceSettings(85, "444", 16))  # 8x8 MCUs
    assert (g.cols, g.rows, g.intervals, g.wraps, g.band_rows) == (111, 90, 625, True, 16)
    g = McuGrid.of(881, 719, SpliceSettings(85, "422", 8))  # 16x8 MCUs
    assert (g.mcu_width, g.mcu_height, g.cols, g.rows, g.wraps) == (16, 8, 56, 90, False)


def test_aligned_rect_rounds_out_to_the_restart_grid_and_stops_at_the_frame_edge() -> None:
    grid = McuGrid.of(1280, 720, SpliceSettings(85, "420", 8))  # 128 px x 16 px cells
    assert aligned_rect((500, 200, 740, 440), grid) == (384, 192, 768, 448)
    assert aligned_rect((0, 0, 1, 1), grid) == (0, 0, 128, 16)
    assert aligned_rect((1279, 719, 1280, 720), grid) == (1152, 704, 1280, 720)
    grid = McuGrid.of(881, 719, SpliceSettings(85, "420", 8))  # 56 MCUs a row: no wrap
    assert aligned_rect((800, 700, 881, 719), grid) == (768, 688, 881, 719)
    grid = McuGrid.of(880, 720, SpliceSettings(85, "420", 8))  # wraps: full-width bands of 8 rows
    assert aligned_rect((300, 200, 500, 300), grid) == (0, 128, 880, 384)
    assert aligned_rect((300, 700, 500, 720), grid) == (0, 640, 880, 720)
    for box in [(-1, 0, 10, 10), (0, 0, 881, 10), (10, 10, 10, 20)]:
        with pytest.raises(ValueError, match="not inside the 880x720 frame"):
            aligned_rect(box, grid)


def test_restart_mcus_for_picks_a_divisor_of_the_mcu_row_near_the_target() -> None:
    assert restart_mcus_for(1280, "420") == 8  # 80 MCUs: 8 x 16 px = 128 px
    assert restart_mcus_for(880, "420") == 5  # 55 MCUs: 80 px and 176 px tie -> 80 px
    assert restart_mcus_for(1280, "444") == 16  # 160 MCUs of 8 px
    assert restart_mcus_for(176, "420", target_px=10_000) == 11  # one MCU row
    assert restart_mcus_for(881, "420") == 8  # 56 MCUs


def test_background_intervals_match_the_dri_and_end_with_eoi(clip: NDArray[np.uint8]) -> None:
    frame = _frame(clip, 0, (880, 720))
    background = SplicedBackground.encode(frame, SpliceSettings(85, "420", 5))
    head = read_header(background.jpeg)
    assert head.restart_mcus == 5 and (head.width, head.height) == (880, 720)
    assert len(background.starts) == background.grid.intervals == 55 * 45 // 5
    jpeg = background.jpeg
    for k in range(1, len(background.starts)):  # RST(k-1 mod 8) right before interval k
        assert jpeg[background.starts[k] - 2] == 0xFF
        assert jpeg[background.starts[k] - 1] == 0xD0 + (k - 1) % 8
    assert jpeg[-2:] == b"\xff\xd9" and background.header == jpeg[: background.scan_start]
    assert background.nbytes == len(jpeg) + 8 * len(background.starts)


# --------------------------------------------------------------------------- errors and the start-up check
def test_header_mismatch_names_what_differs(clip: NDArray[np.uint8]) -> None:
    frame = _frame(clip, 0, (176, 144))
    base = SpliceSettings(85, "420", 11)
    background = encode_bgr(frame, base)
    rect = np.ascontiguousarray(frame[16:64, :])
    assert header_mismatch(background, encode_bgr(rect, base)) is None
    cases = {
        "quantization tables (DQT": SpliceSettings(86, "420", 11),
        "component sampling": SpliceSettings(85, "444", 11),
        "restart interval (DRI": SpliceSettings(85, "420", 1),
    }
    for reason, other in cases.items():
        mismatch = header_mismatch(background, encode_bgr(rect, other))
        assert mismatch is not None and reason in mismatch, (reason, mismatch)
    ok, optimized = cv2.imencode(".jpg", rect, [*base.imencode_params()[:-4], cv2.IMWRITE_JPEG_OPTIMIZE, 1])
    assert ok
    assert "Huffman tables (DHT" in (header_mismatch(background, optimized.tobytes()) or "")
    ok, progressive = cv2.imencode(".jpg", rect, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    assert "SOF2 cannot be spliced" in (header_mismatch(background, progressive.tobytes()) or "")


def test_check_splice_passes_for_the_same_encoder_and_explains_a_different_one(
    clip: NDArray[np.uint8],
) -> None:
    frame = _frame(clip, 3, (881, 719))
    box = _box("centre", (881, 719))
    settings = SpliceSettings(85, "420", 8)
    background = SplicedBackground.encode(frame, settings)
    assert check_splice(background, frame, box, settings) is None
    reason = check_splice(background, frame, box, SpliceSettings(95, "420", 8))
    assert reason is not None and "DQT" in reason
    other_frame = _frame(clip, 0, (881, 719))  # a background that is not this frame's encode
    reason = check_splice(SplicedBackground.encode(other_frame, settings), frame, box, settings)
    assert reason is not None and "differs from the full-frame encode" in reason
    assert "880x720" in (check_splice(background, _frame(clip, 3, (880, 720)), box, settings) or "")


def test_splice_refuses_unaligned_rects_and_wrong_rectangle_streams(clip: NDArray[np.uint8]) -> None:
    frame = _frame(clip, 0, (1280, 720))
    settings = SpliceSettings(85, "420", 8)
    background = SplicedBackground.encode(frame, settings)
    rect = (384, 192, 768, 448)
    with pytest.raises(ValueError, match="not aligned to the restart grid"):
        splice(background, (384, 192, 767, 448), encode_bgr(frame[192:448, 384:767].copy(), settings))
    with pytest.raises(JpegSpliceError, match="is 256x256 px with R=8, expected 384x256 px with R=8"):
        splice(background, rect, encode_bgr(frame[192:448, 384:640].copy(), settings))
    with pytest.raises(JpegSpliceError, match="restart interval \\(DRI, MCUs\\) differ"):
        splice(background, rect, encode_bgr(frame[192:448, 384:768].copy(), SpliceSettings(85, "420", 4)))
    with pytest.raises(JpegSpliceError, match="quantization tables"):
        splice(background, rect, encode_bgr(frame[192:448, 384:768].copy(), SpliceSettings(90, "420", 8)))
    good = encode_bgr(frame[192:448, 384:768].copy(), settings)
    with pytest.raises(JpegSpliceError, match="markers, expected 47 RST then EOI"):  # 3 x 16 intervals
        splice(background, rect, good[: len(good) // 2] + b"\xff\xd9")
    with pytest.raises(JpegSpliceError, match="markers, expected 47 RST then EOI"):
        splice(background, rect, good[:-2])
    with pytest.raises(JpegSpliceError, match="no SOI"):
        splice(background, rect, b"GIF89a" + good)


def test_one_plan_splices_every_output_frame_of_a_video_frame(clip: NDArray[np.uint8]) -> None:
    """The gateway's use: one `SplicePlan` per video frame, applied to each new prediction."""
    size = (1280, 720)
    settings = SpliceSettings(85, "420", restart_mcus_for(1280, "420"))
    frame = _frame(clip, 2, size)
    box = _box("centre", size)
    background = SplicedBackground.encode(frame, settings)
    plan = SplicePlan.of(background, aligned_rect(box, background.grid))
    crop = crop_328(frame, box)
    outputs = set()
    for tint in range(0, 120, 30):
        pred = np.clip(inner_320(crop).astype(np.int16) + tint - 60, 0, 255).astype(np.uint8)
        spliced = plan.apply(encode_bgr(paste_back_region(frame, box, crop, pred, plan.rect), settings))
        assert spliced == encode_bgr(paste_back(frame, box, crop, pred), settings)
        outputs.add(spliced)
    assert len(outputs) == 4


def test_from_jpeg_refuses_streams_without_restart_intervals_or_with_broken_scans(
    clip: NDArray[np.uint8],
) -> None:
    frame = _frame(clip, 0, (176, 144))
    ok, plain = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    with pytest.raises(JpegSpliceError, match="no restart interval"):
        SplicedBackground.from_jpeg(plain.tobytes())
    jpeg = bytearray(encode_bgr(frame, SpliceSettings(85, "420", 11)))
    starts = interval_starts(bytes(jpeg), read_header(bytes(jpeg)))
    jpeg[starts[3] - 1] = 0xD5  # RST2 expected after interval 2
    with pytest.raises(JpegSpliceError, match="where RST2 should follow restart interval 2"):
        SplicedBackground.from_jpeg(bytes(jpeg))
    with pytest.raises(JpegSpliceError, match="truncated JPEG segment"):
        SplicedBackground.from_jpeg(bytes(jpeg[:30]))
