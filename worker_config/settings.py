"""Worker settings: every environment variable the service reads, with defaults and validation.

Torch-free: web processes load these settings too (for the broker URL), so
nothing here may import the engine's model code.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from celery.app.backends import BACKEND_ALIASES
from kombu.transport import TRANSPORT_ALIASES

from pocket_tts.catalog import check_language, default_voice
from pocket_tts.precision_env import precision_from_env
from pocket_tts.threads import threads_from_env
from worker_config.cpu_budget import (
    ALLOW_OVERSUBSCRIBE_ENV,
    CONCURRENCY_ENV,
    ThreadBudget,
    UsableCpus,
    default_concurrency,
    usable_cpus,
)

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
# The visibility timeout is how long a job of a killed worker main process waits before another
# worker runs it: the longest hard limit plus this margin (a job's lease, tasks.leases, stops a
# second attempt from starting while the first still runs).
VISIBILITY_MARGIN = 60
# How often each worker looks for such jobs (kombu's unacked_restore_interval; throttle 1).
RESTORE_INTERVAL = 10


def with_password(url: str, password: str | None) -> str:
    """`url` with `password` inserted when it has none (redis://host/0 -> redis://:password@host/0)."""
    parts = urlsplit(url)
    if password is None or parts.password is not None or not parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{quote(password, safe='')}@{host}"))


def masked_url(url: str) -> str:
    """`url` with its password replaced by ** (for messages and logs)."""
    return re.sub(r"(?<=:)[^:@/]*(?=@)", "**", url, count=1)


class SettingsError(ValueError):
    """An environment variable has an invalid value; the message names it."""


@dataclass(frozen=True)
class Settings:
    broker_url: str
    result_backend: str
    storage_dir: Path
    num_threads: int
    concurrency: int
    allow_oversubscribe: bool
    language: str | None
    config: str | None
    weights: str | None
    voices_dir: Path | None
    default_voice: str
    max_text_chars: int
    time_limit_base: float
    time_limit_per_char: float  # POCKET_TTS_TIME_LIMIT_PER_CHAR x max_batch (rows sharing the process)
    time_limit_grace: float
    visibility_timeout: int
    result_expires: int
    max_tasks_per_child: int | None
    max_memory_per_child_mb: int | None
    max_deliveries: int
    soft_shutdown_timeout: float
    child_start_timeout: float
    voice_cache_size: int
    max_batch: int
    broker_password_from_file: bool  # REDIS_PASSWORD_FILE put the password into the URLs
    start_without_model: bool  # keep a worker up whose model or default voice failed to load
    cpus: UsableCpus

    def time_limits(self, text_chars: int) -> tuple[float, float]:
        """(soft, hard) seconds for a job of `text_chars` characters; longer texts get longer limits."""
        soft = self.time_limit_base + self.time_limit_per_char * min(max(text_chars, 0), self.max_text_chars)
        return soft, soft + self.time_limit_grace

    @property
    def longest_time_limits(self) -> tuple[float, float]:
        return self.time_limits(self.max_text_chars)

    @property
    def recovery_bound(self) -> int:
        """Seconds until the jobs of a killed worker main process run again, at most."""
        return self.visibility_timeout + RESTORE_INTERVAL

    @property
    def batching(self) -> bool:
        """One process generates the jobs of all its pool threads together (needs --pool=threads)."""
        return self.max_batch > 1

    def thread_budget(self, concurrency: int | None = None) -> ThreadBudget:
        # A batching worker's pool threads only wait on its one generation loop: one "child".
        processes = 1 if self.batching else concurrency or self.concurrency
        return ThreadBudget(processes, self.num_threads, self.cpus)

    def missing_model_files(self) -> list[str]:
        """Local files named by the settings that do not exist (hub paths are checked at load)."""
        problems = []
        for env, value in (("POCKET_TTS_CONFIG", self.config), ("POCKET_TTS_WEIGHTS", self.weights)):
            if value and not value.startswith("hf://") and not Path(value).is_file():
                problems.append(f"{env}={value} is not a file")
        if self.voices_dir is not None and not self.voices_dir.is_dir():
            problems.append(f"POCKET_TTS_VOICES_DIR={self.voices_dir} is not a directory")
        return problems


class _Env:
    """Typed reads of environment variables; an invalid value raises SettingsError naming the variable."""

    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ

    def text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def _number(self, name: str, default, convert, minimum, kind: str):
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = convert(raw)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < minimum:
            raise SettingsError(f"{name} must be {kind} >= {minimum}, got {raw!r}")
        return value

    def integer(self, name: str, default: int | None, minimum: int = 1) -> int | None:
        return self._number(name, default, int, minimum, "an integer")

    def seconds(self, name: str, default: float, minimum: float = 0) -> float:
        return self._number(name, default, float, minimum, "a number of seconds")

    def url(self, name: str, default: str, schemes) -> str:
        """A broker or backend URL whose scheme Celery knows (password masked in the error)."""
        url = self.text(name) or default
        shown = masked_url(url)
        scheme, separator, _ = url.partition("://")
        if not separator or not scheme:
            raise SettingsError(f"{name}={shown!r} is not a URL: expected e.g. redis://:password@host:6379/0")
        if scheme.split("+")[0] not in schemes:
            raise SettingsError(f"{name}={shown!r}: unknown transport {scheme!r} (expected e.g. redis://)")
        try:
            urlsplit(url).port
        except ValueError as exc:
            raise SettingsError(f"{name}={shown!r}: bad port ({exc})") from None
        return url

    def secret(self, name: str) -> str | None:
        """The content of the file `name` points to (stripped), e.g. a compose secret under /run/secrets."""
        path = self.text(name)
        if path is None:
            return None
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise SettingsError(f"{name}={path}: cannot read the file: {exc.strerror or exc}") from None
        if not value:
            raise SettingsError(f"{name}={path}: the file is empty")
        return value

    def flag(self, name: str) -> bool:
        raw = (self.text(name) or "0").lower()
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be 1/0 (or true/false), got {raw!r}")


def load_settings(environ: Mapping[str, str] | None = None, cpus: UsableCpus | None = None) -> Settings:
    """Read and validate the settings from `environ` (default: os.environ)."""
    environ = os.environ if environ is None else environ
    env = _Env(environ)
    cpus = cpus or usable_cpus()
    try:
        num_threads = threads_from_env(environ)
        # The engine reads these when it loads; a bad value stops the worker here, in one line.
        precision_from_env(environ), precision_from_env(environ, decoder=True)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None

    # The password from a file keeps it out of the environment (and `docker inspect`).
    redis_password = env.secret("REDIS_PASSWORD_FILE")
    backend_variable = env.text("CELERY_RESULT_BACKEND")
    if redis_password and backend_variable and urlsplit(backend_variable).password is None:
        # Celery reads CELERY_RESULT_BACKEND itself and would connect without the password.
        raise SettingsError(
            "CELERY_RESULT_BACKEND has no password and Celery reads it as given: with REDIS_PASSWORD_FILE, "
            "leave it unset (results then go to the broker's Redis) or write its password in it"
        )
    broker_url = with_password(env.url("CELERY_BROKER_URL", DEFAULT_BROKER_URL, TRANSPORT_ALIASES), redis_password)
    language, config = env.text("POCKET_TTS_LANGUAGE"), env.text("POCKET_TTS_CONFIG")
    if language and config:
        raise SettingsError("set either POCKET_TTS_LANGUAGE or POCKET_TTS_CONFIG, not both")
    if language:
        try:
            check_language(language)
        except ValueError as exc:
            raise SettingsError(f"POCKET_TTS_LANGUAGE: {exc}") from None
    voices_dir = env.text("POCKET_TTS_VOICES_DIR")

    max_text_chars = env.integer("POCKET_TTS_MAX_TEXT_CHARS", 1000)
    max_batch = env.integer("POCKET_TTS_MAX_BATCH", 1)
    time_limit_base = env.seconds("POCKET_TTS_TIME_LIMIT_BASE", 30.0, minimum=1)
    # The per-character limit is for a job running alone; in batching mode up to max_batch
    # jobs share one process's CPU, so each one may take up to max_batch times longer.
    time_limit_per_char = env.seconds("POCKET_TTS_TIME_LIMIT_PER_CHAR", 0.1) * max_batch
    time_limit_grace = env.seconds("POCKET_TTS_TIME_LIMIT_GRACE", 30.0, minimum=1)
    longest_hard_limit = time_limit_base + time_limit_per_char * max_text_chars + time_limit_grace
    # A job still running when the visibility timeout expires is handed to a second worker.
    needed_visibility = math.ceil(longest_hard_limit) + 1
    visibility_timeout = env.integer("POCKET_TTS_VISIBILITY_TIMEOUT", needed_visibility - 1 + VISIBILITY_MARGIN)
    if visibility_timeout < needed_visibility:
        raise SettingsError(
            f"POCKET_TTS_VISIBILITY_TIMEOUT={visibility_timeout} must be longer than the longest hard "
            f"time limit ({longest_hard_limit:g} s for {max_text_chars} characters): use >= {needed_visibility}"
        )

    # Batching: enough pool threads to keep every row of the batch fed.
    concurrency = env.integer(CONCURRENCY_ENV, None) or (
        max_batch if max_batch > 1 else default_concurrency(cpus, num_threads)
    )
    return Settings(
        broker_url=broker_url,
        result_backend=with_password(env.url("CELERY_RESULT_BACKEND", broker_url, BACKEND_ALIASES), redis_password),
        storage_dir=Path(env.text("POCKET_TTS_STORAGE_DIR") or "audio").expanduser().absolute(),
        num_threads=num_threads,
        concurrency=concurrency,
        allow_oversubscribe=env.flag(ALLOW_OVERSUBSCRIBE_ENV),
        language=language,
        config=config,
        weights=env.text("POCKET_TTS_WEIGHTS"),
        voices_dir=Path(voices_dir).expanduser().absolute() if voices_dir else None,
        default_voice=env.text("POCKET_TTS_DEFAULT_VOICE") or default_voice(language),
        max_text_chars=max_text_chars,
        time_limit_base=time_limit_base,
        time_limit_per_char=time_limit_per_char,
        time_limit_grace=time_limit_grace,
        visibility_timeout=visibility_timeout,
        result_expires=env.integer("POCKET_TTS_RESULT_EXPIRES", 86400),
        max_tasks_per_child=env.integer("POCKET_TTS_MAX_TASKS_PER_CHILD", None),
        max_memory_per_child_mb=env.integer("POCKET_TTS_MAX_MEMORY_PER_CHILD_MB", None),
        max_deliveries=env.integer("POCKET_TTS_MAX_DELIVERIES", 3),
        soft_shutdown_timeout=env.seconds("POCKET_TTS_SOFT_SHUTDOWN_TIMEOUT", 60.0),
        child_start_timeout=env.seconds("POCKET_TTS_CHILD_START_TIMEOUT", 120.0, minimum=1),
        voice_cache_size=env.integer("POCKET_TTS_VOICE_CACHE_SIZE", 8),
        max_batch=max_batch,
        broker_password_from_file=redis_password is not None,
        start_without_model=env.flag("POCKET_TTS_START_WITHOUT_MODEL"),
        cpus=cpus,
    )


@cache
def current_settings() -> Settings:
    """The process's settings, read once from os.environ (`current_settings.cache_clear()` re-reads)."""
    return load_settings()
