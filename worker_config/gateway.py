"""Settings of the HTTP gateway (`pocket-tts serve`): its own variables on top of the workers'.

The gateway shares the workers' broker, storage, voices directory, model
selection and text limit (`Settings`), so one environment configures both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker_config.settings import Settings, SettingsError, _Env, load_settings

API_KEYS_ENV = "POCKET_TTS_API_KEYS"
API_KEYS_FILE_ENV = "POCKET_TTS_API_KEYS_FILE"


@dataclass(frozen=True)
class GatewaySettings:
    service: Settings
    api_keys: tuple[bytes, ...]  # empty: no key needed
    max_request_bytes: int
    max_voice_bytes: int
    max_voice_seconds: float
    cors_origins: tuple[str, ...]  # empty: no CORS headers (browsers allow same-origin only)
    queue_timeout: float  # seconds a request waits for its job's first audio
    job_queue: str  # the Celery queue jobs are sent to (workers: `-Q`)

    @property
    def uploads_dir(self) -> Path | None:
        """Where uploaded voices go: inside the voices directory, so workers resolve them by name."""
        return self.service.voices_dir / "uploads" if self.service.voices_dir else None


def load_gateway_settings(environ: Mapping[str, str] | None = None) -> GatewaySettings:
    environ = os.environ if environ is None else environ
    env = _Env(environ)
    origins = tuple(filter(None, (o.strip() for o in (env.text("POCKET_TTS_CORS_ORIGINS") or "").split(","))))
    return GatewaySettings(
        service=load_settings(environ),
        api_keys=_api_keys(env),
        max_request_bytes=env.integer("POCKET_TTS_MAX_REQUEST_BYTES", 12 * 1024 * 1024),
        max_voice_bytes=env.integer("POCKET_TTS_MAX_VOICE_BYTES", 10 * 1024 * 1024),
        max_voice_seconds=env.seconds("POCKET_TTS_MAX_VOICE_SECONDS", 30.0, minimum=1),
        cors_origins=origins,
        queue_timeout=env.seconds("POCKET_TTS_QUEUE_TIMEOUT", 300.0, minimum=1),
        job_queue=env.text("POCKET_TTS_JOB_QUEUE") or "celery",
    )


def _api_keys(env: _Env) -> tuple[bytes, ...]:
    """Keys from POCKET_TTS_API_KEYS (comma-separated) and POCKET_TTS_API_KEYS_FILE (one per line)."""
    keys = (env.text(API_KEYS_ENV) or "").split(",")
    path = env.text(API_KEYS_FILE_ENV)
    if path:
        try:
            from_file = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise SettingsError(f"{API_KEYS_FILE_ENV}={path} cannot be read: {exc.strerror or exc}") from None
        if not from_file:  # fail closed: an emptied key file must not open the gateway
            raise SettingsError(f"{API_KEYS_FILE_ENV}={path} holds no key")
        keys += from_file
    return tuple(key.strip().encode() for key in keys if key.strip())
