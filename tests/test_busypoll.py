"""The event loop's busy-poll after an answer (kanband/busypoll.py, `[daemon] busy_poll`).

The selector is tested on a real socketpair: armed, its next blocking select
polls (without sleeping) until data comes or the window ends, then sleeps for
the rest of the timeout; unarmed, or with a zero window, it never polls. The
RPC layer arms it after writing answers, and only then (in-process, with the
rpc pump's fake transport). A real daemon with the largest window spins while a
client keeps calling, and goes quiet when it stops; `busy_poll = 0` never spins.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from kanband import busypoll
from kanband import config as config_mod
from kanband.errors import InvalidArgument
from kanband.protocol import REQUEST, pack
from tests.test_rpc_pump import board, make_connection, peer  # noqa: F401  (fixtures)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def send_later(sock: socket.socket, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), sock.send(b"x")), daemon=True)
    t.start()
    return t


def selector(window: float, sock: socket.socket) -> busypoll.BusyPollSelector:
    sel = busypoll.BusyPollSelector(window)
    sel.register(sock, 1)  # EVENT_READ
    return sel


def test_armed_select_polls_until_data_comes(pair):
    """Armed, a blocking select keeps polling while it waits, returns the socket that became readable, and disarms."""
    a, b = pair
    sel = selector(1.0, a)
    sel.armed = True
    t = send_later(b, 0.05)
    ready = sel.select(timeout=10)
    t.join()
    assert [key.fileobj for key, _ in ready] == [a]
    assert sel.polls > 1, "it slept instead of polling"
    assert not sel.armed
    sel.close()


def test_unarmed_or_zero_window_never_polls(pair):
    """Unarmed, or with busy_poll = 0, select sleeps in epoll_wait: no polls at all."""
    a, b = pair
    for window, armed in ((1.0, False), (0.0, True)):
        sel = selector(window, a)
        sel.armed = armed
        t = send_later(b, 0.02)
        ready = sel.select(timeout=10)
        t.join()
        a.recv(16)
        assert [key.fileobj for key, _ in ready] == [a]
        assert sel.polls == 0, (window, armed)
        sel.close()


def test_poll_window_ends_then_sleeps_the_rest_of_the_timeout(pair):
    """Nothing comes: the poll stops at its window and select still waits out the caller's whole timeout (not less), then returns nothing."""
    a, _ = pair
    sel = selector(0.02, a)
    sel.armed = True
    t0 = time.monotonic()
    ready = sel.select(timeout=0.3)
    waited = time.monotonic() - t0
    assert ready == []
    assert waited >= 0.29, f"select returned after {waited:.3f}s of a 0.3s timeout"
    assert sel.polls >= 1 and not sel.armed
    sel.close()


def test_a_zero_timeout_keeps_the_arm_for_the_next_blocking_select(pair):
    """The loop's non-blocking selects (callbacks still queued) neither poll nor use up the arm: the next blocking select does."""
    a, b = pair
    sel = selector(1.0, a)
    sel.armed = True
    assert sel.select(timeout=0) == []
    assert sel.armed and sel.polls == 0
    t = send_later(b, 0.02)
    assert sel.select(timeout=None)
    t.join()
    assert sel.polls >= 1 and not sel.armed
    sel.close()


def test_an_answer_arms_the_loop_and_nothing_else_does(board, peer):  # noqa: F811
    """In-process: writing a request's answer arms the loop's selector; a connection that only receives a partial frame, or a notification, does not."""
    loop = busypoll.new_loop(0.001)
    try:
        sel = busypoll._selector
        assert isinstance(sel, busypoll.BusyPollSelector)

        async def go() -> None:
            conn, transport = make_connection(board, peer)
            frame = pack([REQUEST, 7, "system.ping", [{}]])
            conn.data_received(frame[:5])
            assert not sel.armed, "armed before any answer"
            conn.notify("event", {"id": 1})
            assert not sel.armed, "a notification armed the loop"
            conn.data_received(frame[5:])
            assert transport.messages()[-1][:3] == [1, 7, None]
            assert sel.armed, "answering a request did not arm the loop"
            sel.armed = False
            conn.data_received(pack([REQUEST, 8, "task.list", [{}]]))  # a batched answer
            assert sel.armed
        loop.run_until_complete(go())
    finally:
        loop.close()
        busypoll._selector = None


@pytest.mark.parametrize("value,seconds", [("100us", 100e-6), ("2ms", 0.002), (0, 0.0),
                                           ("10ms", 0.01), (0.0005, 0.0005)])
def test_busy_poll_config_values(value, seconds):
    """busy_poll takes a duration with us/ms units (or seconds), up to 10ms; 0 turns it off."""
    assert config_mod.from_dict({"daemon": {"busy_poll": value}}).busy_poll == pytest.approx(seconds)
    assert config_mod.Config().busy_poll == pytest.approx(100e-6)


