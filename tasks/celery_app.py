"""The Celery app shared by workers, Flower and web clients, and the worker lifecycle hooks.

Configuration is computed lazily from `worker_config` the first time Celery
needs it. Importing this module never imports torch (web processes import it).
A prefork worker loads and warms up the model in its main process, on one
thread, before forking: the children share the model's memory copy-on-write
and set their own thread budget (`configure_child`). One thread matters: a
parent that ran a multi-threaded OpenMP region leaves its children hanging.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from urllib.parse import urlsplit

from celery import Celery, signals

from tasks import control  # noqa: F401 - registers the health probe and the budget-guarded pool commands
from tasks.engine import (
    DefaultVoiceError,
    configure_torch_threads,
    describe_model,
    load_engine,
)
from tasks.errors import StorageError, one_line
from tasks.storage import check_storage_root, remove_stale_parts
from worker_config import (
    OversubscriptionError,
    Settings,
    check_thread_budget,
    current_settings,
)
from worker_config.settings import RESTORE_INTERVAL

logger = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits.h: configuration error
# Result writes retry with backoff up to 10 s apart: ~60 tries cover a 10-minute Redis outage.
RESULT_STORE_RETRIES = 60
VISIBILITY_KEY = "pocket_tts:visibility_timeout"
# Raise the fleet's shared visibility timeout to ours if lower; return the fleet's value.
_SHARE_VISIBILITY = (
    "local v = tonumber(redis.call('get', KEYS[1])) "
    "if not v or v < tonumber(ARGV[1]) then redis.call('set', KEYS[1], ARGV[1]) return tonumber(ARGV[1]) end "
    "return v"
)


def celery_config(settings: Settings) -> dict:
    longest_soft, longest_hard = settings.longest_time_limits
    config = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # JSON only: pickle is neither sent nor accepted.
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        # A job whose child dies is handed back to the queue instead of failing with WorkerLostError.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Through a Redis restart running jobs finish and store their result (its writes are retried);
        # an ack lost with the connection only brings the message back, and that attempt returns the
        # stored file (tasks.storage) or waits for the running one (tasks.leases).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "result_backend_always_retry": True,
        "result_backend_max_retries": RESULT_STORE_RETRIES,
        "broker_connection_max_retries": None,  # a worker waits for Redis however long it is away
        # Every message passes tasks.boundary before Celery reads it (see also SynthesisTask.Strategy).
        "worker_consumer": "tasks.boundary:GuardedConsumer",
        # Per-job limits scale with the text (SynthesisRequest); these cover the longest text.
        "task_soft_time_limit": longest_soft,
        "task_time_limit": longest_hard,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            # Look for the messages of killed workers every RESTORE_INTERVAL s (kombu: every 100 s).
            "unacked_restore_interval": RESTORE_INTERVAL,
            "unacked_restore_throttle": 1,
        },
        "result_expires": settings.result_expires,
        "task_track_started": True,
        "worker_concurrency": settings.concurrency,
        "worker_max_tasks_per_child": settings.max_tasks_per_child,
        # Celery's check reads the child's peak RSS, which counts the shared weight pages.
        "worker_max_memory_per_child": (
            settings.max_memory_per_child_mb * 1024 if settings.max_memory_per_child_mb else None
        ),
        "worker_soft_shutdown_timeout": settings.soft_shutdown_timeout,
        # A child whose parent failed to load the model loads it before reporting "up" (Celery allows 4 s).
        "worker_proc_alive_timeout": settings.child_start_timeout,
        # Task events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
    }
    if urlsplit(settings.broker_url).scheme in ("redis", "rediss"):
        # kombu's Redis transport, with a message moved from its queue to the unacked set in one step.
        config["broker_transport"] = "tasks.redis_transport:Transport"
    if settings.broker_password_from_file:
        # Celery prefers the CELERY_BROKER_URL variable, which lacks the password, to `broker_url`;
        # it connects with these two.
        config.update(broker_read_url=settings.broker_url, broker_write_url=settings.broker_url)
    return config


app = Celery("pocket_tts")
app.add_defaults(lambda: celery_config(current_settings()))


@signals.celeryd_after_setup.connect
def prepare_worker_parent(sender, instance, **_):
    """In the worker's main process, after logging is set up and before the pool forks."""
    settings = current_settings()
    in_process = _runs_jobs_in_threads(instance)
    if settings.batching and not in_process:
        _refuse_to_start(
            f"POCKET_TTS_MAX_BATCH={settings.max_batch} batches the jobs of one process's pool threads: "
            "start the worker with --pool=threads (or set POCKET_TTS_MAX_BATCH=1 for prefork)"
        )
    # --autoscale=MAX,MIN may grow the pool to MAX: the budget must hold for that.
    autoscale = getattr(instance, "autoscale", None)
    budget = settings.thread_budget(max(instance.concurrency, autoscale[0] if autoscale else 0))
    try:
        warning = check_thread_budget(budget, settings.allow_oversubscribe)
    except OversubscriptionError as exc:
        _refuse_to_start(str(exc))
    problems = settings.missing_model_files()
    if problems:
        _refuse_to_start("; ".join(problems))
    if warning:
        logger.warning("pocket-tts: %s", warning)
    logger.info("pocket-tts thread budget: %s", budget.describe())
    logger.info("pocket-tts audio storage: %s", settings.storage_dir)
    _prepare_storage(settings)
    _share_visibility_timeout(settings)
    if in_process:  # no fork: this process runs the jobs, so it loads the model before taking any
        _load_model(f"threads pool, batch {settings.max_batch}" if settings.batching else "threads pool")
        return
    if "torch" in sys.modules:
        logger.warning("pocket-tts: torch was imported before the worker set OMP_NUM_THREADS=1 in its main process")
    # OpenMP and MKL read these once, when torch loads: this process never starts a thread pool.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    # Children inherit the loaded, warmed-up model (weights, oneDNN's packed copies, Python
    # objects, the default voice) and torch's pages: measured +30 MB PSS per added child instead
    # of +105 MB when each child loaded its own. A replaced child starts without loading anything.
    _load_model("prefork parent, shared by its children", num_threads=1)
    # Objects that exist now are never collected: the children's garbage collector then does not
    # touch (and copy) the pages of the parent's objects. Measured: ~40 MB less private memory per child.
    gc.collect()
    gc.freeze()


