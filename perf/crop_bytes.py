"""Bytes per frame at 720p: full frames vs crop output (issue 9 item 6).

    python -m perf.crop_bytes                 # builds the 720p avatar once (~1 min)

For every video frame of the demo clip built at 720p (`perf.micro_720p.ensure_avatar`, 880x720),
the gateway's own `gateway.compositor.Compositor` composites a prediction and encodes it as the
WebSocket would send it: a full frame (spliced JPEG, the default) in a ``/ws`` reply, and the
face rectangle alone in a ``/ws?output=crop`` reply (`gateway.ws_protocol`; message bytes,
framing included). Predictions: the identity UNet (pred = crop, as in `perf.capacity`) for every
video frame, and the real ONNX Runtime outputs of the avatar's untrained UNet (noise in the
mouth: a worst case for the face JPEG) for the first frames. The background JPEGs a crop client
fetches once are counted separately, with the number of frames after which crop output has
sent fewer bytes in all. Writes ``perf/results/crop_bytes.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from perf import report
from perf.micro_720p import SCRATCH, ensure_avatar, real_predictions

log = logging.getLogger(__name__)

QUALITY = 85
REAL_FRAMES = 24
"""Video frames rendered with the real UNet (ONNX Runtime on this CPU: ~0.3 s each)."""


@dataclass(frozen=True, slots=True)
class Row:
    """Bytes per frame of one prediction kind (means over the frames)."""

    predictions: str
    frames: int
    full_bytes: float
    crop_bytes: float
    face_px: float

    @property
    def ratio(self) -> float:
        """crop / full."""
        return self.crop_bytes / self.full_bytes


def measure(
    avatar: object, compositor: object, preds: NDArray[np.uint8], frames: Sequence[int], label: str
) -> Row:
    """Mean WebSocket reply bytes, full vs crop, over ``frames`` (video frame indices)."""
    from gateway.compositor import Compositor
    from gateway.store import Avatar
    from gateway.ws_protocol import encode_crop_reply, encode_frame_reply

    assert isinstance(avatar, Avatar) and isinstance(compositor, Compositor)
    full, crop, area = [], [], []
    for k, v in enumerate(frames):
        rect = avatar.rect(v)
        whole = compositor.composite(avatar, v, preds[k], "composite").jpeg
        face = compositor.composite(avatar, v, preds[k], "face").jpeg
        full.append(len(encode_frame_reply(v, 0, whole, rect)))
        crop.append(len(encode_crop_reply(v, 0, face, rect, v)))
        area.append((rect[2] - rect[0]) * (rect[3] - rect[1]))
    return Row(label, len(frames), float(np.mean(full)), float(np.mean(crop)), float(np.mean(area)))


def main(argv: Sequence[str] | None = None) -> int:
    """Build (once) the 720p avatar, measure, write the report."""
    p = argparse.ArgumentParser(prog="python -m perf.crop_bytes", description=__doc__.split("\n")[0])
    p.add_argument("--scratch", type=Path, default=SCRATCH, help="scratch root for the 720p avatar")
    p.add_argument("--real-frames", type=int, default=REAL_FRAMES, help="frames rendered with the real UNet")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR / "crop_bytes.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from export.model_repo import served_version
    from gateway.compositor import Compositor
    from gateway.jpeg import RestartIntervalEncoder, SimpleJpegEncoder
    from gateway.store import prepare_avatar
    from lipsync.package import load_package

    package = load_package(ensure_avatar(args.scratch))
    avatar = prepare_avatar(package)
    compositor = Compositor(SimpleJpegEncoder(QUALITY), RestartIntervalEncoder(QUALITY), splice=True)
    avatar.backgrounds = compositor.backgrounds(avatar)
    n = avatar.video_frames
    rows = [measure(avatar, compositor, avatar.inners, range(n), "identity UNet (pred = crop)")]
    served = served_version(args.scratch / "model_repo_cpu", package.manifest.model_name)
    if served is not None and args.real_frames > 0:
        count = min(args.real_frames, n)
        preds = real_predictions(served.onnx_path, avatar.inners, package.features, count)
        rows.append(
            measure(avatar, compositor, preds, range(count), "real UNet, untrained (noise in the mouth)")
        )
    background = sum(len(avatar.backgrounds.jpeg(v)) for v in range(n))
    identity = rows[0]
    break_even = background / (identity.full_bytes - identity.crop_bytes)
    lines = [
        f"- avatar: `{package.manifest.name}` built by `lipsync package build --height 720` "
        "from the demo clip "
        f"({avatar.width}x{avatar.height}, {n} video frames, face rectangle "
        f"{int(np.sqrt(identity.face_px))} px on average); JPEG quality {QUALITY}, "
        f"{compositor.restart.subsampling}",
        "- full = a `/ws` reply holding the spliced full frame (the gateway's default); crop = a "
        "`/ws?output=crop` reply holding the face rectangle's JPEG (simplejpeg) + bounds + video "
        "frame; bytes are whole WebSocket messages (payload, without the 2-10 byte frame header)",
        "",
        "| predictions | frames | full bytes/frame | crop bytes/frame | crop / full |",
        "|---|---|---|---|---|",
        *(
            f"| {r.predictions} | {r.frames} | {r.full_bytes:,.0f} | {r.crop_bytes:,.0f} "
            f"| {r.ratio:.3f} (1/{1 / r.ratio:.1f}) |"
            for r in rows
        ),
        "",
        f"Background JPEGs a crop client fetches once: {background / 1024:,.0f} KiB for {n} video frames "
        f"({background / n / 1024:.1f} KiB each, cacheable); with the identity UNet crop output has sent "
        f"fewer bytes in all after {break_even:,.0f} frames ({break_even / 25:.1f} s at 25 fps).",
    ]
    command = report.command_line(
        ["python", "-m", "perf.crop_bytes", *(sys.argv[1:] if argv is None else argv)]
    )
    title = "Bytes per 720p frame: full frames vs crop output"
    report.write_text(args.out, [*report.header(title, command=command), *lines])
    report.write_json(
        args.out.with_suffix(".json"),
        {
            "command": command,
            "date": report.utc_now(),
            "quality": QUALITY,
            "rows": [asdict(r) for r in rows],
            "background_bytes": background,
            "video_frames": n,
            "break_even_frames": break_even,
        },
    )
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
