"""Live-session load: N microphones streaming real speech in real time against the stack.

Each session is a microphone that never pauses: 16 kHz PCM in 20 ms chunks, paced at real
time, alternating LibriVox speech (``--talk`` of each ``--cycle-s`` period, 50 % by default)
and digital silence, for ``--seconds``; the sessions' cycles are staggered (session i starts
its talk ``i / N`` of a cycle later), as independent speakers would. Then end of input.

Per run (N sessions at once) it reports, over all sessions' slots:

- **speech slots**: slots the gateway's VAD marked speaking (sent speaking, or idle and late);
- **late (server)**: speech slots the gateway sent idle because their audio encoding or render
  failed, missed its deadline or was not started (the render admission expected it to miss:
  `gateway.live.admission`), as a share of the speech slots (``LiveFrame.late``);
- **late (clock)**: frames received after ``t_start + pts_s + budget``, budget = the 0.45 s a
  speaking slot needs of audio after its start (7 feature rows of lookahead + the 200 ms mel
  window, `gateway.live.timeline.WINDOW_LOOKAHEAD_S`) + ``--render-budget-s``, as a share of
  all slots;
- **audio-to-frame p50/p95** of speaking frames: arrival minus the moment the client sent the
  chunk that completed the slot's own 40 ms of audio (the client's estimate of where its audio
  starts on the timeline is exact to one slot, 40 ms);
- the **idle share**, the **first-frame latency**, Triton's **batch sizes** (UNet and audio
  encoder: executions per batch size from Triton's statistics over the run), the UNet's
  **compute time per frame** and the encoder's per feature row over the run (the renderer's
  pace as loaded as the machine was: a session talking half the time needs 12.5 frames/s, at
  most 80 ms per frame), and the load average (1 min) before and after the run (the machine
  may be shared).

N is **sustained** when no session failed and both late (server) and late (clock) are at most
``--sustain-late`` (5 %) of their slots: the avatar's mouth moves for at least 95 % of what is
said and the video keeps its pace.
``--sessions 1,2,4`` sweeps, after one unmeasured session that warms the models up; without
``--gateway`` the tool starts a CPU `tritonserver` and a gateway (`lipsync gateway`, default
settings) on free ports and writes the markdown and JSON reports (machine, command, date)
given by ``--markdown`` / ``--json``.

    python -m perf.live_load --sessions 1,2 --seconds 20 --markdown perf/results/live_load.md
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from gateway.live.timeline import WINDOW_LOOKAHEAD_S
from gateway.live.types import SLOT_S, SLOT_SAMPLES
from lipsync.contract import AUDIO_ENCODER_MODEL, SAMPLE_RATE
from perf.live_clients import Audio, SessionRecord, Step, run_grpc

RATE = SAMPLE_RATE
"""The sessions' PCM rate (Hz): 16 kHz, the LibriVox recordings' own."""


def speech_16k() -> NDArray[np.int16]:
    """All LibriVox test recordings, concatenated: int16 mono 16 kHz."""
    from lipsync.audio import float_to_pcm16, load_wav_16k_mono
    from lipsync.paths import SPEECH_DIR

    wavs = sorted(SPEECH_DIR.glob("*.wav"))
    if not wavs:
        raise SystemExit(f"no LibriVox WAVs in {SPEECH_DIR} (Debian package pocketsphinx-testdata)")
    return np.concatenate([float_to_pcm16(load_wav_16k_mono(w)) for w in wavs])


def microphone(speech: NDArray[np.int16], seconds: float, talk: float, cycle_s: float, phase: float) -> bytes:
    """``seconds`` of a speaker: talk for ``talk * cycle_s`` of each cycle, silence otherwise,
    the cycle shifted by ``phase`` (0..1); speech taken in order from ``speech``."""
    n = int(seconds * RATE)
    t = (np.arange(n) / RATE / cycle_s + phase) % 1.0
    talking = t < talk
    out = np.zeros(n, np.int16)
    idx = np.flatnonzero(talking)
    out[idx] = speech[np.arange(idx.size) % speech.size]
    return out.astype("<i2").tobytes()


@dataclass
class RunResult:
    """One run of N sessions (module doc)."""

    sessions: int
    slots: int
    speech: int
    speaking: int
    idle: int
    late_server: int
    late_clock: int
    late_server_share: float
    late_clock_share: float
    audio_to_frame_p50_ms: float
    audio_to_frame_p95_ms: float
    first_frame_ms: float
    idle_share: float
    unet_batches: dict[int, int]
    unet_ms_per_frame: float
    encoder_ms_per_row: float
    encoder_batches: dict[int, int]
    errors: list[str]
    sustained: bool
    load_before: float
    load_after: float

    @property
    def mean_unet_batch(self) -> float:
        """UNet frames per Triton execution (NaN when none ran)."""
        total = sum(self.unet_batches.values())
        return sum(b * c for b, c in self.unet_batches.items()) / total if total else float("nan")


def audio_to_frame_s(record: SessionRecord) -> list[float]:
    """Per speaking frame: arrival minus the send time of the chunk completing its slot's audio
    (module doc). The audio starts at the first slot after the first chunk's send time."""
    if not record.pcm_sent:
        return []
    first_sent = record.pcm_sent[0][0]
    start_slot = int((first_sent - record.started_at) / SLOT_S) + 1
    sent_times = np.array([t for t, _ in record.pcm_sent])
    sent_samples = np.array([s for _, s in record.pcm_sent])
    out = []
    for r in record.frames:
        if not r.frame.speaking:
            continue
        need = (r.frame.seq - start_slot + 1) * SLOT_SAMPLES  # 16 kHz: the client's own rate
        i = int(np.searchsorted(sent_samples, need))
        if 0 <= i < len(sent_times):
            out.append(r.at - float(sent_times[i]))
    return out


