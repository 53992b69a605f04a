#!/usr/bin/env bash
# Runtime packages of the GPU server image (deploy/docker/server-gpu.Dockerfile), on top of
# an nvidia/cuda *-cudnn-runtime-ubuntu24.04 base: the Python interpreter of the venv and
# TensorRT's runtime libraries (libnvinfer.so.10, libnvonnxparser.so.10) that ONNX Runtime's
# TensorRT provider loads. Versions are pinned; TRT_VERSION must carry the CUDA major of the
# base image (the "+cudaNN.N" suffix of NVIDIA's package versions).
set -euo pipefail

TRT_VERSION="${TRT_VERSION:-10.16.1.11-1+cuda13.0}"

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends \
    python3 \
    "libnvinfer10=${TRT_VERSION}" \
    "libnvinfer-plugin10=${TRT_VERSION}" \
    "libnvonnxparsers10=${TRT_VERSION}"
# Keep later `apt-get upgrade`s from moving TensorRT away from what ONNX Runtime was built for.
apt-mark hold libnvinfer10 libnvinfer-plugin10 libnvonnxparsers10
rm -rf /var/lib/apt/lists/*
