"""The capacity benchmark's own logic (`perf.capacity`, `perf.capacity_report`,
`perf.procstat`, `perf.identity_unet`, the thread-name hook): /proc parsing and thread
classification on real processes (this one and a child), the variant parser, the measurement
plan, pooling and the report tables; a variant of an earlier git revision (`perf.git_revision`:
export, probe, the old WebSocket reply layout); plus end-to-end smokes of the harness (demo
avatar, 1 stream, 20 frames per protocol: ~10-30 s each) against the real tritonserver and
gateway, today's and the one of issue 9's reference commit. No speed is asserted."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from perf import procstat
from perf.capacity_report import (
    FLOOR,
    RATIO_HEADERS,
    TABLE_HEADERS,
    Cell,
    Measurement,
    Variant,
    aggregate,
    cell_rows,
    check_variants,
    parse_variant,
    plan,
    ratio_rows,
    render_markdown,
    to_json,
)
from perf.procstat import (
    EVENT_LOOP,
    EXITED,
    GRPC_CORE,
    OTHER,
    POOL,
    CpuUsage,
    ProcessSample,
    ProcessTree,
    TreeSnapshot,
    classify_thread,
    cpu_between,
    descendants,
    parse_proc_stat_cpu,
    parse_stat,
)
from perf.stats import FrameRecord, summarize

HZ = procstat.CLOCK_TICKS_PER_S


# ----------------------------------------------------------------------------- /proc parsing


def test_parse_stat_reads_this_process_and_names_with_parentheses() -> None:
    own = parse_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert own.id == os.getpid() and own.ppid == os.getppid() and own.cpu_ticks >= 0
    # comm may hold spaces and ')' : the name runs to the LAST ')'
    line = "4242 (a) b (c)) S 7 1 1 0 -1 0 0 0 0 0 123 45 0 0 20 0 1 0 0 0 0"
    st = parse_stat(line)
    assert (st.id, st.comm, st.ppid, st.cpu_ticks) == (4242, "a) b (c)", 7, 168)
    with pytest.raises(ValueError, match="not a /proc stat line"):
        parse_stat("garbage")


def test_machine_cpu_line_parsing() -> None:
    m = parse_proc_stat_cpu("cpu  10 1 5 100 4 2 3 1 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert m.busy_ticks == 10 + 1 + 5 + 2 + 3 + 1 and m.total_ticks == m.busy_ticks + 100 + 4
    real = procstat.machine_cpu()
    assert 0 < real.busy_ticks <= real.total_ticks
    with pytest.raises(ValueError):
        parse_proc_stat_cpu("intr 1 2 3\n")


def test_descendants_walk_the_tree() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 12, 20: 1, 30: 99}
    assert descendants(10, parents) == [10, 11, 12, 13]
    assert descendants(30, parents) == [30]


def test_process_tree_counts_a_child_process_and_its_cpu() -> None:
    code = ("import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n"
            "while time.process_time() < 0.3: pass\nprint('done', flush=True)\ntime.sleep(30)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        tree = ProcessTree(os.getpid())
        assert child.pid in tree.pids()
        before = tree.snapshot()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        after = tree.snapshot()
        usage = cpu_between(before, after)
        assert usage.processes >= 2
        # the child used >= 0.3 s of CPU since start, most of it between the snapshots
        child_s = (after.processes[child.pid].total_ticks - before.processes[child.pid].total_ticks) / HZ
        assert child_s >= 0.15 and usage.total_s >= child_s
    finally:
        child.kill()
        child.wait()


def test_threads_of_this_process_are_split_by_category() -> None:
    tree = ProcessTree(os.getpid())
    spun, stop = threading.Event(), threading.Event()

    def busy() -> None:
        while time.thread_time() < 0.2:
            pass
        spun.set()
        stop.wait(30)

    worker = threading.Thread(target=busy)
    before = tree.snapshot()
    worker.start()
    assert spun.wait(30)
    mid = tree.snapshot()
    stop.set()
    worker.join()
    after = tree.snapshot()
    live = cpu_between(before, mid)
    # without the hook a Python thread shows the process name: not main, matches no rule
    assert worker.native_id is not None
    name = mid.processes[os.getpid()].threads[worker.native_id][0]
    assert classify_thread(os.getpid(), worker.native_id, name) == OTHER
    assert classify_thread(os.getpid(), os.getpid(), name) == EVENT_LOOP
    assert live.by_category[OTHER] >= 0.15  # the worker's 0.2 s, give or take the ticks
    assert live.by_thread  # per-name detail is filled
    # categories add up to the total (exited threads included), up to reading skew
    assert sum(live.by_category.values()) == pytest.approx(live.total_s, abs=5 / HZ)
    # once the thread exited, its time from `mid` on is only in the process total
    gone = cpu_between(mid, after)
    assert worker.native_id not in after.processes[os.getpid()].threads
    assert gone.by_category[EXITED] >= 0


def test_thread_name_hook_names_python_threads_in_a_child() -> None:
    code = (
        "import threading, time\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "def spin():\n"
        "    end = time.time() + 0.4\n"
        "    while time.time() < end: pass\n"
        "pool = ThreadPoolExecutor(1, thread_name_prefix='composite')\n"
        "pool.submit(spin).result()\n"
        "def idle():\n"
        "    time.sleep(30)\n"
        "threading.Thread(target=idle, daemon=True).start()\n"
        "print(threading.get_native_id(), flush=True)\n"
        "time.sleep(30)\n"
    )
    env = procstat.thread_name_env(os.environ)
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        sample = procstat.sample_process(child.pid)
        assert sample is not None
        names = {name for name, _ in sample.threads.values()}
        assert "composite_0" in names, names
        assert "idle" in names, names  # an unnamed Thread-N (idle) is named after its target
        cats = {classify_thread(child.pid, tid, name) for tid, (name, _) in sample.threads.items()}
        assert {EVENT_LOOP, POOL} <= cats
    finally:
        child.kill()
        child.wait()


def test_classification_rules() -> None:
    pid = 100
    assert classify_thread(pid, 100, "python") == EVENT_LOOP
    assert classify_thread(pid, 101, "composite_1") == POOL
    for name in ("grpc_global_tim", "event_engine", "default-executo", "resolver-execut",
                 "_poll_wrapper", "timer_manager"):
        assert classify_thread(pid, 102, name) == GRPC_CORE, name
    assert classify_thread(pid, 103, "asyncio_0") == OTHER
    assert classify_thread(pid, 103, "splice_0", rules=((POOL, r"^splice"),)) == POOL


def test_cpu_between_on_synthetic_snapshots() -> None:
    before = TreeSnapshot({1: ProcessSample(1, "gw", 100, {1: ("gw", 50), 2: ("composite_0", 30),
                                                           3: ("temp", 20)}),
                           9: ProcessSample(9, "gone", 5, {9: ("gone", 5)})})
    after = TreeSnapshot({1: ProcessSample(1, "gw", 200, {1: ("gw", 90), 2: ("composite_0", 60),
                                                          4: ("event_engine", 10)}),
                          7: ProcessSample(7, "new", 50, {7: ("new", 50)})})
    u = cpu_between(before, after)
    assert u.processes == 1  # 9 left, 7 is new: neither counts
    assert u.total_s == pytest.approx(100 / HZ)
    assert u.by_category[EVENT_LOOP] == pytest.approx(40 / HZ)
    assert u.by_category[POOL] == pytest.approx(30 / HZ)
    assert u.by_category[GRPC_CORE] == pytest.approx(10 / HZ)  # started in between: from 0
    assert u.by_category[EXITED] == pytest.approx(20 / HZ)     # 100 - (40 + 30 + 10)
    assert u.ms_per(10)["total"] == pytest.approx(100 / HZ * 100)
    assert u.by_thread["gw/composite_0"] == pytest.approx(30 / HZ)


# ----------------------------------------------------------------------------- variants and plan


def test_parse_variant() -> None:
    assert parse_variant("old:") == Variant("old", ())
    assert parse_variant("before9@9aa7bb8:") == Variant("before9", (), "9aa7bb8")
    rev = parse_variant("b@main~3:LIPSYNC_JPEG_QUALITY=90")
    assert (rev.revision, rev.env, rev.code_text) == ("main~3", (("LIPSYNC_JPEG_QUALITY", "90"),),
                                                      "git revision main~3")
    assert Variant("old").code_text == "this checkout"
    v = parse_variant("new:LIPSYNC_JPEG_SPLICE=1, LIPSYNC_WORKERS=2")
    assert v.name == "new" and dict(v.env) == {"LIPSYNC_JPEG_SPLICE": "1", "LIPSYNC_WORKERS": "2"}
    assert v.env_text == "LIPSYNC_JPEG_SPLICE=1,LIPSYNC_WORKERS=2"
    assert Variant("old").env_text == "(defaults)"
    for bad, match in (("old", "expected NAME:"), (":LIPSYNC_X=1", "name"),
                       ("a b:", "name"), ("new:LIPSYNC_X", "not KEY=VALUE"),
                       ("new:lipsync_x=1", "not a gateway setting"), ("new:PATH=/x", "not a gateway"),
                       ("new:LIPSYNC_GRPC_PORT=1", "set by the harness"),
                       ("new:LIPSYNC_X=1,LIPSYNC_X=2", "given twice"),
                       ("b@:", "revision ''"), ("b@-x:", "not starting with '-'"),
                       ("b@a b:", "git revision"), ("@9aa7bb8:", "name")):
        with pytest.raises(ValueError, match=match):
            parse_variant(bad)
    with pytest.raises(ValueError, match="given twice"):
        check_variants([Variant("a"), Variant("a", (("LIPSYNC_X", "1"),))])
    with pytest.raises(ValueError, match="no variant"):
        check_variants([])
    check_variants([Variant("a"), Variant("b")], ["b", "a"])
    with pytest.raises(ValueError, match=r"reference\(s\) c name no variant"):
        check_variants([Variant("a"), Variant("b")], ["c"])


def test_capacity_cli_parses_variants_and_grid() -> None:
    from perf.capacity import QUICK, build_parser, grid_from_args

    args = build_parser().parse_args(["--quick", "--variant", "old:", "--variant",
                                      "w2:LIPSYNC_WORKERS=2", "--avatars", "demo"])
    assert [v.name for v in args.variants] == ["old", "w2"]
    grid = grid_from_args(args)
    assert grid.streams == QUICK.streams and grid.avatars == ("demo",)
    assert grid.frames_per_stream(8) * 8 >= grid.frames
    assert [c.target for c in grid.cells()] == ["grpc"] * len(grid.streams) + ["ws"] * len(grid.streams)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--variant", "bad"])
    args = build_parser().parse_args(["--variant", "b@9aa7bb8:", "--reference", "b"])
    assert args.variants == [Variant("b", (), "9aa7bb8")] and args.references == ["b"]
    assert build_parser().parse_args(["--floor"]).floor and FLOOR.floor and FLOOR.name == "floor"


def test_issue9_preset_turns_each_improvement_on_in_turn() -> None:
    from gateway.config import GatewaySettings
    from perf.capacity import BEFORE_ISSUE9, PRESET_REFERENCES, PRESETS, unknown_settings

    before, *variants = [parse_variant(v) for v in PRESETS["issue9"]]
    assert before == Variant("before9", (), BEFORE_ISSUE9), "the gateway issue 9 was filed against"
    assert PRESET_REFERENCES["issue9"] == ("before9", "old")
    check_variants([before, *variants], PRESET_REFERENCES["issue9"])
    assert [v.name for v in variants] == ["old", "splice", "shm", "new"]
    assert all(v.revision is None for v in variants)
    assert all(unknown_settings(v) == [] for v in variants), "every key is a gateway setting"
    fields = GatewaySettings.model_fields
    defaults = [fields[k].default for k in ("jpeg_splice", "triton_shm", "triton_coalesce")]
    assert defaults == [True, "system", True]
    off = {"LIPSYNC_JPEG_SPLICE": "0", "LIPSYNC_TRITON_SHM": "none", "LIPSYNC_TRITON_COALESCE": "0"}
    assert [len(v.env) for v in variants] == [3, 2, 1, 0], "one improvement more per variant"
    assert all(dict(v.env).items() <= off.items() for v in variants)
    # a revision's own settings decide what it ignores
    assert unknown_settings(variants[0], frozenset({"LIPSYNC_JPEG_SPLICE"})) == [
        "LIPSYNC_TRITON_SHM", "LIPSYNC_TRITON_COALESCE"]


# ----------------------------------------------------------------------------- git revisions


@pytest.fixture(scope="module")
def before9_tree(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Issue 9's reference commit exported and probed (git archive + two Python starts: ~2 s)."""
    from perf.capacity import BEFORE_ISSUE9, REPO_ROOT
    from perf.git_revision import checkout_revision

    return checkout_revision(REPO_ROOT, BEFORE_ISSUE9, tmp_path_factory.mktemp("revisions"))