def batch_counts(url: str, model: str) -> dict[int, tuple[int, float]]:
    """Per batch size of ``model`` so far: executions and their total compute time (s)
    (Triton's statistics over gRPC)."""
    import tritonclient.grpc as triton_grpc

    stats = triton_grpc.InferenceServerClient(url).get_inference_statistics(model, as_json=True)[
        "model_stats"
    ][0]
    out: dict[int, tuple[int, float]] = {}
    for b in stats.get("batch_stats", []):
        compute = b["compute_infer"]
        out[int(b["batch_size"])] = int(compute.get("count", 0)), int(compute.get("ns", 0)) / 1e9
    return out


def ms_per_frame(after: dict[int, tuple[int, float]], before: dict[int, tuple[int, float]]) -> float:
    """Compute time per frame (ms) of the executions between two `batch_counts`; NaN without any."""
    frames = sum(b * n for b, n in _diff(after, before).items())
    seconds = sum(s - before.get(b, (0, 0.0))[1] for b, (_, s) in after.items())
    return seconds / frames * 1e3 if frames else float("nan")


def _diff(after: dict[int, tuple[int, float]], before: dict[int, tuple[int, float]]) -> dict[int, int]:
    """Executions per batch size between two `batch_counts`."""
    runs = {b: c - before.get(b, (0, 0.0))[0] for b, (c, _) in sorted(after.items())}
    return {b: n for b, n in runs.items() if n}


async def run_sessions(
    address: str, avatar: str, n: int, args: argparse.Namespace, speech: NDArray[np.int16]
) -> list[SessionRecord]:
    """N sessions at once over gRPC (module doc)."""
    scripts: list[list[Step]] = [
        [Audio(microphone(speech[i * 7 * RATE :], args.seconds, args.talk, args.cycle_s, i / n))]
        for i in range(n)
    ]
    return list(await asyncio.gather(*(run_grpc(address, avatar, RATE, s, chunk_ms=20.0) for s in scripts)))


def warm_up(address: str, avatar: str, speech: NDArray[np.int16]) -> None:
    """One session of 2 s of speech sent at once, not measured: Triton's first executions of a
    model (ONNX Runtime's allocations and kernel choice) are slower than the rest."""
    pcm = speech[: 2 * RATE].astype("<i2").tobytes()
    asyncio.run(run_grpc(address, avatar, RATE, [Audio(pcm, paced=False)], chunk_ms=20.0))


