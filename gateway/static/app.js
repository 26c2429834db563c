// The lipsync web page: plays an avatar at 25 fps over the binary WebSocket, in sync with its
// audio. Plain JS, no build step.
//
// Timing model: the audio element is the clock. Slot k (frame k) is shown during
// [k/25, (k+1)/25) s of audio time. Frames are requested `lead` slots ahead of the clock, where
// `lead` follows the measured round-trip latency (p95), so a requested frame normally arrives
// before its slot; at most MAX_IN_FLIGHT requests are outstanding. A slot whose frame is not
// there when the clock passes it counts as dropped (late reply, skipped request or error).
// Model server outage: a `triton_unavailable` error reply does not go to the error box (one per
// frame would be a wall of errors); the page shows one notice, "model server restarting" when
// /readyz says the supervisor is restarting Triton (`lipsync up`), else why it is unavailable,
// checks /readyz every READYZ_POLL_MS while it lasts, and clears it at the next frame.
// Protocol (little-endian), see gateway/ws_protocol.py:
//   request  [name_len u32][name][frame_id u32][audio_len u32][audio]
//   reply    [1 u8][frame_id u32][processing_ms u32][jpeg_len u32][jpeg][bounds_len u32 = 16][4 x f32]
//            (bounds_len is in bytes, as the original server wrote it)
//   error    [0 u8][frame_id u32][processing_ms u32][len u32][utf-8 message]
"use strict";

const FPS = 25;
const MAX_IN_FLIGHT = 4;      // bounded number of outstanding requests per page
const EXTRA_WINDOW = 3;       // slots requested beyond the minimum lead
const LATENCY_SAMPLES = 100;  // sliding window for the p50/p95 shown (requests)
const LEAD_SAMPLES = 20;      // recent requests the lead follows
const BUFFER_TIMEOUT_MS = 15000;  // longest wait for the first frames before playing
const READYZ_POLL_MS = 1000;      // /readyz checks while the model server is unavailable
const UNAVAILABLE = "triton_unavailable";  // the error code of a model server outage

const $ = (id) => document.getElementById(id);
const ui = {
  avatar: $("avatar"), play: $("play"), stop: $("stop"), status: $("status"),
  untrained: $("untrained"), error: $("error"), notice: $("notice"), canvas: $("screen"),
  audio: $("audio"),
  fps: $("stat-fps"), latency: $("stat-latency"), server: $("stat-server"),
  drawn: $("stat-drawn"), dropped: $("stat-dropped"), errors: $("stat-errors"),
  inflight: $("stat-inflight"), frame: $("stat-frame"),
};
const ctx2d = ui.canvas.getContext("2d");

// Public, read by the browser test: counters of the current/last playback.
const stats = {
  framesDrawn: 0, framesReceived: 0, dropped: 0, errors: 0, requested: 0, unavailable: 0,
  lastError: null, notice: null, playing: false, finished: false, clock: "none",
};
window.lipsync = { stats, avatars: [], ready: false };

let avatars = new Map();
let session = null;  // the current playback

// ------------------------------------------------------------------ protocol

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function encodeRequest(name, frameId) {
  const nameBytes = encoder.encode(name);
  const buf = new ArrayBuffer(12 + nameBytes.length);
  const dv = new DataView(buf);
  dv.setUint32(0, nameBytes.length, true);
  new Uint8Array(buf, 4, nameBytes.length).set(nameBytes);
  dv.setUint32(4 + nameBytes.length, frameId, true);
  dv.setUint32(8 + nameBytes.length, 0, true);  // audio_len = 0: use the package's audio
  return buf;
}

function decodeReply(buf) {
  const dv = new DataView(buf);
  if (buf.byteLength < 13) throw new Error(`reply truncated (${buf.byteLength} bytes)`);
  const status = dv.getUint8(0);
  const frameId = dv.getUint32(1, true);
  const processingMs = dv.getUint32(5, true);
  const len = dv.getUint32(9, true);
  if (13 + len > buf.byteLength) throw new Error("reply truncated (payload)");
  if (status === 0) {
    return { ok: false, frameId, processingMs, message: decoder.decode(new Uint8Array(buf, 13, len)) };
  }
  const jpeg = new Uint8Array(buf, 13, len);
  const boundsLen = dv.getUint32(13 + len, true);  // bytes
  if (17 + len + boundsLen !== buf.byteLength || boundsLen % 4 !== 0) {
    throw new Error(`reply has bounds_len ${boundsLen} but ${buf.byteLength - 17 - len} bytes follow`);
  }
  const bounds = [];
  for (let i = 0; i < boundsLen / 4; i++) bounds.push(dv.getFloat32(17 + len + 4 * i, true));
  return { ok: true, frameId, processingMs, jpeg, bounds };
}