def _prepare_storage(settings: Settings) -> None:
    try:
        check_storage_root(settings.storage_dir)
    except StorageError as exc:  # a worker that can store nothing is down, not failing every job
        _refuse_to_start(str(exc))
    # A .part older than any job is the leftover of a killed writer.
    removed = remove_stale_parts(settings.storage_dir, settings.longest_time_limits[1])
    if removed:
        logger.info("pocket-tts: removed %d unfinished .part file(s) left by killed jobs", removed)


def _share_visibility_timeout(settings: Settings) -> None:
    """Every worker of the fleet uses the largest visibility timeout any of them needs, kept in Redis.

    A worker with a shorter one would hand a job still running elsewhere to another worker.
    """
    import redis  # Celery's Redis backend needs it anyway

    own = settings.visibility_timeout
    try:
        client = redis.Redis.from_url(settings.result_backend, socket_timeout=5, socket_connect_timeout=5)
        with client:
            fleet = int(client.eval(_SHARE_VISIBILITY, 1, VISIBILITY_KEY, own))
    except Exception as exc:  # noqa: BLE001 - Redis not up yet: our own value, leases still prevent overlap
        logger.warning("pocket-tts: fleet visibility timeout not read (%s); using %d s", exc, own)
        fleet = own
    if fleet != own:
        app.conf.broker_transport_options = {**app.conf.broker_transport_options, "visibility_timeout": fleet}
    logger.info(
        "pocket-tts recovery: visibility timeout %d s (fleet-wide; ours %d s): jobs of a killed worker "
        "run again within %d s",
        fleet, own, fleet + RESTORE_INTERVAL,
    )


def _refuse_to_start(reason: str):
    logger.critical("pocket-tts worker: %s", reason)
    raise SystemExit(EX_CONFIG)


def _runs_jobs_in_threads(worker) -> bool:
    return getattr(worker.pool_cls, "__module__", "") == "celery.concurrency.thread"


@signals.worker_process_init.connect
def configure_child(**_):
    """In each prefork child: set the thread budget; the model comes from the parent."""
    settings = current_settings()
    configure_torch_threads(settings.num_threads)
    _load_model("prefork child")  # only loads when the parent's load failed


def _load_model(where: str, num_threads: int | None = None) -> None:
    """Load the model and the default voice, or stop the worker (exit 78) with one line saying why and the fix.

    With POCKET_TTS_START_WITHOUT_MODEL=1 the worker stays up instead: its children and jobs retry the
    load, and the jobs report the error (the healthcheck keeps calling the worker unhealthy).
    """
    settings = current_settings()
    try:
        load_engine(settings, num_threads)
    except Exception as exc:
        if settings.start_without_model:
            logger.exception("pocket-tts: model failed to load in process %d (%s)", os.getpid(), where)
            return
        _refuse_to_start(load_failure(settings, exc))


def load_failure(settings: Settings, exc: Exception) -> str:
    """One line: what failed to load, why, and how to fix it."""
    from pocket_tts.files import ModelFileError  # torch-free

    reason = one_line(exc)
    failure = f"the model ({describe_model(settings)}) could not be loaded: {reason}"
    if isinstance(exc, DefaultVoiceError):
        failure, fix = reason, "name a voice of the model's catalog or a file in POCKET_TTS_VOICES_DIR"
    elif isinstance(exc, ModelFileError):
        fix = (
            "point POCKET_TTS_CONFIG / POCKET_TTS_WEIGHTS at local files (compose: in POCKET_TTS_MODELS_HOST_DIR, "
            "mounted on /models), or set HF_HUB_OFFLINE=1 with the files in the HF_HOME cache"
        )
    else:
        fix = "check POCKET_TTS_LANGUAGE / POCKET_TTS_CONFIG / POCKET_TTS_WEIGHTS"
    return (
        f"{failure}. Fix: {fix}; "
        "or set POCKET_TTS_START_WITHOUT_MODEL=1 to start anyway (jobs then retry the load and report the error)"
    )
