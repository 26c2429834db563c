"""Per-frame CPU micro-benchmark of the gateway's own work at 720p: prepare, composite
(paste back, docs/REFERENCE.md s.2 step 8) and JPEG with each available encoder, full frame vs
face crop only. Inference is not part of it (Triton's job); the predictions pasted are real
ONNX Runtime outputs of the avatar's UNet.

    python -m perf.micro_720p                     # builds the 720p avatar once (~1 min)
    python -m perf.micro_720p --iterations 200

The avatar is built from the demo clip with the package builder's rescale option
(`lipsync package build ... --name demo720 --height 720`) into a scratch packages root
(`.cache/perf/micro720/`), so the repository's packages and model repositories are untouched.
The clip is 11:9, so its 720p frames are 880x720; the benchmark also measures the same frames
pillarboxed to 1280x720 (the face rectangle shifted accordingly), the size the issue names.

Per stage, every iteration times one call with `time.perf_counter` on consecutive frames
(ping-pong over the video); the report gives the median and p90 (ms) and the JPEG sizes (KiB).
Writes `perf/results/micro_720p.md` and `.json`.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from gateway.jpeg import JpegEncoder
from lipsync.contract import UNET_AUDIO, UNET_CROP, UNET_PRED
from perf import report

log = logging.getLogger(__name__)

SCRATCH = Path(__file__).resolve().parent.parent / ".cache" / "perf" / "micro720"
"""Scratch root of the 720p avatar: packages/ and model repositories."""

AVATAR = "demo720"
JPEG_QUALITY = 85


@dataclass(frozen=True, slots=True)
class StageTiming:
    """Timing of one stage over the iterations (ms) and, for JPEG, the mean size (KiB)."""

    frame: str
    stage: str
    variant: str
    median_ms: float
    p90_ms: float
    iterations: int
    mean_kib: float = float("nan")


class TurboJpegEncoder:
    """PyTurboJPEG (libjpeg-turbo through ctypes), BGR input, 4:2:0."""

    name = "pyturbojpeg"

    def __init__(self, quality: int = JPEG_QUALITY) -> None:
        from turbojpeg import TJPF_BGR, TJSAMP_420, TurboJPEG

        self._tj = TurboJPEG()
        self._pf, self._ss = TJPF_BGR, TJSAMP_420
        self.quality = quality

    def encode(self, bgr: NDArray[np.uint8]) -> bytes:
        """Encode uint8 [H, W, 3] BGR to JPEG bytes."""
        jpeg: bytes = self._tj.encode(
            np.ascontiguousarray(bgr), quality=self.quality, pixel_format=self._pf, jpeg_subsample=self._ss
        )
        return jpeg


def available_encoders(quality: int = JPEG_QUALITY) -> dict[str, JpegEncoder]:
    """Every JPEG encoder that loads here: simplejpeg and OpenCV (the gateway's, from
    `gateway.jpeg`) and PyTurboJPEG when it and libturbojpeg are installed."""
    from gateway.jpeg import OpenCvJpegEncoder, SimpleJpegEncoder

    encoders: dict[str, JpegEncoder] = {}
    factories: tuple[Callable[[int], Any], ...] = (
        SimpleJpegEncoder, OpenCvJpegEncoder, TurboJpegEncoder)
    for factory in factories:
        try:
            enc: JpegEncoder = factory(quality)
        except (ImportError, OSError, RuntimeError) as exc:
            log.warning("JPEG encoder %s unavailable: %s", getattr(factory, "__name__", factory), exc)
            continue
        encoders[enc.name] = enc
    return encoders


def time_calls(fn: Callable[[int], object], iterations: int, warmup: int = 3) -> list[float]:
    """Call ``fn(i)`` for i in 0..iterations-1 (after `warmup` untimed calls); ms per call."""
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(iterations):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def ensure_avatar(scratch: Path = SCRATCH) -> Path:
    """Build the 720p avatar into `scratch` unless a valid one is there; its package folder.

    Raises:
        subprocess.CalledProcessError: the builder failed (its output is shown).
    """
    from export.demo import demo_speech_path, demo_video_path
    from lipsync.package import PackageError, load_package

    dest = scratch / "packages" / AVATAR
    try:
        load_package(dest)
        return dest
    except (PackageError, FileNotFoundError, OSError) as exc:
        log.info("building the 720p avatar (%s)", exc)
    cmd = [sys.executable, "-m", "lipsync", "package", "build", "--video", str(demo_video_path()),
           "--audio", str(demo_speech_path()), "--name", AVATAR, "--height", "720", "--force",
           "--packages-root", str(scratch / "packages"),
           "--model-repo-cpu", str(scratch / "model_repo_cpu"),
           "--model-repo-gpu", str(scratch / "model_repo_gpu")]
    subprocess.run(cmd, check=True)
    return dest


def real_predictions(onnx_path: Path, inners: NDArray[np.uint8], features: NDArray[np.float32],
                     count: int) -> NDArray[np.uint8]:
    """UNet outputs u8 [count, 320, 320, 3] for frames 0..count-1, from ONNX Runtime."""
    import onnxruntime as ort

    from lipsync.frames import audio_window, pingpong_index

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    n = len(inners)
    crops = np.stack([inners[pingpong_index(i, n)] for i in range(count)])
    audio = np.stack([audio_window(features, i) for i in range(count)])
    feeds = {UNET_CROP.name: crops, UNET_AUDIO.name: audio}
    preds: NDArray[np.uint8] = sess.run([UNET_PRED.name], feeds)[0]
    return preds


def pillarbox(
    frames: NDArray[np.uint8], rects: NDArray[np.int32], width: int
) -> tuple[NDArray[np.uint8], NDArray[np.int32]]:
    """Centre frames u8 [N, H, W0, 3] in black frames of `width` px; rects shifted in x.

    Raises:
        ValueError: `width` smaller than the frames.
    """
    n, h, w0, _ = frames.shape
    if width < w0:
        raise ValueError(f"cannot pillarbox {w0} px wide frames into {width} px")
    left = (width - w0) // 2
    out = np.zeros((n, h, width, 3), dtype=np.uint8)
    out[:, :, left:left + w0] = frames
    shifted = rects.copy()
    shifted[:, [0, 2]] += left
    return out, shifted


def add_sensor_noise(frames: NDArray[np.uint8], sigma: float, seed: int = 0) -> NDArray[np.uint8]:
    """Frames with Gaussian noise of `sigma` grey levels added (clipped to 0..255): texture like a
    camera's, so JPEG works as hard as on real 720p video (the upscaled clip is too smooth)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, sigma, size=frames.shape[1:]).astype(np.float32)
    return np.clip(frames.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def benchmark(frames: NDArray[np.uint8], rects: NDArray[np.int32], features: NDArray[np.float32],
              preds: NDArray[np.uint8], encoders: dict[str, JpegEncoder], iterations: int,
              label: str) -> list[StageTiming]:
    """Time the gateway's per-frame stages on one set of frames (see the module docstring)."""
    from lipsync.frames import audio_window, crop_328, inner_320, paste_back, pingpong_index

    n = len(frames)
    crops = np.stack([crop_328(f, r) for f, r in zip(frames, rects, strict=True)])
    inners = np.ascontiguousarray(np.stack([inner_320(c) for c in crops]))
    results: list[StageTiming] = []

    def add(stage: str, variant: str, ms: list[float], kib: float = float("nan")) -> None:
        results.append(StageTiming(label, stage, variant, float(np.median(ms)),
                                   float(np.percentile(ms, 90)), len(ms), kib))

    def prepare(i: int) -> object:  # what FramePipeline.render does before the Triton call
        v = pingpong_index(i, n)
        return inners[v:v + 1], audio_window(features, i)[None]

    add("prepare", "crop view + audio window", time_calls(prepare, iterations))

    composited = [paste_back(frames[pingpong_index(i, n)], rects[pingpong_index(i, n)],
                             crops[pingpong_index(i, n)], preds[i % len(preds)])
                  for i in range(min(n, 32))]

    def composite(i: int) -> NDArray[np.uint8]:
        v = pingpong_index(i, n)
        return paste_back(frames[v], rects[v], crops[v], preds[i % len(preds)])

    add("composite", "paste back into full frame", time_calls(composite, iterations))

    def composite_crop(i: int) -> NDArray[np.uint8]:  # face-crop-only output: no full-frame copy
        v = pingpong_index(i, n)
        x1, y1, x2, y2 = (int(c) for c in rects[v])
        crop = crops[v].copy()
        crop[4:324, 4:324] = preds[i % len(preds)]
        patch: NDArray[np.uint8] = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
        return patch

    add("composite", "face crop only (resize back, no frame copy)", time_calls(composite_crop, iterations))
    patches = [composite_crop(i) for i in range(len(composited))]

    for name, enc in encoders.items():
        sizes_full = [len(enc.encode(f)) for f in composited[:8]]

        def encode_full(i: int, e: JpegEncoder = enc) -> bytes:
            return e.encode(composited[i % len(composited)])

        def encode_crop(i: int, e: JpegEncoder = enc) -> bytes:
            return e.encode(patches[i % len(patches)])

        add("jpeg", f"{name}, full frame", time_calls(encode_full, iterations),
            float(np.mean(sizes_full)) / 1024)
        sizes_crop = [len(enc.encode(p)) for p in patches[:8]]
        add("jpeg", f"{name}, face crop only", time_calls(encode_crop, iterations),
            float(np.mean(sizes_crop)) / 1024)
    return results


def write_micro_report(timings: Sequence[StageTiming], setup: Sequence[str], out: Path,
                       argv: Sequence[str] | None = None) -> None:
    """Markdown table per frame size (median and p90 ms per call) plus JSON next to it."""
    lines = report.header("Gateway per-frame CPU work at 720p", argv)
    lines += [*setup, ""]
    for frame in dict.fromkeys(t.frame for t in timings):
        rows = [[t.stage, t.variant, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}",
                 report.fmt(t.mean_kib, 1) if not np.isnan(t.mean_kib) else "", t.iterations]
                for t in timings if t.frame == frame]
        lines += [f"## {frame}", ""]
        lines += report.markdown_table(
            ["stage", "variant", "median ms", "p90 ms", "mean JPEG KiB", "iterations"], rows)
        best = [t for t in timings if t.frame == frame and t.stage == "jpeg" and "full frame" in t.variant]
        comp = next(t for t in timings if t.frame == frame and t.variant == "paste back into full frame")
        prep = next(t for t in timings if t.frame == frame and t.stage == "prepare")
        if best:
            fastest = min(best, key=lambda t: t.median_ms)
            total = prep.median_ms + comp.median_ms + fastest.median_ms
            lines += ["", f"Full-frame output with the fastest encoder ({fastest.variant.split(',')[0]}): "
                          f"prepare + composite + JPEG = {total:.2f} ms per frame on one core "
                          f"(measured medians summed), i.e. about {1000 / total:.0f} frames/s per core.", ""]
    report.write_text(out, lines)
    report.write_json(out.with_suffix(".json"), {
        "machine": report.machine_line(), "command": report.command_line(argv),
        "date": report.utc_now(), "timings": [asdict(t) for t in timings],
    })


