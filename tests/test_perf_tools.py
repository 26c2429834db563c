"""The perf tools' own logic: statistics, report writing, argument parsing, perf_analyzer
input/CSV handling, the load generator's stream driver against the real gateway, and the
baseline's per-frame work. No timing is asserted: speed is measured in perf/, not here."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from lipsync.contract import UNET_AUDIO, UNET_CROP
from perf import report
from perf.compare import BatchStats, Row, compare_rows, write_compare
from perf.loadgen import (
    LoadConfig,
    build_parser,
    check_jpeg,
    config_from_args,
    run_load,
    verify_records,
    write_reports,
)
from perf.pa_tools import (
    pa_table,
    perf_analyzer_args,
    read_batching,
    read_pa_csv,
    write_input_dir,
)
from perf.stats import FrameRecord, percentiles, ratio, summarize


def _rec(stream: int, seq: int, due: float, done: float, ok: bool = True, error: str = "",
         server_ms: float = float("nan"), jpeg: int = 1000) -> FrameRecord:
    return FrameRecord(stream, seq, seq, due, due, done, ok, error, server_ms, jpeg if ok else 0)


# ----------------------------------------------------------------------------- stats


def test_percentiles_interpolate_linearly() -> None:
    values = list(range(1, 101))  # 1..100 ms
    p50, p95, p99 = percentiles(values, (50, 95, 99))
    # numpy's linear method: position q/100 * (n-1) between the sorted values
    assert p50 == pytest.approx(1 + 0.50 * 99)
    assert p95 == pytest.approx(1 + 0.95 * 99)
    assert p99 == pytest.approx(1 + 0.99 * 99)
    assert all(math.isnan(v) for v in percentiles([], (50, 99)))


def test_summarize_counts_late_frames_errors_and_rate() -> None:
    # stream 0: 4 frames due every 40 ms, latencies 10, 30, 50, 90 ms; stream 1: one error
    lat = [0.010, 0.030, 0.050, 0.090]
    recs = [_rec(0, k, k * 0.040, k * 0.040 + lat[k], server_ms=5.0 + k) for k in range(4)]
    recs.append(_rec(1, 0, 0.0, 0.2, ok=False, error="overloaded: too many frames"))
    recs.append(_rec(1, 1, 0.04, 0.2, ok=False, error="overloaded: too many frames"))
    s = summarize(recs, label="t", streams=2, frames_per_stream=4, pace_fps=25)
    assert s.frames_ok == 4 and s.errors == 2
    assert s.late == 2  # 50 and 90 ms exceed the 40 ms slot
    assert s.late_pct == pytest.approx(50.0)
    wall = max(r.done_s for r in recs) - min(r.due_s for r in recs)
    assert s.wall_s == pytest.approx(wall)
    assert s.fps == pytest.approx(4 / wall)
    assert s.p50_ms == pytest.approx(np.percentile([10, 30, 50, 90], 50))
    assert s.max_ms == pytest.approx(90)
    assert s.server_p50_ms == pytest.approx(6.5)
    assert s.error_samples == ["overloaded: too many frames"]
    assert json.loads(json.dumps(s.to_dict()))["errors"] == 2


def test_summarize_refuses_an_empty_run() -> None:
    with pytest.raises(ValueError, match="nothing was sent"):
        summarize([], label="empty", streams=1, frames_per_stream=1, pace_fps=0)


def test_ratio_handles_missing_values() -> None:
    assert ratio(30.0, 10.0) == pytest.approx(3.0)
    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(float("nan"), 2.0))


# ----------------------------------------------------------------------------- reports


def test_markdown_table_formats_and_checks_rows(tmp_path: Path) -> None:
    lines = report.markdown_table(["a", "b", "c"], [[1, 2.345, float("nan")]])
    assert lines[0] == "| a | b | c |" and lines[2] == "| 1 | 2.3 | n/a |"
    with pytest.raises(ValueError, match="2 cells"):
        report.markdown_table(["a", "b", "c"], [[1, 2]])
    head = report.header("Title", ["python", "-m", "perf.x", "--flag", "a b"])
    assert head[0] == "# Title"
    assert any(line == "- command: `python -m perf.x --flag 'a b'`" for line in head)
    assert any(line.startswith("- machine: ") and "cores" in line for line in head)
    path = report.write_text(tmp_path / "sub" / "r.md", head)
    assert path.read_text().endswith("\n") and path.read_text().startswith("# Title")


def test_loadgen_reports_written(tmp_path: Path) -> None:
    recs = [_rec(0, k, k * 0.04, k * 0.04 + 0.02) for k in range(5)]
    s = summarize(recs, label="ours x1", streams=1, frames_per_stream=5, pace_fps=25)
    cfg = LoadConfig(target="grpc", address="h:1", frames=5)
    write_reports(s, cfg, json_path=tmp_path / "r.json", markdown_path=tmp_path / "r.md",
                  records=recs, argv=["python", "-m", "perf.loadgen"])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["frames_ok"] == 5 and len(data["frames"]) == 5
    assert data["config"]["window"] == 8  # paced default
    assert "| ours x1 | grpc | 1 |" in (tmp_path / "r.md").read_text()


def test_compare_table_ratios(tmp_path: Path) -> None:
    def summary(fps: float, p95: float, label: str) -> Any:
        # 20 frames spread so that fps and p95 come out as asked
        recs = [_rec(0, k, k / fps, k / fps + p95 / 1000) for k in range(20)]
        return summarize(recs, label=label, streams=8, frames_per_stream=20, pace_fps=0)

    ours, base = summary(10.0, 100.0, "ours"), summary(2.0, 400.0, "base")
    rows = [Row(8, ours, base, BatchStats(inferences=160, executions=40), 3.25, 480.0)]
    table = compare_rows(rows)[0]
    assert table[3] == f"{ours.fps / base.fps:.2f}x"
    assert table[6] == f"{ours.p95_ms / base.p95_ms:.2f}"
    assert table[-3:] == ["4.00", "3.25", "480.0"]
    assert compare_rows([Row(1, ours, base, None)])[0][-3:] == ["n/a", "n/a", "n/a"]
    write_compare(rows, tmp_path / "c.md", tmp_path / "c.json", ["- setup"], ["python", "-m", "perf.compare"])
    text = (tmp_path / "c.md").read_text()
    assert f"throughput ratio **{ours.fps / base.fps:.2f}x**" in text
    assert json.loads((tmp_path / "c.json").read_text())["rows"][0]["streams"] == 8


# ----------------------------------------------------------------------------- arguments


def test_loadgen_arguments() -> None:
    cfg = config_from_args(build_parser().parse_args(
        ["--target", "ws", "--streams", "4", "--pace", "0", "--frames", "60", "--avatar", "demo"]))
    assert (cfg.target, cfg.address, cfg.streams, cfg.frames, cfg.pace_fps) == (
        "ws",
        "localhost:8085",
        4,
        60,
        0,
    )
    assert cfg.ws_url == "ws://localhost:8085/ws" and cfg.effective_window == 1
    assert config_from_args(build_parser().parse_args([])).address == "localhost:50051"
    checked = config_from_args(build_parser().parse_args(["--verify-every", "5", "--expect-size", "880x720"]))
    assert (checked.verify_every, checked.expect_size) == (5, (880, 720))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--target", "http"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--expect-size", "880"])
    with pytest.raises(ValueError, match="verify_every"):
        LoadConfig(target="grpc", address="x", verify_every=-1)
    with pytest.raises(ValueError, match="pace must be >= 0"):
        LoadConfig(target="grpc", address="x", pace_fps=-1)
    with pytest.raises(ValueError, match="must be >= 1"):
        LoadConfig(target="grpc", address="x", streams=0)


def test_stream_frame_ids_stay_in_range_and_differ_between_streams() -> None:
    cfg = LoadConfig(target="grpc", address="x", streams=4, frames=30, frame_range=50)
    ids = [cfg.stream_frame_ids(s) for s in range(4)]
    assert all(len(i) == 30 and min(i) >= 0 and max(i) < 50 for i in ids)
    assert len({i[0] for i in ids}) == 4
    assert all(np.all(np.diff(i) % 50 == 1) for i in ids)  # consecutive, wrapping


# ----------------------------------------------------------------------------- perf_analyzer


PA_HEADER = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
             "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
             "p50 latency,p90 latency,p95 latency,p99 latency")


def test_perf_analyzer_csv_and_text_parsing(tmp_path: Path) -> None:
    csv_path = tmp_path / "pa.csv"
    csv_path.write_text(f"{PA_HEADER}\n1,9.5,30,800,100,50,100000,900,3,105000,110000,120000,130000\n"
                        f"{PA_HEADER}\n4,20.0,30,800,90000,50,150000,900,3,200000,210000,220000,230000\n")
    rows = read_pa_csv(csv_path)
    assert [r["Concurrency"] for r in rows] == ["1", "4"]
    text = tmp_path / "pa.txt"
    text.write_text("Request concurrency: 1\n  Server: \n    Inference count: 40\n    Execution count: 40\n"
                    "Request concurrency: 4\n  Server: \n    Inference count: 80\n    Execution count: 25\n")
    batching = read_batching(text)
    assert batching == {1: 1.0, 4: pytest.approx(3.2)}
    table = pa_table(rows, batching)
    # µs -> ms; compute = input + infer + output
    assert table[2].split(" | ")[2] == "105.0"
    assert float(table[3].split(" | ")[7]) == pytest.approx((50 + 150000 + 900) / 1000, abs=0.051)
    assert table[3].rstrip(" |").endswith("3.2")
    with pytest.raises(ValueError, match="not a perf_analyzer CSV"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        read_pa_csv(tmp_path / "bad.csv")


def test_perf_analyzer_input_matches_the_contract(demo_package: Any, tmp_path: Path) -> None:
    from lipsync.frames import audio_window, crop_328, inner_320, pingpong_index

    crop_path, audio_path = write_input_dir(Path(demo_package.root), 10, tmp_path)
    assert (crop_path.name, audio_path.name) == (UNET_CROP.name, UNET_AUDIO.name)
    crop = np.frombuffer(crop_path.read_bytes(), dtype=UNET_CROP.dtype)
    audio = np.frombuffer(audio_path.read_bytes(), dtype="<f4")
    v = pingpong_index(10, demo_package.frame_count)
    expected = inner_320(crop_328(demo_package.frames[v], demo_package.rects[v]))
    assert np.array_equal(crop.reshape(UNET_CROP.dims), expected)
    assert np.array_equal(audio.reshape(UNET_AUDIO.dims), audio_window(demo_package.features, 10))
    model = demo_package.manifest.model_name
    assert perf_analyzer_args(model, tmp_path) == [
        "-m", model, "--input-data", str(tmp_path),
        "--shape", f"{UNET_CROP.name}:{','.join(map(str, UNET_CROP.dims))}",
        "--shape", f"{UNET_AUDIO.name}:{','.join(map(str, UNET_AUDIO.dims))}",
    ]
    with pytest.raises(ValueError, match="outside"):
        write_input_dir(Path(demo_package.root), demo_package.feature_rows, tmp_path)


# ----------------------------------------------------------------------------- against real servers


@pytest.mark.triton
@pytest.mark.parametrize("target", ["grpc", "ws"])
def test_loadgen_drives_the_real_gateway(gateway_server: Any, demo_package: Any, target: str) -> None:
    address = (
        gateway_server.grpc_address if target == "grpc" else gateway_server.http_url.replace("http://", "")
    )
    size = (demo_package.manifest.width, demo_package.manifest.height)
    cfg = LoadConfig(target=target, address=address, avatar="demo", streams=2, frames=3,
                     pace_fps=0, frame_range=demo_package.feature_rows, timeout_s=60,
                     verify_every=2, expect_size=size)
    summary, records = asyncio.run(run_load(cfg, progress=False))
    assert summary.errors == 0, summary.error_samples
    assert summary.frames_ok == 6 and len(records) == 6
    assert summary.verified == 4  # seq 0 and 2 of each stream, decoded at the avatar's size
    assert all(r.sample is None for r in records)  # samples are dropped once checked
    # the same replies checked against a wrong size: every sampled frame becomes an error
    wrong = dataclasses.replace(cfg, expect_size=(size[0] + 16, size[1]))
    summary, records = asyncio.run(run_load(wrong, progress=False))
    assert summary.verified == 4 and summary.errors == 4 and summary.frames_ok == 2
    assert f"expected {size[0] + 16}x{size[1]}" in summary.error_samples[0]
    assert all(r.jpeg_bytes > 0 and r.done_s >= r.sent_s >= r.due_s for r in records)
    assert sorted((r.stream, r.seq) for r in records) == [(s, k) for s in range(2) for k in range(3)]


@pytest.mark.triton
def test_loadgen_counts_in_band_errors(gateway_server: Any) -> None:
    cfg = LoadConfig(target="grpc", address=gateway_server.grpc_address, avatar="no_such_avatar",
                     streams=1, frames=2, pace_fps=0, timeout_s=30)
    summary, _ = asyncio.run(run_load(cfg, progress=False))
    assert summary.frames_ok == 0 and summary.errors == 2
    assert "no_such_avatar" in summary.error_samples[0]


def test_check_jpeg_decodes_and_checks_the_size() -> None:
    ok, data = cv2.imencode(".jpg", np.full((144, 176, 3), 128, np.uint8))
    assert ok
    assert check_jpeg(data.tobytes(), (176, 144)) == ""
    assert check_jpeg(data.tobytes(), None) == ""
    assert "expected 880x720" in check_jpeg(data.tobytes(), (880, 720))
    assert check_jpeg(b"not a jpeg", None) == "bad JPEG: no SOI marker"
    assert check_jpeg(data.tobytes()[:40], None) == "bad JPEG: does not decode"
    rec = FrameRecord(0, 0, 0, 0.0, 0.0, 0.01, True, sample=b"\xff\xd8junk")
    checked, n = verify_records([rec, FrameRecord(0, 1, 1, 0.0, 0.0, 0.01, True)], None)
    assert n == 1 and not checked[0].ok and checked[0].sample is None and checked[1].ok


def test_loadgen_reports_an_unreachable_server() -> None:
    from lipsync.triton_local import free_ports

    (port,) = free_ports(1)
    cfg = LoadConfig(target="ws", address=f"127.0.0.1:{port}", streams=2, frames=2, pace_fps=0, timeout_s=5)
    summary, records = asyncio.run(run_load(cfg, progress=False))
    assert summary.errors == 4 and all(not r.ok for r in records)
    assert "connect" in summary.error_samples[0]


def test_baseline_renders_a_full_frame(demo_package: Any) -> None:
    import cv2

    from perf.baseline_server import load_engine

    engine = load_engine(Path(demo_package.root))
    out = engine.render(5)
    img = cv2.imdecode(np.frombuffer(out.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == demo_package.frames.shape[1:]
    assert out.bounds == tuple(float(c) for c in demo_package.rects[5])
    x1, y1, x2, y2 = (int(c) for c in demo_package.rects[5])
    outside = np.ones(img.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    diff = np.abs(img.astype(int) - demo_package.frames[5].astype(int))[outside]
    assert diff.mean() < 4  # JPEG noise only: the frame outside the face is untouched
    with pytest.raises(ValueError, match="out of range"):
        engine.render(demo_package.feature_rows)


# ----------------------------------------------------------------------------- model cost and sizing


def test_model_cost_matches_the_reference_flops(demo_package: Any) -> None:
    from perf.model_cost import demo_unet_onnx, model_cost

    cost = model_cost(demo_unet_onnx())
    assert cost.conv_gflop == pytest.approx(9.8, rel=0.03)  # docs/REFERENCE.md s.1: ~9.8 GFLOP/frame
    assert cost.parameters_m == pytest.approx(12.19, rel=0.02)  # 12,186,935 (BN folded or not)
    assert 0 < cost.depthwise_count < cost.conv_count
    # the largest activation alone (320x320x64, FP16) is 12.5 MiB: the sum must exceed it
    assert cost.activation_mib_fp16 > cost.activation_mib_fp16_fused > 12.5


def test_sizing_estimate_follows_its_formula() -> None:
    from perf.procstat import EVENT_LOOP
    from perf.sizing import Assumptions, Gpu, estimate, gateway_ms_per_frame

    a = Assumptions()
    slow = estimate(Gpu("a", 100.0, 0.3), 10.0, 200.0, 4.0, a)
    fast = estimate(Gpu("b", 100.0, 3.0), 10.0, 200.0, 4.0, a)
    assert slow.fps[0] == pytest.approx(min(slow.compute_bound_fps[0], slow.bandwidth_bound_fps[0]))
    assert slow.bandwidth_bound_fps[0] == pytest.approx(0.3e12 * 0.5 / (2 * 200 * 2**20))
    assert fast.streams[0] > slow.streams[0]
    assert slow.gateway_cores[0] == pytest.approx(slow.streams[0] * 25 * 4.0 / 1000 / 0.7)
    assert slow.gateway_processes[0] == max(1, math.ceil(slow.streams[0] * 25 * 4.0 / 1000 / 0.7))
    split = estimate(Gpu("b", 100.0, 3.0), 10.0, 200.0, 4.0, a, overhead_ms=1.0)
    assert split.gateway_processes[1] <= fast.gateway_processes[1]

    def cell(variant: str, target: str, streams: int, total: float, loop: float) -> dict[str, Any]:
        return {"variant": variant, "cell": {"avatar": "demo720", "target": target, "streams": streams},
                "gateway_ms": {"total": total, EVENT_LOOP: loop}}

    capacity = {"cells": [cell("old", "grpc", 8, 9.0, 3.0), cell("new", "grpc", 1, 5.0, 2.0),
                          cell("new", "grpc", 8, 1.5, 0.6), cell("new", "ws", 8, 1.4, 0.7)]}
    # the highest stream count, the larger of the protocols
    assert gateway_ms_per_frame(capacity) == pytest.approx((1.5, 0.7))
    with pytest.raises(ValueError, match="no cell of variant 'gone'"):
        gateway_ms_per_frame(capacity, "gone")


@pytest.mark.triton
def test_perf_analyzer_script_runs_against_the_cpu_triton(triton_server: Any, tmp_path: Path) -> None:
    """The documented perf_analyzer command works here (binary fetched once into .cache/)."""
    import subprocess

    from lipsync.paths import REPO_ROOT

    out = tmp_path / "pa"
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "perf" / "perf_analyzer.sh"), "--profile", "cpu",
         "--url", triton_server.grpc_url, "--concurrency", "2", "--out", str(out), "--",
         "--measurement-request-count", "6", "--stability-percentage", "100", "--max-trials", "4"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_pa_csv(out.with_suffix(".csv"))
    assert [r["Concurrency"] for r in rows] == ["2"] and float(rows[0]["Inferences/Second"]) > 0
    text = out.with_suffix(".md").read_text()
    assert "| 2 |" in text and "perf_analyzer 2.41.1" in text
    assert read_batching(out.with_suffix(".txt"))[2] >= 1.0


def test_baseline_server_answers_the_stream_in_order(demo_package: Any, tmp_path: Path) -> None:
    """The baseline process (as `perf.compare` starts it) serves `StreamInference` over gRPC:
    frames answered in request order, an unknown avatar answered in-band."""
    from perf.compare import start_baseline

    with start_baseline(Path(demo_package.root), tmp_path) as (address, pid):
        assert pid > 0
        cfg = LoadConfig(target="grpc", address=address, avatar="demo", streams=1, frames=3,
                         pace_fps=0, frame_range=demo_package.feature_rows, timeout_s=120)
        summary, records = asyncio.run(run_load(cfg, progress=False))
        assert summary.errors == 0 and [r.frame_id for r in records] == [0, 1, 2]
        unknown = LoadConfig(target="grpc", address=address, avatar="nobody", streams=1, frames=1,
                             pace_fps=0, timeout_s=60)
        summary, _ = asyncio.run(run_load(unknown, progress=False))
        assert summary.errors == 1 and "unknown_avatar" in summary.error_samples[0]
