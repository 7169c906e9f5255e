"""Group commit and request batching.

Store level (in-process, no daemon): `Store.batch()` runs every write operation
as a savepoint of one transaction, commits once at the end and only then hands
the batch's events to `on_commit` listeners. An operation that fails inside it
rolls back alone; an exception escaping it, or SQLite dropping the whole
transaction, loses the batch. The `_Checkpointer` thread copies the WAL back
into the database file, and `close()` stops it.

Daemon level: the requests of one socket read that only touch the board share
one transaction, their answers go out after the commit, and a burst larger
than the per-step budget (PUMP_BUDGET) or than the answer high-water mark is
still answered in full.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import Kanband, RawConn, module_kanband, wait_for
from kanband import rpc
from kanband.errors import Conflict, NotFound, Unavailable
from kanband.protocol import pack
from kanband.store import AUTOCHECKPOINT_FALLBACK, Store


# -- store-level helpers -------------------------------------------------------------
class Recorder:
    """An on_commit listener: every call, with the events it was handed."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []

    def __call__(self, events: list[dict[str, Any]]) -> None:
        self.calls.append(list(events))

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for call in self.calls for e in call]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "b.db"


@pytest.fixture
def store(db_path: Path) -> Any:
    s = Store(db_path)
    s.rec = Recorder()  # type: ignore[attr-defined]
    s.on_commit(s.rec)  # type: ignore[attr-defined]
    yield s
    try:
        s.close()
    except sqlite3.ProgrammingError:
        pass  # a test closed it already


def create(s: Store, title: str, parents: list[str] | None = None, triage: bool = False,
           **fields: Any) -> dict[str, Any]:
    task, _ = s.create_task({"title": title, **fields}, parents or [], triage=triage,
                            now=time.time())
    return task


def ro_titles(path: Path) -> list[str]:
    """Task titles as an independent, read-only connection sees them (committed data)."""
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return sorted(r[0] for r in c.execute("SELECT title FROM tasks"))
    finally:
        c.close()


def add_temp_trigger(s: Store, sql: str) -> None:
    """Fault injection: a TEMP trigger lives only on the store's own connection."""
    s._db.execute(sql)


# -- Store.batch -----------------------------------------------------------------------
def test_batch_commits_once_and_publishes_after_the_commit(store, db_path):
    """Creates inside a batch are visible to the store at once, to another connection
    only after the batch, and their events reach listeners only after the commit,
    in order, exactly once."""
    first = create(store, "before")
    assert ro_titles(db_path) == ["before"]
    assert [e["task_id"] for e in store.rec.events] == [first["id"]]
    writes0, calls0 = store.writes, len(store.rec.calls)

    with store.batch() as b:
        made = [create(store, f"in-batch {i}") for i in range(5)]
        # The batch's own connection sees its writes...
        assert len(store.list_tasks()) == 6
        assert store.get_task(made[-1]["id"])["title"] == "in-batch 4"
        # ...nobody else does, and no listener has heard of them.
        assert ro_titles(db_path) == ["before"]
        assert len(store.rec.calls) == calls0
        assert store.writes == writes0
        assert b.writes == 5

    assert ro_titles(db_path) == sorted(["before"] + [f"in-batch {i}" for i in range(5)])
    assert store.writes == writes0 + 5
    new = store.rec.events[1:]
    assert [(e["kind"], e["task_id"]) for e in new] == [("created", t["id"]) for t in made]
    ids = [e["id"] for e in new]
    assert ids == sorted(ids) and len(set(ids)) == 5
    # Exactly the rows in the events table: nothing published twice or left out.
    assert [e["id"] for e in store.events(since=store.rec.events[0]["id"])] == ids