def test_a_revision_is_exported_once_and_its_gateway_probed(before9_tree: Any) -> None:
    from perf.capacity import REPO_ROOT
    from perf.capacity_report import HARNESS_KEYS
    from perf.git_revision import checkout_revision, revision_environment

    tree = before9_tree
    assert tree.commit.startswith(tree.revision) and len(tree.commit) == 40
    assert tree.root.name == tree.commit and (tree.root / "gateway" / "cli.py").is_file()
    assert not (tree.root / "gateway" / "compositor.py").exists(), "its own code, not today's"
    assert tree.settings >= HARNESS_KEYS and "LIPSYNC_JPEG_SPLICE" not in tree.settings
    assert tree.ws_count_bounds, "before c528de5 the WebSocket reply counted its bounds"
    stamp = tree.root.stat().st_mtime_ns
    again = checkout_revision(REPO_ROOT, tree.commit, tree.root.parent)
    assert again.root == tree.root and tree.root.stat().st_mtime_ns == stamp, "cached by hash"
    env = revision_environment({"PYTHONPATH": "/hook"}, tree.root)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tree.root), "/hook"]


def test_old_websocket_replies_decode_with_their_bounds_counted(before9_tree: Any) -> None:
    from gateway import ws_protocol
    from perf.clients import decode_count_bounds_reply
    from perf.git_revision import revision_environment

    code = ("from gateway.ws_protocol import encode_frame_reply, encode_error_reply\n"
            "print(encode_frame_reply(7, 3.0, b'\\xff\\xd8jpeg', (1.0, 2.0, 30.0, 31.0)).hex())\n"
            "print(encode_error_reply(8, 1.0, 'bad_request: x').hex())\n")
    env = revision_environment(os.environ, before9_tree.root)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=before9_tree.root,
                         capture_output=True, text=True, check=True).stdout.split()
    old_ok, old_error = (bytes.fromhex(h) for h in out)
    with pytest.raises(ws_protocol.ProtocolError, match="bounds_len=4"):
        ws_protocol.decode_reply(old_ok)
    reply = decode_count_bounds_reply(old_ok)
    assert isinstance(reply, ws_protocol.FrameReply)
    assert (reply.frame_id, reply.jpeg, reply.bounds) == (7, b"\xff\xd8jpeg", (1.0, 2.0, 30.0, 31.0))
    error = decode_count_bounds_reply(old_error)
    assert isinstance(error, ws_protocol.ErrorReply) and error.message == "bad_request: x"
    today = ws_protocol.encode_frame_reply(9, 1.0, b"\xff\xd8", (0.0, 0.0, 4.0, 4.0))
    assert decode_count_bounds_reply(today) == ws_protocol.decode_reply(today)


