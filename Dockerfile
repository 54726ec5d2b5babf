# syntax=docker/dockerfile:1
# livemb worker image (CPU). Build:  docker build -t livemb .
# Run:    docker run --rm -p 6066:6066 livemb worker --broker kafka://kafka:9092 --model /models/m.pt --items /models/items.npz
# /metrics, /healthz and /readyz are served on LIVEMB_WEB_PORT (default 6066, core/settings.py).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. torch first, pinned, from the CPU-only index (the default PyPI wheel pulls in CUDA, ~GBs).
#    Every later `pip install` sees torch>=2.2 satisfied and leaves it alone.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/livemb

# 2. The other dependencies in their own layer, read from pyproject.toml, so a code change does
#    not reinstall faiss/pandas/pyarrow/faust.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 3. The project itself (installs the `livemb` console script).
COPY core/ core/
COPY stream/ stream/
COPY models/ models/
COPY state/ state/
COPY tools/ tools/
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info

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
    LIVEMB_DATA_DIR=/var/lib/livemb/worker
EXPOSE 6066
VOLUME ["/var/lib/livemb"]

# slim has no curl: probe /healthz with the stdlib (any exception -> non-zero exit -> unhealthy).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LIVEMB_WEB_PORT', '6066'), timeout=4)"]

ENTRYPOINT ["livemb"]
CMD ["worker", "--help"]
