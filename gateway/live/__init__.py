"""Live sessions (issue 10): stream audio in, get one lip-synced frame per 40 ms slot out.

The parts, each in its own module, none of them touching a socket or Triton directly:

- `pcm`:      16-bit LE mono PCM at 8-48 kHz -> float32 16 kHz (validation, `soxr` streaming);
- `mel`:      the incremental mel spectrogram (docs/REFERENCE.md s.4), frame by frame;
- `features`: one segment's feature rows and 16-row windows, as the offline package computes
              them, behind the `AudioEncoder` interface (Triton's `audio_encoder` in the gateway);
- `vad`:      per-slot voice activity (`webrtcvad`) and the onset/hangover gate;
- `segment`:  one continuous piece of audio on the timeline (PCM -> mel, VAD, readiness);
- `timeline`: the session's state machine (slots, pacing, flush, interrupt, end, errors);
- `session`:  the async driver: encoder calls, concurrent renders, deadlines, in-order output;
- `clock`, `settings`, `types`: the injected clock, the tunables, the data passed around.

The transports (gRPC `lipsync.live.v1.LiveLipSync`, WebSocket `/live`) feed a `LiveSession`
and write the `LiveOutput` items it yields.
"""