def test_a_revision_that_cannot_run_is_refused_with_the_reason(tmp_path: Path) -> None:
    from perf.capacity import REPO_ROOT, checkout_revisions
    from perf.git_revision import RevisionError, checkout_revision

    with pytest.raises(RevisionError, match="'no-such-rev' is not a commit of"):
        checkout_revisions([Variant("a"), Variant("x", (), "no-such-rev")], tmp_path)
    with pytest.raises(RevisionError, match="not a git checkout"):
        checkout_revision(tmp_path, "HEAD", tmp_path / "cache")
    root = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-list", "--max-parents=0", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.split()[-1]
    # the first commit has a `lipsync` CLI but no gateway settings yet
    with pytest.raises(RevisionError, match="do not import with this Python"):
        checkout_revision(REPO_ROOT, root, tmp_path / "cache")
    assert (tmp_path / "cache" / root).is_dir() and not list((tmp_path / "cache").glob(".*tmp"))


def test_plan_interleaves_variants_and_rotates_who_goes_first() -> None:
    cells = [Cell("demo", "grpc", n) for n in (1, 4, 8, 16)]
    variants = [Variant("old"), Variant("new"), Variant("x")]
    steps = plan(cells, variants, rounds=2)
    assert len(steps) == 2 * 4 * 3
    assert len({(r, c, v.name) for r, c, v in steps}) == len(steps)
    # the variants of a cell run back to back
    for k in range(0, len(steps), 3):
        assert len({(r, c) for r, c, _ in steps[k:k + 3]}) == 1
    firsts = [steps[k][2].name for k in range(0, len(steps), 3)]
    counts = [firsts.count(n) for n in ("old", "new", "x")]
    assert max(counts) - min(counts) <= 1  # 8 cells over 3 variants: 3, 3, 2
    with pytest.raises(ValueError):
        plan(cells, variants, rounds=0)


