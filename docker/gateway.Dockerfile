# syntax=docker/dockerfile:1
# The lip-sync gateway image: runtime dependencies only (`pip install .`, no extras: no torch,
# no onnx/onnxruntime, no tritonserver), non-root, healthcheck on /healthz.
# Build context: the repository root (see docker-compose.yml and .dockerignore). Needs BuildKit
# (the default builder since Docker 23) for the RUN --mount below.
#
#   docker build -f docker/gateway.Dockerfile -t lipsync-gateway:0.1.0 .
#   docker run --rm -e LIPSYNC_TRITON_URL=triton:8001 -v "$PWD/packages:/packages:ro" \
#       -p 50051:50051 -p 8085:8085 lipsync-gateway:0.1.0

# --- build stage: a wheel of the project and the wheels of its runtime dependencies ---------
FROM python:3.11.10-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lipsync/ lipsync/
COPY gateway/ gateway/
COPY proto/ proto/
COPY export/ export/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime stage ---------------------------------------------------------------------------
FROM python:3.11.10-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LIPSYNC_HOST=0.0.0.0 \
    LIPSYNC_GRPC_PORT=50051 \
    LIPSYNC_HTTP_PORT=8085 \
    LIPSYNC_TRITON_URL=triton:8001 \
    LIPSYNC_PACKAGES_ROOT=/packages \
    LIPSYNC_PACKAGES_DIR=/packages \
    LIPSYNC_CACHE_DIR=/tmp/lipsync-cache

# the wheels built above (the project's runtime dependencies only), then throw them away
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/lipsync_serving-*.whl \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin lipsync \
    && mkdir -p /packages \
    && chown 10001:10001 /packages

# non-root (numeric, so Kubernetes' runAsNonRoot can verify it)
USER 10001:10001
WORKDIR /home/lipsync
EXPOSE 50051 8085
VOLUME ["/packages"]

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LIPSYNC_HTTP_PORT', '8085'), timeout=2)"]

CMD ["lipsync", "gateway"]
