"""`GatewaySettings`: the one configuration object of the gateway.

Every field can be set by an environment variable with the prefix ``LIPSYNC_`` (for example
``LIPSYNC_TRITON_URL=triton:8001``, ``LIPSYNC_JPEG_QUALITY=90``; nested fields with ``__``:
``LIPSYNC_LIVE__MARGIN_S=1.0``), from a ``.env`` file, or by
the CLI (``gateway/cli.py`` passes keyword arguments, which win over the environment).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.live.settings import LiveSettings
from gateway.triton_client import CONTROL_KEY_HEADER
from lipsync.contract import (
    AUDIO_ENCODER_MODEL,
    GATEWAY_GRPC_PORT,
    GATEWAY_HTTP_PORT,
    TRITON_GRPC_PORT,
)
from lipsync.paths import PACKAGES_DIR


class GatewaySettings(BaseSettings):
    """Gateway configuration (env prefix ``LIPSYNC_``). Units are in the field names/docs."""

    model_config = SettingsConfigDict(
        env_prefix="LIPSYNC_", env_file=".env", extra="ignore", env_nested_delimiter="__"
    )

    # --- where things are -------------------------------------------------------------------
    triton_url: str = Field(f"localhost:{TRITON_GRPC_PORT}", description="Triton gRPC endpoint host:port")
    host: str = Field("0.0.0.0", description="interface the gRPC and HTTP servers bind")
    grpc_port: int = Field(GATEWAY_GRPC_PORT, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    http_port: int = Field(GATEWAY_HTTP_PORT, ge=0, le=65535, description="HTTP/WebSocket port (0 = free one)")
    packages_root: Path = Field(PACKAGES_DIR, description="folder holding one folder per avatar")
    device: str = Field("triton", description="label reported as `device` in gRPC answers")

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
        64, ge=1, description="frames in flight in the whole gateway; more -> Overloaded at once"
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
    audio_encoder_model: str = Field(AUDIO_ENCODER_MODEL, description="Triton model for live audio")
    triton_shm: Literal["system", "none"] = Field(
        "system",
        description="how UNet tensors reach Triton: system = POSIX shared memory registered with "
        "Triton when it shares this host's /dev/shm (else gRPC, logged; gateway.triton_shm); "
        "none = inside the gRPC messages",
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

    # --- live sessions (issue 10) -----------------------------------------------------------
    live: LiveSettings = Field(
        default_factory=LiveSettings,
        description="live sessions: pacing margin, deadlines, voice activity (env "
        "LIPSYNC_LIVE__<FIELD>, e.g. LIPSYNC_LIVE__MARGIN_S=1.0)",
    )