def measure(
    address: str, triton_url: str, unet: str, n: int, args: argparse.Namespace, speech: NDArray[np.int16]
) -> RunResult:
    """One run of N sessions and its figures."""
    before = batch_counts(triton_url, unet), batch_counts(triton_url, AUDIO_ENCODER_MODEL)
    load_before = os.getloadavg()[0]
    records = asyncio.run(run_sessions(address, args.avatar, n, args, speech))
    load_after = os.getloadavg()[0]
    time.sleep(1.0)  # Triton counts a request when it is released, just after its answer
    after = batch_counts(triton_url, unet), batch_counts(triton_url, AUDIO_ENCODER_MODEL)
    budget = WINDOW_LOOKAHEAD_S + args.render_budget_s
    slots = speaking = idle = late_server = late_clock = 0
    latencies: list[float] = []
    firsts: list[float] = []
    errors: list[str] = []
    for record in records:
        if record.error:
            errors.append(record.error)
        errors += record.notices + [r.frame.error for r in record.frames if r.frame.error]
        for r in record.frames:
            slots += 1
            speaking += r.frame.speaking
            late_server += r.frame.late
            idle += not r.frame.speaking and not r.frame.late
            late_clock += r.at > record.started_at + r.frame.pts_s + budget
        latencies += audio_to_frame_s(record)
        if record.frames:
            firsts.append(record.frames[0].at - record.started_at)
    speech_slots = speaking + late_server
    late_server_share = late_server / speech_slots if speech_slots else 0.0
    late_clock_share = late_clock / slots if slots else 1.0

    def p(q: float) -> float:
        """The q-th percentile of the latencies (ms); NaN without any."""
        return float(np.percentile(latencies, q)) * 1e3 if latencies else float("nan")

    return RunResult(
        sessions=n, slots=slots, speech=speech_slots, speaking=speaking, idle=idle, late_server=late_server,
        late_clock=late_clock, late_server_share=late_server_share, late_clock_share=late_clock_share,
        audio_to_frame_p50_ms=p(50), audio_to_frame_p95_ms=p(95),
        first_frame_ms=float(np.median(firsts)) * 1e3 if firsts else float("nan"),
        idle_share=idle / slots if slots else float("nan"),
        unet_batches=_diff(after[0], before[0]), unet_ms_per_frame=ms_per_frame(after[0], before[0]),
        encoder_batches=_diff(after[1], before[1]), encoder_ms_per_row=ms_per_frame(after[1], before[1]),
        errors=errors[:5],
        sustained=not errors and max(late_server_share, late_clock_share) <= args.sustain_late,
        load_before=load_before, load_after=load_after,
    )


