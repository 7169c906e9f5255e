"""systemd integration (SPEC §8): sd_notify, watchdog, socket activation.

Everything here is a no-op without systemd: no NOTIFY_SOCKET, no messages;
no LISTEN_FDS for this pid, kanband binds its own socket.
"""

from __future__ import annotations

import os
import socket
import stat
import time

import sdnotify

SD_LISTEN_FDS_START = 3


class Notify:
    """sd_notify messages. Built once at start-up, before anything changes env."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        usec = env.get("WATCHDOG_USEC")
        wpid = env.get("WATCHDOG_PID")
        self.watchdog_usec = 0
        if usec and usec.isdigit() and (not wpid or wpid == str(os.getpid())):
            self.watchdog_usec = int(usec)

    def send(self, *fields: str) -> None:
        if self._n is not None:
            self._n.notify("\n".join(fields))

    @property
    def watchdog_interval(self) -> float | None:
        """Half the watchdog timeout, as systemd recommends; None when off."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")


def listen_socket(env: dict[str, str] | None = None) -> socket.socket | None:
    """The first socket systemd passed us (fd 3), or None. Clears LISTEN_* so
    workers never see them."""
    env = os.environ if env is None else env
    pid, fds = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(var, None)
    if not pid or not fds or pid != str(os.getpid()) or not fds.isdigit() or int(fds) < 1:
        return None
    fd = SD_LISTEN_FDS_START
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise OSError(f"LISTEN_FDS: fd {fd} is not a socket")
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise OSError("LISTEN_FDS: fd 3 is not a Unix stream socket (check kanband.socket)")
    sock.setblocking(False)
    return sock
