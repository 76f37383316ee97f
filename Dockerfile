# syntax=docker/dockerfile:1.7
#
# Atlas server images. One Dockerfile, two devices, chosen by build argument:
#
#   docker build -t atlas:cpu .                                 # CPU torch, Python 3.11 slim
#   docker build --build-arg DEVICE=cuda -t atlas:cuda .        # CUDA torch, CUDA runtime base
#   docker run --rm -p 8000:8000 atlas:cpu                      # serves the embedded model
#
# Stages: base-<device> (interpreter) -> builder (hash-locked virtualenv) -> quickstart (trains
# the embedded default model at build time) -> runtime (non-root, no compilers, no secrets).
# The API key is never a build argument or a layer: pass ATLAS_API_KEY or mount a secret file
# and set ATLAS_API_KEY_FILE. See docs/deployment.md.

ARG DEVICE=cpu
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# Interpreters. Each base defines ATLAS_PYTHON, the interpreter the virtualenv is built on.
FROM ${PYTHON_IMAGE} AS base-cpu
ENV ATLAS_PYTHON=/usr/local/bin/python3.11 \
    ATLAS_LOCK=cpu.txt

FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu 24.04's own Python 3.12; deploy/requirements/cuda.txt is locked for it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
ENV ATLAS_PYTHON=/usr/bin/python3.12 \
    ATLAS_LOCK=cuda.txt

# ---------------------------------------------------------------------------------------------
# A virtualenv in /opt/venv with every dependency checked against the lock's sha256 hashes.
# hadolint ignore=DL3006
FROM base-${DEVICE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN "$ATLAS_PYTHON" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/requirements/ /tmp/requirements/
RUN pip install --require-hashes --no-deps -r "/tmp/requirements/$ATLAS_LOCK" \
    && "$ATLAS_PYTHON" -m venv /opt/build-venv \
    && /opt/build-venv/bin/pip install --require-hashes --no-deps -r /tmp/requirements/build.txt
# Sources last, so editing code does not invalidate the dependency layer.
COPY pyproject.toml README.md /src/
COPY atlas_server/ /src/atlas_server/
COPY plugins/ /src/plugins/
COPY trainer/ /src/trainer/
COPY eval_suites/ /src/eval_suites/
COPY configs/ /src/configs/
# The wheel is built in a separate venv holding only the hashed build backend (build.txt), so
# nothing unpinned is fetched and the runtime venv keeps exactly the versions of its own lock.
RUN /opt/build-venv/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels /src \
    && pip install --no-deps /tmp/wheels/*.whl
# The native CPU kernels (atlas_server/model/native.py), built here because the
# runtime image has no compiler. NATIVE_MARCH is the oldest CPU the image must run on
# (x86-64-v3: AVX2 and FMA); an empty value skips it and the server uses PyTorch's SDPA.
ARG NATIVE_MARCH=x86-64-v3
# hadolint ignore=DL3008
RUN if [ -n "$NATIVE_MARCH" ]; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/* \
        && python -c "from atlas_server.model.native import main; main()" \
            --march "$NATIVE_MARCH" /opt/venv/lib/atlas-cpu-kernels.so; \
    fi

# ---------------------------------------------------------------------------------------------
# The embedded default model: a few minutes of CPU training at build time, on the Python
# standard library's own text (no download). Override QUICKSTART_ARGS to change its budget.
# Only OUTPUT/checkpoint and the figures (quickstart.json) reach the runtime image; the
# corpus, shards and run folder stay in this stage.
FROM builder AS quickstart
ARG QUICKSTART_ARGS=""
# QUICKSTART_ARGS is split into words on purpose (e.g. "--steps 300").
# hadolint ignore=SC2086
RUN HF_HUB_OFFLINE=1 atlas-train quickstart --output /opt/atlas/quickstart $QUICKSTART_ARGS

# ---------------------------------------------------------------------------------------------
# The device's base image is tagged explicitly above; hadolint cannot see through the ARG.
# hadolint ignore=DL3006
FROM base-${DEVICE} AS runtime
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 atlas \
    && useradd --system --uid 10001 --gid atlas --home-dir /home/atlas --create-home \
        --shell /usr/sbin/nologin atlas \
    && mkdir -p /var/lib/atlas/checkpoints /var/lib/atlas/rag /etc/atlas \
    && chown atlas:atlas /var/lib/atlas/checkpoints /var/lib/atlas/rag
COPY --from=builder /opt/venv /opt/venv
COPY --from=quickstart /opt/atlas/quickstart/checkpoint /opt/atlas/quickstart/checkpoint
COPY --from=quickstart /opt/atlas/quickstart/quickstart.json /opt/atlas/quickstart/
COPY deploy/docker/entrypoint.sh /usr/local/bin/atlas-entrypoint
COPY deploy/docker/atlas.toml /etc/atlas/atlas.toml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/atlas-hf \
    ATLAS_HOST=0.0.0.0 \
    ATLAS_PORT=8000 \
    ATLAS_CONFIG=/etc/atlas/atlas.toml \
    ATLAS_CHECKPOINT=/opt/atlas/quickstart/checkpoint \
    ATLAS_NATIVE_LIB=/opt/venv/lib/atlas-cpu-kernels.so
# Checkpoints you bring, and the embedded Qdrant's data directory for RAG (rag.data_dir in
# /etc/atlas/atlas.toml).
VOLUME ["/var/lib/atlas/checkpoints", "/var/lib/atlas/rag"]
USER 10001:10001
WORKDIR /home/atlas
EXPOSE 8000
# 503 while the model loads or the server drains -> urlopen raises -> non-zero exit.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ATLAS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["atlas-entrypoint"]
CMD []