def main(argv: Sequence[str] | None = None) -> int:
    """Build (once) the 720p avatar, time the stages, write the report."""
    p = argparse.ArgumentParser(prog="python -m perf.micro_720p", description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=300, help="timed calls per stage and variant")
    p.add_argument("--noise-sigma", type=float, default=3.0,
                   help="grey levels of the synthetic sensor noise of the third frame set")
    p.add_argument("--scratch", type=Path, default=SCRATCH, help="scratch root for the 720p avatar")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR / "micro_720p.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cv2.setNumThreads(1)  # one core per frame, as in the gateway's thread pool

    from lipsync.package import load_package

    pkg = load_package(ensure_avatar(args.scratch))
    from export.model_repo import served_version

    served = served_version(args.scratch / "model_repo_cpu", pkg.manifest.model_name)
    if served is None:
        raise SystemExit(f"no model {pkg.manifest.model_name} in {args.scratch / 'model_repo_cpu'}")
    onnx_path = served.onnx_path
    rects = np.asarray(pkg.rects, dtype=np.int32)
    from lipsync.frames import crop_328, inner_320

    inners = np.stack([inner_320(crop_328(f, r)) for f, r in zip(pkg.frames, rects, strict=True)])
    preds = real_predictions(onnx_path, np.ascontiguousarray(inners), pkg.features, 8)
    encoders = available_encoders()
    h, w = pkg.frames.shape[1:3]
    timings = benchmark(pkg.frames, rects, pkg.features, preds, encoders, args.iterations,
                        f"{w}x{h} (the clip at 720p, aspect kept)")
    if w < 1280:
        wide, wide_rects = pillarbox(pkg.frames, rects, 1280)
        timings += benchmark(wide, wide_rects, pkg.features, preds, encoders, args.iterations,
                             "1280x720 (same frames pillarboxed)")
        noisy = add_sensor_noise(wide, sigma=args.noise_sigma)
        timings += benchmark(
            noisy,
            wide_rects,
            pkg.features,
            preds,
            encoders,
            args.iterations,
            f"1280x720 pillarboxed + sensor-like noise (sigma {args.noise_sigma:g}, synthetic)",
        )
    side = rects[:, 2] - rects[:, 0]
    setup = [
        f"- avatar: `{pkg.name}` built by `lipsync package build --height 720` from the demo clip "
        f"(176x144 upscaled: smoother than camera 720p, so JPEG sizes and times are on the low side); "
        f"{pkg.frame_count} video frames, face rectangle {int(side.min())}-{int(side.max())} px",
        "- predictions: real ONNX Runtime outputs of its UNet "
        f"(weights trained: {pkg.manifest.weights.trained})",
        f"- JPEG quality {JPEG_QUALITY}, 4:2:0; encoders available: {', '.join(encoders)}; "
        f"OpenCV threads 1; {args.iterations} timed calls per row",
        "- prepare = the gateway's work before the Triton call; composite = `lipsync.frames.paste_back`; "
        "face crop only = the pasted crop resized back to its rectangle, without the full frame",
    ]
    write_micro_report(timings, setup, args.out,
                       ["python", "-m", "perf.micro_720p", *(sys.argv[1:] if argv is None else argv)])
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
