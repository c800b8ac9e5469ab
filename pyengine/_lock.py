"""One writer per store: an exclusive ``flock`` on ``X.h5.lock`` held for a whole capture.

The lock file holds the writer's pid (for messages only). The kernel releases the lock when
the process dies, however it dies, so a killed capture leaves a stale file and no stale lock:
the next capture takes the lock and resumes. Readers only probe (``running_pid``).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from pyengine.errors import StoreError

# A reader's probe holds a shared lock for microseconds; a writer retries this long before
# concluding that another writer holds the lock.
_RETRIES = 10
_RETRY_SECONDS = 0.02


def lock_path(path: Path) -> Path:
    """``X.h5.lock`` beside ``X.h5`` and ``X.h5.partial``."""
    return path.with_name(path.name + ".lock")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def writer_name(pid: int) -> str:
    """How messages name the writing process."""
    return f"pid {pid}" if pid else "pid not yet recorded"


def _flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class CaptureLock:
    """``with CaptureLock(store_path):`` — the exclusive right to write ``store_path``."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = lock_path(store)
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                raise StoreError(f"{self.store}: directory {self.store.parent} does not exist") from None
            if not self._lock(fd):
                pid = _read_pid(fd) or 0
                os.close(fd)
                raise StoreError(
                    f"{self.store}: another capture ({writer_name(pid)}) is writing it (lock {self.path}); "
                    "wait for it to finish, or stop it and run this capture again to resume"
                )
            # The holder before us may have removed the file after we opened it: then our
            # lock is on an unlinked inode and a third process could lock a new file. Retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @staticmethod
    def _lock(fd: int) -> bool:
        for attempt in range(_RETRIES):
            if _flock(fd, fcntl.LOCK_EX):
                return True
            if attempt + 1 < _RETRIES:
                time.sleep(_RETRY_SECONDS)
        return False

    def release(self) -> None:
        """Remove the lock file (while still holding the lock), then release it."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CaptureLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def running_pid(store: Path) -> int | None:
    """The pid of the live capture writing ``store`` (``X.h5``; 0: not known yet), or None when none runs.

    Probes with a shared lock, released at once; never creates the lock file.
    """
    try:
        fd = os.open(lock_path(store), os.O_RDONLY)
    except OSError:
        return None
    try:
        if _flock(fd, fcntl.LOCK_SH):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _read_pid(fd) or 0
    finally:
        os.close(fd)