@pytest.mark.parametrize("value", ["11ms", "1s", -1, "fast", True])
def test_busy_poll_config_refused(value):
    with pytest.raises(InvalidArgument, match="daemon.busy_poll"):
        config_mod.from_dict({"daemon": {"busy_poll": value}})


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _paced_calls(k: Any, n: int, pause: float) -> float:
    """Daemon CPU seconds spent while a client makes n pings, `pause` apart."""
    c = k.client()
    try:
        c.call("system.ping", {})
        before = _cpu_seconds(k.proc.pid)
        for _ in range(n):
            c.call("system.ping", {})
            time.sleep(pause)
        return _cpu_seconds(k.proc.pid) - before
    finally:
        c.close()


def test_daemon_spins_between_calls_only_when_configured(kanband_factory):
    """A real daemon with busy_poll = "10ms" polls through the 3 ms pauses of a client that keeps calling (CPU time of about the pauses); with busy_poll = 0 it sleeps through them (a small fraction of that); and once the client stops, the spinning daemon goes quiet. status and reload show the window."""
    spin = kanband_factory('[daemon]\nbusy_poll = "10ms"\n', sub="spin")
    quiet = kanband_factory("[daemon]\nbusy_poll = 0\n", sub="quiet")
    assert spin.call("daemon.status")["busy_poll_us"] == 10000
    assert quiet.call("daemon.status")["busy_poll_us"] == 0
    n, pause = 150, 0.003
    spun = _paced_calls(spin, n, pause)
    slept = _paced_calls(quiet, n, pause)
    assert spun >= 0.25 * n * pause, f"busy_poll=10ms used only {spun:.3f}s of CPU in {n} pauses"
    assert slept < spun / 3, f"busy_poll=0 used {slept:.3f}s of CPU, busy_poll=10ms {spun:.3f}s"
    before = _cpu_seconds(spin.proc.pid)
    time.sleep(1.0)
    idle = _cpu_seconds(spin.proc.pid) - before
    assert idle < 0.3, f"an idle daemon used {idle:.2f}s of CPU in 1s: it kept spinning"
    spin.write_config('[daemon]\nbusy_poll = "50us"\n')
    assert spin.ctl("reload").returncode == 0
    assert spin.call("daemon.status")["busy_poll_us"] == 50


# -- the client's side (protocol.Client.busy_poll) ------------------------------------
class _Peer:
    """A stand-in daemon on a real Unix socket: it accepts one connection, reads
    one request and answers it as told; the answer marks when it starts to send."""

    def __init__(self, path: str, answer: Any) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.answer = answer  # (peer, conn, msgid) -> None; calls peer.sending() first
        self.sent = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def sending(self) -> None:
        """Called by an answer just before its first byte goes out."""
        self.sent.set()

    def _serve(self) -> None:
        import msgpack
        conn, _ = self.srv.accept()
        with conn:
            u = msgpack.Unpacker(raw=False)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    u.feed(data)
                    for req in u:
                        self.answer(self, conn, req[1])
                        conn.recv(1)  # hold the connection until the client closes it
                        return
            except OSError:  # the client gave up and went away first
                return

    def close(self) -> None:
        self.srv.close()
        self.thread.join(10)


def _reply(msgid: int, result: Any = "pong") -> bytes:
    return pack([1, msgid, None, result])


def _late(delay: float) -> Any:
    """An answer: "pong", sent `delay` seconds after the request came."""
    def answer(p: _Peer, conn: socket.socket, msgid: int) -> None:
        time.sleep(delay)
        p.sending()
        conn.sendall(_reply(msgid))
    return answer


def _counting(c: Any, peer: _Peer) -> list[tuple[bool, Any]]:
    """Wrap c._read_now: one (peer had started answering when the poll returned,
    what the poll read: None for nothing) per poll."""
    polls: list[tuple[bool, Any]] = []
    read_now = c._read_now

    def counted() -> Any:
        data = read_now()
        polls.append((peer.sent.is_set(), data))
        return data
    c._read_now = counted
    return polls


def _found(polls: list[tuple[bool, Any]]) -> list[bool]:
    return [data is not None for _, data in polls]


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_client_polls_for_an_answer_that_comes_within_its_window(tmp_path, timeout):
    """With a window longer than the answer takes, the client keeps polling and it
    is a poll, not a sleeping recv, that reads the answer. Both socket modes: with
    a timeout (the descriptor is non-blocking, os.read) and without (recv with
    MSG_DONTWAIT on a blocking descriptor)."""
    from kanband.protocol import Client
    path = str(tmp_path / "s.sock")
    peer = _Peer(path, _late(0.05))
    c = Client(path, timeout=timeout, busy_poll=5.0).connect()
    try:
        polls = _counting(c, peer)
        assert c.call("system.ping") == "pong"
        assert len(polls) > 1, "the client did not poll while it waited"
        found = _found(polls)
        # the read that completed the answer was a poll: no sleeping recv ran
        assert found[-1], "a sleeping recv read the answer, not a poll"
        assert not any(found[:-1])
    finally:
        c.close()
        peer.close()


