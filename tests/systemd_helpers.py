"""Helpers for tests/test_systemd.py: a stand-in for systemd's notify socket, a
kanband started with extra environment, process checks and journald decoding."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

from conftest import ROOT, Kanband, wait_for
from supervision_helpers import alive

PY = sys.executable
VENV_BIN = Path(PY).parent
OPS = ROOT / "packaging" / "kanband-ops"


# -- sd_notify -----------------------------------------------------------------------
class Message:
    """One sd_notify datagram: its fields in order and when the test received it."""

    def __init__(self, data: bytes, at: float) -> None:
        self.raw = data.decode("utf-8", "replace")
        self.at = at
        self.fields: dict[str, str] = {}
        for line in self.raw.split("\n"):
            if "=" in line:
                k, _, v = line.partition("=")
                self.fields[k] = v

    def has(self, key: str, value: str | None = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)

    def __repr__(self) -> str:
        return f"<{self.at:.3f} {self.raw!r}>"


class NotifySocket:
    """An AF_UNIX datagram socket standing in for $NOTIFY_SOCKET. A thread reads it
    continuously (as systemd does: the kernel queues only a few datagrams, and a full
    queue would block the daemon's send) and timestamps each message on arrival."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(Message(data, time.monotonic()))

    def snapshot(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def find(self, key: str, value: str | None = None, after: int = 0) -> int | None:
        """Index of the first message from index `after` on that carries KEY(=VALUE)."""
        for i, m in enumerate(self.snapshot()[after:], after):
            if m.has(key, value):
                return i
        return None

    def wait(self, key: str, value: str | None = None, after: int = 0,
             timeout: float = 15.0, match: Callable[[Message], bool] | None = None) -> int:
        """Wait for a message from index `after` on with KEY(=VALUE) (and `match`); its index."""
        def found() -> int | None:
            for i, m in enumerate(self.snapshot()[after:], after):
                if m.has(key, value) and (match is None or match(m)):
                    return i + 1  # truthy even for index 0
            return None
        return wait_for(found, timeout, f"sd_notify {key}={value or '*'} after #{after}; "
                                        f"got {self.snapshot()[after:]}") - 1

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def quiet_for(pred: Callable[[], Any], window: float, interval: float = 0.02) -> bool:
    """Watch `pred` for `window` seconds (a deadline, not a sleep): True if it never
    held, False as soon as it does."""
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        if pred():
            return False
        time.sleep(interval)
    return not pred()


# -- daemons -----------------------------------------------------------------------
class EnvKanband(Kanband):
    """A Kanband whose daemon (and kanbanctl) get extra environment variables."""

    def __init__(self, home: Path, config: str | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        super().__init__(home, config)
        self.extra_env = dict(extra_env or {})

    @property
    def env(self) -> dict[str, str]:
        e = super().env
        e.update(self.extra_env)
        return e


def state(pid: int) -> str | None:
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return None


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def kill_and_wait(pid: int | None, timeout: float = 10.0) -> None:
    """SIGCONT + SIGKILL a process the test started (directly or detached) and wait
    until it is gone or a zombie nobody will reap."""
    if not pid or not alive(pid):
        return
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
    wait_for(lambda: not alive(pid), timeout, f"pid {pid} to die")


def dead_pid() -> int:
    """A pid that belonged to a process that has exited and been reaped."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def run(argv: list[str], env: dict[str, str], timeout: float = 30.0,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)


# -- journald native protocol --------------------------------------------------------
def decode_journal(data: bytes) -> list[tuple[str, str]]:
    """Parse journald's native datagram format: `KEY=value\\n`, or `KEY\\n` + a 64-bit
    little-endian length + the raw value + `\\n`."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out.append((k.decode(), v.decode()))
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + n]
            if data[nl + 9 + n:nl + 10 + n] != b"\n":
                pytest.fail(f"length-prefixed field {line!r} not followed by a newline")
            out.append((line.decode(), value.decode()))
            i = nl + 10 + n
    return out
