# syntax=docker/dockerfile:1
# The demo avatar for deploy/k8s/overlays/cpu-demo: its CPU-profile Triton models
# (model_repository/cpu: lipsync_demo, audio_encoder) and its package (packages/demo), which
# init containers copy into emptyDir volumes, so the demo needs no storage class.
# Build after `lipsync package demo` (which writes both), from the repository root; BuildKit
# reads docker/demo-content.Dockerfile.dockerignore instead of .dockerignore:
#
#   docker build -f docker/demo-content.Dockerfile -t lipsync-demo-content:0.1.0 .
FROM busybox:1.36.1
COPY model_repository/cpu/ /content/models/
COPY packages/demo/ /content/packages/demo/
USER 1000:1000