def test_failed_operation_rolls_back_alone(store, db_path):
    """Operations that raise inside a batch (a missing parent, a refused claim, an insert
    aborted after the task row was written, a link aborted after its event was
    written) leave no row and no event; every other operation of the batch commits."""
    add_temp_trigger(store, """
        CREATE TEMP TRIGGER poison AFTER INSERT ON main.events
        WHEN NEW.kind = 'created'
         AND (SELECT title FROM main.tasks WHERE id = NEW.task_id) = 'poison'
        BEGIN SELECT RAISE(ABORT, 'poisoned'); END""")
    add_temp_trigger(store, """
        CREATE TEMP TRIGGER poison_move BEFORE UPDATE OF status ON main.tasks
        WHEN OLD.title = 'stuck' BEGIN SELECT RAISE(ABORT, 'poisoned move'); END""")
    with store.batch() as b:
        a = create(store, "a")
        with pytest.raises(NotFound):
            create(store, "orphan", parents=["t_00000000"])
        tri = create(store, "triaged", triage=True)
        with pytest.raises(Conflict):  # triage is not ready: the claim is refused
            store.claim(tri["id"], claimer="me", profile=None, lease_ttl=None,
                        token_hash="x" * 64, now=time.time())
        with pytest.raises(sqlite3.IntegrityError, match="poisoned"):
            create(store, "poison")  # the tasks row is written, then its event aborts
        child = create(store, "child", parents=[a["id"]])  # a parent from this batch
        stuck = create(store, "stuck")
        with pytest.raises(sqlite3.IntegrityError, match="poisoned move"):
            store.link(child["id"], stuck["id"], now=time.time())  # link + event, then demote
        again = create(store, "keyed", idempotency_key="k1")
        same, created = store.create_task({"title": "keyed twice", "idempotency_key": "k1"},
                                          [], triage=False, now=time.time())
        assert b.writes == 6  # a, triaged, child, stuck, keyed, keyed-twice (found)

    assert ro_titles(db_path) == ["a", "child", "keyed", "stuck", "triaged"]
    assert store.parents(stuck["id"]) == [] and store.get_task(stuck["id"])["status"] == "ready"
    assert child["status"] == "todo" and store.get_task(child["id"])["status"] == "todo"
    assert store.parents(child["id"])[0]["id"] == a["id"]
    assert created is False and same["id"] == again["id"]
    assert store.get_task(tri["id"])["status"] == "triage"
    assert store.runs(tri["id"]) == []
    assert store.writes == 6
    assert [(e["kind"], e["task_id"]) for e in store.rec.events] == [
        ("created", a["id"]), ("created", tri["id"]), ("created", child["id"]),
        ("created", stuck["id"]), ("created", again["id"])]
    assert [e["id"] for e in store.events()] == [e["id"] for e in store.rec.events]


def test_one_request_batch_writes_without_a_savepoint_and_rolls_back_whole(store, db_path):
    """batch(single=True), as the RPC layer runs a lone request: its first write goes
    without SAVEPOINT/RELEASE. When that write fails after writing (the task row of a
    poisoned create, then its event aborts), the whole transaction rolls back: no row,
    no event, nothing published, the in-memory counts unchanged, and the batch ends
    without an error. A second write of the same batch gets a savepoint again, so
    its failure keeps the first."""
    add_temp_trigger(store, """
        CREATE TEMP TRIGGER poison AFTER INSERT ON main.events
        WHEN NEW.kind = 'created'
         AND (SELECT title FROM main.tasks WHERE id = NEW.task_id) = 'poison'
        BEGIN SELECT RAISE(ABORT, 'poisoned'); END""")
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    with store.batch(single=True) as b:
        ok = create(store, "ok")
    assert b.writes == 1 and ro_titles(db_path) == ["ok"]
    assert not any("SAVEPOINT" in q or "RELEASE" in q for q in seen), seen

    with store.batch(single=True) as b:
        with pytest.raises(sqlite3.IntegrityError, match="poisoned"):
            create(store, "poison")
        assert b.writes == 0
    assert ro_titles(db_path) == ["ok"]
    assert [e["task_id"] for e in store.rec.events] == [ok["id"]]
    assert store.counts_by_status() == {"ready": 1} and store.writes == 1

    seen.clear()
    with store.batch(single=True) as b:
        second = create(store, "second")
        with pytest.raises(sqlite3.IntegrityError, match="poisoned"):
            create(store, "poison")
    store._db.set_trace_callback(None)
    assert b.writes == 1 and any("SAVEPOINT" in q for q in seen)
    assert ro_titles(db_path) == ["ok", "second"]
    assert [e["task_id"] for e in store.rec.events] == [ok["id"], second["id"]]
    assert store.counts_by_status() == {"ready": 2}
    assert [e["task_id"] for e in store.events()] == [ok["id"], second["id"]]