// ------------------------------------------------------------------ helpers

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

// ------------------------------------------------------------------ model server outage

const outage = { timer: null };

function showNotice(text) {
  stats.notice = text;
  ui.notice.textContent = text;
  ui.notice.hidden = false;
}

function clearNotice() {
  if (outage.timer !== null) { clearTimeout(outage.timer); outage.timer = null; }
  stats.notice = null;
  ui.notice.hidden = true;
  ui.notice.textContent = "";
}

// A frame failed with `triton_unavailable`: one notice, refreshed from /readyz while it lasts.
function modelServerUnavailable() {
  if (outage.timer !== null) return;
  if (stats.notice === null) showNotice("model server unavailable; checking…");
  const check = async () => {
    outage.timer = null;
    let body = null;
    try {
      body = await (await fetch("/readyz", { cache: "no-store" })).json();
    } catch (err) {
      showNotice(`model server unavailable (gateway not answering: ${err.message})`);
    }
    if (stats.notice === null) return;  // a frame came back meanwhile
    if (body && body.ready) {
      showNotice("model server back; frames resume");
    } else if (body && body.triton_supervisor && body.triton_supervisor.restarting) {
      const last = body.triton_supervisor.last_exit;
      showNotice(`model server restarting${last ? ` (${last.reason})` : ""}; frames resume when it is back`);
    } else if (body) {
      showNotice(`model server unavailable: ${body.reason}`);
    }
    outage.timer = setTimeout(check, READYZ_POLL_MS);
  };
  outage.timer = setTimeout(check, 0);
}

function percentile(values, p) {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[idx];
}

function fmtMs(v) { return Number.isFinite(v) ? `${v.toFixed(0)} ms` : "–"; }

// ------------------------------------------------------------------ avatars

async function loadAvatars() {
  const resp = await fetch("/api/avatars", { headers: window.lipsyncAuth.headers() });
  if (resp.status === 401) {
    ui.status.textContent = "this gateway needs an access token";
    window.lipsyncAuth.ask();
    return;
  }
  if (!resp.ok) throw new Error(`GET /api/avatars: HTTP ${resp.status}`);
  clearError();
  const body = await resp.json();
  window.lipsync.avatars = body.avatars;
  avatars = new Map(body.avatars.map((a) => [a.name, a]));
  ui.avatar.replaceChildren(...body.avatars.map((a) => {
    const opt = document.createElement("option");
    opt.value = a.name;
    opt.textContent = `${a.name} (${a.width}x${a.height}, ${a.duration_s.toFixed(1)} s${a.trained ? "" : ", untrained"})`;
    return opt;
  }));
  if (body.avatars.length === 0) {
    ui.status.textContent = "no avatars loaded";
    return;
  }
  ui.play.disabled = false;
  ui.status.textContent = `${body.avatars.length} avatar(s)`;
  selectAvatar();
  window.lipsync.ready = true;
}

function selectAvatar() {
  const a = avatars.get(ui.avatar.value);
  if (!a) return;
  ui.canvas.width = a.width;
  ui.canvas.height = a.height;
  ui.untrained.hidden = a.trained;
}

// ------------------------------------------------------------------ playback

class Playback {
  constructor(avatar) {
    this.avatar = avatar;
    this.total = avatar.output_frames;      // valid frame_ids: 0 .. total-1
    this.inFlight = new Map();              // frameId -> send time (ms)
    this.ready = new Map();                 // frameId -> ImageBitmap (decoded, not yet shown)
    this.latencies = [];                    // round trip (ms)
    this.serverMs = [];                     // server processing time (ms)
    this.drawTimes = [];                    // performance.now() of recent draws
    this.nextRequest = 0;
    this.lastSlot = -1;                     // last slot accounted for (drawn or dropped)
    this.clockStart = null;                 // performance.now() when using the fallback clock
    this.useAudioClock = true;
    this.stopped = false;
    this.onBuffered = null;                 // resolves the buffering wait
    this.ws = null;
    this.timer = null;
    this.statsTimer = null;
  }

