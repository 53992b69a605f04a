# syntax=docker/dockerfile:1.7
# `pruneserve optimize` with CPU torch, transformers, onnx, the default model
# (all-MiniLM-L6-v2, shipped as a package: nothing is downloaded at run time) and the
# openvino extra (NNCF's static INT8 for --target tensorrt and --quantize auto, OpenVINO
# to measure it).
#
#   docker build -f deploy/docker/optimizer.Dockerfile -t pruneserve-optimizer:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp -v "$PWD/artifacts:/models" \
#     pruneserve-optimizer:0.1.0 optimize --quantize dynamic --target cpu --out /models/minilm
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pruneserve/ pruneserve/
COPY server/ server/
COPY optimizer/ optimizer/
COPY deploy/scripts/install-optimizer.sh deploy/scripts/
COPY deploy/docker/constraints.txt deploy/docker/
# The CPU build of torch (the default index's torch is the multi-GB CUDA one).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
    bash deploy/scripts/install-optimizer.sh --venv /opt/pruneserve --src /src

FROM ${PYTHON_IMAGE} AS optimizer
RUN groupadd --system --gid 10001 pruneserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pruneserve \
 && mkdir -p /models && chown 10001:10001 /models
COPY --from=build /opt/pruneserve /opt/pruneserve
ENV PATH=/opt/pruneserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["pruneserve"]
CMD ["optimize", "--help"]