def test_one_request_batch_keeps_savepoints_for_nested_writes(store, db_path):
    """A write nested in another write of a one-request batch still gets its own
    savepoint: when it fails and the outer write goes on, the outer write's rows
    before and after it commit together, and the nested one's do not."""
    add_temp_trigger(store, """
        CREATE TEMP TRIGGER poison AFTER INSERT ON main.events
        WHEN NEW.kind = 'created'
         AND (SELECT title FROM main.tasks WHERE id = NEW.task_id) = 'poison'
        BEGIN SELECT RAISE(ABORT, 'poisoned'); END""")
    with store.batch(single=True) as b:
        with store._tx() as db:  # the outer write: a row of its own, then a nested write
            db.execute("INSERT INTO meta(key, value) VALUES ('outer', 'before')")
            with pytest.raises(sqlite3.IntegrityError, match="poisoned"):
                create(store, "poison")
            create(store, "outer-after")
    assert b.failed is None
    assert ro_titles(db_path) == ["outer-after"]
    assert store.get_meta("outer") == "before"


class FailingRollback:
    """The store's connection, except that its first ROLLBACK statement fails."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.failed = False

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith("ROLLBACK") and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("disk I/O error (test)")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@pytest.mark.parametrize("single", [True, False])
def test_a_write_that_cannot_be_undone_loses_the_batch(store, db_path, single):
    """When rolling back a failed write itself fails, the batch must not commit
    the failed write's half: it raises `unavailable` and nothing of it is kept,
    whether the write had a savepoint (a batch of many) or not (a lone request)."""
    add_temp_trigger(store, """
        CREATE TEMP TRIGGER poison AFTER INSERT ON main.events
        WHEN NEW.kind = 'created'
         AND (SELECT title FROM main.tasks WHERE id = NEW.task_id) = 'poison'
        BEGIN SELECT RAISE(ABORT, 'poisoned'); END""")
    real = store._db
    store._db = proxy = FailingRollback(real)
    try:
        with pytest.raises(Unavailable, match="rollback failed"):
            with store.batch(single=single):
                if not single:
                    create(store, "before")
                with pytest.raises(Unavailable, match="rollback failed"):
                    create(store, "poison")
    finally:
        store._db = real
    assert proxy.failed, "no ROLLBACK was attempted"
    assert ro_titles(db_path) == []
    assert store.rec.events == [] and store.counts_by_status() == {}
    assert create(store, "after")["status"] == "ready"  # the store works on
    assert ro_titles(db_path) == ["after"]


def test_exception_escaping_the_batch_rolls_back_everything(store, db_path):
    """An exception out of the batch body loses the whole batch: no row, no event, no
    write counted; the store keeps working afterwards."""
    base = create(store, "base")
    writes0, calls0 = store.writes, len(store.rec.calls)
    with pytest.raises(ZeroDivisionError):
        with store.batch():
            create(store, "lost 1")
            create(store, "lost 2")
            1 / 0
    with pytest.raises(NotFound):
        with store.batch():
            create(store, "lost 3")
            create(store, "lost 4", parents=["t_00000000"])  # not caught: escapes
    assert ro_titles(db_path) == ["base"]
    assert [t["title"] for t in store.list_tasks()] == ["base"]
    assert store.writes == writes0 and len(store.rec.calls) == calls0
    assert [e["task_id"] for e in store.events()] == [base["id"]]
    assert not store._db.in_transaction
    after = create(store, "after")  # a plain transaction works, and publishes
    assert ro_titles(db_path) == ["after", "base"]
    assert store.rec.events[-1]["task_id"] == after["id"]
    with store.batch():  # and so does the next batch
        create(store, "next batch")
    assert "next batch" in ro_titles(db_path)


def test_batches_do_not_nest(store, db_path):
    """A batch inside a batch is refused with RuntimeError; the outer batch is unharmed."""
    with store.batch() as b:
        create(store, "outer 1")
        with pytest.raises(RuntimeError):
            with store.batch():
                create(store, "never")  # pragma: no cover - the with statement raises first
        create(store, "outer 2")
        assert b.writes == 2
    assert ro_titles(db_path) == ["outer 1", "outer 2"]
    assert [e["kind"] for e in store.rec.events] == ["created", "created"]


def test_empty_and_read_only_batches(store, db_path):
    """A batch that only reads commits nothing, counts no write and publishes nothing."""
    create(store, "x")
    writes0, calls0 = store.writes, len(store.rec.calls)
    with store.batch() as b:
        assert [t["title"] for t in store.list_tasks()] == ["x"]
        store.counts_by_status()
    assert b.writes == 0 and store.writes == writes0 and len(store.rec.calls) == calls0
    with store.batch() as b:
        pass
    assert b.writes == 0 and store.writes == writes0 and len(store.rec.calls) == calls0
    assert not store._db.in_transaction


def test_transaction_dropped_by_sqlite_loses_the_whole_batch(store, db_path):
    """When SQLite itself rolls back the batch's transaction (RAISE(ROLLBACK) stands in
    for an I/O error), later operations of the batch are refused, the batch ends with
    `unavailable`, and none of its writes is durable or published."""
    create(store, "kept")
    writes0, calls0 = store.writes, len(store.rec.calls)
    add_temp_trigger(store, """
        CREATE TEMP TRIGGER boom BEFORE INSERT ON main.tasks WHEN NEW.title = 'boom'
        BEGIN SELECT RAISE(ROLLBACK, 'boom'); END""")
    with pytest.raises(Unavailable):
        with store.batch() as b:
            create(store, "lost 1")
            create(store, "lost 2")
            with pytest.raises(sqlite3.DatabaseError):
                create(store, "boom")
            assert b.failed
            with pytest.raises(Unavailable):
                create(store, "lost 3")
    assert ro_titles(db_path) == ["kept"]
    assert store.writes == writes0 and len(store.rec.calls) == calls0
    assert not store._db.in_transaction
    after = create(store, "after")
    assert ro_titles(db_path) == ["after", "kept"]
    assert store.rec.events[-1]["task_id"] == after["id"]


def test_transaction_dropped_before_any_write_of_the_batch(store, db_path):
    """If SQLite drops the transaction before the batch wrote anything, nothing is lost:
    the failing operation fails and the rest of the batch commits."""
    add_temp_trigger(store, """
        CREATE TEMP TRIGGER boom BEFORE INSERT ON main.tasks WHEN NEW.title = 'boom'
        BEGIN SELECT RAISE(ROLLBACK, 'boom'); END""")
    with store.batch() as b:
        with pytest.raises(sqlite3.DatabaseError):
            create(store, "boom")
        t = create(store, "survivor")
        assert b.writes == 1 and not b.failed
    assert ro_titles(db_path) == ["survivor"]
    assert [e["task_id"] for e in store.rec.events] == [t["id"]]


# -- the checkpointer ------------------------------------------------------------------
def titles_in_main_file(path: Path, scratch: Path) -> int:
    """How many tasks the main database file holds on its own, without its -wal:
    a copy of just that file, opened elsewhere. Raises while the copy is unusable
    (no tasks table yet, or torn mid-checkpoint)."""
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{scratch}{suffix}")
        except FileNotFoundError:
            pass
    shutil.copyfile(path, scratch)
    c = sqlite3.connect(scratch)
    try:
        return c.execute("SELECT count(*) FROM tasks").fetchone()[0]
    finally:
        c.close()


def test_checkpointer_moves_the_wal_into_the_database(tmp_path):
    """After writes, the checkpoint thread copies them from the WAL into the database
    file (the inline autocheckpoint is raised out of the way), and does it again after
    later writes."""
    scratch = tmp_path / "copy.db"
    # Control: without the thread, a handful of writes stays in the WAL.
    plain = Store(tmp_path / "plain.db")
    try:
        for i in range(20):
            create(plain, f"p{i}")
        try:
            n = titles_in_main_file(tmp_path / "plain.db", scratch)
        except sqlite3.Error:
            n = 0
        assert n == 0, "the control store checkpointed on its own"
    finally:
        plain.close()

    path = tmp_path / "b.db"
    s = Store(path)
    try:
        s.start_checkpointer()
        assert s._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == AUTOCHECKPOINT_FALLBACK
        for i in range(150):
            create(s, f"single {i}")
        with s.batch():
            for i in range(150):
                create(s, f"batched {i}")

        def in_main(n: int) -> Any:
            return titles_in_main_file(path, scratch) == n

        wait_for(lambda: in_main(300), 10.0, "300 tasks in the main database file")
        for i in range(40):
            create(s, f"later {i}")
        wait_for(lambda: in_main(340), 10.0, "340 tasks in the main database file")
        assert s._ckpt is not None and s._ckpt.failures == 0
    finally:
        s.close()


def test_close_stops_the_checkpointer(tmp_path):
    """close() ends the thread, whether it is idle or has a checkpoint pending;
    start_checkpointer() twice keeps one thread."""
    idle = Store(tmp_path / "idle.db")
    idle.start_checkpointer()
    t = idle._ckpt
    assert t is not None and t.is_alive()
    idle.start_checkpointer()
    assert idle._ckpt is t
    idle.close()
    assert not t.is_alive() and idle._ckpt is None

    busy = Store(tmp_path / "busy.db")
    busy.start_checkpointer(delay=0.5)
    t = busy._ckpt
    assert t is not None
    for i in range(10):
        create(busy, f"t{i}")
    busy.close()  # the thread is most likely mid-delay, a checkpoint pending
    assert not t.is_alive()
    again = Store(tmp_path / "busy.db")  # nothing was lost on the way out
    try:
        assert len(again.list_tasks()) == 10
    finally:
        again.close()


# -- through a real daemon -------------------------------------------------------------
@pytest.fixture(scope="module")
def bkd() -> Any:
    yield from module_kanband(prefix="kbb")


def frames(reqs: list[tuple[int, str, dict[str, Any]]]) -> bytes:
    return b"".join(pack([0, msgid, method, [params]]) for msgid, method, params in reqs)


def read_answers(c: RawConn, n: int) -> dict[int, tuple[Any, Any]]:
    """n responses by msgid (notifications are skipped); each msgid answered once."""
    got: dict[int, tuple[Any, Any]] = {}
    while len(got) < n:
        msg = c.read()
        if msg[0] != 1:
            continue
        _, msgid, error, result = msg
        assert msgid not in got, f"msgid {msgid} answered twice"
        got[msgid] = (error, result)
    return got


def titles_with(k: Kanband, prefix: str) -> list[str]:
    return sorted(t["title"] for t in k.call("task.list", archived=True)["tasks"]
                  if t["title"].startswith(prefix))


class CountingSocket:
    """A client socket that counts its writes (socket objects take no new attributes)."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.writes = 0

    def sendall(self, data: bytes) -> None:
        self.writes += 1
        self.sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_call_many_sends_its_requests_in_one_write(bkd):
    """Client.call_many writes all its requests at once (so kanband reads them
    together and commits them as one group), and still pairs every answer, errors
    included, with its request in order."""
    tag = f"many-{uuid.uuid4().hex[:8]} "
    c = bkd.client()
    try:
        c.call("system.ping")
        counting = CountingSocket(c._sock)
        c._sock = counting
        calls = [("task.create", {"title": f"{tag}{i}"}) for i in range(40)]
        calls.insert(20, ("task.show", {"id": "t_00000000"}))
        out = c.call_many(calls)
        c._sock = counting.sock
    finally:
        c.close()
    assert counting.writes == 1
    assert isinstance(out[20], NotFound)
    made = [r["task"]["title"] for i, r in enumerate(out) if i != 20]
    assert made == [f"{tag}{i}" for i in range(40)]
    assert titles_with(bkd, tag) == sorted(made)


