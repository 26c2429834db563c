"""`GatewaySettings`: the one configuration object of the gateway.

Every field can be set by an environment variable with the prefix ``LIPSYNC_`` (for example
``LIPSYNC_TRITON_URL=triton:8001``, ``LIPSYNC_JPEG_QUALITY=90``; nested fields with ``__``:
``LIPSYNC_LIVE__MARGIN_S=1.0``), from a ``.env`` file, or by
the CLI (``gateway/cli.py`` passes keyword arguments, which win over the environment).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.live.settings import LiveSettings
from gateway.triton_client import CONTROL_KEY_HEADER
from gateway.triton_targets import Target, parse_targets
from lipsync.contract import (
    AUDIO_ENCODER_MODEL,
    GATEWAY_GRPC_PORT,
    GATEWAY_HTTP_PORT,
    TRITON_GRPC_PORT,
)
from lipsync.paths import CACHE_DIR, PACKAGES_DIR

MIN_TOKEN_CHARS = 16
"""Shortest `GatewaySettings.auth_token` / ``admin_token`` accepted (characters)."""


class GatewaySettings(BaseSettings):
    """Gateway configuration (env prefix ``LIPSYNC_``). Units are in the field names/docs."""

    # hide_input_in_errors: a refused setting's error must not print a token into the log
    model_config = SettingsConfigDict(
        env_prefix="LIPSYNC_",
        env_file=".env",
        extra="ignore",
        env_nested_delimiter="__",
        hide_input_in_errors=True,
    )

    # --- where things are -------------------------------------------------------------------
    triton_url: str = Field(
        f"localhost:{TRITON_GRPC_PORT}",
        description="Triton gRPC endpoints: host:port, or several separated by commas; a host name is "
        "spread over all its addresses (a Kubernetes headless Service: every ready Triton pod), "
        "resolved again every triton_dns_interval_s (gateway/triton_targets.py, gateway/endpoint_pool.py)",
    )
    host: str = Field("0.0.0.0", description="interface the gRPC and HTTP servers bind")
    grpc_port: int = Field(GATEWAY_GRPC_PORT, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    http_port: int = Field(
        GATEWAY_HTTP_PORT, ge=0, le=65535, description="HTTP/WebSocket port (0 = free one)"
    )
    packages_root: Path = Field(PACKAGES_DIR, description="folder holding one folder per avatar")
    device: str = Field("triton", description="label reported as `device` in gRPC answers")
    crop_cache_dir: Path | None = Field(
        CACHE_DIR / "crops",
        description="folder where each avatar's face crops (gateway/crop_cache.py) and, in its "
        "backgrounds/ folder, background JPEGs (gateway/background_cache.py) are computed once and "
        "memory-mapped from, shared by the workers; empty: computed into each process's RAM",
    )

    # --- processes --------------------------------------------------------------------------
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="gateway worker processes sharing the gRPC, HTTP and health ports (SO_REUSEPORT), "
        "started and restarted by a supervisor (gateway/workers.py); 1 = one process, no "
        "supervisor. How many per GPU: docs/ARCHITECTURE.md",
    )

    # --- output ---------------------------------------------------------------------------------
    jpeg_quality: int = Field(85, ge=1, le=100, description="JPEG quality of returned frames")
    jpeg_encoder: Literal["simplejpeg", "opencv"] = Field(
        "simplejpeg", description="JPEG encoder (simplejpeg: libjpeg-turbo; opencv: cv2.imencode)"
    )
    jpeg_subsampling: Literal["auto", "420", "422", "444"] = Field(
        "auto", description="chroma subsampling; auto = 4:4:4 at quality >= 90, else 4:2:0"
    )
    jpeg_threads: int = Field(2, ge=1, le=64, description="thread-pool size for paste-back + JPEG")
    jpeg_splice: bool = Field(
        True,
        description="spliced partial JPEG (gateway.compositor): per frame, encode only the face "
        "rectangle's restart-aligned rectangle and splice it into the video frame's JPEG built at "
        "load (byte-identical to OpenCV's full encode with restart markers); false: paste into "
        "a copy of the frame and encode all of it with jpeg_encoder",
    )
    jpeg_restart_px: int = Field(
        128, ge=8, le=4096,
        description="target width (px) of one restart interval of spliced JPEGs: R = the divisor "
        "of the MCU row nearest it",
    )

    # --- admission (robustness) ---------------------------------------------------------------
    max_in_flight_per_connection: int = Field(
        8, ge=1, description="frames one WebSocket/gRPC stream may have in flight at once"
    )
    max_in_flight_total: int = Field(
        64,
        ge=1,
        description="frames in flight in one gateway process (each worker with workers > 1); "
        "more -> Overloaded at once",
    )

    # --- per-client limits (gateway/limits.py, gateway/ws_limits.py); each worker's own ------
    max_in_flight_per_peer: int = Field(
        32,
        ge=1,
        description="frames one client address may have in flight over all its connections and "
        "calls (half the global cap: one client cannot take every slot); behind a reverse "
        "proxy every client has the proxy's address, set it to max_in_flight_total there",
    )
    max_aux_in_flight: int = Field(
        4,
        ge=1,
        description="GetVideoFrame JPEGs and live-audio feature jobs (mel + audio encoder) in "
        "flight in the whole gateway; more -> overloaded at once",
    )
    aux_threads: int = Field(
        1, ge=1, le=64, description="thread pool of that work, apart from the composite pool"
    )
    max_ws_connections: int = Field(
        128, ge=1, description="open WebSocket connections; one more is refused (HTTP 503)"
    )
    ws_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port], comma-separated; * = any) allowed to open a "
        "WebSocket besides the page's own; a browser's upgrade from another origin is refused "
        "(HTTP 403); clients that send no Origin (not browsers) are allowed",
    )
    ws_send_buffer_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        description="replies one WebSocket may have queued in the gateway, not yet taken by the "
        "client's TCP connection (bytes); a client past it is closed with 1013",
    )
    ws_send_timeout_s: float = Field(
        10.0, gt=0, description="longest wait for a WebSocket client to take a reply (s); then 1013"
    )
    grpc_max_concurrent_rpcs: int = Field(
        256, ge=1, description="gRPC calls open at once in the server; more -> RESOURCE_EXHAUSTED"
    )
    grpc_max_streams_per_connection: int = Field(
        100, ge=1, description="gRPC calls open at once on one HTTP/2 connection"
    )
    grpc_keepalive_time_s: float = Field(
        60.0, gt=0, description="the server pings a gRPC connection quiet this long (s)"
    )
    grpc_keepalive_timeout_s: float = Field(
        20.0, gt=0, description="...and drops it when the ping is not answered within this (s)"
    )
    grpc_max_connection_idle_s: float = Field(
        300.0, gt=0, description="a gRPC connection with no call for this long is closed (s)"
    )
    grpc_max_connection_age_s: float = Field(
        3600.0, gt=0, description="a gRPC connection this old gets GOAWAY: new calls reconnect (s)"
    )
    grpc_max_connection_age_grace_s: float | None = Field(
        None,
        gt=0,
        description="calls open at a connection's max age may run this long more (s); unset: "
        "until they end, so a long StreamInference is never cut",
    )

    # --- Triton ---------------------------------------------------------------------------------
    triton_timeout_s: float = Field(
        30.0,
        gt=0,
        description="deadline of one inference call to Triton, queueing included (s); a dead "
        "Triton is detected much sooner by the readiness probe, which aborts calls in flight",
    )
    triton_probe_timeout_s: float = Field(
        1.0, gt=0, description="deadline of one readiness probe to Triton (s)"
    )
    triton_load_timeout_s: float = Field(
        120.0, gt=0, description="deadline of one load_model call to Triton (s)"
    )
    triton_poll_interval_s: float = Field(
        0.5, gt=0, description="period of the Triton readiness monitor (s)"
    )
    triton_load_models: bool = Field(
        True, description="ask Triton (explicit model control) to load each avatar's model"
    )
    triton_control_key: SecretStr | None = Field(
        None,
        description="key sent with model-control calls (load_model), for a Triton started with "
        f"--grpc-restricted-protocol=model-repository:{CONTROL_KEY_HEADER}=<key>; unset: none sent",
    )
    triton_dns_interval_s: float = Field(
        10.0,
        gt=0,
        description="period of resolving Triton host names again (s); also at once when an endpoint "
        "goes down",
    )
    audio_encoder_model: str = Field(AUDIO_ENCODER_MODEL, description="Triton model for live audio")
    triton_shm: Literal["system", "none"] = Field(
        "system",
        description="how UNet tensors reach Triton: system = POSIX shared memory registered with "
        "Triton when it shares this host's /dev/shm, one region per Triton endpoint (an endpoint "
        "that cannot open it gets gRPC, logged; gateway.triton_shm); none = inside the gRPC messages",
    )
    triton_coalesce: bool = Field(
        True,
        description="send the single-frame UNet calls that are ready in the same event-loop "
        "iteration as one batched request per model (gateway.batching); false: one request per frame",
    )

    # --- message size limits -------------------------------------------------------------------
    grpc_max_receive_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest gRPC request message accepted (bytes)"
    )
    grpc_max_send_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest gRPC response message sent (bytes)"
    )
    ws_max_message_bytes: int = Field(
        1024 * 1024, ge=64, description="largest WebSocket message accepted (bytes)"
    )
    max_batch_frames: int = Field(
        256, ge=1, description="most frames one GenerateBatch* request may ask for"
    )
    malformed_log_interval_s: float = Field(
        10.0,
        gt=0,
        description="malformed client input is logged at most once per peer per this many "
        "seconds, with the count of the ones left out (s; every one is counted in /metrics)",
    )

    # --- live sessions (issue 10) -----------------------------------------------------------
    live: LiveSettings = Field(
        default_factory=LiveSettings,
        description="live sessions: pacing margin, deadlines, voice activity (env "
        "LIPSYNC_LIVE__<FIELD>, e.g. LIPSYNC_LIVE__MARGIN_S=1.0)",
    )

    # --- security (README "Security"; gateway.auth, gateway.tls) -----------------------------
    auth_token: SecretStr | None = Field(
        None,
        description="token every client call needs: gRPC metadata `authorization: Bearer <token>`, "
        "the same HTTP header, or `?token=` on a WebSocket; unset: no authentication (a warning "
        "when binding a non-loopback address). /healthz, /readyz and /metrics stay open",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="token of the admin calls (OptimizedLipSyncAdmin, the seed LoadPackage); unset: "
        "admin calls are refused",
    )
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain of the gRPC and HTTP/WebSocket ports (with tls_key)"
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: clients must present a certificate it signed (mutual TLS)"
    )
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="extra plain-HTTP port serving only /healthz, /readyz and /metrics (probes, "
        "Prometheus; no TLS, no token; shared by the workers like the other ports); unset: none",
    )
    triton_tls: bool = Field(False, description="TLS to every Triton endpoint of triton_url")
    triton_tls_ca: Path | None = Field(
        None, description="PEM CA bundle Triton's certificate is checked against (default: system)"
    )
    max_avatar_bytes: int | None = Field(
        None,
        ge=1,
        description="cap on the bytes of avatar frames held in RAM (full frames + 328/320 crops + "
        "background JPEGs of every avatar); a load past it is refused; unset: no cap. With "
        "workers > 1, each worker's avatars, counted whole even where memory-mapped and shared "
        "(gateway/store.py)",
    )

    @field_validator("auth_token", "admin_token", mode="after")
    @classmethod
    def _token_format(cls, value: SecretStr | None) -> SecretStr | None:
        """An empty token is no token; a set one is 16+ visible ASCII characters (a header value)."""
        if value is None or value.get_secret_value() == "":
            return None
        token = value.get_secret_value()
        if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
            raise ValueError(
                f"a token must be at least {MIN_TOKEN_CHARS} visible ASCII characters without "
                "spaces (e.g. `openssl rand -hex 32`)"
            )
        return value

    @model_validator(mode="after")
    def _security_consistent(self) -> GatewaySettings:
        """TLS files come as cert + key (both or neither), a client CA only with them, every file
        readable; the admin token differs from the client token."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both LIPSYNC_TLS_CERT and LIPSYNC_TLS_KEY, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("LIPSYNC_TLS_CLIENT_CA (mutual TLS) needs LIPSYNC_TLS_CERT and _KEY")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "triton_tls_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"LIPSYNC_{name.upper()}: {path} is not a file")
        if (
            self.auth_token is not None
            and self.admin_token is not None
            and self.auth_token.get_secret_value() == self.admin_token.get_secret_value()
        ):
            raise ValueError("LIPSYNC_ADMIN_TOKEN must differ from LIPSYNC_AUTH_TOKEN")
        return self

    @field_validator("crop_cache_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("triton_url")
    @classmethod
    def _check_triton_url(cls, value: str) -> str:
        parse_targets(value)  # ValueError: names the entry at fault
        return value

    @property
    def triton_targets(self) -> tuple[Target, ...]:
        """``triton_url`` parsed (`gateway.triton_targets.parse_targets`)."""
        return parse_targets(self.triton_url)

    @field_validator("ws_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """``LIPSYNC_WS_ALLOWED_ORIGINS=https://a.example,https://b.example`` -> a list."""
        if isinstance(value, str):
            return [o.strip().rstrip("/") for o in value.split(",") if o.strip()]
        return value
