"""The wire protocol both sides import (SPEC §5): msgpack-rpc over a Unix socket.

request  [0, msgid, method, [params]]
response [1, msgid, error, result]
notify   [2, method, [params]]

This module and the blocking `Client` must stay light: kanbanctl imports them,
so nothing here may import asyncio, structlog or psutil.
"""

from __future__ import annotations

import os
import time

# _socket, not socket: socket.py builds its enums at import (~8 ms of a
# kanbanctl call on a slow machine); a Unix stream socket needs none of it.
import _socket
TYPE_CHECKING = False  # typing itself is not imported at run time: kanbanctl stays light
if TYPE_CHECKING:
    from typing import Any, Iterator

import msgpack

from kanband.errors import KanbanError, from_wire

REQUEST, RESPONSE, NOTIFY = 0, 1, 2
MAX_BUFFER = 8 * 1024 * 1024  # per-connection cap on buffered, unparsed input
# How long a Client polls for an answer before it sleeps in recv (seconds). A
# sleeping client is woken by the daemon's send, which on a VM can cost as much
# as the request itself, on both sides; see Client.busy_poll.
CLIENT_BUSY_POLL = 200e-6


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpacker(max_buffer: int = MAX_BUFFER) -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, max_buffer_size=max_buffer, strict_map_key=True,
                            use_list=True)


