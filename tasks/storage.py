"""Where finished audio goes: `<storage>/<shard>/<shard>/<task_id>.<ext>`, written once, atomically.

Readers (web apps on the shared volume) either see no file or the whole file:
the encoded audio is written to a temporary `.part` file in the target folder
and fsynced, then hard-linked to its final name, which fails when that name
exists: a finished file is never replaced (a redelivered job or a reused task
id gets the file that is there). Every OS error, a full disk included, is a
StorageError naming the reason; the byte count written is checked with `if`,
not `assert`, so `python -O` changes nothing. The storage root itself is never
created: a missing folder is a missing mount, and files must not land on the
wrong disk.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from tasks.errors import InvalidJobError, StorageError

# Task ids become file names: refuse anything that could name another folder.
_SAFE_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
FILE_MODE = 0o644  # readable by web processes running as another user on the shared volume
PART_SUFFIX = ".part"
# File systems without hard links (some network and FUSE mounts) publish with a rename instead.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


def audio_path(storage_dir: Path, task_id: str, extension: str) -> Path:
    """The final path of a job's audio; two hex shard levels keep folders small."""
    if not _SAFE_TASK_ID.fullmatch(task_id or ""):
        raise InvalidJobError(f"task id {task_id!r} cannot be used as a file name (letters, digits, '_.-' only)")
    digest = hashlib.sha256(task_id.encode()).hexdigest()
    return storage_dir / digest[:2] / digest[2:4] / f"{task_id}.{extension}"


def check_storage_root(storage_dir: Path) -> None:
    if not storage_dir.is_dir():
        raise StorageError(
            f"storage directory {storage_dir} does not exist or is not a folder "
            "(POCKET_TTS_STORAGE_DIR; is the volume mounted?)"
        )


def write_once(storage_dir: Path, path: Path, data: bytes) -> bool:
    """Publish `data` as `path` (inside `storage_dir`) unless a file is there already; True if this call wrote it.

    On any failure no file is left behind, neither the final one nor the `.part`. The caller runs
    the job alone (tasks.leases), so `.part` files of the same job are leftovers of a killed attempt.
    """
    check_storage_root(storage_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{PART_SUFFIX}"):
            leftover.unlink(missing_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PART_SUFFIX)
    except OSError as exc:
        raise StorageError(f"cannot write audio in {path.parent}: {_reason(exc)}") from None
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, FILE_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
        published = _publish(temp_name, path)
        _fsync_dir(path.parent)
        return published
    except OSError as exc:
        raise StorageError(f"cannot write audio file {path}: {_reason(exc)}") from None
    finally:  # also on SoftTimeLimitExceeded and worker shutdown
        with suppress(OSError):
            os.unlink(temp_name)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "the file system accepted no bytes")
        view = view[written:]
    if os.fstat(fd).st_size != len(data):
        raise OSError(errno.EIO, f"file holds {os.fstat(fd).st_size} of {len(data)} bytes after writing")


def _publish(temp_name: str, path: Path) -> bool:
    try:
        os.link(temp_name, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if path.exists():
            return False
        os.rename(temp_name, path)
    return True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_parts(storage_dir: Path, older_than_s: float) -> int:
    """Delete `.part` files left by killed writers; younger ones may belong to a running job elsewhere."""
    removed = 0
    cutoff = time.time() - older_than_s
    for part in storage_dir.glob(f"*/*/.*{PART_SUFFIX}"):
        with suppress(OSError):
            if part.stat().st_mtime < cutoff:
                part.unlink()
                removed += 1
    return removed


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