def test_burst_of_creates_is_answered_after_it_is_durable(bkd):
    """200 creates in one write: each answered once under its msgid with a distinct
    task, every answered task already visible to an independent reader, all listed."""
    tag = f"burst-{uuid.uuid4().hex[:8]} "
    reqs = [(10_000 + i, "task.create", {"title": f"{tag}{i}"}) for i in range(200)]
    ro = sqlite3.connect(f"file:{bkd.home / 'kanban.db'}?mode=ro", uri=True)
    got: dict[int, tuple[Any, Any]] = {}
    try:
        with RawConn(bkd.socket) as c:
            c.send_bytes(frames(reqs))
            while len(got) < len(reqs):
                kind, msgid, error, result = c.read()
                assert kind == 1 and msgid not in got
                got[msgid] = (error, result)
                assert error is None, (msgid, error)
                tid = result["task"]["id"]
                row = ro.execute("SELECT title FROM tasks WHERE id = ?", (tid,)).fetchone()
                assert row is not None, f"{tid} was answered before it was committed"
    finally:
        ro.close()
    assert set(got) == {m for m, _, _ in reqs}
    for msgid, method, params in reqs:
        error, result = got[msgid]
        assert result["created"] is True and result["task"]["title"] == params["title"]
    ids = [got[m][1]["task"]["id"] for m, _, _ in reqs]
    assert len(set(ids)) == len(ids)
    assert titles_with(bkd, tag) == sorted(p["title"] for _, _, p in reqs)


