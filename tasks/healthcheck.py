"""`python -m tasks.healthcheck [NODE]`: exit 0 when the worker answers with its model loaded, else 1.

The compose healthcheck of a worker container: NODE defaults to `celery@<this host name>`,
the name of the container's worker. The answer comes from the worker's main
process (a remote control command), so a worker whose children are all busy
with long jobs is still healthy; one that lost the broker, or runs without its
model (POCKET_TTS_START_WITHOUT_MODEL=1), is not. Prints one line either way.
"""

from __future__ import annotations

import socket
import sys

from tasks.client import check_connections
from tasks.control import HEALTH_COMMAND
from tasks.errors import one_line

REPLY_TIMEOUT = 5.0


def worker_health(node: str, timeout: float = REPLY_TIMEOUT) -> tuple[bool, str]:
    from tasks.celery_app import app

    check_connections()
    replies = app.control.broadcast(HEALTH_COMMAND, destination=[node], reply=True, timeout=timeout)
    answer = next((reply[node] for reply in replies if node in reply), None)
    if answer is None:
        return False, f"{node} did not answer within {timeout:g} s"
    if "ok" in answer:
        return True, f"{node}: {answer['ok']}"
    return False, f"{node}: {answer.get('error', answer)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    node = args[0] if args else f"celery@{socket.gethostname()}"
    try:
        healthy, message = worker_health(node)
    except Exception as exc:  # noqa: BLE001 - settings, broker: unhealthy, with the reason
        healthy, message = False, one_line(exc)
    print(("healthy: " if healthy else "unhealthy: ") + message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
