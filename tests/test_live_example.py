"""`examples/live_client.py` against the gateway on the real tritonserver: it streams a LibriVox
WAV over gRPC and writes a playable MP4 with one video frame per slot and the audio."""
from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import av
import pytest

from tests.fixtures_live import speech_paths, speech_pcm16

pytestmark = pytest.mark.triton


def test_example_writes_an_mp4_with_every_frame_and_the_audio(
    gateway_server: Any, tmp_path: Path, capsys: Any
) -> None:
    from examples.live_client import main

    wav = tmp_path / "speech.wav"
    with wave.open(str(wav), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(speech_pcm16(speech_paths()[1])[:32000].astype("<i2").tobytes())  # 2 s
    mp4 = tmp_path / "out.mp4"
    assert main([str(wav), str(mp4), "--gateway", gateway_server.grpc_address, "--avatar", "demo"]) == 0
    printed = capsys.readouterr().out
    frames = int(printed.split(": ")[1].split(" frames")[0])
    assert frames >= 50  # 2 s of audio: 50 slots and more
    with av.open(str(mp4)) as container:
        video = container.streams.video[0]
        assert container.streams.audio and container.streams.audio[0].rate == 16000
        decoded = list(container.decode(video=0))
        assert len(decoded) == frames
        assert (video.codec_context.width, video.codec_context.height) == (176, 144)
        assert container.duration is not None and float(container.duration / av.time_base) >= 2.0
