# syntax=docker/dockerfile:1.7
# pruneserve gRPC server on NVIDIA GPUs: ONNX Runtime with the TensorRT and CUDA providers.
#
# The majors must match what the pinned onnxruntime-gpu (deploy/docker/constraints.txt)
# links: CUDA 13, cuDNN 9, TensorRT 10. Hosts need an NVIDIA driver for CUDA 13 (r580+).
#
#   docker build -f deploy/docker/server-gpu.Dockerfile -t pruneserve-server:0.1.0-gpu .
#   docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 --read-only --tmpfs /tmp \
#     -v "$PWD/artifacts/minilm:/models/minilm:ro" -v trt-cache:/var/cache/pruneserve/tensorrt \
#     pruneserve-server:0.1.0-gpu serve /models/minilm --provider tensorrt,cuda,cpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- build ------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pruneserve/ pruneserve/
COPY server/ server/
COPY optimizer/ optimizer/
COPY deploy/scripts/install-server.sh deploy/scripts/
COPY deploy/docker/constraints.txt deploy/docker/
# The provider check at the end of the script needs no GPU: it lists compiled-in providers.
RUN --mount=type=cache,target=/root/.cache/pip \
    bash deploy/scripts/install-server.sh --venv /opt/pruneserve --flavor gpu --src /src

# ---- server -------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS server
COPY deploy/scripts/install-tensorrt-runtime.sh /tmp/
# Python (the venv's interpreter) and TensorRT's runtime libraries from NVIDIA's CUDA apt
# repository, which the base image already trusts.
RUN bash /tmp/install-tensorrt-runtime.sh && rm /tmp/install-tensorrt-runtime.sh \
 && groupadd --system --gid 10001 pruneserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pruneserve \
 && mkdir -p /models /var/cache/pruneserve/tensorrt \
 && chown 10001:10001 /models /var/cache/pruneserve/tensorrt
COPY --from=build /opt/pruneserve /opt/pruneserve
ENV PATH=/opt/pruneserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001 8002
ENTRYPOINT ["pruneserve"]
CMD ["serve", "--help"]

FROM server AS server-baked
ARG ARTIFACT=artifacts/minilm
COPY --chown=10001:10001 ${ARTIFACT}/ /models/minilm/
CMD ["serve", "/models/minilm", "--provider", "tensorrt,cuda,cpu"]