def test_failures_inside_a_burst_stay_local(bkd):
    """A burst mixing creates with failing and non-batchable requests: each failure gets
    its own error under its msgid, every other request succeeds and persists."""
    tag = f"mixed-{uuid.uuid4().hex[:8]} "
    key = f"key-{uuid.uuid4().hex}"
    reqs: list[tuple[int, str, dict[str, Any]]] = []
    want: dict[int, str | None] = {}  # msgid -> expected error code (None: a created task)
    for i in range(40):
        msgid = 500 + i
        if i == 8:
            reqs.append((msgid, "task.create", {"title": f"{tag}orphan", "parents": ["t_00000000"]}))
            want[msgid] = "not_found"
        elif i == 14:
            reqs.append((msgid, "task.nope", {}))
            want[msgid] = "method_not_found"
        elif i == 20:
            reqs.append((msgid, "task.complete", {"id": "t_00000000"}))
            want[msgid] = "not_found"
        elif i == 26:
            reqs.append((msgid, "task.create", {"body": "no title"}))
            want[msgid] = "invalid_argument"
        elif i == 30:
            reqs.append((msgid, "task.show", {"id": "t_00000000"}))
            want[msgid] = "not_found"
        elif i == 33:
            reqs.append((msgid, "system.ping", {}))
            want[msgid] = "pong"
        elif i in (35, 36):
            reqs.append((msgid, "task.create", {"title": f"{tag}keyed {i}",
                                                "idempotency_key": key}))
            want[msgid] = "keyed"
        else:
            reqs.append((msgid, "task.create", {"title": f"{tag}{i}"}))
            want[msgid] = None
    with RawConn(bkd.socket) as c:
        c.send_bytes(frames(reqs))
        got = read_answers(c, len(reqs))
    assert set(got) == set(want)
    params_of = {m: p for m, _, p in reqs}
    for msgid, code in want.items():
        error, result = got[msgid]
        if code == "pong":
            assert error is None and result["pong"] is True
        elif code == "keyed":
            assert error is None, error
        elif code is None:
            assert error is None, (msgid, error)
            assert result["task"]["title"] == params_of[msgid]["title"]
            assert result["created"] is True
        else:
            assert result is None and error["code"] == code, (msgid, error)
    k1, k2 = got[535][1], got[536][1]
    assert k1["created"] is True and k2["created"] is False
    assert k1["task"]["id"] == k2["task"]["id"]
    expected = sorted([params_of[m]["title"] for m, c in want.items() if c is None]
                      + [f"{tag}keyed 35"])
    assert titles_with(bkd, tag) == expected


