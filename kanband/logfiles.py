"""Task log files: opened for appending by starts, unlinked by gc.

gc looks for old logs on a worker thread, and unlinks them there, while the
loop goes on (a home with 100k logs takes seconds to look through). A start
may open a log meanwhile, on a spawn thread or on the loop. A worker whose
log was unlinked under it would write to a file nobody can read, so the two
meet here: every append-open goes through `open_append`, and gc unlinks
through `unlink_old`, under one lock. A log opened after the gc pass began
(`begin_pass`) is never unlinked by that pass, and neither is a log written
to since the cut-off.
"""

from __future__ import annotations

import os
import stat
import threading

_lock = threading.Lock()
_opened: set[str] | None = None  # logs opened since the gc pass began; None: no pass


def open_append(path: str | os.PathLike[str], mode: int = 0o600) -> int:
    """Open `path` for appending (created if missing; close-on-exec). Raises
    OSError as os.open does."""
    with _lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
        if _opened is not None:
            _opened.add(os.fspath(path))
        return fd


def begin_pass() -> None:
    """A gc pass starts: from now on, note every log opened."""
    global _opened
    with _lock:
        _opened = set()


def end_pass() -> None:
    global _opened
    with _lock:
        _opened = None


def unlink_old(path: str | os.PathLike[str], cutoff: float) -> bool:
    """Unlink the log at `path` if it is a regular file last modified before
    `cutoff` and not opened since the pass began. True if it was unlinked.
    Raises OSError (other than a file already gone)."""
    with _lock:
        if _opened is not None and os.fspath(path) in _opened:
            return False
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_mtime >= cutoff:
            return False
        os.unlink(path)
        return True
