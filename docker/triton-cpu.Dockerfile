# syntax=docker/dockerfile:1
# Triton for the CPU profile (deploy/k8s/overlays/cpu-demo): the NGC image docker-compose.yml
# pins, plus what the CPU profile's Python-backend models import that the image lacks.
# model_repository/python_onnx/model.py imports numpy (the image installs it for the Python
# backend), triton_python_backend_utils (the Python backend's own) and onnxruntime (added here;
# the image's onnxruntime *backend* is C++, its Python has no onnxruntime package). The image's
# Python is 3.10 (Ubuntu 22.04); onnxruntime 1.20.1 ships wheels for it and runs with numpy 1
# and 2.
#
#   docker build -f docker/triton-cpu.Dockerfile -t lipsync-triton-cpu:24.08-py3 .
FROM nvcr.io/nvidia/tritonserver:24.08-py3
RUN pip3 install --no-cache-dir onnxruntime==1.20.1
# triton-server (uid 1000), the NGC image's own non-root user
USER 1000:1000