def test_subscriber_gets_the_created_events_of_a_burst(bkd):
    """A live events.subscribe sees one `created` event per task of a burst, in order."""
    tag = f"sub-{uuid.uuid4().hex[:8]} "
    with bkd.client(timeout=15.0) as sub:
        r = sub.call("events.subscribe", {"kinds": ["created"]})
        reqs = [(i + 1, "task.create", {"title": f"{tag}{i}"}) for i in range(60)]
        with RawConn(bkd.socket) as c:
            c.send_bytes(frames(reqs))
            got = read_answers(c, len(reqs))
        assert all(e is None for e, _ in got.values())
        want = {res["task"]["id"] for _, res in got.values()}
        seen: list[dict[str, Any]] = []
        while {e["task_id"] for e in seen} & want != want:
            method, params = sub.next_notification()
            if method == "event" and params["task_id"] in want:
                assert params["kind"] == "created" and params["subscription"] == r["subscription"]
                seen.append(params)
    assert len(seen) == len(want), "an event was delivered twice"
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids)
    by_task = {e["task_id"]: e["id"] for e in seen}
    order = [got[m][1]["task"]["id"] for m, _, _ in reqs]
    assert [by_task[t] for t in order] == sorted(by_task.values())


def test_burst_larger_than_the_pump_budget(bkd):
    """1,500 pipelined requests in one write (about three PUMP_BUDGETs, with
    non-batchable requests among them) are all answered; the creates persist; another
    client is served meanwhile."""
    assert 1500 > 2 * rpc.PUMP_BUDGET
    tag = f"big-{uuid.uuid4().hex[:8]} "
    reqs = [(i, "system.ping", {}) if i % 400 == 399 else (i, "task.create", {"title": f"{tag}{i}"})
            for i in range(1500)]
    with RawConn(bkd.socket, timeout=30.0) as c:
        c.send_bytes(frames(reqs))
        bkd.call("system.ping")  # another connection still gets its turn
        got = read_answers(c, len(reqs))
    assert set(got) == set(range(1500))
    assert all(error is None for error, _ in got.values())
    ids = {res["task"]["id"] for m, (_, res) in got.items() if m % 400 != 399}
    assert len(ids) == 1500 - 3
    assert len(titles_with(bkd, tag)) == 1500 - 3


