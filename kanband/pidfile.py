"""The pidfile (SPEC §8): locked for the daemon's life, removed only if ours."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class AlreadyRunning(Exception):
    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"kanband is already running, {who} (pidfile {path})")
        self.pid = pid


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class PidFile:
    """Take the lock first (refuse a second instance), write the pid later."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(self.path, read_pid(self.path)) from None
        # Locked: whatever the file held came from a daemon that is gone.
        if os.fstat(fd).st_ino != _inode(self.path):  # replaced between open and lock
            os.close(fd)
            return self.acquire()
        self._fd = fd

    def write(self, pid: int | None = None) -> None:
        assert self._fd is not None
        data = f"{pid or os.getpid()}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if read_pid(self.path) in (os.getpid(), None) and \
                    os.fstat(self._fd).st_ino == _inode(self.path):  # ours, or never written
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None
