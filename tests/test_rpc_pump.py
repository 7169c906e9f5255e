"""The per-connection request pump (kanband/rpc.py Connection._pump / _run_batch) when
a group commit cannot even begin.

In-process: a real Store and Board on a temp home, a real RpcServer, and a Connection
driven through `data_received` with a fake transport that records what is written.
When `Store.batch()` refuses to begin (the board cannot be read: SQLite busy, I/O
error, a transaction already open), the pump must still answer every request -- each
one handled alone, with its result or an `unavailable` error -- and return; it used to
retry the same batch forever, wedging the daemon's event loop.

An endless pump fails the test instead of hanging it: `store.batch` is wrapped to
count its calls (an absurd count raises), and an interval timer raises from a signal
handler as a backstop. Both raise a BaseException, which nothing in the pump catches.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

from kanband import config as config_mod
from kanband import rpc
from kanband.board import Board
from kanband.errors import Unavailable
from kanband.paths import resolve_daemon_paths
from kanband.protocol import REQUEST, RESPONSE, pack
from kanband.store import Store


class PumpRunaway(BaseException):
    """Raised inside the pump when it loops without end (not an Exception: the
    request handlers' `except Exception` must not swallow it)."""


class FakeTransport(asyncio.Transport):
    """An asyncio.Transport stand-in that records every call."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.written: list[bytes] = []
        self.calls: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append("write")
        self.written.append(bytes(data))

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.calls.append("set_write_buffer_limits")

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def messages(self) -> list[Any]:
        u = msgpack.Unpacker(raw=False, strict_map_key=False)
        u.feed(b"".join(self.written))
        return list(u)


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    paths = resolve_daemon_paths(str(tmp_path / "home"), env={})
    paths.home.mkdir(parents=True, exist_ok=True)
    store = Store(str(tmp_path / "board.db"))
    b = Board(store, config_mod.load(None), paths)
    try:
        yield b
    finally:
        with contextlib.suppress(Exception):
            if store._db.in_transaction:
                store._db.execute("ROLLBACK")
        store.close()


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    """One end of a socketpair: real peer credentials (ours) for connection_made."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a
    finally:
        a.close()
        b.close()


@contextlib.contextmanager
def runaway_guard(seconds: float) -> Iterator[None]:
    """Raise PumpRunaway in the main thread if the body takes longer than `seconds`."""
    def fire(signum: int, frame: Any) -> None:
        raise PumpRunaway(f"the pump did not return within {seconds}s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def count_batches(store: Store, monkeypatch: pytest.MonkeyPatch, limit: int,
                  fail: bool) -> dict[str, int]:
    """Wrap store.batch: count calls; raise PumpRunaway past `limit` calls; with
    `fail`, refuse to begin like a board that cannot be read (else delegate)."""
    real = store.batch
    seen = {"calls": 0}

    @contextlib.contextmanager
    def batch(**kw: Any) -> Iterator[Any]:
        seen["calls"] += 1
        if seen["calls"] > limit:
            raise PumpRunaway(f"store.batch() entered {seen['calls']} times: the pump loops")
        if fail:
            raise Unavailable("the board could not be read: database is locked (test)")
        with real(**kw) as b:
            yield b
    monkeypatch.setattr(store, "batch", batch)
    return seen


def requests(n: int, first_id: int = 1) -> tuple[bytes, dict[int, str]]:
    """n requests in one buffer, mostly batchable (create, list, assignees, show of
    a missing task) with a few that are not (ping); msgid -> method."""
    kinds = [("task.create", lambda i: {"title": f"t{i}"}),
             ("task.list", lambda i: {}),
             ("board.assignees", lambda i: {}),
             ("task.create", lambda i: {"title": f"u{i}", "body": "x"}),
             ("task.show", lambda i: {"id": "t-nonexistent"}),
             ("system.ping", lambda i: {})]
    out = bytearray()
    methods: dict[int, str] = {}
    for i in range(n):
        method, params = kinds[i % len(kinds)]
        msgid = first_id + i
        methods[msgid] = method
        out += pack([REQUEST, msgid, method, [params(i)]])
    return bytes(out), methods


async def drive(conn: rpc.Connection, transport: FakeTransport, data: bytes,
                want: int, chunk: int | None = None) -> list[Any]:
    """Feed `data` through data_received (in chunks), then let the loop run until
    `want` answers were written (the pump reschedules itself past PUMP_BUDGET)."""
    step = chunk or len(data)
    for i in range(0, len(data), step):
        conn.data_received(data[i:i + step])
    for _ in range(10_000):
        msgs = transport.messages()
        if len(msgs) >= want and not conn._backlog:
            return msgs
        await asyncio.sleep(0)
    return transport.messages()


def check_answers(msgs: list[Any], methods: dict[int, str]) -> dict[int, Any]:
    """Exactly one response per request; return msgid -> (error, result)."""
    answers: dict[int, Any] = {}
    for m in msgs:
        assert isinstance(m, list) and m[0] == RESPONSE, f"unexpected message {m!r}"
        assert m[1] not in answers, f"request {m[1]} answered twice"
        answers[m[1]] = (m[2], m[3])
    missing = sorted(set(methods) - set(answers))
    assert not missing, f"{len(missing)} requests never answered, e.g. {missing[:5]}"
    assert set(answers) == set(methods)
    return answers


def make_connection(board: Board, peer: socket.socket) -> tuple[rpc.Connection, FakeTransport]:
    server = rpc.RpcServer(board)
    conn = rpc.Connection(server)
    transport = FakeTransport(peer)
    conn.connection_made(transport)  # type: ignore[arg-type]
    assert not conn.closed, "our own uid must be admitted"
    return conn, transport


@pytest.mark.parametrize("n", [7, rpc.PUMP_BUDGET + 90])
def test_every_request_is_answered_when_the_batch_cannot_begin(board, peer, monkeypatch, n):
    """store.batch() raises `unavailable` on entry: each request is handled alone and
    answered (the writes go through their own transactions), the pump returns, and the
    connection reads again once the backlog is empty -- within one step for a few
    requests, over several steps past PUMP_BUDGET."""
    seen = count_batches(board.store, monkeypatch, limit=4 * n + 10, fail=True)
    data, methods = requests(n)

    async def main() -> list[Any]:
        conn, transport = make_connection(board, peer)
        msgs = await drive(conn, transport, data, n)
        assert conn._backlog == [] and not conn.closed
        assert transport.calls[-1] == "resume_reading", transport.calls[-5:]
        return msgs

    with runaway_guard(20.0):
        msgs = asyncio.run(main())
    answers = check_answers(msgs, methods)
    for msgid, method in methods.items():
        err, res = answers[msgid]
        if method == "task.show":
            assert err is not None and err["code"] == "not_found", err
        else:
            assert err is None, (method, err)
    created = [answers[i][1]["task"]["id"] for i, m in methods.items() if m == "task.create"]
    assert len(set(created)) == len(created)
    assert {t["id"] for t in board.store.list_tasks()} == set(created)
    assert seen["calls"] >= 1


def test_board_in_a_foreign_transaction_every_request_gets_unavailable_or_a_result(
        board, peer, monkeypatch):
    """The real failure, not a mock: the store's connection is already inside a
    transaction, so BEGIN fails (`unavailable`). Reads are answered, every write is
    refused with `unavailable` (nothing of them lands), and once the transaction is
    gone the same connection batches again."""
    n = rpc.PUMP_BUDGET + 40
    seen = count_batches(board.store, monkeypatch, limit=4 * n + 10, fail=False)
    data, methods = requests(n)
    store = board.store

    async def main() -> tuple[list[Any], list[Any]]:
        conn, transport = make_connection(board, peer)
        store._db.execute("BEGIN")  # someone else's transaction on our connection
        first = await drive(conn, transport, data, n, chunk=4096)
        assert conn._backlog == [] and not conn.closed
        store._db.execute("ROLLBACK")
        assert store.list_tasks() == [], "a refused write must not land"
        transport.written.clear()
        again, again_methods = requests(30, first_id=100_000)
        batches_before = seen["calls"]
        second = await drive(conn, transport, again, 30)
        assert seen["calls"] - batches_before <= 10, "healthy requests are batched again"
        return first, [(second, again_methods)]

    with runaway_guard(20.0):
        first, [(second, again_methods)] = asyncio.run(main())
    answers = check_answers(first, methods)
    for msgid, method in methods.items():
        err, res = answers[msgid]
        if method == "task.create":
            assert err is not None and err["code"] == "unavailable", err
        elif method == "task.show":
            assert err is not None and err["code"] in ("not_found", "unavailable"), err
        else:
            assert err is None or err["code"] == "unavailable", (method, err)
    answers = check_answers(second, again_methods)
    for msgid, method in again_methods.items():
        err, res = answers[msgid]
        if method != "task.show":
            assert err is None, (method, err)
    assert len(store.list_tasks()) == sum(m == "task.create" for m in again_methods.values())


def test_a_group_commit_that_fails_answers_every_request_of_it(board, peer, monkeypatch):
    """The batch begins but its commit fails: every request of the batch gets the
    error (none is reported as done), the pump returns, nothing of it is durable."""
    store = board.store
    real = store.batch

    @contextlib.contextmanager
    def failing_commit(**kw: Any) -> Iterator[Any]:
        with real(**kw) as b:
            yield b
            b.failed = "disk I/O error (test)"  # SQLite dropped the transaction
    monkeypatch.setattr(store, "batch", failing_commit)
    data, methods = requests(12)
    methods = {k: v for k, v in methods.items()}

    async def main() -> list[Any]:
        conn, transport = make_connection(board, peer)
        return await drive(conn, transport, data, len(methods))

    with runaway_guard(20.0):
        msgs = asyncio.run(main())
    answers = check_answers(msgs, methods)
    for msgid, method in methods.items():
        err, _ = answers[msgid]
        if method == "system.ping":
            assert err is None  # not batchable: handled outside any batch
        else:
            assert err is not None and err["code"] == "unavailable", (method, err)
    assert store.list_tasks() == []


def test_requests_queued_when_we_close_the_connection_are_not_run(board, peer):
    """Closing a connection from our side (shutdown, a lagging subscriber) drops
    the requests it had queued: they would run -- tasks created, nobody told --
    and a client that retries would create them twice."""
    n = 3 * rpc.PUMP_BUDGET
    data = b"".join(pack([REQUEST, i, "task.create", [{"title": f"c{i}"}]])
                    for i in range(1, n + 1))

    async def main() -> int:
        conn, transport = make_connection(board, peer)
        conn.data_received(data)  # the first PUMP_BUDGET run now, the rest queue
        handled = len(transport.messages())
        assert 0 < handled < n and conn._backlog
        conn.close()
        for _ in range(50):
            await asyncio.sleep(0)
        assert conn._backlog == []
        return handled

    handled = asyncio.run(main())
    assert len(board.store.list_tasks()) == handled