# ----------------------------------------------------------------------------- pooling and report


def _measurement(cell: Cell, variant: str, round_: int, frames: int, wall: float, gw_s: float,
                 loop_s: float, lat_ms: float, errors: int = 0) -> Measurement:
    recs = [FrameRecord(0, k, k, k * wall / frames, k * wall / frames,
                        k * wall / frames + lat_ms / 1000, True) for k in range(frames)]
    recs += [FrameRecord(0, frames + k, 0, 0.0, 0.0, 0.0, False, "overloaded: x") for k in range(errors)]
    summary = summarize(recs, label="t", streams=cell.streams, frames_per_stream=frames,
                        pace_fps=0, verified=frames // 10)
    cats = dict.fromkeys(procstat.CATEGORIES, 0.0)
    cats[EVENT_LOOP], cats[POOL] = loop_s, gw_s - loop_s
    return Measurement(round_, cell, variant, summary, tuple(r.latency_ms for r in recs if r.ok),
                       wall, CpuUsage(gw_s, cats, {"gw/python (main)": loop_s}, 1),
                       CpuUsage(0.5, dict.fromkeys(procstat.CATEGORIES, 0.0)), 0.2, 0.3,
                       float(frames), frames / 2)


def test_aggregate_pools_rounds_and_ratios_compare_the_same_cell(tmp_path: Path) -> None:
    c8 = Cell("demo720", "grpc", 8)
    c1 = Cell("demo", "ws", 1)
    ms = [
        _measurement(c8, "old", 0, 100, 1.0, 0.6, 0.2, 30.0),
        _measurement(c8, "new", 0, 100, 0.5, 0.15, 0.05, 10.0),
        _measurement(c8, "new", 1, 100, 0.5, 0.15, 0.05, 10.0),
        _measurement(c8, "old", 1, 100, 1.0, 0.6, 0.2, 30.0, errors=2),
        _measurement(c1, "old", 0, 50, 1.0, 0.1, 0.1, 5.0),
    ]
    results = aggregate(ms)
    old8 = next(r for r in results if r.cell == c8 and r.variant == "old")
    assert old8.rounds == 2 and old8.frames_ok == 200 and old8.errors == 2 and old8.verified == 20
    assert old8.fps == pytest.approx(
        200 / sum(m.summary.wall_s for m in ms if m.cell == c8 and m.variant == "old")
    )
    assert old8.gateway_ms["total"] == pytest.approx(1.2 * 1000 / 200)
    assert old8.gateway_ms[EVENT_LOOP] == pytest.approx(0.4 * 1000 / 200)
    assert old8.triton_ms == pytest.approx(1.0 * 1000 / 200) and old8.loadgen_ms == pytest.approx(2.0)
    assert old8.triton_batch == pytest.approx(2.0)
    assert old8.p50_ms == pytest.approx(30.0)

    rows = cell_rows(results, "demo720", ["old", "new"])
    assert [r[2] for r in rows] == ["old", "new"] and all(len(r) == len(TABLE_HEADERS) for r in rows)
    ratios = ratio_rows(results, "demo720", "old", ["old", "new"])
    assert len(ratios) == 1 and len(ratios[0]) == len(RATIO_HEADERS)
    new8 = next(r for r in results if r.cell == c8 and r.variant == "new")
    assert ratios[0][3] == f"{new8.fps / old8.fps:.2f}x"
    assert ratios[0][4] == "0.25x"  # 0.15 s vs 0.6 s of gateway CPU for the same frames
    assert ratio_rows(results, "demo", "old") == []  # nothing to compare there

    variants = [Variant("old"), Variant("new", (("LIPSYNC_X", "1"),))]
    labels = {"demo": "176x144 (`demo`)", "demo720": "880x720 (`demo720`)"}
    lines = render_markdown(results, variants, labels, ["- setup"], "python -m perf.capacity",
                            {"new": "note here"})
    text = "\n".join(lines)
    assert "## 176x144 (`demo`)" in text and "## 880x720 (`demo720`)" in text
    assert "`LIPSYNC_X=1`" in text and "note here" in text and "Ratios to `old`" in text
    assert "| `old` | this checkout | `(defaults)` |  |" in text
    assert "overloaded: x" in text and "Ratios to `new`" not in text
    both = "\n".join(render_markdown(results, variants, labels, [], "c", references=["new", "old"]))
    assert both.index("Ratios to `new`") < both.index("Ratios to `old`")
    assert "| grpc | 8 | old / new |" in both and "| grpc | 8 | new / old |" in both
    payload = to_json(results, ms, variants, {"machine": "m"})
    back = json.loads(json.dumps(payload))
    assert back["machine"] == "m" and len(back["measurements"]) == 5 and len(back["cells"]) == 3
    assert back["variants"][1] == {"name": "new", "env": {"LIPSYNC_X": "1"}, "revision": None,
                                   "floor": False}


# ----------------------------------------------------------------------------- identity model


def test_identity_unet_has_the_contract_and_returns_the_crop(tmp_path: Path) -> None:
    import onnxruntime as ort

    from export.model_repo import read_model_spec
    from lipsync.contract import UNET_AUDIO, UNET_CROP, UNET_PRED
    from perf.identity_unet import write_identity_onnx, write_identity_repository

    path = write_identity_onnx(tmp_path / "id.onnx")
    spec = read_model_spec(path)
    assert [(t.name, t.dims) for t in spec.inputs] == [(UNET_CROP.name, UNET_CROP.dims),
                                                      (UNET_AUDIO.name, UNET_AUDIO.dims)]
    assert [(t.name, t.dims) for t in spec.outputs] == [(UNET_PRED.name, UNET_PRED.dims)]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    crop = np.random.default_rng(0).integers(0, 256, UNET_CROP.batch_shape(3), dtype=np.uint8)
    (pred,) = sess.run([UNET_PRED.name], {UNET_CROP.name: crop,
                                          UNET_AUDIO.name: np.zeros(UNET_AUDIO.batch_shape(3), np.float32)})
    assert pred.dtype == np.uint8 and np.array_equal(pred, crop)
    names = write_identity_repository(tmp_path / "repo", ["demo", "demo720"])
    assert names == ["lipsync_demo", "lipsync_demo720"]
    assert all((tmp_path / "repo" / n / "config.pbtxt").is_file() for n in names)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.triton
def test_capacity_smoke_run(demo_package: Any, tmp_path: Path) -> None:
    """The whole harness once, tiny: demo avatar, 1 stream, 20 frames per protocol, one round."""
    from perf.capacity import main

    out = tmp_path / "capacity.md"
    rc = main(["--avatars", "demo", "--streams", "1", "--frames", "20", "--rounds", "1",
               "--verify-every", "5", "--floor", "--scratch", str(tmp_path / "scratch"),
               "--out", str(out)])
    assert rc == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert sorted((m["cell"]["target"], m["variant"]) for m in data["measurements"]) == [
        ("grpc", "defaults"), ("grpc", "floor"), ("ws", "defaults"), ("ws", "floor")]
    for cell in data["cells"]:
        # the floor's replies are JPEGs of the avatar's size too (verified like the gateway's)
        assert cell["frames_ok"] == 20 and cell["errors"] == 0 and cell["verified"] == 4
        # 20 frames of the floor may take less than one clock tick of CPU
        assert cell["gateway_ms"]["total"] > 0 or cell["variant"] == "floor"
        # the floor calls no model: no execution of it in its window
        assert math.isnan(cell["triton_batch"]) == (cell["variant"] == "floor")
    text = out.read_text()
    assert "## 176x144 (`demo`)" in text and "| grpc | 1 | defaults |" in text
    assert "| grpc | 1 | floor |" in text and "`perf.protocol_floor`" in text
    # every server it started is gone
    assert set(data["processes"]) == {"triton", "gateway-defaults", "gateway-floor"}
    for pid in data["processes"].values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.triton
def test_capacity_runs_the_gateway_of_a_git_revision(demo_package: Any, tmp_path: Path) -> None:
    """Issue 9's reference commit and today's gateway side by side, tiny: both serve the
    current demo package and identity repository over gRPC and WebSocket, every sampled
    JPEG verified, and the ratio table divides by the revision."""
    from perf.capacity import BEFORE_ISSUE9, main

    out = tmp_path / "capacity.md"
    rc = main(["--variant", f"before9@{BEFORE_ISSUE9}:", "--variant", "today:", "--avatars", "demo",
               "--streams", "1", "--frames", "20", "--rounds", "1", "--verify-every", "5",
               "--scratch", str(tmp_path / "scratch"), "--out", str(out)])
    assert rc == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["revisions"]["before9"].startswith(BEFORE_ISSUE9) and data["references"] == ["before9"]
    assert {(c["variant"], c["cell"]["target"]) for c in data["cells"]} == {
        (v, t) for v in ("before9", "today") for t in ("grpc", "ws")}
    for cell in data["cells"]:
        assert cell["frames_ok"] == 20 and cell["errors"] == 0 and cell["verified"] == 4
        assert cell["gateway_ms"]["total"] > 0
    text = out.read_text()
    assert f"| `before9` | git revision {BEFORE_ISSUE9} |" in text
    assert "| grpc | 1 | today / before9 |" in text
    for pid in data["processes"].values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
