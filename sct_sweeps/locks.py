"""Exclusive fcntl locks on files, between processes of this machine (or of a shared filesystem that has them).

Two uses: one `sct-sweep run` at a time takes a sweep's name (`record.claim_name`), and a new SQLite
MLflow store is created and migrated by one process while the others wait (`tracking.client`). The
kernel drops a lock when its process dies, so a killed holder never leaves a name or a store locked.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def lock_file(path: Path, *, wait: bool) -> int | None:
    """An open descriptor of `path` (created if missing) holding its exclusive lock; None if another process
    holds it and `wait` is False. Closing the descriptor releases the lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file while we waited: lock the one there now


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of `path` for the block, waiting for any other holder first."""
    fd = lock_file(path, wait=True)
    try:
        yield
    finally:
        os.close(fd)  # type: ignore[arg-type]