def test_client_polls_only_for_its_window_then_sleeps(tmp_path):
    """An answer that comes long after the window is read by the blocking recv:
    every poll happened before the peer answered."""
    from kanband.protocol import Client
    path = str(tmp_path / "s.sock")
    peer = _Peer(path, _late(1.0))
    c = Client(path, timeout=30, busy_poll=0.02).connect()
    try:
        polls = _counting(c, peer)
        assert c.call("system.ping") == "pong"
        assert polls, "the client did not poll at all"
        # every poll returned before the peer even began to answer
        assert all(not answered and data is None for answered, data in polls), \
            "the client went on polling after its window"
    finally:
        c.close()
        peer.close()


def test_client_without_a_window_never_polls(tmp_path):
    from kanband.protocol import Client
    path = str(tmp_path / "s.sock")
    peer = _Peer(path, lambda p, conn, msgid: conn.sendall(_reply(msgid)))
    c = Client(path, timeout=30, busy_poll=0).connect()
    try:
        polls = _counting(c, peer)
        assert c.call("system.ping") == "pong"
        assert polls == []
    finally:
        c.close()
        peer.close()


def test_client_poll_joins_an_answer_split_across_writes(tmp_path):
    from kanband.protocol import Client
    path = str(tmp_path / "s.sock")

    def halves(p: _Peer, conn: socket.socket, msgid: int) -> None:
        frame = _reply(msgid, {"text": "x" * 1000})
        p.sending()
        conn.sendall(frame[:500])
        time.sleep(0.05)
        conn.sendall(frame[500:])
    peer = _Peer(path, halves)
    c = Client(path, timeout=30, busy_poll=5.0).connect()
    try:
        polls = _counting(c, peer)
        assert c.call("system.ping") == {"text": "x" * 1000}
        found = _found(polls)
        # polls read it all (two reads, or one if the halves merged while the
        # client was off its CPU), the last of them completing the answer
        assert found[-1] and sum(found) in (1, 2), found
    finally:
        c.close()
        peer.close()


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_client_poll_reports_a_peer_that_went_away(tmp_path, timeout):
    """The peer closes without answering while the client polls: Unreachable, as
    from a sleeping read, not a wait for the window or the timeout."""
    from kanband.protocol import Client, Unreachable
    path = str(tmp_path / "s.sock")
    peer = _Peer(path, lambda p, conn, msgid: (time.sleep(0.05), p.sending(),
                                                conn.shutdown(socket.SHUT_WR)))
    c = Client(path, timeout=timeout, busy_poll=30.0).connect()
    try:
        polls = _counting(c, peer)
        with pytest.raises(Unreachable, match="closed the connection"):
            c.call("system.ping")
        assert polls and polls[-1][1] == b"", "a poll did not see the end of the stream"
    finally:
        c.close()
        peer.close()


def test_client_window_default_bad_value_and_one_cpu():
    """The default window applies on more than one CPU; on one CPU (where polling
    could only keep the daemon from running) the client never polls; a negative
    window is refused."""
    import subprocess
    import sys

    from kanband.protocol import CLIENT_BUSY_POLL, Client
    many = len(os.sched_getaffinity(0)) > 1
    assert Client("/nonexistent").busy_poll == (CLIENT_BUSY_POLL if many else 0.0)
    assert CLIENT_BUSY_POLL > 0
    one_cpu = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
               "from kanband.protocol import Client; "
               "print(Client('/x').busy_poll, Client('/x', busy_poll=1.0).busy_poll)")
    out = subprocess.run([sys.executable, "-c", one_cpu], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0.0", "0.0"]
    with pytest.raises(ValueError, match="busy_poll"):
        Client("/x", busy_poll=-1)


def test_client_window_never_outlasts_the_timeout(tmp_path):
    """A timeout shorter than the window caps it: the call times out after about
    the timeout, not after the 5 s window."""
    from kanband.protocol import Client, TimedOut
    path = str(tmp_path / "s.sock")
    peer = _Peer(path, _late(1.5))
    c = Client(path, timeout=0.05, busy_poll=5.0).connect()
    try:
        polls = _counting(c, peer)
        t = time.monotonic()
        with pytest.raises(TimedOut):
            c.call("system.ping")
        took = time.monotonic() - t
        assert polls, "the client did not poll at all"
        assert took < 1.0, f"the call took {took:.2f}s: the 5 s window ignored the 0.05 s timeout"
    finally:
        c.close()
        peer.close()
