# syntax=docker/dockerfile:1
# Two images from one file (multi-stage):
#   docker build --target operator -t qmodel-operator .  slim: kopf + the Kubernetes client, no torch
#   docker build --target runtime  -t qmodel-runtime .   CUDA: torch, triton, the quantize Job, storage, server
# Both install through scripts/install-python.sh, the script `make setup` runs, with the
# versions pinned in constraints.txt. Bases are pinned to exact releases; in production pin
# their digests as well (e.g. with Renovate), which this offline build cannot look up.

ARG PYTHON_BASE=python:3.11.14-slim-bookworm
# torch's PyPI wheels bring their own CUDA 13 libraries: the base only needs a CUDA 13-capable
# driver on the node (>= 580) and the NVIDIA container toolkit; "base" is the smallest flavour.
ARG CUDA_BASE=nvidia/cuda:13.0.2-base-ubuntu24.04

# ---------------------------------------------------------------- operator
FROM ${PYTHON_BASE} AS operator-build
WORKDIR /src
COPY constraints.txt requirements-test.txt ./
COPY scripts/install-python.sh scripts/
COPY operator/ operator/
RUN scripts/install-python.sh /opt/qmodel operator

FROM ${PYTHON_BASE} AS operator
COPY --from=operator-build /opt/qmodel /opt/qmodel
ENV PATH=/opt/qmodel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# 65532: the conventional "nonroot" uid; the chart runs it with a read-only root filesystem.
USER 65532:65532
# 8080 kopf liveness (/healthz), 8081 Prometheus (/metrics)
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "qmodel_operator"]

# ---------------------------------------------------------------- runtime
FROM ${CUDA_BASE} AS runtime-build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY constraints.txt requirements-test.txt ./
COPY scripts/install-python.sh scripts/
COPY kernels/ kernels/
COPY runtime/ runtime/
RUN PYTHON=python3 scripts/install-python.sh /opt/qmodel runtime

FROM ${CUDA_BASE} AS runtime
# Triton JIT-compiles a small C launcher for each kernel signature at first use
# (triton/runtime/build.py calls gcc with the Python headers), so the runtime image keeps a C
# compiler and python3-dev; nothing else from the build stage comes along.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin qmodel
COPY --from=runtime-build /opt/qmodel /opt/qmodel
# Caches go to /tmp, which the operator mounts as an emptyDir (the root filesystem is read-only).
ENV PATH=/opt/qmodel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/qmodel \
    XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    QMODEL_CACHE=/tmp/cache/qmodel \
    HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /home/qmodel
EXPOSE 8000
# The operator sets the command per pod: `python -m qmodel_runtime.jobs.quantize` (Jobs),
# `python -m qmodel_runtime.serve --artifact ...` (serving), `python -m qmodel_runtime.storage rm ...`.
CMD ["python", "-m", "qmodel_runtime.serve", "--help"]
