# syntax=docker/dockerfile:1.7
# pruneserve gRPC server on CPU: slim Python, ONNX Runtime's CPU provider, no torch.
#
#   docker build -f deploy/docker/server-cpu.Dockerfile -t pruneserve-server:0.1.0-cpu .
#   docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 --read-only --tmpfs /tmp \
#     -v "$PWD/artifacts/minilm:/models/minilm:ro" pruneserve-server:0.1.0-cpu serve /models/minilm
#
# Bake an artifact in instead of mounting it (target `server-baked`):
#   docker build -f deploy/docker/server-cpu.Dockerfile --target server-baked \
#     --build-arg ARTIFACT=artifacts/minilm -t pruneserve-server:0.1.0-cpu-minilm .
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

# ---- build: the venv, made by the same script the tests run ----------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# Only what the wheel needs (both wings' packages are in one distribution; the optimizer's
# code is inert without its extra) plus the install script and pins.
COPY pyproject.toml README.md ./
COPY pruneserve/ pruneserve/
COPY server/ server/
COPY optimizer/ optimizer/
COPY deploy/scripts/install-server.sh deploy/scripts/
COPY deploy/docker/constraints.txt deploy/docker/
RUN --mount=type=cache,target=/root/.cache/pip \
    bash deploy/scripts/install-server.sh --venv /opt/pruneserve --flavor cpu --src /src

# ---- server: runtime only, non-root, works with a read-only root file system --------------
FROM ${PYTHON_IMAGE} AS server
# Same uid/gid as the Kubernetes securityContext (deploy/k8s/base/deployment.yaml).
RUN groupadd --system --gid 10001 pruneserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pruneserve \
 && mkdir -p /models && chown 10001:10001 /models
COPY --from=build /opt/pruneserve /opt/pruneserve
# No bytecode writes at run time (pip compiled it at install); HOME and temp files go to
# /tmp, the one writable mount (emptyDir / --tmpfs).
ENV PATH=/opt/pruneserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001 8002
ENTRYPOINT ["pruneserve"]
CMD ["serve", "--help"]

# ---- server-baked: the same, with an artifact inside at /models/minilm -------------------
FROM server AS server-baked
ARG ARTIFACT=artifacts/minilm
COPY --chown=10001:10001 ${ARTIFACT}/ /models/minilm/
CMD ["serve", "/models/minilm"]
