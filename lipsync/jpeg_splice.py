"""Spliced partial JPEG: encode only the face's MCU rectangle and splice it into the background.

Every output frame of an avatar is its video frame with only the face rectangle changed. The
background frame is encoded once, with a restart marker every ``R`` MCUs (DRI, ITU-T T.81
B.2.4.4), and kept split into its entropy-coded restart intervals (`SplicedBackground`). Per
output frame only the MCU-aligned rectangle around the face (`aligned_rect`) is composited and
encoded, with the same encoder settings, and its restart intervals replace the background's
(`splice`), with the RST markers renumbered modulo 8 (T.81 B.2.1, E.1.4).

Why the result is byte-identical to encoding the whole composited frame:

- An MCU's entropy-coded bits depend only on its own pixels, the quantization and Huffman
  tables, and the DC predictor of each component. The predictor is reset to 0 at the start of
  the scan and after every RST marker (T.81 F.1.1.5.1, E.2.4), and the encoder pads the
  interval with 1-bits to a byte boundary before the marker (F.1.2.3, E.1.4), so each restart
  interval is a self-contained whole number of bytes. With the same DQT (same quality), the
  standard Huffman tables of T.81 K.3 (no optimized Huffman: OpenCV's default) and baseline
  sequential coding (no progressive), an interval covering the same MCUs with the same pixels
  is the same bytes in both streams.
- Colour conversion is per pixel; chroma downsampling in libjpeg-turbo (``jcsample.c``
  ``h2v1``/``h2v2_downsample`` and their SIMD versions, bit-exact with each other) averages
  each 2x1 / 2x2 pixel group with a bias that alternates per output column starting at column
  0; OpenCV leaves ``smoothing_factor`` at 0, so no filter crosses a group, and every MCU
  boundary is an even pixel column, so the bias phase is the same in the rectangle and the
  frame. Nothing crosses an MCU boundary.
- Edges: an image whose size is not a multiple of the MCU is padded by libjpeg: the last
  pixel column/row is replicated to a whole block (``expand_right_edge``,
  ``expand_bottom_edge``) and blocks beyond the image inside the last MCU are "dummy" blocks
  (DC of the block to the left/above, AC 0; ``jccoefct.c``). A rectangle that ends on the
  frame's right or bottom edge ends exactly there (never rounded past it), so it has the same
  remainder modulo the MCU size and is padded the same way.

Geometry (`McuGrid`): MCU = 16x16 px at 4:2:0, 16x8 at 4:2:2, 8x8 at 4:4:4 (8 px times the
largest sampling factor, T.81 A.2.4). The frame has ``cols = ceil(W / mcu_w)`` x
``rows = ceil(H / mcu_h)`` MCUs; restart intervals run in raster order over the MCUs and the
last one may be short (it has no RST after it: EOI follows). A rectangle can be spliced when
it is a union of whole intervals in both streams:

- ``R`` divides ``cols`` (no interval wraps a row): every MCU row starts an interval, and the
  rectangle is aligned to ``R`` MCUs across (``R * mcu_w`` px) and to one MCU row down;
- otherwise intervals wrap across rows and their column phase shifts per row, so the only
  rectangles made of whole intervals are full-width bands whose first and end rows are
  multiples of ``R / gcd(cols, R)`` MCU rows (or the frame's end): correct, but the band
  costs far more to encode; `restart_mcus_for` picks an ``R`` that divides ``cols``.

The encoder is OpenCV's (libjpeg-turbo): simplejpeg cannot write restart markers. Everything
here is pure (numpy arrays and bytes in, bytes out); no I/O. Use::

    settings = SpliceSettings(85, "420", restart_mcus_for(width, "420"))
    # load time, per video frame v (its face rectangle rects[v] is fixed):
    background = SplicedBackground.encode(frames[v], settings)
    plan = SplicePlan.of(background, aligned_rect(rects[v], background.grid))
    # start-up, once: None, or the reason to fall back to full-frame encoding
    reason = check_splice(background, frames[v], rects[v], settings)
    # per output frame (lipsync.frames.paste_back_region composites only plan.rect):
    region = paste_back_region(frames[v], rects[v], crop, pred, plan.rect)
    jpeg = plan.apply(encode_bgr(region, settings))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

Subsampling = Literal["420", "422", "444"]
Rect = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` in px, x1/y1 exclusive (numpy slice bounds)."""
JpegBuffer = bytes | memoryview
"""A JPEG stream: bytes, or a byte-format (``B``) memoryview, e.g. of a memory-mapped file
(`gateway.background_cache`); read without copying."""