  async start() {
    Object.assign(stats, {
      framesDrawn: 0, framesReceived: 0, dropped: 0, errors: 0, requested: 0, unavailable: 0,
      lastError: null, playing: false, finished: false, clock: "none",
    });
    clearError();
    clearNotice();
    ui.status.textContent = "connecting…";
    const audioLoaded = this.loadAudio();  // loads while the first frames are rendered
    audioLoaded.catch(() => {});  // awaited below; no "unhandled rejection" meanwhile
    this.ws = new WebSocket(window.lipsyncAuth.wsUrl("/ws"));
    this.ws.binaryType = "arraybuffer";
    this.ws.onmessage = (ev) => this.onMessage(ev);
    this.ws.onclose = (ev) => {
      if (!this.stopped) {
        showError(`WebSocket closed by the server (code ${ev.code}${ev.reason ? ": " + ev.reason : ""})`);
        this.stop();
      }
    };
    await new Promise((resolve, reject) => {
      this.ws.onopen = resolve;
      this.ws.onerror = () => reject(new Error("WebSocket connection to /ws failed"));
    });
    this.ws.onerror = null;

    // Buffer: ask for the first MAX_IN_FLIGHT frames and start the clock when they are all
    // back, so the first slots are not lost to connection set-up and Triton warm-up.
    ui.status.textContent = "buffering…";
    const buffered = new Promise((resolve) => { this.onBuffered = resolve; });
    this.fill(0);
    const timeout = new Promise((resolve) => setTimeout(resolve, BUFFER_TIMEOUT_MS));
    await Promise.race([buffered, timeout]);
    this.onBuffered = null;
    if (this.stopped) return;

    await audioLoaded;
    if (this.stopped) return;
    ui.audio.currentTime = 0;
    try {
      await ui.audio.play();
      stats.clock = "audio";
    } catch (err) {
      // Autoplay refused or no audio output: keep the frames going on a wall clock.
      this.useAudioClock = false;
      this.clockStart = performance.now();
      stats.clock = "wall";
      ui.status.textContent = `audio could not start (${err.name}); playing without sound`;
    }
    ui.audio.onended = () => this.finish();
    stats.playing = true;
    if (stats.clock === "audio") ui.status.textContent = `playing ${this.avatar.name}`;
    this.timer = setInterval(() => this.tick(), 5);
    this.statsTimer = setInterval(() => this.renderStats(), 250);
  }

  // The avatar's WAV: straight from its URL, or, when a token is needed (an <audio> element
  // cannot send headers), fetched with it and played from a blob URL.
  async loadAudio() {
    const headers = window.lipsyncAuth.headers();
    if (!headers.Authorization) {
      ui.audio.src = this.avatar.audio_url;
      ui.audio.load();
      return;
    }
    const resp = await fetch(this.avatar.audio_url, { headers });
    if (!resp.ok) throw new Error(`GET ${this.avatar.audio_url}: HTTP ${resp.status}`);
    if (ui.audio.src.startsWith("blob:")) URL.revokeObjectURL(ui.audio.src);
    ui.audio.src = URL.createObjectURL(await resp.blob());
    ui.audio.load();
  }

  clock() {
    if (this.useAudioClock) return ui.audio.currentTime;
    return (performance.now() - this.clockStart) / 1000;
  }

  // Minimum number of slots between the clock and a newly requested frame, from the p95
  // round-trip latency: a frame requested closer than this would arrive after its slot.
  lead() {
    const recent = this.latencies.slice(-LEAD_SAMPLES);
    const p95 = recent.length ? percentile(recent, 95) : 200;
    return Math.ceil(p95 / (1000 / FPS)) + 1;
  }

  send(frameId) {
    this.inFlight.set(frameId, performance.now());
    stats.requested += 1;
    this.ws.send(encodeRequest(this.avatar.name, frameId));
  }

  // Request frames from `slot + lead` up to `slot + lead + EXTRA_WINDOW`, keeping at most
  // MAX_IN_FLIGHT outstanding; frames that can no longer arrive in time are skipped.
  fill(slot) {
    if (this.ws.readyState !== WebSocket.OPEN) return;
    const lead = stats.playing ? this.lead() : 0;
    const first = slot + lead;
    if (this.nextRequest < first) this.nextRequest = first;
    const last = Math.min(this.total - 1, first + EXTRA_WINDOW);
    while (this.inFlight.size < MAX_IN_FLIGHT && this.nextRequest <= last) {
      this.send(this.nextRequest);
      this.nextRequest += 1;
    }
  }

