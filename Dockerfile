# Pocket TTS worker image (also runs Flower and the `pocket-tts` client). CPU only.
#
#   docker build -t pocket-tts-worker .
#   docker build --network host --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://127.0.0.1:8780/ ...
#
# Where pip cannot reach PyPI or the PyTorch index, pass pip's sources as build args (all unset by
# default: pip then behaves as it does without them): a local wheelhouse (PIP_NO_INDEX=1 +
# PIP_FIND_LINKS), or mirrors (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, TORCH_INDEX_URL).
FROM python:3.11-slim

ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
# CPU-only torch wheels (no CUDA libraries); ignored when PIP_NO_INDEX=1.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional dependency groups of pyproject.toml installed in the image.
ARG EXTRAS=flower,gateway

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The worker's main process must never start an OpenMP/MKL thread pool before forking;
    # each child sets its own torch threads from POCKET_TTS_NUM_THREADS.
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    # `docker stop` (SIGTERM) gives running jobs a soft shutdown, then hands unfinished ones back.
    REMAP_SIGTERM=SIGQUIT \
    HF_HOME=/cache/huggingface \
    POCKET_TTS_STORAGE_DIR=/data/audio

RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data/audio /cache/huggingface /voices /models \
    && chown app:app /data/audio /cache/huggingface /voices

WORKDIR /app

# Dependencies first, in their own layer: a change to the code reuses it (measured in docs/deployment.md).
# torch comes from TORCH_INDEX_URL, everything else from pip's usual sources; both lists from pyproject.toml.
COPY pyproject.toml docker/requirements.py ./
RUN python requirements.py torch > /tmp/torch.txt \
    && python requirements.py others "$EXTRAS" > /tmp/requirements.txt \
    && pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt \
    && pip install -r /tmp/requirements.txt \
    && rm requirements.py /tmp/torch.txt /tmp/requirements.txt

# The code: only the packages (no tests, benchmarks or dev-stack helpers, see .dockerignore);
# no dependency is resolved here, so this layer needs no package index.
COPY README.md ./
COPY pocket_tts ./pocket_tts
COPY tasks ./tasks
COPY worker_config ./worker_config
COPY gateway ./gateway
RUN pip install --no-deps --no-build-isolation . && rm -rf build *.egg-info

USER app
CMD ["celery", "-A", "tasks", "worker", "--pool=prefork", "--loglevel=INFO"]