def test_big_answers_cross_the_high_water_mark(bkd):
    """Pipelined reads whose answers add up to several times WRITE_HIGH_WATER: the
    batch stops early, the daemon waits for the client to read, and every answer
    arrives whole and correct."""
    tenant = f"hw{uuid.uuid4().hex[:8]}"
    body = "x" * 16_000
    with bkd.client(timeout=15.0) as cl:
        made = cl.call_many([("task.create", {"title": f"hw {i}", "body": body,
                                              "tenant": tenant}) for i in range(20)])
    assert not [m for m in made if isinstance(m, Exception)]
    n = 24  # ~320 KB per answer, ~7.5 MB in all
    reqs = [(i, "task.list", {"tenant": tenant}) for i in range(n)]
    reqs.insert(12, (999, "task.create", {"title": "hw mid", "tenant": tenant}))
    with RawConn(bkd.socket, timeout=30.0) as c:
        c.send_bytes(frames(reqs))
        got = read_answers(c, len(reqs))
    assert sum(len(pack(r)) for _, r in got.values()) > 4 * rpc.WRITE_HIGH_WATER
    assert got[999][0] is None and got[999][1]["created"] is True
    for i in range(n):
        error, result = got[i]
        assert error is None
        tasks = result["tasks"]
        assert len(tasks) in (20, 21) and all(t["tenant"] == tenant for t in tasks)
        assert all(t["body"] == body for t in tasks if t["title"] != "hw mid")
        assert len(tasks) == (20 if i < 12 else 21), (i, len(tasks))


def test_failed_group_commit_answers_every_write_with_an_error(kd):
    """When SQLite drops the daemon's batch transaction (a trigger added to the
    database stands in for an I/O error), no write of the burst is answered as a
    success nor persisted nor published, and the daemon keeps serving."""
    tag = f"gc-{uuid.uuid4().hex[:8]} "
    db = sqlite3.connect(kd.home / "kanban.db")
    try:
        db.execute("CREATE TRIGGER boom BEFORE INSERT ON tasks WHEN NEW.title = 'boom'"
                   " BEGIN SELECT RAISE(ROLLBACK, 'boom'); END")
        db.commit()
    finally:
        db.close()
    with kd.client(timeout=15.0) as sub:
        sub.call("events.subscribe", {"kinds": ["created"]})
        reqs = [(1, "task.create", {"title": f"{tag}1"}), (2, "task.create", {"title": f"{tag}2"}),
                (3, "task.create", {"title": "boom"}), (4, "task.create", {"title": f"{tag}4"})]
        with RawConn(kd.socket) as c:
            c.send_bytes(frames(reqs))
            got = read_answers(c, len(reqs))
        for msgid in (1, 2, 4):
            error, result = got[msgid]
            assert result is None and error["code"] == "unavailable", (msgid, error)
        assert got[3][1] is None and got[3][0] is not None
        assert titles_with(kd, tag) == []
        sentinel = kd.create(f"{tag}sentinel")  # the daemon still writes
        while True:
            method, params = sub.next_notification()
            if method == "event":
                # No event of the lost burst may come before the sentinel's.
                assert params["task_id"] == sentinel["id"], params
                break
    assert titles_with(kd, tag) == [f"{tag}sentinel"]