MCU_SIZE: Final[dict[str, tuple[int, int]]] = {"420": (16, 16), "422": (16, 8), "444": (8, 8)}
"""MCU (width, height) px per chroma subsampling: 8 px times the luma sampling factors."""

_SAMPLING_NAME: Final[dict[tuple[int, int], Subsampling]] = {(2, 2): "420", (2, 1): "422", (1, 1): "444"}
CV_SAMPLING_FACTOR: Final[dict[str, int]] = {
    "420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
    "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
    "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
}
"""OpenCV's ``IMWRITE_JPEG_SAMPLING_FACTOR`` value per chroma subsampling."""
_EOI, _SOS, _DQT, _DHT, _DRI = 0xD9, 0xDA, 0xDB, 0xC4, 0xDD
_RST0 = 0xD0
_SOF_SEQUENTIAL_HUFFMAN: Final = (0xC0, 0xC1)
"""Baseline and extended sequential DCT, Huffman coded (T.81 B.1.1.3): what splicing supports."""
_MAX_RESTART_MCUS: Final[int] = 0xFFFF
"""Ri is a 16-bit field of DRI (T.81 B.2.4.4)."""


class JpegSpliceError(ValueError):
    """A JPEG stream that cannot be split or spliced (not baseline, no DRI, malformed, wrong size)."""


# --------------------------------------------------------------------------- encoder settings
@dataclass(frozen=True, slots=True)
class SpliceSettings:
    """The one encoder configuration shared by backgrounds and rectangles.

    Attributes:
        quality: JPEG quality 1..100 (libjpeg's ``jpeg_set_quality`` scaling of the T.81 K.1
            tables).
        subsampling: chroma subsampling, ``420``, ``422`` or ``444``.
        restart_mcus: ``R``, MCUs per restart interval (the DRI field Ri), 1..65535.
    """

    quality: int
    subsampling: Subsampling
    restart_mcus: int

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.quality}")
        if self.subsampling not in MCU_SIZE:
            raise ValueError(f"unknown chroma subsampling {self.subsampling!r} (420, 422, 444)")
        if not 1 <= self.restart_mcus <= _MAX_RESTART_MCUS:
            raise ValueError(f"restart interval must be 1..65535 MCUs, got {self.restart_mcus}")

    def imencode_params(self) -> list[int]:
        """``cv2.imencode`` parameters: quality, sampling, restart interval, and baseline coding
        with the standard Huffman tables (optimize and progressive explicitly off)."""
        return [
            cv2.IMWRITE_JPEG_QUALITY, self.quality,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, CV_SAMPLING_FACTOR[self.subsampling],
            cv2.IMWRITE_JPEG_RST_INTERVAL, self.restart_mcus,
            cv2.IMWRITE_JPEG_OPTIMIZE, 0,
            cv2.IMWRITE_JPEG_PROGRESSIVE, 0,
        ]


