# Pocket TTS worker image (also runs Flower). CPU only.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The worker's main process must never start an OpenMP/MKL thread pool before forking;
    # each child sets its own torch threads from POCKET_TTS_NUM_THREADS.
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    HF_HOME=/cache/huggingface \
    POCKET_TTS_STORAGE_DIR=/data/audio

# CPU-only torch first (no CUDA libraries), so the project's torch requirement is already met.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<2.14"

RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data/audio /cache/huggingface /voices \
    && chown app:app /data/audio /cache/huggingface /voices

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pocket_tts ./pocket_tts
COPY tasks ./tasks
COPY worker_config ./worker_config
RUN pip install ".[flower]"

USER app
CMD ["celery", "-A", "tasks", "worker", "--pool=prefork", "--loglevel=INFO"]
