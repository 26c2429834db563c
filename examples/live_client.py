"""Stream a WAV file to a live session over gRPC and write the frames, with the audio, to an MP4.

    python examples/live_client.py speech.wav out.mp4 --gateway localhost:50051 --avatar demo

The WAV (16-bit PCM, any rate from 8 to 48 kHz, mono or stereo: mixed down) is sent in 20 ms
chunks in real time, as a microphone would (``--burst``: all at once, as a text-to-speech
engine would), then the request stream is half-closed (end of input). Every ``LiveFrame``
(one per 40 ms slot, ``seq`` 0, 1, 2, ...) becomes one video frame at 25 fps (H.264); the
WAV becomes the AAC audio track, starting at the slot where the gateway placed it (the
first slot after the first chunk was sent). Needs the stubs in ``proto/`` and PyAV (``av``).
"""
from __future__ import annotations

import argparse
import io
import time
import wave
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import grpc
import numpy as np
from numpy.typing import NDArray

from lipsync.contract import GATEWAY_GRPC_PORT
from proto import live_pb2 as pb
from proto import live_pb2_grpc as pbg

SLOT_S = 0.04  # one frame per 40 ms slot (25 fps); slot k has pts_s = k * 0.04


def read_wav(path: Path) -> tuple[NDArray[np.int16], int]:
    """int16 mono samples and the rate (Hz) of a 16-bit PCM WAV."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise SystemExit(f"{path}: 16-bit PCM WAV expected")
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, wav.getnchannels())
        return pcm.mean(axis=1).astype(np.int16), wav.getframerate()


def stream(
    gateway: str, avatar: str, pcm: NDArray[np.int16], rate: int, burst: bool
) -> tuple[list[pb.LiveFrame], int]:
    """Run the session; return its frames and the slot the audio started at."""
    sent: list[float] = []

    def requests() -> Iterator[pb.LiveRequest]:
        yield pb.LiveRequest(start=pb.LiveStart(avatar=avatar, sample_rate_hz=rate))
        step = rate // 50  # 20 ms
        t0 = time.monotonic()
        for i in range(0, len(pcm), len(pcm) if burst else step):
            if not burst:
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            sent.append(time.monotonic())
            yield pb.LiveRequest(pcm=pcm[i : i + (len(pcm) if burst else step)].astype("<i2").tobytes())

    with grpc.insecure_channel(gateway) as channel:
        started = time.monotonic()
        frames = []
        for frame in pbg.LiveLipSyncStub(channel).Stream(requests()):
            if frame.error:
                print(f"slot {frame.seq}: {frame.error}")
            if frame.jpeg:  # a frame without a JPEG is an error before the session started
                frames.append(frame)
    return frames, int((sent[0] - started) / SLOT_S) + 1 if sent else 0


def decode_jpeg(data: bytes) -> av.VideoFrame:
    """One JPEG as a video frame."""
    with av.open(io.BytesIO(data), mode="r") as image:
        return next(image.decode(video=0))


def write_mp4(
    out: Path, frames: list[pb.LiveFrame], pcm: NDArray[np.int16], rate: int, audio_slot: int
) -> None:
    """Frames as H.264 at 25 fps, the audio as AAC delayed to its slot."""
    with av.open(str(out), "w") as mp4:
        first = decode_jpeg(frames[0].jpeg)
        video = mp4.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = (
            first.width - first.width % 2,
            first.height - first.height % 2,
            "yuv420p",
        )
        audio = mp4.add_stream("aac", rate=rate)
        audio.layout = "mono"
        for frame in frames:
            image = decode_jpeg(frame.jpeg).reformat(width=video.width, height=video.height, format="yuv420p")
            image.pts, image.time_base = frame.seq, Fraction(1, 25)
            mp4.mux(video.encode(image))
        mp4.mux(video.encode())
        delayed = np.concatenate([np.zeros(int(audio_slot * SLOT_S * rate), np.int16), pcm])
        samples = av.AudioFrame.from_ndarray(delayed[None, :], format="s16", layout="mono")
        samples.sample_rate, samples.pts = rate, 0
        mp4.mux(audio.encode(samples))
        mp4.mux(audio.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wav", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--gateway", default=f"localhost:{GATEWAY_GRPC_PORT}", help="gRPC host:port")
    parser.add_argument("--avatar", default="demo")
    parser.add_argument(
        "--burst", action="store_true", help="send the audio at once (TTS) instead of in real time"
    )
    args = parser.parse_args(argv)
    pcm, rate = read_wav(args.wav)
    frames, audio_slot = stream(args.gateway, args.avatar, pcm, rate, args.burst)
    if not frames:
        raise SystemExit("no frames came back")
    write_mp4(args.out, frames, pcm, rate, audio_slot)
    speaking = sum(f.speaking for f in frames)
    print(
        f"{args.out}: {len(frames)} frames ({speaking} speaking, {sum(f.late for f in frames)} late), "
        f"audio at slot {audio_slot}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
