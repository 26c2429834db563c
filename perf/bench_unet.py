"""UNet throughput on this machine, three ways, in one run (a benchmark, not a test).

1. ONNX Runtime in-process (CPU provider, all cores) at batch 1 and batch 4;
2. through the real CPU `tritonserver` (CPU profile: Python backend + ONNX Runtime, dynamic
   batching) at concurrency 1, 4 and 8 (closed loop: each client thread sends one frame, waits
   for the answer, sends the next), with Triton's own batch counters;
3. PyTorch eager (`UnetWithPrePost`, `torch.no_grad`) at batch 1.

All three run the same weights (the untrained seed-0 UNet unless `--checkpoint` is given) on
the same seeded uint8 crops and audio windows. Each point runs `--seconds` seconds after one
warm-up call. The report (machine, command, date, numbers) is written by this tool to
`perf/results/bench_unet.md` (raw numbers to `perf/results/raw/bench_unet.json`).

    python -m perf.bench_unet [--seconds 4] [--checkpoint UNET.pth] [--mode ave]

The machine may be shared with other work: the report records the load average before and
after, and the numbers are only as quiet as the machine was.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from lipsync.contract import AUDIO_MODES, UNET_AUDIO, UNET_CROP, UNET_PRED, AudioMode, avatar_model_name
from perf.report import RESULTS_DIR, header, markdown_table, write_json, write_text
from perf.stats import percentiles

if TYPE_CHECKING:  # torch is imported by the benchmarks that need it
    from export.models.unet import UNet328

logger = logging.getLogger(__name__)

MODEL_NAME = avatar_model_name("bench")
ORT_BATCHES = (1, 4)
TRITON_CONCURRENCY = (1, 4, 8)


@dataclass
class Point:
    """One measured configuration.

    Attributes:
        path: "onnxruntime", "triton" or "pytorch-eager".
        setting: "batch B" or "concurrency C".
        frames: frames completed in the timed window.
        seconds: length of the timed window (s).
        latency_ms: per-call latency samples (ms); a call carries `batch` frames.
        mean_batch: Triton only: frames per model execution (inference/execution counts).
    """

    path: str
    setting: str
    frames: int = 0
    seconds: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    mean_batch: float = float("nan")

    @property
    def fps(self) -> float:
        """Frames per second over the timed window."""
        return self.frames / self.seconds if self.seconds > 0 else float("nan")

    def row(self) -> list[object]:
        p50, p95 = percentiles(self.latency_ms, (50, 95))
        return [
            self.path,
            self.setting,
            self.frames,
            self.fps,
            1000.0 / self.fps if self.frames else float("nan"),
            p50,
            p95,
            self.mean_batch,
        ]


def _inputs(batch: int, mode: AudioMode, seed: int = 0) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    from export.onnx_export import example_unet_inputs

    return example_unet_inputs(mode, batch=batch, seed=seed)


def _timed_loop(point: Point, call: Callable[[], int], seconds: float) -> Point:
    """Run `call` (returns frames done) once to warm up, then repeatedly for `seconds`."""
    call()
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        t0 = time.perf_counter()
        point.frames += call()
        t1 = time.perf_counter()
        point.latency_ms.append((t1 - t0) * 1000.0)
        if t1 >= deadline:
            break
    point.seconds = time.perf_counter() - start
    return point


def bench_onnxruntime(onnx_path: Path, mode: AudioMode, seconds: float) -> list[Point]:
    """In-process ONNX Runtime (CPU provider, intra-op threads = all cores) at each batch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    points = []
    for batch in ORT_BATCHES:
        crop, audio = _inputs(batch, mode)

        def call(crop: NDArray[np.uint8] = crop, audio: NDArray[np.float32] = audio) -> int:
            session.run([UNET_PRED.name], {UNET_CROP.name: crop, UNET_AUDIO.name: audio})
            return crop.shape[0]

        points.append(_timed_loop(Point("onnxruntime", f"batch {batch}"), call, seconds))
        logger.info("onnxruntime batch %d: %.2f frames/s", batch, points[-1].fps)
    return points


def bench_eager(unet: UNet328, mode: AudioMode, seconds: float) -> Point:
    """PyTorch eager, batch 1, `torch.no_grad`, intra-op threads = all cores."""
    import torch

    from export.onnx_export import UnetWithPrePost

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = UnetWithPrePost(unet).eval()
    crop, audio = (torch.from_numpy(a) for a in _inputs(1, mode))

    def call() -> int:
        with torch.no_grad():
            model(crop, audio)
        return 1

    point = _timed_loop(Point("pytorch-eager", "batch 1"), call, seconds)
    logger.info("pytorch eager batch 1: %.2f frames/s", point.fps)
    return point


def _triton_counts(client: Any) -> tuple[int, int]:
    """`client`: a `tritonclient.grpc.InferenceServerClient` (tritonclient ships no types)."""
    stats = client.get_inference_statistics(model_name=MODEL_NAME).model_stats[0]
    return int(stats.inference_count), int(stats.execution_count)