  async onMessage(ev) {
    const now = performance.now();
    let reply;
    try {
      reply = decodeReply(ev.data);
    } catch (err) {
      stats.errors += 1;
      showError(`bad reply from the server: ${err.message}`);
      return;
    }
    const sent = this.inFlight.get(reply.frameId);
    this.inFlight.delete(reply.frameId);
    if (sent !== undefined) {
      this.latencies.push(now - sent);
      if (this.latencies.length > LATENCY_SAMPLES) this.latencies.shift();
    }
    if (!reply.ok) {
      stats.errors += 1;
      stats.lastError = reply.message;
      if (reply.message.startsWith(`${UNAVAILABLE}:`)) {
        stats.unavailable += 1;
        modelServerUnavailable();
      } else {
        showError(`frame ${reply.frameId}: ${reply.message}`);
      }
      this.checkBuffered();
      return;
    }
    if (stats.notice !== null) clearNotice();
    stats.framesReceived += 1;
    this.serverMs.push(reply.processingMs);
    if (this.serverMs.length > LATENCY_SAMPLES) this.serverMs.shift();
    if (this.stopped || reply.frameId <= this.lastSlot) return;  // too late: its slot passed
    const bitmap = await createImageBitmap(new Blob([reply.jpeg], { type: "image/jpeg" }));
    if (this.stopped || reply.frameId <= this.lastSlot) { bitmap.close(); this.checkBuffered(); return; }
    this.ready.set(reply.frameId, bitmap);
    this.checkBuffered();
  }

  // While buffering, playback starts once every buffered request has been answered.
  checkBuffered() {
    if (this.onBuffered && this.inFlight.size === 0) { this.onBuffered(); this.onBuffered = null; }
  }

  tick() {
    if (this.stopped) return;
    const slot = Math.floor(this.clock() * FPS);
    if (slot >= this.total) { this.finish(); return; }
    if (slot > this.lastSlot) {
      // Account for every slot the clock passed since the last tick.
      for (let k = this.lastSlot + 1; k < slot; k++) {
        if (this.ready.has(k)) { this.ready.get(k).close(); this.ready.delete(k); }
        stats.dropped += 1;
      }
      const bitmap = this.ready.get(slot);
      if (bitmap) {
        ctx2d.drawImage(bitmap, 0, 0, ui.canvas.width, ui.canvas.height);
        bitmap.close();
        this.ready.delete(slot);
        stats.framesDrawn += 1;
        this.drawTimes.push(performance.now());
      } else {
        stats.dropped += 1;
      }
      this.lastSlot = slot;
      ui.frame.textContent = `${slot} / ${this.total}`;
    }
    this.fill(slot);
  }

  renderStats() {
    const now = performance.now();
    this.drawTimes = this.drawTimes.filter((t) => now - t <= 1000);
    ui.fps.textContent = String(this.drawTimes.length);
    ui.latency.textContent = `${fmtMs(percentile(this.latencies, 50))} / ${fmtMs(percentile(this.latencies, 95))}`;
    ui.server.textContent = fmtMs(percentile(this.serverMs, 50));
    ui.drawn.textContent = String(stats.framesDrawn);
    ui.dropped.textContent = String(stats.dropped);
    ui.errors.textContent = String(stats.errors);
    ui.inflight.textContent = `${this.inFlight.size} / ${this.lead()}`;
    stats.fps = this.drawTimes.length;
    stats.lead = this.lead();
    stats.inFlight = this.inFlight.size;
    stats.nextRequest = this.nextRequest;
    stats.slot = this.lastSlot;
    stats.latencyP50 = percentile(this.latencies, 50);
    stats.latencyP95 = percentile(this.latencies, 95);
  }

  finish() {
    if (this.stopped) return;
    stats.finished = true;
    ui.status.textContent = `finished ${this.avatar.name}`;
    this.stop();
  }

  stop() {
    if (this.stopped) return;
    this.stopped = true;
    stats.playing = false;
    clearInterval(this.timer);
    clearInterval(this.statsTimer);
    this.renderStats();
    ui.audio.pause();
    for (const bitmap of this.ready.values()) bitmap.close();
    this.ready.clear();
    if (this.onBuffered) { this.onBuffered(); this.onBuffered = null; }
    clearNotice();
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "stopped");
    ui.play.disabled = false;
    ui.stop.disabled = true;
    ui.avatar.disabled = false;
    if (!stats.finished) ui.status.textContent = "stopped";
  }
}

async function play() {
  const avatar = avatars.get(ui.avatar.value);
  if (!avatar) return;
  if (session) session.stop();
  ui.play.disabled = true;
  ui.stop.disabled = false;
  ui.avatar.disabled = true;
  session = new Playback(avatar);
  try {
    await session.start();
  } catch (err) {
    showError(err.message);
    session.stop();
  }
}

ui.avatar.addEventListener("change", selectAvatar);
ui.play.addEventListener("click", play);
ui.stop.addEventListener("click", () => { if (session) session.stop(); });

function start() {
  loadAvatars().catch((err) => {
    ui.status.textContent = "failed";
    showError(`could not load the avatar list: ${err.message}`);
  });
}
window.addEventListener("lipsync-token", start);
start();