def test_bad_msgid_inside_a_batchable_burst(kd):
    """The frames before a bad one are answered (and only they ran); the
    connection then ends with the error."""
    with RawConn(kd.socket, timeout=5) as c:
        c.send_bytes(pack([0, 1, "task.create", [{"title": "A"}]])
                     + pack([0, -1, "task.create", [{"title": "B"}]])
                     + pack([0, 3, "task.create", [{"title": "C"}]]))
        msgs = c.read_until_eof()
    titles = sorted(t["title"] for t in kd.call("task.list")["tasks"])
    assert [m[:2] for m in msgs] == [[1, 1], [2, "error"]], (msgs, titles)
    assert titles == ["A"], titles


def test_read_in_a_failed_group_commit_sees_no_lost_writes(kd):
    """When the group commit fails, reads of the batch (which saw its writes)
    get the error too: no answer shows a row that does not exist."""
    db = sqlite3.connect(kd.home / "kanban.db")
    db.execute("CREATE TRIGGER boom BEFORE INSERT ON tasks WHEN NEW.title = 'boom'"
               " BEGIN SELECT RAISE(ROLLBACK, 'boom'); END")
    db.commit()
    db.close()
    with RawConn(kd.socket) as c:
        c.send_bytes(pack([0, 1, "task.create", [{"title": "ghost"}]])
                     + pack([0, 2, "task.list", [{}]])
                     + pack([0, 3, "task.create", [{"title": "boom"}]]))
        got = {m[1]: m for m in (c.read() for _ in range(3))}
    assert got[1][2]["code"] == "unavailable"
    assert got[2][2]["code"] == "unavailable", got[2]
    assert kd.call("task.list")["tasks"] == []


def test_bool_type_field_is_not_a_request(kd):
    """[False, 0, ...] is not a request although False == 0 in Python: the daemon
    says why in an `error` notification and closes, answering nothing."""
    with RawConn(kd.socket, timeout=5) as c:
        c.send_bytes(pack([False, 0, "system.ping", [{}]]))
        msgs = c.read_until_eof()
    assert [m[:2] for m in msgs] == [[2, "error"]], msgs
    assert msgs[0][2][0]["code"] == "invalid_argument"


def test_batch_whose_transaction_vanished_reports_its_writes_lost(store, db_path):
    """If SQLite drops the batch's transaction on its own after a write (emulated
    here with a ROLLBACK behind the store's back), the batch must not report
    success, publish events or count the lost rows -- nor start a fresh
    transaction for the next write as if nothing had happened."""
    with pytest.raises(Unavailable):
        with store.batch():
            store.create_task({"title": "lost"}, [], triage=False, now=1.0)
            store._db.execute("ROLLBACK")
            with pytest.raises(Unavailable):
                store.create_task({"title": "after"}, [], triage=False, now=2.0)
    assert store.rec.events == []
    assert store.counts_by_status() == {} and store.event_count() == 0
    assert store.list_tasks() == []
    t, _ = store.create_task({"title": "fine"}, [], triage=False, now=3.0)
    assert [x["id"] for x in store.list_tasks()] == [t["id"]]


def test_taken_task_and_run_ids_are_drawn_again(store, monkeypatch):
    """Ids are 32 random bits, so a large board meets taken ones: create_task and
    claim draw again instead of failing (a claim used to raise IntegrityError out
    of the dispatch pass)."""
    import kanband.store as store_mod
    first = create(store, "first")
    token = "h" * 64
    run = store.claim(first["id"], claimer="me", profile=None, lease_ttl=None,
                      token_hash=token, now=time.time())
    drawn: list[str] = []
    queue = {"t_": [first["id"], first["id"], "t_00000001"], "r_": [run["id"], "r_00000002"]}

    def fake_new_id(prefix: str) -> str:
        drawn.append(prefix)
        return queue[prefix].pop(0)
    monkeypatch.setattr(store_mod, "new_id", fake_new_id)
    second = create(store, "second")
    assert second["id"] == "t_00000001"
    run2 = store.claim(second["id"], claimer="me", profile=None, lease_ttl=None,
                       token_hash="i" * 64, now=time.time())
    assert run2["id"] == "r_00000002"
    assert drawn == ["t_", "t_", "t_", "r_", "r_"]
    assert store.get_task(second["id"])["status"] == "running"
    assert [r["id"] for r in store.runs(first["id"])] == [run["id"]]
