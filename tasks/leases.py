"""One attempt of a job at a time, whatever the broker redelivers.

A message comes back while its first attempt may still run: a worker whose
visibility timeout is shorter than another's, a main process killed while its
orphaned child finishes, an ack lost in a Redis restart. So an attempt runs
only while it holds the job's lease, a Redis key naming it, with a short TTL
that a thread of the running process keeps extending. A killed process stops
extending it and the lease lapses after LEASE_TTL seconds (at once when the
worker sees its child die: `release_lease`); another attempt that finds the
lease held comes back when it would lapse, instead of running.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

logger = logging.getLogger(__name__)

KEY_PREFIX = "pocket_tts:lease:"
LEASE_TTL = 20  # seconds a lease outlives the last refresh of a dead process
REFRESH_INTERVAL = 5

# Extend or delete the key only while it still names this attempt.
_EXTEND = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class JobLease:
    """The lease of one job attempt: `acquire()`, then `release()` when the attempt ends."""

    def __init__(self, client, task_id: str):
        self._client = client
        self.key = KEY_PREFIX + task_id
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self._client.set(self.key, self.token, nx=True, ex=LEASE_TTL):
            return False
        self._thread = threading.Thread(target=self._keep, name="pocket-tts-lease", daemon=True)
        self._thread.start()
        return True

    def seconds_left(self) -> int:
        """How long the current holder's lease lasts unless extended (0 when there is none)."""
        return max(0, int(self._client.ttl(self.key)))

    def _keep(self) -> None:
        while not self._stop.wait(REFRESH_INTERVAL):
            try:
                if not self._client.eval(_EXTEND, 1, self.key, self.token, LEASE_TTL):
                    # Lapsed while Redis was away: take it back unless another attempt has.
                    self._client.set(self.key, self.token, nx=True, ex=LEASE_TTL)
            except Exception as exc:  # noqa: BLE001 - Redis away: retry on the next tick
                logger.debug("lease %s not extended: %s", self.key, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._client.eval(_RELEASE, 1, self.key, self.token)
        except Exception as exc:  # noqa: BLE001 - it lapses after LEASE_TTL anyway
            logger.warning("lease %s not released (lapses in %d s): %s", self.key, LEASE_TTL, exc)


def release_lease(client, task_id: str) -> None:
    """Drop a job's lease whoever holds it: for the worker whose child running the job died."""
    client.delete(KEY_PREFIX + task_id)