def markdown(results: Sequence[RunResult], args: argparse.Namespace, setup: Sequence[str]) -> str:
    """The report (module doc)."""
    budget = WINDOW_LOOKAHEAD_S + args.render_budget_s
    lines = [
        "# Live sessions under load (`perf/live_load.py`)",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        f"- command: `python -m perf.live_load {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        *setup,
        (f"- each session: {args.seconds:g} s of microphone at 16 kHz in 20 ms chunks, real time; talk "
         f"{args.talk:.0%} of each {args.cycle_s:g} s cycle (LibriVox speech), silence otherwise; "
         "cycles staggered across sessions"),
        (
            "- speech slots: marked speaking by the VAD (sent speaking, or idle and late); late (server): "
            "speech slots sent idle (`LiveFrame.late`: render failed, missed its deadline or not "
            f"started), share of the speech slots; late (clock): received after start + pts + {budget:.2f} s "
            f"(0.45 s lookahead + {args.render_budget_s:g} s render budget), share of all slots"
        ),
        (
            f"- sustained: no session failed and both late shares <= {args.sustain_late:.0%} (the mouth "
            f"moves for >= {1 - args.sustain_late:.0%} of what is said and the video keeps its pace)"
        ),
        "",
        (
            "| sessions | load avg before / after | slots | speech slots | speaking | late (server) "
            "| late (clock) | idle share | audio-to-frame p50 / p95 (ms) | first frame (ms) "
            "| UNet batches (size: executions) | mean UNet batch | UNet ms / frame | encoder batches "
            "| encoder ms / row | sustained |"
        ),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- "
        "| ---: | :---: |",
    ]
    for r in results:
        batches = ", ".join(f"{b}: {c}" for b, c in r.unet_batches.items()) or "-"
        enc = ", ".join(f"{b}: {c}" for b, c in r.encoder_batches.items()) or "-"
        lines.append(
            f"| {r.sessions} | {r.load_before:.1f} / {r.load_after:.1f} | {r.slots} | {r.speech} "
            f"| {r.speaking} | {r.late_server} ({r.late_server_share:.0%}) "
            f"| {r.late_clock} ({r.late_clock_share:.0%}) | {r.idle_share:.0%} "
            f"| {r.audio_to_frame_p50_ms:.0f} / {r.audio_to_frame_p95_ms:.0f} | {r.first_frame_ms:.0f} "
            f"| {batches} | {r.mean_unet_batch:.2f} | {r.unet_ms_per_frame:.0f} | {enc} "
            f"| {r.encoder_ms_per_row:.1f} | {'yes' if r.sustained else 'no'} |"
        )
    sustained = [r.sessions for r in results if r.sustained]
    lines += ["", f"Sessions sustained: **{max(sustained) if sustained else 0}**"
              + ("" if sustained else " (no session count met the criterion)")]
    errors = [e for r in results for e in r.errors]
    if errors:
        lines += ["", "Errors (first few): " + "; ".join(errors[:5])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--gateway", help="gRPC host:port of a running gateway (default: start CPU Triton + gateway)"
    )
    p.add_argument("--triton-url", help="Triton gRPC host:port (with --gateway; for batch statistics)")
    p.add_argument("--avatar", default="demo")
    p.add_argument(
        "--sessions", default="1,2", help="comma-separated session counts to run, one after the other"
    )
    p.add_argument("--seconds", type=float, default=20.0, help="audio per session (s)")
    p.add_argument("--talk", type=float, default=0.5, help="talk share of each cycle, 0..1")
    p.add_argument("--cycle-s", type=float, default=4.0, help="talk + silence period (s)")
    p.add_argument(
        "--render-budget-s", type=float, default=0.25, help="render time allowed after the lookahead (s)"
    )
    p.add_argument("--sustain-late", type=float, default=0.05, help="late shares still called sustained")
    p.add_argument(
        "--live",
        type=json.loads,
        help="LiveSettings for the started gateway, JSON, e.g. '{\"render_timeout_s\": 3}'",
    )
    p.add_argument("--markdown", type=Path)
    p.add_argument("--json", type=Path)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Start what is missing, run each session count, write the reports."""
    from lipsync.package import load_package
    from lipsync.paths import MODEL_REPOSITORY_CPU, PACKAGES_DIR
    from lipsync.triton_local import TritonServer, free_ports
    from perf.servers import start_gateway

    args = build_parser().parse_args(argv)
    speech = speech_16k()
    pkg = load_package(PACKAGES_DIR / args.avatar)
    unet = pkg.manifest.model_name
    load_start = os.getloadavg()
    results: list[RunResult] = []
    with contextlib.ExitStack() as stack:
        address, triton_url = args.gateway, args.triton_url
        if address is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lipsync-live-load-")))
            http, grpc_port, metrics = free_ports(3)
            server = TritonServer(
                MODEL_REPOSITORY_CPU,
                http_port=http,
                grpc_port=grpc_port,
                metrics_port=metrics,
                load_models=(unet, AUDIO_ENCODER_MODEL),
                log_file=work / "triton.log",
            )
            server.start(timeout_s=180)
            stack.callback(server.stop)
            triton_url = server.grpc_url
            root = work / "packages"
            root.mkdir()
            shutil.copytree(pkg.root, root / pkg.name)
            env = {f"LIPSYNC_LIVE__{k.upper()}": str(v) for k, v in (args.live or {}).items()}
            address = stack.enter_context(
                start_gateway(triton_url, root, work, 30.0, extra_env=env)
            ).grpc_address
        if triton_url is None:
            raise SystemExit("--triton-url is needed with --gateway (batch statistics)")
        warm_up(address, args.avatar, speech)
        for n in (int(x) for x in args.sessions.split(",")):
            result = measure(address, triton_url, unet, n, args, speech)
            results.append(result)
            print(json.dumps({**asdict(result), "mean_unet_batch": result.mean_unet_batch}), flush=True)
    load_end = os.getloadavg()
    setup = [
        (
            f"- stack: CPU `tritonserver` (Python backend + ONNX Runtime) + one gateway, live settings "
            f"{args.live or 'default'}; avatar `{pkg.name}` {pkg.manifest.width}x{pkg.manifest.height}, "
            "gRPC `LiveLipSync/Stream`"
        ),
        (
            "- load average (1/5/15 min) at start "
            f"{load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, "
            f"at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} (other work shares these cores)"
        ),
    ]
    text = markdown(results, args, setup)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(
            json.dumps([{**asdict(r), "mean_unet_batch": r.mean_unet_batch} for r in results], indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
