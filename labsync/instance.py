"""One labsync per SQLite database: a second process is refused with a clear error.

SQLite has no row locks to claim orders with, so two processes on one SQLite file would
work on the same orders. MySQL/MariaDB instances coordinate through claims instead
(``labsync.store.claims``) and need no lock here.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from labsync.config import DatabaseConfig
from labsync.errors import LabsyncError


class InstanceLock:
    """An exclusive ``flock`` on ``{database}.labsync.lock``, held while labsync works."""

    def __init__(self, database: DatabaseConfig) -> None:
        self.path: Path | None = None
        if database.is_sqlite and database.url.database not in (None, "", ":memory:"):
            self.path = Path(f"{database.url.database}.labsync.lock")
        self._fd: int | None = None

    def acquire(self) -> InstanceLock:
        if self.path is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LabsyncError(
                f"another labsync process (pid {holder}) is already working on this SQLite "
                f"database; SQLite runs a single instance (lock: {self.path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> InstanceLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
