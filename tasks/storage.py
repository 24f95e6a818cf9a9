"""Where finished audio goes: `<storage>/<shard>/<shard>/<task_id>.<ext>`, written atomically.

Readers (web apps on the shared volume) either see no file or the whole file:
audio is written to a temporary file in the target folder, fsynced, renamed
over the final name, and the folder is fsynced so the rename survives a crash.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from tasks.errors import InvalidJobError, StorageError

# Task ids become file names: refuse anything that could name another folder.
_SAFE_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
FILE_MODE = 0o644  # readable by web processes running as another user on the shared volume


def audio_path(storage_dir: Path, task_id: str, extension: str) -> Path:
    """The final path of a job's audio; two hex shard levels keep folders small."""
    if not _SAFE_TASK_ID.fullmatch(task_id or ""):
        raise InvalidJobError(f"task id {task_id!r} cannot be used as a file name (letters, digits, '_.-' only)")
    digest = hashlib.sha256(task_id.encode()).hexdigest()
    return storage_dir / digest[:2] / digest[2:4] / f"{task_id}.{extension}"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temp_path)`, then publish the result as `path`; on any failure leave no file behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot write audio in {path.parent}: {_reason(exc)}") from None
    temp_path = Path(temp_name)
    published = False
    try:
        write(temp_path)
        os.chmod(temp_path, FILE_MODE)
        _fsync(temp_path, os.O_RDONLY)
        os.replace(temp_path, path)
        published = True
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except BaseException as exc:  # includes SoftTimeLimitExceeded and worker shutdown
        with suppress(OSError):
            os.unlink(path if published else temp_path)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write audio file {path}: {_reason(exc)}") from None
        raise


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