def encode_bgr(bgr: NDArray[np.uint8], settings: SpliceSettings) -> bytes:
    """Encode uint8 ``[H, W, 3]`` BGR with `settings` (OpenCV / libjpeg-turbo): the encoder of
    both the background frames and the per-frame rectangles.

    Raises:
        ValueError: wrong dtype/shape, or OpenCV failed.
    """
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError(f"JPEG input must be uint8 [H, W, 3] BGR, got {bgr.dtype} {list(bgr.shape)}")
    ok, buf = cv2.imencode(".jpg", bgr, settings.imencode_params())
    if not ok:
        raise ValueError(f"OpenCV failed to encode a {bgr.shape[1]}x{bgr.shape[0]} image as JPEG")
    return buf.tobytes()


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True, slots=True)
class McuGrid:
    """The MCU and restart-interval grid of one frame size (see the module docstring).

    Attributes:
        width, height: frame size (px).
        mcu_width, mcu_height: MCU size (px).
        restart_mcus: ``R``, MCUs per restart interval.
    """

    width: int
    height: int
    mcu_width: int
    mcu_height: int
    restart_mcus: int

    @classmethod
    def of(cls, width: int, height: int, settings: SpliceSettings) -> McuGrid:
        """The grid of a ``width x height`` px frame encoded with `settings`.

        Raises:
            ValueError: a non-positive size.
        """
        if width < 1 or height < 1:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        mw, mh = MCU_SIZE[settings.subsampling]
        return cls(width, height, mw, mh, settings.restart_mcus)

    @property
    def cols(self) -> int:
        """MCUs per MCU row: ``ceil(width / mcu_width)``."""
        return -(-self.width // self.mcu_width)

    @property
    def rows(self) -> int:
        """MCU rows: ``ceil(height / mcu_height)``."""
        return -(-self.height // self.mcu_height)

    @property
    def intervals(self) -> int:
        """Restart intervals in the scan: ``ceil(cols * rows / R)`` (RST markers: one fewer)."""
        return -(-(self.cols * self.rows) // self.restart_mcus)

    @property
    def wraps(self) -> bool:
        """True when intervals wrap across MCU rows (``R`` does not divide ``cols``)."""
        return self.cols % self.restart_mcus != 0

    @property
    def band_rows(self) -> int:
        """MCU rows per aligned band down: 1 without wrapping, ``R / gcd(cols, R)`` with it."""
        return self.restart_mcus // math.gcd(self.cols, self.restart_mcus)

    def is_aligned(self, rect: Rect) -> bool:
        """Whether `rect` is a union of whole restart intervals (what `aligned_rect` returns)."""
        x0, y0, x1, y1 = rect
        step_x = self.width if self.wraps else self.restart_mcus * self.mcu_width
        step_y = self.band_rows * self.mcu_height
        return (
            0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height
            and x0 % step_x == 0 and (x1 % step_x == 0 or x1 == self.width)
            and y0 % step_y == 0 and (y1 % step_y == 0 or y1 == self.height)
        )


def restart_mcus_for(width: int, subsampling: Subsampling, target_px: int = 128) -> int:
    """The restart interval ``R`` (MCUs) whose width is nearest `target_px` among those that
    divide the MCU row, so intervals never wrap (ties go to the narrower one).

    Raises:
        ValueError: non-positive `width` or `target_px`, or an unknown subsampling.
    """
    if width < 1 or target_px < 1:
        raise ValueError(f"width and target must be positive, got {width} and {target_px}")
    if subsampling not in MCU_SIZE:
        raise ValueError(f"unknown chroma subsampling {subsampling!r} (420, 422, 444)")
    mw = MCU_SIZE[subsampling][0]
    cols = -(-width // mw)
    divisors = [d for d in range(1, min(cols, _MAX_RESTART_MCUS) + 1) if cols % d == 0]
    return min(divisors, key=lambda d: (abs(d * mw - target_px), d))


def aligned_rect(box: Rect | NDArray[np.integer[Any]], grid: McuGrid) -> Rect:
    """The smallest rectangle around `box` that is a union of whole restart intervals.

    Without wrapping (``R`` divides ``cols``): x rounded out to multiples of ``R * mcu_width``
    px, y to multiples of ``mcu_height`` px. With wrapping: the full width, y rounded out to
    multiples of ``band_rows * mcu_height`` px. Ends are clipped to the frame (never rounded
    past its right or bottom edge, so the edge padding matches the full frame's).

    Args:
        box: ``(x0, y0, x1, y1)`` px, x1/y1 exclusive, inside the frame (e.g. the face rect).
        grid: the frame's grid.

    Returns:
        ``(x0, y0, x1, y1)`` px, x1/y1 exclusive.

    Raises:
        ValueError: an empty box or one outside the frame.
    """
    bx0, by0, bx1, by1 = (int(v) for v in box)
    if not (0 <= bx0 < bx1 <= grid.width and 0 <= by0 < by1 <= grid.height):
        raise ValueError(
            f"box (x0={bx0}, y0={by0}, x1={bx1}, y1={by1}) is not inside the "
            f"{grid.width}x{grid.height} frame"
        )
    step_y = grid.band_rows * grid.mcu_height
    y0, y1 = by0 // step_y * step_y, min(-(-by1 // step_y) * step_y, grid.height)
    if grid.wraps:
        return 0, y0, grid.width, y1
    step_x = grid.restart_mcus * grid.mcu_width
    return bx0 // step_x * step_x, y0, min(-(-bx1 // step_x) * step_x, grid.width), y1


# --------------------------------------------------------------------------- stream parsing
@dataclass(frozen=True, slots=True)
class JpegFrame:
    """Header facts of a sequential-Huffman JFIF stream (T.81 B.2), read by `read_header`.

    Attributes:
        width, height: image size (px), from SOF.
        sampling: ``(component id, H, V, quantization table id)`` per component, from SOF.
        restart_mcus: Ri from DRI (MCUs per restart interval), 0 without DRI.
        scan_start: offset (bytes) of the first entropy-coded byte (just after the SOS header).
        segments: ``(marker, payload)`` of every segment from SOI up to and including SOS.
        size_at: offset (bytes) of SOF's 16-bit height and width fields (4 bytes, big-endian).
    """

    width: int
    height: int
    sampling: tuple[tuple[int, int, int, int], ...]
    restart_mcus: int
    scan_start: int
    segments: tuple[tuple[int, bytes], ...]
    size_at: int

    def mcu_size(self) -> tuple[int, int]:
        """MCU (width, height) px: 8 px times the largest H and V sampling factors (T.81 A.2.4)."""
        return 8 * max(s[1] for s in self.sampling), 8 * max(s[2] for s in self.sampling)

    def subsampling(self) -> Subsampling:
        """``420``, ``422`` or ``444`` (Y sampled HxV, both chroma components 1x1).

        Raises:
            JpegSpliceError: any other sampling layout.
        """
        hv = [(s[1], s[2]) for s in self.sampling]
        name = _SAMPLING_NAME.get(hv[0]) if len(hv) == 3 and hv[1] == hv[2] == (1, 1) else None
        if name is None:
            raise JpegSpliceError(f"unsupported component sampling {hv} (need Y 2x2, 2x1 or 1x1, chroma 1x1)")
        return name


def read_header(data: JpegBuffer) -> JpegFrame:
    """Walk the marker segments from SOI to SOS (T.81 B.1.1.2, B.2).

    Raises:
        JpegSpliceError: no SOI, a truncated or malformed segment, no SOF or SOS, a frame type
            other than baseline/extended sequential Huffman, or a scan that is not one
            interleaved full-spectrum pass over the three components.
    """
    if data[:2] != b"\xff\xd8":
        raise JpegSpliceError("not a JPEG stream (no SOI marker)")
    segments: list[tuple[int, bytes]] = []
    size: tuple[int, int] | None = None
    size_at = 0
    sampling: tuple[tuple[int, int, int, int], ...] = ()
    restart = 0
    i, n = 2, len(data)
    while True:
        if i + 4 > n or data[i] != 0xFF:
            raise JpegSpliceError(f"malformed JPEG header at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker (T.81 B.1.1.2)
            i += 1
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        end = i + 2 + length
        if length < 2 or end > n:
            raise JpegSpliceError(f"truncated JPEG segment 0xFF{marker:02X} at byte {i}")
        payload = bytes(data[i + 4 : end])
        segments.append((marker, payload))
        if 0xC0 <= marker <= 0xCF and marker not in (_DHT, 0xC8, 0xCC):
            if marker not in _SOF_SEQUENTIAL_HUFFMAN:
                raise JpegSpliceError(
                    f"frame type SOF{marker - 0xC0} cannot be spliced (need baseline sequential "
                    "Huffman coding: no progressive, lossless or arithmetic coding)"
                )
            height, width = (payload[1] << 8) | payload[2], (payload[3] << 8) | payload[4]
            size, size_at = (width, height), i + 5
            sampling = tuple(
                (payload[6 + 3 * k], payload[7 + 3 * k] >> 4, payload[7 + 3 * k] & 15, payload[8 + 3 * k])
                for k in range(payload[5])
            )
        elif marker == _DRI:
            restart = (payload[0] << 8) | payload[1]
        elif marker == _SOS:
            if size is None:
                raise JpegSpliceError("SOS before SOF")
            ns = payload[0]
            if ns != len(sampling) or ns != 3 or payload[1 + 2 * ns : 4 + 2 * ns] != b"\x00\x3f\x00":
                raise JpegSpliceError("the scan is not one interleaved full-spectrum scan of 3 components")
            return JpegFrame(size[0], size[1], sampling, restart, end, tuple(segments), size_at)
        i = end


def interval_starts(data: JpegBuffer, frame: JpegFrame) -> NDArray[np.int64]:
    """Byte offsets of the restart intervals of the scan (T.81 E.1.4).

    Interval ``k`` is ``data[starts[k] : starts[k + 1] - 2]`` (the 2 bytes before the next start
    are ``RST(k mod 8)``); the last one ends 2 bytes before the end of `data` (EOI).

    Raises:
        JpegSpliceError: a marker other than RST0..RST7 in the scan, RST markers out of
            sequence, a count that does not match the DRI and the frame size, or a stream that
            does not end with EOI.
    """
    a = np.frombuffer(data, dtype=np.uint8)
    scan = a[frame.scan_start :]
    ff = np.flatnonzero(scan[:-1] == 0xFF)
    following = scan[ff + 1]
    is_marker = following != 0  # 0xFF 0x00 is a stuffed data byte (T.81 F.1.2.3)
    pos, codes = ff[is_marker], following[is_marker]
    if len(pos) == 0 or codes[-1] != _EOI or pos[-1] != len(scan) - 2:
        raise JpegSpliceError("the scan does not end with EOI")
    rst = codes[:-1].astype(np.int64)
    expected = _RST0 + np.arange(len(rst)) % 8
    if not np.array_equal(rst, expected):
        k = int(np.flatnonzero(rst != expected)[0])
        raise JpegSpliceError(
            f"marker 0xFF{int(rst[k]):02X} where RST{k % 8} should follow restart interval {k}"
        )
    if frame.restart_mcus:
        mw, mh = frame.mcu_size()
        mcus = -(-frame.width // mw) * -(-frame.height // mh)
        count = -(-mcus // frame.restart_mcus)
        if len(rst) + 1 != count:
            raise JpegSpliceError(
                f"{len(rst) + 1} restart intervals, expected {count} "
                f"({mcus} MCUs, {frame.restart_mcus} per interval)"
            )
    starts = np.empty(len(rst) + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = pos[:-1] + 2
    starts += frame.scan_start
    return starts


def _table_segments(frame: JpegFrame, marker: int) -> dict[int, bytes]:
    """DQT (T.81 B.2.4.1) or DHT (B.2.4.2) tables by id (DHT: class << 4 | id)."""
    tables: dict[int, bytes] = {}
    for m, payload in frame.segments:
        if m != marker:
            continue
        i = 0
        while i < len(payload):
            key = payload[i]
            size = (128 if key >> 4 else 64) + 1 if marker == _DQT else 17 + sum(payload[i + 1 : i + 17])
            tables[key] = payload[i : i + size]
            i += size
    return tables


def header_mismatch(background_jpeg: JpegBuffer, rect_jpeg: JpegBuffer) -> str | None:
    """Why the rectangle encoder's stream cannot be spliced into the background's, or None.

    Compares what the entropy-coded bytes depend on: the frame type (SOF), component sampling
    and quantization-table choice, the quantization tables (DQT), the Huffman tables (DHT), the
    restart interval (DRI) and the scan header (SOS). Image sizes are not compared. Call it at
    start-up with a rectangle from the encoder that will run per frame; on a reason, fall back
    to full-frame encoding and say so.

    Raises:
        Nothing for parseable streams; a stream that cannot be parsed is itself the reason.
    """
    try:
        bg, rect = read_header(background_jpeg), read_header(rect_jpeg)
    except JpegSpliceError as exc:
        return f"unparseable JPEG header: {exc}"
    sof = [m for m, _ in bg.segments if 0xC0 <= m <= 0xC1], [m for m, _ in rect.segments if 0xC0 <= m <= 0xC1]
    checks: list[tuple[str, object, object]] = [
        ("frame type (SOF marker)", sof[0], sof[1]),
        ("component sampling (SOF: id, H, V, Tq)", bg.sampling, rect.sampling),
        ("quantization tables (DQT; a different JPEG quality?)",
         _table_segments(bg, _DQT), _table_segments(rect, _DQT)),
        ("Huffman tables (DHT; optimized Huffman coding?)",
         _table_segments(bg, _DHT), _table_segments(rect, _DHT)),
        ("restart interval (DRI, MCUs)", bg.restart_mcus, rect.restart_mcus),
        ("scan header (SOS)",
         next(p for m, p in bg.segments if m == _SOS), next(p for m, p in rect.segments if m == _SOS)),
    ]
    for what, ours, theirs in checks:
        if ours != theirs:
            return f"{what} differ between the background and the rectangle encoder"
    if bg.restart_mcus == 0:
        return "the background has no restart interval (DRI)"
    return None


# --------------------------------------------------------------------------- splicing
@dataclass(frozen=True, slots=True)
class SplicedBackground:
    """One background frame's JPEG, split into its restart intervals.

    Attributes:
        jpeg: the whole JPEG (bytes, or a memoryview of a mapped cache entry: never copied here);
            served as is where the frame has no face change.
        starts: int64 ``[intervals]`` byte offset of each restart interval in `jpeg`.
        grid: the frame's MCU / restart grid.
        scan_start: offset (bytes) of the first entropy-coded byte (header = ``jpeg[:scan_start]``).
        size_at: offset (bytes) of SOF's height and width fields.
    """

    jpeg: JpegBuffer
    starts: NDArray[np.int64]
    grid: McuGrid
    scan_start: int
    size_at: int

    @classmethod
    def from_jpeg(cls, jpeg: JpegBuffer) -> SplicedBackground:
        """Split an existing JPEG (e.g. precomputed by the package builder).

        Raises:
            JpegSpliceError: not baseline sequential Huffman, no DRI, unsupported sampling, or a
                malformed scan (see `read_header`, `interval_starts`).
        """
        frame = read_header(jpeg)
        if frame.restart_mcus == 0:
            raise JpegSpliceError("the background JPEG has no restart interval (DRI)")
        mw, mh = frame.mcu_size()
        frame.subsampling()  # supported layouts only
        grid = McuGrid(frame.width, frame.height, mw, mh, frame.restart_mcus)
        return cls(jpeg, interval_starts(jpeg, frame), grid, frame.scan_start, frame.size_at)

    @classmethod
    def encode(cls, frame_bgr: NDArray[np.uint8], settings: SpliceSettings) -> SplicedBackground:
        """Encode a background frame, uint8 ``[H, W, 3]`` BGR, with `settings` and split it.

        Raises:
            ValueError: wrong dtype/shape; JpegSpliceError if the encoder's stream is unusable.
        """
        return cls.from_jpeg(encode_bgr(frame_bgr, settings))

    @property
    def header(self) -> bytes:
        """SOI .. SOS header (bytes)."""
        return bytes(self.jpeg[: self.scan_start])

    @property
    def nbytes(self) -> int:
        """Memory held (bytes): the JPEG plus the offsets."""
        return len(self.jpeg) + self.starts.nbytes


@dataclass(frozen=True, slots=True)
class SplicePlan:
    """Everything `splice` needs that depends only on the background and the rectangle, so a
    caller that splices the same video frame's rectangle again (the face rectangle of a video
    frame is fixed) builds it once and pays only `apply` per output frame.

    Attributes:
        background: the split background frame.
        rect: ``(x0, y0, x1, y1)`` px, aligned to ``background.grid``.
        rect_header: the SOI..SOS header every rectangle stream must start with: the
            background's with SOF's size replaced by the rectangle's (bytes).
        codes: uint8 ``[n - 1]``, the RST marker code after each rectangle interval but the last,
            renumbered to the frame's interval count (``0xD0 + k mod 8``).
        run_first, run_end: per run of consecutive frame intervals (one per MCU row without
            wrapping, one band with it), the first rectangle interval and one past the last.
        bg_pieces: views of the background bytes before, between and after the runs
            (``len(runs) + 1``).
    """

    background: SplicedBackground
    rect: Rect
    rect_header: bytes
    codes: NDArray[np.uint8]
    run_first: NDArray[np.int64]
    run_end: NDArray[np.int64]
    bg_pieces: tuple[memoryview, ...]

    @classmethod
    def of(cls, background: SplicedBackground, rect: Rect) -> SplicePlan:
        """Plan splicing `rect` into `background`.

        Raises:
            ValueError: `rect` is not aligned to the background's restart grid.
        """
        grid = background.grid
        if not grid.is_aligned(rect):
            raise ValueError(f"rectangle {rect} is not aligned to the restart grid of {grid}")
        x0, y0, x1, y1 = (int(v) for v in rect)
        # frame interval index of each rectangle interval: its first MCU in the frame's raster / R
        r = grid.restart_mcus
        rect_cols = -(-(x1 - x0) // grid.mcu_width)
        rect_mcus = rect_cols * -(-(y1 - y0) // grid.mcu_height)
        first_mcu = np.arange(-(-rect_mcus // r), dtype=np.int64) * r
        full = ((y0 // grid.mcu_height + first_mcu // rect_cols) * grid.cols
                + x0 // grid.mcu_width + first_mcu % rect_cols) // r
        breaks = np.flatnonzero(np.diff(full) != 1) + 1
        run_first = np.concatenate(([0], breaks)).astype(np.int64)
        run_end = np.concatenate((breaks, [len(full)])).astype(np.int64)
        starts, jpeg = background.starts, background.jpeg
        bg_ends = np.append(starts[1:] - 2, len(jpeg) - 2)  # each interval's end (its RST or EOI)
        cuts = [0]
        for a, b in zip(full[run_first].tolist(), full[run_end - 1].tolist(), strict=True):
            cuts += [int(starts[a]), int(bg_ends[b])]  # bg keeps its own markers around each run
        cuts.append(len(jpeg))
        at = background.size_at
        size = (y1 - y0).to_bytes(2, "big") + (x1 - x0).to_bytes(2, "big")  # SOF: Y then X
        header = bytes(jpeg[:at]) + size + bytes(jpeg[at + 4 : background.scan_start])
        codes = (_RST0 + full[:-1] % 8).astype(np.uint8)
        view = memoryview(jpeg)  # zero-copy: a plan holds no second copy of the background
        pieces = tuple(view[cuts[k] : cuts[k + 1]] for k in range(0, len(cuts), 2))
        return cls(background, (x0, y0, x1, y1), header, codes, run_first, run_end, pieces)

    def apply(self, rect_jpeg: bytes) -> bytes:
        """Splice one rectangle stream (see `splice`).

        Raises:
            JpegSpliceError: `rect_jpeg` has another header (size, tables, restart interval)
                than the plan's, or its scan does not hold the expected restart intervals.
        """
        head = len(self.rect_header)
        if not rect_jpeg.startswith(self.rect_header):
            raise JpegSpliceError(self._header_problem(rect_jpeg))
        a = np.frombuffer(rect_jpeg, dtype=np.uint8)
        ff = np.flatnonzero(a[head:-1] == 0xFF) + head
        markers = ff[a[ff + 1] != 0]  # 0xFF 0x00 is a stuffed data byte (T.81 F.1.2.3)
        count = len(self.codes) + 1
        if (len(markers) != count or markers[-1] != len(a) - 2 or a[-1] != _EOI
                or np.any((a[markers[:-1] + 1] & 0xF8) != _RST0)):
            raise JpegSpliceError(
                f"rectangle scan holds {len(markers)} markers, expected {count - 1} RST then EOI")
        patched = a.copy()
        patched[markers[:-1] + 1] = self.codes
        bounds = np.empty(count + 1, dtype=np.int64)  # interval j is patched[bounds[j] + 2 : bounds[j + 1]]
        bounds[0], bounds[1:] = head - 2, markers
        rect_from = (bounds[self.run_first] + 2).tolist()
        rect_to = bounds[self.run_end].tolist()
        rv = patched.data
        pieces: list[memoryview] = []
        for bg, lo, hi in zip(self.bg_pieces, rect_from, rect_to, strict=False):
            pieces += (bg, rv[lo:hi])
        pieces.append(self.bg_pieces[-1])
        return b"".join(pieces)

    def _header_problem(self, rect_jpeg: bytes) -> str:
        reason = header_mismatch(self.background.jpeg, rect_jpeg)
        if reason is not None:
            return reason
        try:
            head = read_header(rect_jpeg)
        except JpegSpliceError as exc:
            return str(exc)
        x0, y0, x1, y1 = self.rect
        return (f"rectangle JPEG is {head.width}x{head.height} px with R={head.restart_mcus}, "
                f"expected {x1 - x0}x{y1 - y0} px with R={self.background.grid.restart_mcus}"
                + ("" if (head.width, head.height) != (x1 - x0, y1 - y0)
                   else " (other header segments differ)"))


def splice(background: SplicedBackground, rect: Rect, rect_jpeg: bytes) -> bytes:
    """The background JPEG with the restart intervals under `rect` taken from `rect_jpeg`.

    Same as ``SplicePlan.of(background, rect).apply(rect_jpeg)``; keep the plan to splice the
    same rectangle again.

    Args:
        background: the split background frame.
        rect: ``(x0, y0, x1, y1)`` px from `aligned_rect` on ``background.grid``.
        rect_jpeg: the rectangle's pixels (uint8 ``[y1 - y0, x1 - x0, 3]``) encoded with the
            background's settings (`encode_bgr`).

    Returns:
        The spliced JPEG: equal, byte for byte, to encoding the background frame with the
        rectangle's pixels written into it.

    Raises:
        ValueError: `rect` is not aligned to the background's restart grid.
        JpegSpliceError: `rect_jpeg` has another header (size, tables, restart interval) than
            the rectangle needs, or a malformed scan.
    """
    return SplicePlan.of(background, rect).apply(rect_jpeg)


def splice_region(
    background: SplicedBackground, rect: Rect, region_bgr: NDArray[np.uint8], settings: SpliceSettings
) -> bytes:
    """Encode the composited rectangle (uint8 ``[y1 - y0, x1 - x0, 3]`` BGR) and `splice` it.

    Raises:
        ValueError, JpegSpliceError: as `encode_bgr` and `splice`.
    """
    return splice(background, rect, encode_bgr(region_bgr, settings))


def check_splice(
    background: SplicedBackground, frame_bgr: NDArray[np.uint8], box: Rect, settings: SpliceSettings
) -> str | None:
    """Start-up self-test of the per-frame rectangle encoder against a background.

    Compares the table headers (`header_mismatch`), then splices the inverted rectangle around
    `box` and compares it byte for byte with a full encode of the same composited frame.

    Args:
        background: the split background of `frame_bgr` (e.g. loaded from a package or cache).
        frame_bgr: that background's video frame, uint8 ``[H, W, 3]`` BGR.
        box: a face rectangle ``(x0, y0, x1, y1)`` px.
        settings: the settings the gateway will encode rectangles with.

    Returns:
        None when splicing is exact; otherwise the reason, for the caller to log (and report)
        before falling back to full-frame encoding.
    """
    if frame_bgr.shape[:2] != (background.grid.height, background.grid.width):
        return (f"frame is {frame_bgr.shape[1]}x{frame_bgr.shape[0]} px but the background is "
                f"{background.grid.width}x{background.grid.height}")
    try:
        rect = aligned_rect(box, background.grid)
        x0, y0, x1, y1 = rect
        region = np.ascontiguousarray(255 - frame_bgr[y0:y1, x0:x1])
        rect_jpeg = encode_bgr(region, settings)
        reason = header_mismatch(background.jpeg, rect_jpeg)
        if reason is not None:
            return reason
        composited = frame_bgr.copy()
        composited[y0:y1, x0:x1] = region
        spliced, full = splice(background, rect, rect_jpeg), encode_bgr(composited, settings)
    except ValueError as exc:  # JpegSpliceError included
        return f"splicing failed: {exc}"
    if spliced != full:
        diff = next(
            (i for i, (p, q) in enumerate(zip(spliced, full, strict=False)) if p != q),
            min(len(spliced), len(full)),
        )
        return (f"spliced JPEG differs from the full-frame encode at byte {diff} "
                f"({len(spliced)} vs {len(full)} bytes): the background was encoded differently")
    return None
