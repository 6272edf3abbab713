# syntax=docker/dockerfile:1
# One image for every Tessera component; its entry point is the `tessera` command:
#   tessera operator   (the chart's operator Deployment)
#   tessera agent      (the chart's node-agent DaemonSet)
#   tessera serve ...  (each model pool's engine pods; operator/render.py sets
#                       command ["tessera", "serve"] and the flags as args)
#
# CPU nodes (the default, slim Python base and CPU torch wheels):
#   docker build -t ghcr.io/tessera-dev/tessera:0.1.0 .
# GPU nodes (CUDA runtime base and CUDA torch wheels; Ubuntu 24.04 ships Python 3.12):
#   docker build -t ghcr.io/tessera-dev/tessera:0.1.0-cuda \
#     --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG BASE=python:3.12-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONSAFEPATH=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

# The CUDA base has no Python of its own; the slim one has Python and venv already.
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
# A C compiler for the attention worker's host kernel (agents/engine/host_attention_kernel.c),
# built at first use on the node with -march=native; without one the worker falls back to SDPA
# (~1.4x slower scans on the H200 host).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# torch first, from the wheel index that matches the base (CPU or CUDA).
RUN pip install --index-url "${TORCH_INDEX}" torch
COPY pyproject.toml README.md ./
COPY tessera tessera
COPY api api
COPY policies policies
COPY operator operator
COPY agents agents
COPY sim sim
RUN pip install ".[serve]" && rm -rf /src

WORKDIR /
# A non-root user; model weights are mounted read-only (e.g. /models/<name>, --weights-uri).
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["tessera"]
CMD ["--help"]