class Unreachable(Exception):
    """No daemon answers at the socket."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot reach kanband at {path}: {reason}")
        self.path = path
        self.reason = reason


class TimedOut(Exception):
    pass


def _cpus() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Client:
    """A blocking client: one socket, requests pipelined, answers matched by msgid.

    `busy_poll` (seconds, default CLIENT_BUSY_POLL): while waiting for input,
    poll the socket without sleeping for up to this long first (never longer
    than the timeout), yielding the CPU between polls. Most answers come within
    it, and the daemon's send then wakes nobody. 0 turns it off; it is always
    off when this process may run on one CPU only (its affinity mask, or the
    machine), where polling could only delay the daemon."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = None,
                 token: str | None = None, busy_poll: float | None = None) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.token = token
        if busy_poll is None:
            busy_poll = CLIENT_BUSY_POLL
        if busy_poll < 0:
            raise ValueError("busy_poll must be >= 0")
        self.busy_poll = busy_poll if busy_poll and _cpus() > 1 else 0.0
        self._sock: _socket.socket | None = None
        self._msgid = 0
        self._answers: dict[int, tuple[Any, Any]] = {}
        self._new_stream()
        self.notifications: list[tuple[str, Any]] = []

    def connect(self) -> "Client":
        """Connect; a full listen queue (EAGAIN) is retried until the timeout."""
        deadline = time.monotonic() + (self.timeout if self.timeout is not None else 30.0)
        while True:
            try:
                return self._connect_once()
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Unreachable(self.path, "the daemon's listen queue stayed full") from None
                time.sleep(0.01)

    def _connect_once(self) -> "Client":
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except FileNotFoundError:
            s.close()
            raise Unreachable(self.path, "no socket there") from None
        except ConnectionRefusedError:
            s.close()
            raise Unreachable(self.path, "connection refused (stale socket?)") from None
        except TimeoutError:
            s.close()
            raise Unreachable(self.path, "timed out connecting") from None
        except BlockingIOError:
            s.close()
            raise
        except OSError as e:
            s.close()
            raise Unreachable(self.path, e.strerror or str(e)) from None
        self._sock = s
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Client":
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests ------------------------------------------------------------
    def _frame(self, method: str, params: dict[str, Any] | None) -> bytes:
        self._msgid = (self._msgid + 1) & 0x7FFFFFFF
        params = dict(params or {})
        if self.token and "run_token" not in params:
            params["run_token"] = self.token
        return pack([REQUEST, self._msgid, method, [params]])

    def _send_bytes(self, data: bytes, what: str) -> None:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except (TimeoutError, OSError) as e:
            # Part of a frame may have gone out: that connection cannot carry
            # another request. The next call connects afresh.
            self._drop()
            if isinstance(e, TimeoutError):
                raise TimedOut(f"timed out sending {what}") from None
            raise Unreachable(self.path, f"connection lost: {e.strerror or e}") from None

    def _new_stream(self) -> None:
        """Nothing read yet: a fresh decoder, no answers waiting."""
        self._unpacker = unpacker(64 * 1024 * 1024)
        self._answers.clear()

    def _drop(self) -> None:
        self.close()
        self._new_stream()

    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        self._send_bytes(self._frame(method, params), method)
        return self._msgid

    def receive(self, msgid: int) -> Any:
        """Wait for the answer to `msgid`; raise its error as a KanbanError."""
        while msgid not in self._answers:
            self._read_one()
        error, result = self._answers.pop(msgid)
        if error is not None:
            raise from_wire(error)
        return result

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.receive(self.send(method, params))

    def call_many(self, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Pipeline several requests; each answer is a result or a KanbanError.
        The requests go out in one write: kanband reads them together and runs
        them as one group commit instead of one by one."""
        ids, frames = [], []
        for m, p in calls:
            frames.append(self._frame(m, p))
            ids.append(self._msgid)
        if frames:
            self._send_bytes(b"".join(frames), f"{len(frames)} requests")
        out: list[Any] = []
        for i in ids:
            try:
                out.append(self.receive(i))
            except KanbanError as e:
                out.append(e)
        return out

    def next_notification(self) -> tuple[str, Any]:
        while not self.notifications:
            self._read_one()
        return self.notifications.pop(0)

    def notifications_iter(self) -> Iterator[tuple[str, Any]]:
        while True:
            yield self.next_notification()

    def _read_one(self) -> None:
        assert self._sock is not None
        for msg in self._unpacker:
            self._accept(msg)
            return
        window = self.busy_poll
        timeout = self._sock.gettimeout()
        if timeout is not None:
            window = min(window, timeout)  # 0 for a non-blocking socket: no poll
        polling = window > 0
        end = time.perf_counter() + window if polling else 0.0
        while True:
            try:
                if polling:
                    data = self._read_now()
                    if data is None:  # nothing yet: poll again, or sleep in recv
                        polling = time.perf_counter() < end
                        if polling:
                            os.sched_yield()
                        continue
                else:
                    data = self._sock.recv(256 * 1024)
            except TimeoutError:
                raise TimedOut("timed out waiting for kanband to answer") from None
            except OSError as e:
                raise Unreachable(self.path, f"connection lost: {e.strerror or e}") from None
            if not data:
                raise Unreachable(self.path, "kanband closed the connection")
            self._unpacker.feed(data)
            got = False
            for msg in self._unpacker:
                self._accept(msg)
                got = True
            if got:
                return

    def _read_now(self) -> bytes | None:
        """What the socket holds now, without waiting; None if nothing. A socket
        with a timeout polls before it reads, even with MSG_DONTWAIT; but its
        descriptor is non-blocking, so os.read on it returns at once. Without a
        timeout the descriptor blocks, and recv's MSG_DONTWAIT does it."""
        sock = self._sock
        if sock is None:  # closed by another thread meanwhile
            raise Unreachable(self.path, "the client was closed")
        try:
            if sock.gettimeout() is None:
                return sock.recv(256 * 1024, _socket.MSG_DONTWAIT)
            return os.read(sock.fileno(), 256 * 1024)
        except (BlockingIOError, InterruptedError):
            return None

    def _accept(self, msg: Any) -> None:
        if isinstance(msg, list) and len(msg) == 4 and msg[0] == RESPONSE:
            self._answers[msg[1]] = (msg[2], msg[3])
        elif isinstance(msg, list) and len(msg) == 3 and msg[0] == NOTIFY:
            params = msg[2][0] if isinstance(msg[2], list) and msg[2] else msg[2]
            self.notifications.append((msg[1], params))


def call(path: str | os.PathLike[str], method: str, params: dict[str, Any] | None = None,
         timeout: float | None = 30.0) -> Any:
    """One request on a fresh connection."""
    with Client(path, timeout=timeout) as c:
        return c.call(method, params)


def wait_until_reachable(path: str, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while True:
        try:
            call(path, "system.ping", timeout=2.0)
            return True
        except (Unreachable, TimedOut):
            if time.monotonic() >= end:
                return False
            time.sleep(0.2)
