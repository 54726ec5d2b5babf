# syntax=docker/dockerfile:1
# livemb worker image: multi-stage (build a venv, copy it into a slim runtime), non-root, HEALTHCHECK.
#
#   CPU (default):  docker build -t livemb .
#   CUDA:           docker build -t livemb:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                       --build-arg LIVEMB_DEVICE=cuda .
#                   docker run --gpus all ... livemb:cuda worker ...
#   (the CUDA torch wheels bring their own CUDA runtime libraries; the host needs the NVIDIA driver
#   and the container toolkit, nothing else.)
#
# Run:    docker run --rm -p 6066:6066 -v $PWD/models:/models:ro livemb \
#             worker --broker kafka://kafka:9092 --model /models/model.pt --items /models/items.npz
# /metrics, /healthz and /readyz are served on LIVEMB_WEB_PORT (default 6066, core/settings.py).
# deploy/docker-compose.yml runs two of these with Kafka (KRaft), Prometheus and Grafana.
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# constraints.txt: the exact versions of a tested build (`make constraints`); torch is pinned there
# without its local build label, so the CPU and the CUDA wheels both satisfy it.
COPY constraints.txt ./

# 1. torch first, at the constrained version, from the chosen index (CPU by default: the default
#    PyPI wheel pulls in CUDA, GBs). Every later install sees torch satisfied and leaves it alone.
RUN TORCH_VERSION="$(sed -n 's/^torch==//p' constraints.txt)" \
    && test -n "${TORCH_VERSION}" \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# 2. The runtime dependencies only (pyproject's [project].dependencies: no `tools` extra, so no
#    embedded broker, pyarrow or matplotlib), at the constrained versions, in their own layer so a
#    code change does not reinstall faiss/pandas/faust.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 3. The project itself, nothing more (installs the `livemb` console script into the venv).
COPY core/ core/
COPY stream/ stream/
COPY models/ models/
COPY state/ state/
COPY tools/ tools/
RUN pip install --no-cache-dir --no-deps .

# ---------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime
ARG LIVEMB_DEVICE=auto
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv

# Non-root runtime user; Faust/RocksDB state lives under /var/lib/livemb (mount a volume there).
RUN groupadd --system --gid 10001 livemb \
    && useradd --system --create-home --uid 10001 --gid 10001 --home-dir /home/livemb livemb \
    && mkdir -p /var/lib/livemb \
    && chown 10001:10001 /var/lib/livemb
USER 10001:10001
WORKDIR /var/lib/livemb

# web_host defaults to 127.0.0.1 (core/settings.py): bind all interfaces so Prometheus can scrape.
ENV LIVEMB_WEB_HOST=0.0.0.0 \
    LIVEMB_WEB_PORT=6066 \
    LIVEMB_DATA_DIR=/var/lib/livemb/worker \
    LIVEMB_DEVICE=${LIVEMB_DEVICE}
EXPOSE 6066
VOLUME ["/var/lib/livemb"]

# slim has no curl: probe /healthz with the stdlib (any exception -> non-zero exit -> unhealthy).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LIVEMB_WEB_PORT', '6066'), timeout=4)"]

ENTRYPOINT ["livemb"]
CMD ["worker", "--help"]