def _unet_infer_inputs(crop: NDArray[np.uint8], audio: NDArray[np.float32]) -> list[object]:
    import tritonclient.grpc as grpcclient

    inputs = []
    for spec, array in ((UNET_CROP, crop), (UNET_AUDIO, audio)):
        tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.triton_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _closed_loop(
    grpc_url: str,
    concurrency: int,
    mode: AudioMode,
    seconds: float,
    counters: Callable[[], tuple[int, int]],
) -> Point:
    """`concurrency` client threads, each sending one frame and waiting for it, for `seconds`;
    `counters()` gives Triton's (inference_count, execution_count) for the batch ratio."""
    import tritonclient.grpc as grpcclient

    point = Point("triton (CPU profile)", f"concurrency {concurrency}")
    crop, audio = _inputs(1, mode)
    clients = [grpcclient.InferenceServerClient(grpc_url) for _ in range(concurrency)]
    for client in clients:  # warm-up, outside the timed window
        client.infer(MODEL_NAME, _unet_infer_inputs(crop, audio))
    lock = threading.Lock()
    inferences0, executions0 = counters()
    deadline = time.perf_counter() + seconds

    def worker(client: grpcclient.InferenceServerClient) -> None:
        inputs = _unet_infer_inputs(crop, audio)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            client.infer(MODEL_NAME, inputs, client_timeout=120.0)
            elapsed_ms = (time.perf_counter() - t0) * 1000.0
            with lock:
                point.frames += 1
                point.latency_ms.append(elapsed_ms)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    point.seconds = time.perf_counter() - start
    inferences1, executions1 = counters()
    executions = executions1 - executions0
    point.mean_batch = (inferences1 - inferences0) / executions if executions else float("nan")
    for client in clients:
        client.close()
    return point


def bench_triton(onnx_path: Path, mode: AudioMode, seconds: float, workdir: Path) -> list[Point]:
    """The CPU profile through the real tritonserver, closed loop at each concurrency, with
    Triton's inference/execution counters over each timed window."""
    import tritonclient.grpc as grpcclient

    from export.model_repo import write_avatar_model
    from lipsync.triton_local import TritonServer, free_ports

    repo = workdir / "model_repo_cpu"
    write_avatar_model(repo, MODEL_NAME, onnx_path, "cpu")
    http_port, grpc_port, metrics_port = free_ports(3)
    points = []
    with TritonServer(
        repo,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_file=workdir / "tritonserver.log",
    ) as server:
        control = grpcclient.InferenceServerClient(server.grpc_url)
        label = f"triton {control.get_server_metadata().version} (CPU profile)"
        for concurrency in TRITON_CONCURRENCY:
            point = _closed_loop(
                server.grpc_url, concurrency, mode, seconds, lambda: _triton_counts(control)
            )
            point.path = label
            points.append(point)
            logger.info(
                "triton concurrency %d: %.2f frames/s, %.2f frames per execution",
                concurrency,
                point.fps,
                point.mean_batch,
            )
        control.close()
    return points


def main(argv: list[str] | None = None) -> int:
    """Run every point and write the report; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m perf.bench_unet", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="timed seconds per point (default 4)"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="SyncTalk_2D UNet checkpoint (default: untrained seed 0)",
    )
    parser.add_argument("--mode", choices=AUDIO_MODES, default="ave")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "bench_unet.md")
    args = parser.parse_args(argv)

    from lipsync.log import setup_logging

    setup_logging()
    import onnxruntime
    import torch

    from export.checkpoint import load_unet
    from export.onnx_export import export_unet_module

    load_before = os.getloadavg()
    unet, weights = load_unet(args.checkpoint, mode=args.mode, seed=0)
    with tempfile.TemporaryDirectory(prefix="bench_unet_") as tmp:
        workdir = Path(tmp)
        onnx_path = export_unet_module(unet, weights, workdir / "unet.onnx").path
        points = bench_onnxruntime(onnx_path, args.mode, args.seconds)
        points += bench_triton(onnx_path, args.mode, args.seconds, workdir)
        points.append(bench_eager(unet, args.mode, args.seconds))
    load_after = os.getloadavg()

    weights_line = (
        f"trained checkpoint {weights.source}"
        if weights.trained
        else f"UNTRAINED seeded weights ({weights.source}); speed does not depend on the values"
    )
    lines = header(
        f"UNet ({args.mode}) frames/s: ONNX Runtime vs Triton CPU profile vs PyTorch eager"
    )
    lines += [
        f"- weights: {weights_line}",
        f"- versions: onnxruntime {onnxruntime.__version__}, torch {torch.__version__}",
        f"- timed window per point: {args.seconds:g} s after one warm-up call; inputs per frame: "
        f"{UNET_CROP.name} uint8 {'x'.join(map(str, UNET_CROP.dims))}, {UNET_AUDIO.name} "
        f"float32 {'x'.join(map(str, UNET_AUDIO.dims))} (the ave window)",
        f"- load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/"
        f"{load_before[2]:.2f}, after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}"
        " (the machine is shared with other work; treat the numbers as indicative)",
        "",
    ]
    lines += markdown_table(
        [
            "path",
            "setting",
            "frames",
            "frames/s",
            "ms/frame",
            "call p50 (ms)",
            "call p95 (ms)",
            "frames per Triton execution",
        ],
        [p.row() for p in points],
    )
    lines += [
        "",
        "A call is one `session.run` / one Triton request / one eager forward; at batch 4 it "
        "carries 4 frames. Triton rows are closed-loop clients each sending one frame at a time; "
        "'frames per Triton execution' is Triton's inference_count / execution_count over the "
        "window (above 1 = the dynamic batcher merged concurrent requests).",
    ]
    write_text(args.output, lines)
    write_json(
        RESULTS_DIR / "raw" / "bench_unet.json",
        [asdict(p) | {"fps": p.fps} for p in points],
    )
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
