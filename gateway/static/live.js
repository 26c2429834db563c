// The page's "Live" mode: a live session over ws://HOST/live (gateway/live_ws_protocol.py).
// Audio comes from the microphone (getUserMedia) or from a WAV file played in real time; an
// AudioWorklet captures it at the AudioContext's rate (usually 48 kHz, declared in `start`:
// the gateway resamples) and posts 20 ms pieces, sent as 16-bit little-endian PCM. Frames
// come back one per 40 ms slot and are drawn by pts_s against the audio clock
// (AudioContext.currentTime from the start), `playoutS` behind it; a played WAV is delayed by
// the same amount (DelayNode) so the mouth matches what is heard. Kept apart from app.js.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    mic: $("live-mic"), file: $("live-file"), stop: $("live-stop"), status: $("live-status"),
    canvas: $("live-screen"), frames: $("live-frames"), speaking: $("live-speaking"),
    first: $("live-first"), offset: $("live-offset"), late: $("live-late"),
  };
  const ctx2d = ui.canvas.getContext("2d");
  const HEADER = 46;          // bytes of a frame message's header (live_ws_protocol.py)
  const PLAYOUT_S = 1.0;      // frames are shown this long after their pts on the audio clock

  const stats = {
    state: "idle", frames: 0, speaking: 0, late: 0, idle: 0, errors: [], firstFrameMs: null,
    offsetMs: null, lastSeq: -1, gaps: 0, speakingSeqs: [], lateSeqs: [], source: null,
  };
  window.lipsyncLive = { stats };

  // AudioWorklet: forwards mono float samples in pieces of `samples` frames (20 ms).
  const WORKLET = `
    class Capture extends AudioWorkletProcessor {
      constructor(options) {
        super();
        this.size = options.processorOptions.samples;
        this.buf = new Float32Array(this.size);
        this.n = 0;
      }
      process(inputs, outputs) {
        const input = inputs[0];
        if (input && input[0]) {
          const ch = input[0];
          for (let i = 0; i < ch.length; i++) {
            this.buf[this.n++] = ch[i];
            if (this.n === this.size) { this.port.postMessage(this.buf.slice()); this.n = 0; }
          }
          if (outputs[0] && outputs[0][0]) outputs[0][0].set(ch);
        }
        return true;
      }
    }
    registerProcessor("lipsync-capture", Capture);`;

  let session = null;

  function toPcm16(floats) {
    const out = new DataView(new ArrayBuffer(floats.length * 2));
    for (let i = 0; i < floats.length; i++) {
      const s = Math.max(-1, Math.min(1, floats[i]));
      out.setInt16(i * 2, s < 0 ? s * 32768 : s * 32767, true);
    }
    return out.buffer;
  }

  function decodeFrame(buf) {
    const v = new DataView(buf);
    const kind = v.getUint8(0), flags = v.getUint8(1);
    const errorLen = v.getUint32(38, true), jpegLen = v.getUint32(42, true);
    const error = new TextDecoder().decode(new Uint8Array(buf, HEADER, errorLen));
    if (kind === 2) return { notice: true, error };
    return {
      notice: false, error,
      seq: Number(v.getBigUint64(2, true)), pts: v.getFloat64(10, true),
      speaking: (flags & 1) !== 0, late: (flags & 2) !== 0, videoFrame: v.getUint32(18, true),
      jpeg: new Blob([new Uint8Array(buf, HEADER + errorLen, jpegLen)], { type: "image/jpeg" }),
    };
  }

  function show() {
    ui.frames.textContent = String(stats.frames);
    ui.speaking.textContent = stats.frames ? `${Math.round((100 * stats.speaking) / stats.frames)} %` : "–";
    ui.first.textContent = stats.firstFrameMs === null ? "–" : `${Math.round(stats.firstFrameMs)} ms`;
    ui.offset.textContent = stats.offsetMs === null ? "–" : `${Math.round(stats.offsetMs)} ms`;
    ui.late.textContent = String(stats.late);
  }

  class LiveSession {
    constructor(avatar, source) {
      this.avatar = avatar;
      this.source = source;         // "mic" or a File
      this.queue = [];              // decoded frames waiting for their time, in seq order
      this.offsets = [];            // arrival - pts on the audio clock (s), speaking frames
      this.closed = false;
    }

    async start() {
      this.ctx = new AudioContext();
      await this.ctx.resume();
      const rate = this.ctx.sampleRate;
      const url = URL.createObjectURL(new Blob([WORKLET], { type: "text/javascript" }));
      await this.ctx.audioWorklet.addModule(url);
      this.capture = new AudioWorkletNode(this.ctx, "lipsync-capture", {
        processorOptions: { samples: Math.round(rate / 50) }, numberOfOutputs: 1, outputChannelCount: [1],
      });
      this.sink = this.ctx.createGain();   // the capture must be pulled: into a muted gain
      this.sink.gain.value = 0;
      this.capture.connect(this.sink).connect(this.ctx.destination);

      this.ws = new WebSocket(window.lipsyncAuth.wsUrl("/live"));
      this.ws.binaryType = "arraybuffer";
      await new Promise((resolve, reject) => {
        this.ws.onopen = resolve;
        this.ws.onerror = () => reject(new Error("cannot open /live"));
      });
      this.ws.onmessage = (ev) => this.onFrame(ev.data);
      this.ws.onclose = () => this.onClose();
      this.ws.send(JSON.stringify({ type: "start", avatar: this.avatar, sample_rate_hz: rate }));
      this.t0 = this.ctx.currentTime;      // slot k is due at t0 + 0.04 k on the audio clock
      this.sentAt = performance.now();
      this.capture.port.onmessage = (ev) => {
        if (this.ws.readyState === WebSocket.OPEN && !this.ending) this.ws.send(toPcm16(ev.data));
      };

      if (this.source === "mic") {
        this.stream = await navigator.mediaDevices.getUserMedia({
          audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
        });
        this.input = this.ctx.createMediaStreamSource(this.stream);
        this.input.connect(this.capture);
      } else {
        const data = await this.source.arrayBuffer();
        const buffer = await this.ctx.decodeAudioData(data);
        this.input = this.ctx.createBufferSource();
        this.input.buffer = buffer;
        const delay = this.ctx.createDelay(PLAYOUT_S + 1);
        delay.delayTime.value = PLAYOUT_S;   // heard when its frames are shown
        this.input.connect(this.capture);
        this.input.connect(delay).connect(this.ctx.destination);
        this.input.onended = () => this.end();
        this.input.start();
      }
      stats.state = "live";
      ui.status.textContent = `live: ${this.avatar} (${rate} Hz)`;
      this.draw();
    }

    onFrame(data) {
      if (typeof data === "string") return;
      const f = decodeFrame(data);
      if (f.error) { stats.errors.push(f.error); ui.status.textContent = f.error; }
      if (f.notice) return;
      const now = this.ctx.currentTime;
      if (stats.frames === 0) stats.firstFrameMs = performance.now() - this.sentAt;
      if (f.seq !== stats.lastSeq + 1) stats.gaps += 1;
      stats.lastSeq = f.seq;
      stats.frames += 1;
      if (f.speaking) {
        stats.speaking += 1;
        stats.speakingSeqs.push(f.seq);
        this.offsets.push(now - (this.t0 + f.pts));
        const sorted = [...this.offsets.slice(-100)].sort((a, b) => a - b);
        stats.offsetMs = 1000 * sorted[Math.floor(sorted.length / 2)];
      } else if (f.late) {
        stats.late += 1;
        stats.lateSeqs.push(f.seq);
      } else stats.idle += 1;
      this.queue.push(f);
      show();
    }

    draw() {
      if (this.closed && this.queue.length === 0) return;
      const clock = this.ctx.currentTime - this.t0 - PLAYOUT_S;
      let due = null;
      while (this.queue.length && this.queue[0].pts <= clock) due = this.queue.shift();
      if (due) {
        createImageBitmap(due.jpeg).then((img) => {
          if (ui.canvas.width !== img.width) { ui.canvas.width = img.width; ui.canvas.height = img.height; }
          ctx2d.drawImage(img, 0, 0);
          stats.drawn = (stats.drawn || 0) + 1;
        });
      }
      requestAnimationFrame(() => this.draw());
    }

    end() {
      if (this.ending) return;
      this.ending = true;
      if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: "end" }));
      if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
      ui.status.textContent = "ending: the last frames are coming";
    }

    onClose() {
      this.closed = true;
      stats.state = "closed";
      ui.status.textContent = `session closed: ${stats.frames} frames`;
      ui.mic.disabled = false; ui.file.disabled = false; ui.stop.disabled = true;
      if (this.ctx) setTimeout(() => this.ctx.close(), (PLAYOUT_S + 0.5) * 1000);
    }
  }

  async function begin(source) {
    const avatar = ($("avatar") && $("avatar").value) || "demo";
    Object.assign(stats, {
      state: "starting", frames: 0, speaking: 0, late: 0, idle: 0, errors: [], firstFrameMs: null,
      offsetMs: null, lastSeq: -1, gaps: 0, speakingSeqs: [], lateSeqs: [], drawn: 0,
      source: source === "mic" ? "mic" : "file",
    });
    show();
    ui.mic.disabled = true; ui.file.disabled = true; ui.stop.disabled = false;
    session = new LiveSession(avatar, source);
    try {
      await session.start();
    } catch (err) {
      stats.state = "failed";
      stats.errors.push(String(err));
      ui.status.textContent = `live failed: ${err}`;
      ui.mic.disabled = false; ui.file.disabled = false; ui.stop.disabled = true;
    }
  }

  ui.mic.addEventListener("click", () => begin("mic"));
  ui.file.addEventListener("change", () => { if (ui.file.files.length) begin(ui.file.files[0]); });
  ui.stop.addEventListener("click", () => session && session.end());
  window.lipsyncLive.start = begin;
  window.lipsyncLive.end = () => session && session.end();
})();
