"""The consumer boundary: every task message is checked in the worker's main process before Celery uses it.

Celery reads a message's headers and body in the worker's main process (the
consumer) and trusts their shapes: a body that is not `[args, kwargs, embed]`,
kwargs given as a list or a `timelimit` header of strings raise there, which
stops the consumer (the worker exits, the message goes back to the queue and
kills the next worker) or loops on "connection lost". So the strategy of our
tasks checks the shape first, and a malformed message is refused: acknowledged,
its result set to FAILURE with a one-line InvalidJobError, and logged with its
id and the reason, never its body. A message too large to be a valid request is
refused by its encoded size, before its body is decoded.

`GuardedConsumer` is the last resort for anything else that raises while a
message is received: it logs one line and drops that message, so that no
message can stop the consumer.
"""

from __future__ import annotations

import inspect
import logging
import math

from celery.worker.consumer import Consumer
from celery.worker.strategy import default as default_strategy

from tasks.errors import InvalidJobError
from worker_config import current_settings

logger = logging.getLogger(__name__)

# A request's body is its JSON-encoded arguments: the longest text (12 bytes per character
# at worst: an emoji escaped as a surrogate pair) plus room for the other fields.
BODY_OVERHEAD_BYTES = 64 * 1024
_NUMBER = (int, float)


def max_body_bytes() -> int:
    return 12 * current_settings().max_text_chars + BODY_OVERHEAD_BYTES


def message_problem(message, task) -> str | None:
    """Why `message` cannot be run as `task`, in one line; None when its shape is valid."""
    headers = message.headers
    if not isinstance(headers, dict) or not isinstance(headers.get("id"), str):
        return "message has no task id"
    body = message.body
    if isinstance(body, (bytes, str)) and len(body) > max_body_bytes():
        return f"message body is {len(body)} bytes; the limit is {max_body_bytes()} (POCKET_TTS_MAX_TEXT_CHARS)"
    timelimit = headers.get("timelimit")
    if timelimit is not None and not (
        isinstance(timelimit, (list, tuple))
        and len(timelimit) == 2
        and all(_is_limit(value) for value in timelimit)
    ):
        return "header 'timelimit' must be [hard, soft] seconds (numbers or null)"
    for name in ("retries",):
        if headers.get(name) is not None and (type(headers[name]) is not int or headers[name] < 0):
            return f"header {name!r} must be a non-negative integer"
    try:
        payload = message.decode()
    except Exception as exc:  # undecodable JSON, a refused content type
        return f"message body cannot be decoded: {type(exc).__name__}"
    if not (isinstance(payload, (list, tuple)) and len(payload) == 3):
        return "message body must be [args, kwargs, embed] (Celery task protocol 2)"
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)):
        return f"task args must be a list, got {type(args).__name__}"
    if not isinstance(kwargs, dict):
        return f"task kwargs must be an object, got {type(kwargs).__name__}"
    if not isinstance(embed, dict) or not all(
        isinstance(embed.get(key), (list, type(None))) for key in ("callbacks", "errbacks", "chain")
    ) or not isinstance(embed.get("chord"), (dict, type(None))):
        return "message embed (callbacks, errbacks, chain, chord) is malformed"
    try:
        inspect.signature(task.run).bind(*args, **kwargs)
    except TypeError as exc:
        return f"{task.name}: {exc}"
    return None


def _is_limit(value) -> bool:
    return value is None or (type(value) in _NUMBER and math.isfinite(value) and value > 0)


def refuse(app, message, reason: str, connection_errors=()) -> None:
    """Fail the job with `reason` (when it has an id to fail) and drop its message."""
    task_id = message.headers.get("id") if isinstance(message.headers, dict) else None
    logger.error("pocket-tts: refused message %s: %s", task_id if isinstance(task_id, str) else "(no id)", reason)
    if isinstance(task_id, str):
        try:
            app.backend.mark_as_failure(task_id, InvalidJobError(reason), call_errbacks=False)
        except Exception as exc:  # noqa: BLE001 - the message is dropped either way
            logger.error("pocket-tts: result of refused message %s not stored: %s", task_id, exc)
    message.ack_log_error(logger, connection_errors)


def guarded_strategy(task, app, consumer, **kwargs):
    """Celery's default strategy behind `message_problem`; set as the Strategy of the service's tasks."""
    handle = default_strategy(task, app, consumer, **kwargs)
    connection_errors = consumer.connection_errors

    def task_message_handler(message, body, ack, reject, callbacks, **options):
        problem = message_problem(message, task) if body is None else "only Celery task protocol 2 is accepted"
        if problem is None:
            try:
                return handle(message, body, ack, reject, callbacks, **options)
            except connection_errors:
                raise
            except Exception as exc:  # e.g. an unparsable eta: Celery's own checks
                problem = f"malformed message: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        refuse(app, message, problem, connection_errors)

    return task_message_handler


class GuardedConsumer(Consumer):
    """Celery's consumer whose message handler cannot be stopped by one message, nor by a Redis restart."""

    def on_connection_error_after_connected(self, exc):
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            # kombu's Redis channel, closed after its connection was collected, tries to hand back
            # its unacked messages without connection parameters ("Unrecoverable error", measured in
            # a batching worker). Those messages stay in Redis's unacked set and come back after the
            # visibility timeout; the consumer reconnects as usual.
            logger.warning("pocket-tts: unacked messages left for the visibility timeout to restore: %s", error)

    def create_task_handler(self, *args, **kwargs):
        on_task_received = super().create_task_handler(*args, **kwargs)
        broker_errors = tuple(self.connection_errors) + tuple(self.channel_errors)

        def guarded_on_task_received(message):
            try:
                return on_task_received(message)
            except broker_errors:
                raise
            except Exception as exc:
                logger.error(
                    "pocket-tts: dropped a message that could not be received: %s: %s",
                    type(exc).__name__,
                    " ".join(str(exc).split())[:200],
                )
                message.ack_log_error(logger, self.connection_errors)

        return guarded_on_task_received
