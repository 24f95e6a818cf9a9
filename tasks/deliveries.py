"""How many times a job has been handed to a worker process.

With acks_late + reject_on_worker_lost, a job whose process dies (SIGKILL, OOM
killer, a crash in native code) goes back to the queue and runs again. A job
that kills its process every time would loop forever, so each start is counted
in the result backend (Redis), keyed by task id, and the job gives up past the cap.
"""

from __future__ import annotations

from tasks.errors import RedeliveryLimitError

KEY_PREFIX = "pocket_tts:deliveries:"


def record_delivery(backend, task_id: str, max_deliveries: int, ttl_seconds: int) -> int:
    """Count this delivery; raise RedeliveryLimitError once the count passes `max_deliveries`."""
    key = KEY_PREFIX + task_id
    count = int(backend.incr(key))
    backend.expire(key, ttl_seconds)
    if count > max_deliveries:
        raise RedeliveryLimitError(
            f"job {task_id} was delivered {count} times and its {count - 1} earlier attempt(s) never finished "
            f"(worker process killed, out of memory or shut down); giving up "
            f"(POCKET_TTS_MAX_DELIVERIES={max_deliveries})"
        )
    return count


def delivery_count(backend, task_id: str) -> int:
    """The deliveries counted so far (0: no attempt started generating)."""
    return int(backend.get(KEY_PREFIX + task_id) or 0)
