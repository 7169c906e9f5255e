"""The board's storage: the only module that speaks SQL (SPEC §2, §3, §7).

One method per domain operation, one transaction each. Every status change
goes through `_move()`, which asks `states` and updates with
`WHERE id=? AND status=?`, and every change writes its event(s) inside the
same transaction. Listeners registered with `on_commit` see the events after
they are durable.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from kanband import states
from kanband.errors import Conflict, InvalidArgument, NotFound, Unavailable

SCHEMA_VERSION = 3
APPLICATION_ID = 0x4B4E4244  # "KNBD": refuse foreign SQLite files

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        body TEXT NOT NULL DEFAULT '',
        assignee TEXT,
        status TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        tenant TEXT,
        workspace_kind TEXT NOT NULL DEFAULT 'scratch',
        workspace_path TEXT,
        created_by TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        completed_at REAL,
        result TEXT,
        skills TEXT NOT NULL DEFAULT '[]',
        idempotency_key TEXT,
        max_runtime_seconds REAL,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        last_failure_error TEXT,
        not_before REAL,
        current_run_id TEXT
    );
    CREATE UNIQUE INDEX tasks_idempotency ON tasks(idempotency_key)
        WHERE idempotency_key IS NOT NULL AND status != 'archived';
    CREATE INDEX tasks_status_order ON tasks(status, priority DESC, created_at);
    CREATE INDEX tasks_assignee ON tasks(assignee, status);
    CREATE INDEX tasks_tenant ON tasks(tenant, status);

    CREATE TABLE task_links (
        parent_id TEXT NOT NULL REFERENCES tasks(id),
        child_id TEXT NOT NULL REFERENCES tasks(id),
        PRIMARY KEY (parent_id, child_id),
        CHECK (parent_id != child_id)
    ) WITHOUT ROWID;
    CREATE INDEX task_links_child ON task_links(child_id, parent_id);

    CREATE TABLE comments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL REFERENCES tasks(id),
        author TEXT,
        body TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX comments_task ON comments(task_id, id);

    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT,
        run_id TEXT,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    CREATE INDEX events_task ON events(task_id, id);

    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks(id),
        profile TEXT,
        claimer TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        outcome TEXT,
        summary TEXT,
        error TEXT,
        metadata TEXT,
        worker_pid INTEGER,
        worker_start_time REAL,
        exit_code INTEGER,
        signal INTEGER,
        lease_expires REAL,
        lease_ttl REAL,
        last_heartbeat_at REAL,
        heartbeat_note TEXT,
        token_hash TEXT
    );
    CREATE INDEX runs_task ON runs(task_id, started_at);
    CREATE UNIQUE INDEX runs_token ON runs(token_hash) WHERE token_hash IS NOT NULL;
    CREATE INDEX runs_active ON runs(outcome, lease_expires);

    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );

    CREATE TABLE notify_subs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL REFERENCES tasks(id),
        platform TEXT NOT NULL,
        chat_id TEXT,
        thread_id TEXT,
        user_id TEXT,
        created_at REAL NOT NULL,
        last_event_id INTEGER NOT NULL DEFAULT 0
    );
    """,
    # Dispatch order without walking every ready row; "recent work of the same
    # assignee" without sorting its whole history; the log offset on the run.
    2: """
    CREATE INDEX tasks_dispatch ON tasks(status, assignee, priority DESC, created_at, id);
    CREATE INDEX tasks_assignee_completed ON tasks(assignee, completed_at)
        WHERE completed_at IS NOT NULL;
    ALTER TABLE runs ADD COLUMN log_offset INTEGER;
    """,
    # Fewer B-tree pages written per change (each is a WAL frame at commit):
    # tasks_dispatch serves every status (and status + assignee) lookup that
    # tasks_status_order and tasks_assignee did -- the list order is then a sort
    # of the matching rows, and the counts live in memory; tenant is indexed only
    # where set; event ids no longer need AUTOINCREMENT's sqlite_sequence row
    # (gc never deletes the newest event, so an id is never handed out twice).
    3: """
    DROP INDEX tasks_status_order;
    DROP INDEX tasks_assignee;
    DROP INDEX tasks_tenant;
    CREATE INDEX tasks_tenant ON tasks(tenant, status) WHERE tenant IS NOT NULL;
    CREATE TABLE events_v3 (
        id INTEGER PRIMARY KEY,
        task_id TEXT,
        run_id TEXT,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    INSERT INTO events_v3(id, task_id, run_id, kind, payload, created_at)
        SELECT id, task_id, run_id, kind, payload, created_at FROM events ORDER BY id;
    INSERT INTO events_v3(id, task_id, run_id, kind, payload, created_at)
        SELECT seq, NULL, NULL, 'schema_upgraded', '{"version":3}',
               (julianday('now') - 2440587.5) * 86400.0
        FROM sqlite_sequence WHERE name = 'events'
        AND seq > (SELECT coalesce(max(id), 0) FROM events);
    DROP TABLE events;
    ALTER TABLE events_v3 RENAME TO events;
    CREATE INDEX events_task ON events(task_id, id);
    """,
}

TASK_FIELDS = (
    "id", "title", "body", "assignee", "status", "priority", "tenant", "workspace_kind",
    "workspace_path", "created_by", "created_at", "started_at", "completed_at", "result",
    "skills", "idempotency_key", "max_runtime_seconds", "consecutive_failures",
    "last_failure_error", "not_before", "current_run_id")
RUN_FIELDS = (
    "id", "task_id", "profile", "claimer", "outcome", "started_at", "ended_at", "summary",
    "error", "metadata", "worker_pid", "exit_code", "signal")

_TASK_COLUMNS = (*TASK_FIELDS, "worker_pid", "lease_expires", "last_heartbeat_at")
_COMMENT_COLUMNS = ("id", "task_id", "author", "body", "created_at")
_COMMENTS = "SELECT " + ", ".join(_COMMENT_COLUMNS) + " FROM comments WHERE task_id = ?"
_TASK_COLS = (
    ", ".join(f"t.{f}" for f in TASK_FIELDS)
    + ", r.worker_pid AS worker_pid, r.lease_expires AS lease_expires,"
    " r.last_heartbeat_at AS last_heartbeat_at")
_RUN_JOIN = " LEFT JOIN runs r ON r.id = t.current_run_id AND r.outcome IS NULL"
_TASK_SELECT = "SELECT " + _TASK_COLS + " FROM tasks t" + _RUN_JOIN
# A task (side 0), its parents (1) and its children (2), each group by created_at.
_FAMILY = (
    "SELECT " + _TASK_COLS + ", 0 AS side FROM tasks t" + _RUN_JOIN + " WHERE t.id = ? UNION ALL"
    " SELECT " + _TASK_COLS + ", 1 AS side FROM task_links l JOIN tasks t ON t.id = l.parent_id"
    + _RUN_JOIN + " WHERE l.child_id = ? UNION ALL"
    " SELECT " + _TASK_COLS + ", 2 AS side FROM task_links l JOIN tasks t ON t.id = l.child_id"
    + _RUN_JOIN + " WHERE l.parent_id = ? ORDER BY side, created_at")

Event = dict[str, Any]
# json.dumps with any non-default argument builds a new encoder on every call
# (1.3 us of the 4 an event payload costs); one encoder serves every event.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


# Task and run ids must be unique, not secret (run tokens come from `secrets`):
# a generator seeded from os.urandom makes them without a getrandom(2) call
# each, which showed as 5-9 % of the daemon's time under pipelined creates.
# create_task and claim draw again when an id is taken; a forked child reseeds.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_id(prefix: str) -> str:
    return f"{prefix}{_ids.getrandbits(32):08x}"


def _insert_new_id(prefix: str, column: str, insert: Callable[[str], object]) -> str:
    """Run `insert(id)` with a fresh id, drawing again while `column` (e.g.
    "tasks.id") says the id is taken -- ids are 32 random bits, and a large
    board meets taken ones. Any other IntegrityError is the caller's."""
    for _ in range(8):
        new = new_id(prefix)
        try:
            insert(new)
            return new
        except sqlite3.IntegrityError as e:
            if column not in str(e):
                raise
    raise Conflict(f"could not allocate an id for {column}")  # pragma: no cover - 8 in a row


def _first_line(text: str | None, limit: int = 400) -> str | None:
    if not text:
        return text
    return text.strip().splitlines()[0][:limit] if text.strip() else ""


AUTOCHECKPOINT_FALLBACK = 16384  # pages (64 MiB of WAL) before a commit checkpoints inline


class _Checkpointer(threading.Thread):
    """See Store.start_checkpointer."""

    def __init__(self, path: str, delay: float) -> None:
        super().__init__(name="kanband-checkpoint", daemon=True)
        self.path = path
        self.delay = delay
        self.due = threading.Event()
        self.stopping = False
        self.failures = 0

    def run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=0")
            while not self.stopping:
                self.due.wait()
                if self.stopping:
                    return
                time.sleep(self.delay)  # let a burst of writes finish first
                self.due.clear()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    self.failures += 1  # the next write retries; the inline fallback remains
        finally:
            db.close()

    def stop(self) -> None:
        self.stopping = True
        self.due.set()
        self.join(5.0)


class Batch:
    """State of one group commit (see Store.batch)."""

    def __init__(self, single: bool = False) -> None:
        self.writes = 0  # operations whose savepoint was released
        self.failed: str | None = None  # set when SQLite dropped the transaction
        self.single = single  # one request: its first write needs no savepoint
        self.depth = 0  # savepoints open (writes nested in writes)


class Store:
    """The board in SQLite. Not thread-safe: kanband calls it from one thread."""

    def __init__(self, path: Path | str, durability: str = "normal") -> None:
        self.path = str(path)
        self._listeners: list[Callable[[list[Event]], None]] = []
        self._pending: list[Event] = []
        self._batch: Batch | None = None
        self._ckpt: _Checkpointer | None = None
        # Called before every transaction begins: the supervisor writes the spawn
        # records it holds back, so they always precede later changes of a run.
        self.before_write: Callable[[], None] | None = None
        self._hooking = False
        self.writes = 0  # committed write transactions (a batch counts its operations)
        self._db = self._open(durability)
        # Counts kept in memory so stats and status are O(1) in board size: loaded
        # once here, then changed only by the writes that change them (create_task,
        # _move, assign, _emit, gc_events). Changes of the open transaction wait in
        # _delta and are dropped with it on rollback.
        self._counts: dict[tuple[str | None, str], int] = {
            (a, st): n for a, st, n in self._db.execute(
                "SELECT assignee, status, count(*) FROM tasks GROUP BY assignee, status")}
        self._events = self._db.execute("SELECT count(*) FROM events").fetchone()[0]
        self._delta: list[tuple[tuple[str | None, str] | None, int]] = []

    # -- setup -------------------------------------------------------------
    def _open(self, durability: str) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        except sqlite3.OperationalError as e:  # the file may be fine: say what failed
            name = getattr(e, "sqlite_errorname", "") or ""
            hint = (" -- is the disk full? SQLite needs room for its -wal and -shm files"
                    if "IOERR" in name or "FULL" in name else "")
            raise Unavailable(f"{self.path}: cannot open the database: {e}"
                              f"{f' ({name})' if name else ''}{hint}") from None
        except sqlite3.DatabaseError as e:
            raise Unavailable(f"{self.path}: not a kanband database ({e})") from None
        if tables and app_id != APPLICATION_ID:
            raise Unavailable(f"{self.path}: not a kanband database (foreign SQLite file)")
        if version > SCHEMA_VERSION:
            raise Unavailable(f"{self.path}: schema version {version} is newer than this "
                              f"kanband understands ({SCHEMA_VERSION}); upgrade kanband")
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise Unavailable(f"{self.path}: database failed its integrity check: {check}")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                db.execute("BEGIN IMMEDIATE")
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={v}")
                db.execute("COMMIT")
            if version == 0 and SCHEMA_VERSION > 1:
                db.execute("VACUUM")  # a new board: drop the pages later migrations freed
        except sqlite3.DatabaseError as e:  # damaged pages make the pragmas raise
            db.close()
            raise Unavailable(f"{self.path}: database failed its integrity check: {e}") from None
        except Unavailable:
            db.close()
            raise
        return db

    def backup(self, target: str) -> dict[str, Any]:
        """A consistent online copy through SQLite's backup API, written to a
        temporary file beside `target` and renamed into place."""
        import os
        tmp = f"{target}.tmp-{os.getpid()}"
        try:
            dst = sqlite3.connect(tmp)
            try:
                self._db.backup(dst)  # one step: no sleeps between pages on the loop
                dst.execute("PRAGMA journal_mode=DELETE")
                check = dst.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                dst.close()
            if check != "ok":
                raise sqlite3.DatabaseError(f"the copy failed its integrity check: {check}")
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        except (sqlite3.Error, OSError) as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise Unavailable(f"backup to {target} failed: {e}") from None
        return {"path": target, "bytes": os.path.getsize(target),
                "tasks": sum(self.counts_by_status().values()), "event_head": self.event_head()}

    # -- checkpoints ---------------------------------------------------------
    def start_checkpointer(self, delay: float = 0.2) -> None:
        """Move WAL checkpoints off the calling thread.

        A checkpoint copies the WAL back into the database and, with
        synchronous=NORMAL, is where SQLite fsyncs. Run inline (SQLite's
        autocheckpoint, every 1000 pages) it stalls whichever commit crosses the
        threshold -- on this daemon, the event loop. Here a thread with its own
        connection runs a PASSIVE checkpoint `delay` seconds after writes, which
        never blocks the writer. The inline autocheckpoint stays on at a much
        higher threshold, in case this thread cannot keep up or has failed."""
        if self._ckpt is not None:
            return
        self._db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_FALLBACK}")
        self._ckpt = _Checkpointer(self.path, delay)
        self._ckpt.start()

    def _wrote(self) -> None:
        ck = self._ckpt
        if ck is not None and not ck.due.is_set():
            ck.due.set()

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.stop()
            self._ckpt = None
        try:
            self._db.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass
        self._db.close()

    def on_commit(self, fn: Callable[[list[Event]], None]) -> None:
        self._listeners.append(fn)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction. A storage failure (disk full, I/O error) rolls back and
        becomes `unavailable`: the client gets a clear error, nothing half-done.
        Inside `batch()` it is a savepoint of the batch's one transaction."""
        if self._batch is not None:
            with self._savepoint(self._batch):
                yield self._db
            return
        self._before_write()
        self._pending = []
        self._delta = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            self._pending, self._delta = [], []
            raise self._unwritable(e) from None
        except BaseException:
            self._pending, self._delta = [], []
            raise
        self._apply_delta()
        self.writes += 1
        self._wrote()
        self._publish()

    def _unwritable(self, why: object) -> Unavailable:
        return Unavailable(f"the board could not be written: {why} (database {self.path})")

    def _apply_delta(self) -> None:
        delta, self._delta = self._delta, []
        for key, n in delta:
            if key is None:
                self._events += n
            else:
                self._counts[key] = self._counts.get(key, 0) + n

    def _before_write(self) -> None:
        """Run the `before_write` hook (not re-entered from inside itself)."""
        hook = self.before_write
        if hook is None or self._hooking:
            return
        self._hooking = True
        try:
            hook()
        finally:
            self._hooking = False

    def _publish(self) -> None:
        events, self._pending = self._pending, []
        if events:
            for fn in self._listeners:
                fn(events)

    @contextmanager
    def _savepoint(self, b: "Batch") -> Iterator[None]:
        if b.failed:
            raise self._unwritable(b.failed)
        mark, dmark = len(self._pending), len(self._delta)
        if not self._db.in_transaction and b.writes:
            # SQLite rolled the batch's transaction back on its own (an I/O error
            # in a read, say): the writes before are gone. Never start afresh.
            b.failed = "the transaction was rolled back"
            raise self._unwritable(b.failed)
        # The first write of a one-request batch has nothing before it to keep:
        # the transaction is its savepoint, and a failure rolls all of it back.
        # Not for a write nested in another (the outer one's work is before it).
        whole = b.single and not b.writes and not b.depth
        b.depth += 1
        try:
            if not self._db.in_transaction:
                self._db.execute("BEGIN IMMEDIATE")
            if not whole:
                self._db.execute("SAVEPOINT op")
            try:
                yield
                if not whole:
                    self._db.execute("RELEASE op")
            except BaseException:
                del self._pending[mark:]
                del self._delta[dmark:]
                if self._db.in_transaction:
                    try:
                        if whole:
                            self._db.execute("ROLLBACK")
                        else:
                            self._db.execute("ROLLBACK TO op")
                            self._db.execute("RELEASE op")
                    except sqlite3.Error as e:  # never commit what could not be undone
                        b.failed = f"rollback failed: {e}"
                        raise self._unwritable(b.failed) from None
                elif b.writes:  # SQLite rolled the whole transaction back (I/O error)
                    b.failed = "the transaction was rolled back"
                raise
        except sqlite3.OperationalError as e:
            if not self._db.in_transaction and b.writes:
                b.failed = str(e)
            raise self._unwritable(e) from None
        finally:
            b.depth -= 1
        b.writes += 1

    @contextmanager
    def batch(self, single: bool = False) -> Iterator["Batch"]:
        """Group commit: every `_tx` inside becomes a savepoint of one transaction,
        committed (and its events published) at the end. Reads inside share that
        transaction too: one snapshot, and one round of file locking instead of
        one per statement. An operation that fails rolls back alone; if the
        final commit fails, every write of the batch is lost and this raises
        `unavailable` -- callers must not have told anyone the writes succeeded
        (`b.writes` counts them). `single`: the batch holds one request, whose
        first write then goes without a savepoint (two statements fewer)."""
        if self._batch is not None:
            raise RuntimeError("batches do not nest")
        self._before_write()
        try:
            self._db.execute("BEGIN")  # deferred: reads share one snapshot and one lock
        except sqlite3.OperationalError as e:
            raise Unavailable(f"the board could not be read: {e} "
                              f"(database {self.path})") from None
        b = self._batch = Batch(single)
        self._pending, self._delta = [], []
        try:
            yield b
        except BaseException:
            self._batch = None
            self._pending, self._delta = [], []
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._batch = None
        try:
            if b.failed:
                raise sqlite3.OperationalError(b.failed)
            if self._db.in_transaction:
                self._db.execute("COMMIT")
            elif b.writes:  # rolled back by SQLite after the last write: all lost
                raise sqlite3.OperationalError("the transaction was rolled back")
        except sqlite3.Error as e:
            self._pending, self._delta = [], []
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise self._unwritable(e) from None
        self._apply_delta()
        self.writes += b.writes
        if b.writes:
            self._wrote()
        self._publish()

    # -- helpers -----------------------------------------------------------
    def _emit(self, task_id: str | None, kind: str, payload: dict[str, Any], now: float,
              run_id: str | None = None) -> None:
        text = _compact_json(payload)
        cur = self._db.execute(
            "INSERT INTO events(task_id, run_id, kind, payload, created_at) VALUES (?,?,?,?,?)",
            (task_id, run_id, kind, text, now))
        self._pending.append({"id": cur.lastrowid, "task_id": task_id, "run_id": run_id,
                              "kind": kind, "payload": payload, "created_at": now})
        self._delta.append((None, 1))

    def _task_row(self, task_id: str) -> sqlite3.Row:
        row = self._db.execute(_TASK_SELECT + " WHERE t.id = ?", (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"no task {task_id}")
        return row

    def _move(self, task_id: str, action: str, dst: str, now: float,
              sets: dict[str, Any] | None = None) -> str:
        """The one place a task's status changes. Returns the old status."""
        row = self._db.execute("SELECT status, assignee FROM tasks WHERE id=?",
                               (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"no task {task_id}")
        src, assignee = row
        if not states.allowed(action, src, dst):
            raise states.refused(action, task_id, src)
        cols = {"status": dst, **(sets or {})}
        assign = ", ".join(f"{k} = ?" for k in cols)
        cur = self._db.execute(f"UPDATE tasks SET {assign} WHERE id = ? AND status = ?",
                               (*cols.values(), task_id, src))
        if cur.rowcount != 1:  # cannot happen with one writer; visible if it does
            raise Conflict(f"lost a race changing {task_id} from {src}")
        self._delta += [((assignee, src), -1), ((cols.get("assignee", assignee), dst), 1)]
        return src

    def _unfinished_parents(self, task_id: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT l.parent_id FROM task_links l JOIN tasks p ON p.id = l.parent_id"
            " WHERE l.child_id = ? AND p.status NOT IN ('done', 'archived')"
            " ORDER BY l.parent_id", (task_id,))]

    def _promote_children(self, parent_id: str, now: float) -> None:
        """todo -> ready for children whose parents are now all done/archived."""
        for (child,) in self._db.execute(
                "SELECT l.child_id FROM task_links l JOIN tasks c ON c.id = l.child_id"
                " WHERE l.parent_id = ? AND c.status = 'todo'", (parent_id,)).fetchall():
            if not self._unfinished_parents(child):
                self._move(child, "promote_deps", states.READY, now)
                self._emit(child, "promoted", {"by": parent_id}, now)

    def _close_run(self, run_id: str, outcome: str, now: float, **cols: Any) -> None:
        cols = {"outcome": outcome, "ended_at": now, **cols}
        assign = ", ".join(f"{k} = ?" for k in cols)
        cur = self._db.execute(f"UPDATE runs SET {assign} WHERE id = ? AND outcome IS NULL",
                               (*cols.values(), run_id))
        if cur.rowcount != 1:
            raise Conflict(f"run {run_id} has already ended")

    # -- reads -------------------------------------------------------------
    def get_task(self, task_id: str) -> dict[str, Any]:
        return _task(self._task_row(task_id))

    def list_tasks(self, *, statuses: list[str] | None = None, assignee: str | None = None,
                   tenant: str | None = None, created_by: str | None = None,
                   include_archived: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
        # Always an IN list of statuses, so tasks_dispatch (status, assignee, ...)
        # serves the status and the assignee filters.
        sts = statuses or [st for st in states.STATUSES
                           if include_archived or st != states.ARCHIVED]
        where, args = [f"t.status IN ({','.join('?' * len(sts))})"], list(sts)
        if assignee is not None:
            if assignee == "none":
                where.append("t.assignee IS NULL")
            else:
                where.append("t.assignee = ?")
                args.append(assignee)
        if tenant is not None:
            where.append("t.tenant = ?")
            args.append(tenant)
        if created_by is not None:
            where.append("t.created_by = ?")
            args.append(created_by)
        sql = _TASK_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY t.priority DESC, t.created_at, t.id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [_task(r) for r in self._db.execute(sql, args)]

    def parents(self, task_id: str) -> list[dict[str, Any]]:
        return [_task(r) for r in self._db.execute(
            _TASK_SELECT + " JOIN task_links l ON l.parent_id = t.id WHERE l.child_id = ?"
            " ORDER BY t.created_at", (task_id,))]

    def family(self, task_id: str) -> tuple[dict[str, Any], list[dict[str, Any]],
                                            list[dict[str, Any]]]:
        """(task, parents, children) in one query; parents and children ordered
        by created_at."""
        groups: tuple[list[dict[str, Any]], ...] = ([], [], [])
        for r in self._db.execute(_FAMILY, (task_id, task_id, task_id)):
            groups[r["side"]].append(_task(r))
        if not groups[0]:
            raise NotFound(f"no task {task_id}")
        return groups[0][0], groups[1], groups[2]

    def unfinished_parents(self, task_id: str) -> list[str]:
        return self._unfinished_parents(task_id)

    def comments(self, task_id: str, last: int | None = None) -> list[dict[str, Any]]:
        """In id order; `last`: only the last that many."""
        order = f" ORDER BY id DESC LIMIT {int(last)}" if last else " ORDER BY id"
        rows = self._db.execute(_COMMENTS + order, (task_id,)).fetchall()
        if last:
            rows.reverse()
        return [dict(zip(_COMMENT_COLUMNS, r)) for r in rows]

    def count_comments(self, task_id: str) -> int:
        return self._db.execute("SELECT count(*) FROM comments WHERE task_id=?",
                                (task_id,)).fetchone()[0]

    def events(self, *, since: int = 0, upto: int | None = None, task_id: str | None = None,
               limit: int | None = None, kinds: list[str] | None = None,
               assignee: str | None = None, tenant: str | None = None) -> list[Event]:
        where, args = ["e.id > ?"], [since]
        if upto is not None:
            where.append("e.id <= ?")
            args.append(upto)
        if task_id is not None:
            where.append("e.task_id = ?")
            args.append(task_id)
        if kinds:
            where.append(f"e.kind IN ({','.join('?' * len(kinds))})")
            args += kinds
        join = ""
        if assignee is not None or tenant is not None:
            join = " JOIN tasks t ON t.id = e.task_id"
            if assignee is not None:
                where.append("t.assignee = ?")
                args.append(assignee)
            if tenant is not None:
                where.append("t.tenant = ?")
                args.append(tenant)
        sql = ("SELECT e.id, e.task_id, e.run_id, e.kind, e.payload, e.created_at FROM events e"
               + join + " WHERE " + " AND ".join(where) + " ORDER BY e.id")
        if limit:
            sql += f" LIMIT {int(limit)}"
        return _events(self._db.execute(sql, args).fetchall())

    def event_head(self) -> int:
        return self._db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]

    def runs(self, task_id: str, last: int | None = None,
             check: bool = True) -> list[dict[str, Any]]:
        """A task's runs; `check=False` when the caller already loaded the task."""
        if check:
            self._task_row(task_id)
        rows = self._db.execute(
            "SELECT * FROM runs WHERE task_id = ? ORDER BY started_at DESC, rowid DESC"
            + (f" LIMIT {int(last)}" if last else ""), (task_id,)).fetchall()
        return [_run(r) for r in reversed(rows)]

    def count_runs(self, task_id: str) -> int:
        return self._db.execute("SELECT count(*) FROM runs WHERE task_id=?",
                                (task_id,)).fetchone()[0]

    def get_run(self, run_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"no run {run_id}")
        return _run(row, internal=True)

    def run_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM runs WHERE token_hash = ?", (token_hash,)).fetchone()
        return _run(row, internal=True) if row else None

    def active_runs(self) -> list[dict[str, Any]]:
        return [_run(r, internal=True) for r in self._db.execute(
            "SELECT * FROM runs WHERE outcome IS NULL ORDER BY started_at")]

    def next_lease_expiry(self) -> float | None:
        return self._db.execute(
            "SELECT min(lease_expires) FROM runs WHERE outcome IS NULL"
            " AND lease_expires IS NOT NULL").fetchone()[0]

    def latest_completed_run(self, task_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT * FROM runs WHERE task_id = ? AND outcome = 'completed'"
            " ORDER BY ended_at DESC LIMIT 1", (task_id,)).fetchone()
        return _run(row) if row else None

    def recent_completed(self, assignee: str, exclude: str, limit: int = 5) -> list[dict[str, Any]]:
        """The assignee's latest finished tasks: id, title, completed_at, result."""
        return [dict(r) for r in self._db.execute(
            "SELECT id, title, completed_at, result FROM tasks WHERE assignee = ? AND id != ?"
            " AND status IN ('done','archived') AND completed_at IS NOT NULL"
            " ORDER BY completed_at DESC LIMIT ?", (assignee, exclude, limit))]

    def _current_counts(self) -> dict[tuple[str | None, str], int]:
        """Committed counts plus the open transaction's changes (read your writes)."""
        if not self._delta:
            return self._counts
        counts = dict(self._counts)
        for key, n in self._delta:
            if key is not None:
                counts[key] = counts.get(key, 0) + n
        return counts

    def counts_by_status(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, status), n in self._current_counts().items():
            if n:
                out[status] = out.get(status, 0) + n
        return dict(sorted(out.items()))

    def counts_by_assignee(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (assignee, status), n in sorted(self._current_counts().items(),
                                            key=lambda kv: (kv[0][0] or "", kv[0][1])):
            if n:
                out.setdefault(assignee or "", {})[status] = n
        return out

    def oldest_ready_created_at(self) -> float | None:
        return self._db.execute(
            "SELECT min(created_at) FROM tasks WHERE status = 'ready'").fetchone()[0]

    def event_count(self) -> int:
        return self._events + sum(n for key, n in self._delta if key is None)

    def db_size_bytes(self) -> int:
        page = self._db.execute("PRAGMA page_size").fetchone()[0]
        return page * self._db.execute("PRAGMA page_count").fetchone()[0]

    def dispatch_candidates(self, profiles: list[str], now: float,
                            limit: int) -> list[dict[str, Any]]:
        """Ready tasks a daemon worker may take, in dispatch order (SPEC §4)."""
        if not profiles or limit <= 0:
            return []
        return [_task(r) for r in self._db.execute(
            _TASK_SELECT + " WHERE t.status = 'ready' AND t.current_run_id IS NULL"
            f" AND t.assignee IN ({','.join('?' * len(profiles))})"
            " AND (t.not_before IS NULL OR t.not_before <= ?)"
            " ORDER BY t.priority DESC, t.created_at, t.id LIMIT ?", (*profiles, now, limit))]

    def next_not_before(self, profiles: list[str], now: float) -> float | None:
        """The earliest future backoff end among tasks a daemon worker could take."""
        if not profiles:
            return None
        return self._db.execute(
            "SELECT min(not_before) FROM tasks WHERE status = 'ready' AND not_before > ?"
            f" AND assignee IN ({','.join('?' * len(profiles))})", (now, *profiles)).fetchone()[0]

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    # -- writes ------------------------------------------------------------
    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key)"
                       " DO UPDATE SET value = excluded.value", (key, value))

    def delete_meta(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def record_exit_status(self, run_id: str, exit_code: int | None,
                           signal: int | None) -> None:
        """Keep the exit status of a run that was already closed (complete/block)."""
        with self._tx() as db:
            db.execute("UPDATE runs SET exit_code = ?, signal = ? WHERE id = ?",
                       (exit_code, signal, run_id))

    # -- notify subscriptions (SPEC §9) ---------------------------------------
    def notify_subscribe(self, task_id: str, platform: str, chat_id: str | None,
                         thread_id: str | None, user_id: str | None, now: float) -> dict[str, Any]:
        """A subscription starts at the event head: no replay of old events."""
        with self._tx() as db:
            self._task_row(task_id)
            dup = db.execute(
                "SELECT id FROM notify_subs WHERE task_id=? AND platform=? AND chat_id IS ?"
                " AND thread_id IS ? AND user_id IS ?",
                (task_id, platform, chat_id, thread_id, user_id)).fetchone()
            if dup:
                return self.notify_get(dup[0])
            cur = db.execute(
                "INSERT INTO notify_subs(task_id, platform, chat_id, thread_id, user_id,"
                " created_at, last_event_id) VALUES (?,?,?,?,?,?,?)",
                (task_id, platform, chat_id, thread_id, user_id, now, self.event_head()))
            return self.notify_get(cur.lastrowid)

    def notify_get(self, sub_id: int) -> dict[str, Any]:
        row = self._db.execute("SELECT * FROM notify_subs WHERE id = ?", (sub_id,)).fetchone()
        if row is None:
            raise NotFound(f"no notify subscription {sub_id}")
        return dict(row)

    def notify_list(self, task_id: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM notify_subs", ()
        if task_id is not None:
            sql, args = sql + " WHERE task_id = ?", (task_id,)
        return [dict(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    def notify_unsubscribe(self, task_id: str, platform: str | None, chat_id: str | None,
                           thread_id: str | None, user_id: str | None) -> int:
        where, args = ["task_id = ?"], [task_id]
        for col, val in (("platform", platform), ("chat_id", chat_id),
                         ("thread_id", thread_id), ("user_id", user_id)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        with self._tx() as db:
            return db.execute("DELETE FROM notify_subs WHERE " + " AND ".join(where),
                              args).rowcount

    def notify_advance(self, sub_id: int, event_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE notify_subs SET last_event_id = ? WHERE id = ?"
                       " AND last_event_id < ?", (event_id, sub_id, event_id))

    def notify_end(self, sub_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM notify_subs WHERE id = ?", (sub_id,))

    def gc_events(self, before: float, limit: int | None = None) -> int:
        """Delete events older than `before` of tasks that are done or archived.
        The newest event always stays: event ids are max(id) + 1, so keeping it
        keeps every id ever handed out unique (subscribers' cursors rely on it).
        So do events a notify subscription has not delivered yet (a notifier
        that keeps failing must not lose the event it is retrying). `limit`:
        delete at most that many (one transaction; call again for more)."""
        with self._tx() as db:
            n = db.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < ?"
                " AND task_id IN (SELECT id FROM tasks WHERE status IN ('done', 'archived'))"
                " AND id < (SELECT max(id) FROM events)"
                " AND NOT EXISTS (SELECT 1 FROM notify_subs s"
                " WHERE s.task_id = events.task_id AND s.last_event_id < events.id)"
                + (f" LIMIT {int(limit)}" if limit else "") + ")",
                (before,)).rowcount
            self._delta.append((None, -n))
            return n

    def event_bytes(self) -> int:
        """An estimate from the newest 1000 events (reading every payload of a
        large board would make stats O(events))."""
        count = self.event_count()
        if not count:
            return 0
        sample, avg = self._db.execute(
            "SELECT count(*), coalesce(avg(length(payload) + length(kind) + 48), 0) FROM"
            " (SELECT payload, kind FROM events ORDER BY id DESC LIMIT 1000)").fetchone()
        return int(avg * count) if sample else 0

    def ended_run_ids(self, ended_before: float) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT id FROM runs WHERE outcome IS NOT NULL AND ended_at < ?", (ended_before,))]

    def task_statuses(self, ids: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            out.update({r[0]: r[1] for r in self._db.execute(
                f"SELECT id, status FROM tasks WHERE id IN ({','.join('?' * len(chunk))})", chunk)})
        return out

    def adopt(self, run_id: str, pid: int, now: float) -> None:
        with self._tx():
            run = self.get_run(run_id)
            self._emit(run["task_id"], "adopted", {"pid": pid}, now, run_id)

    def create_task(self, fields: dict[str, Any], parents: list[str], *, triage: bool,
                    now: float) -> tuple[dict[str, Any], bool]:
        """Insert a task; with an idempotency key that matches a live task,
        return that one instead (created=False). The unique index decides."""
        key = fields.get("idempotency_key")
        with self._tx() as db:
            if key is not None:
                existing = self._by_idempotency_key(key)
                if existing:
                    return existing, False
            for p in parents:
                self._task_row(p)
            unfinished = [p for p in dict.fromkeys(parents)
                          if db.execute("SELECT status FROM tasks WHERE id=?", (p,)).fetchone()[0]
                          not in states.PARENT_SATISFIED]
            status = states.TRIAGE if triage else (states.TODO if unfinished else states.READY)
            assert states.allowed("create", states.NEW, status)
            row = {**fields, "status": status, "created_at": now,
                   "skills": json.dumps(fields["skills"]) if fields.get("skills") else "[]"}
            sql = f"INSERT INTO tasks(id, {', '.join(row)}) VALUES (?{', ?' * len(row)})"
            try:
                task_id = _insert_new_id("t_", "tasks.id",
                                         lambda i: db.execute(sql, (i, *row.values())))
            except sqlite3.IntegrityError as e:
                if key is not None and "idempotency" in str(e):
                    existing = self._by_idempotency_key(key)
                    if existing:
                        return existing, False
                raise
            self._delta.append(((fields.get("assignee"), status), 1))
            for p in dict.fromkeys(parents):
                db.execute("INSERT INTO task_links(parent_id, child_id) VALUES (?, ?)",
                           (p, task_id))
            self._emit(task_id, "created", {"assignee": fields.get("assignee"),
                                            "status": status,
                                            "parents": list(dict.fromkeys(parents)),
                                            "tenant": fields.get("tenant")}, now)
            # The new row, as _task_row would read it (no run yet): no re-select.
            task = dict.fromkeys(_TASK_COLUMNS)
            task.update(row, id=task_id, consecutive_failures=0,
                        skills=list(fields.get("skills") or []))
            return task, True

    def _by_idempotency_key(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute(_TASK_SELECT + " WHERE t.idempotency_key = ? AND"
                               " t.status != 'archived'", (key,)).fetchone()
        return _task(row) if row else None

    def assign(self, task_id: str, assignee: str | None, now: float) -> dict[str, Any]:
        with self._tx() as db:
            task = self._task_row(task_id)
            if task["status"] == states.RUNNING:
                raise Conflict(f"cannot assign {task_id}: status is running "
                               "(use --force to reclaim it first)",
                               {"task_id": task_id, "status": "running"})
            if task["status"] == states.ARCHIVED:
                raise states.refused("assign", task_id, task["status"])
            db.execute("UPDATE tasks SET assignee = ? WHERE id = ?", (assignee, task_id))
            self._delta += [((task["assignee"], task["status"]), -1),
                            ((assignee, task["status"]), 1)]
            self._emit(task_id, "assigned", {"assignee": assignee}, now)
            return self.get_task(task_id)

    def link(self, parent: str, child: str, now: float) -> dict[str, Any]:
        if parent == child:
            raise InvalidArgument(f"cannot link {parent} to itself")
        with self._tx() as db:
            p, c = self._task_row(parent), self._task_row(child)
            for t in (p, c):
                if t["status"] == states.ARCHIVED:
                    raise states.refused("link", t["id"], t["status"])
            if db.execute("SELECT 1 FROM task_links WHERE parent_id=? AND child_id=?",
                          (parent, child)).fetchone():
                raise Conflict(f"{parent} is already a parent of {child}")
            cycle = db.execute(
                "WITH RECURSIVE anc(id) AS (SELECT parent_id FROM task_links WHERE child_id = ?"
                " UNION SELECT l.parent_id FROM task_links l JOIN anc ON l.child_id = anc.id)"
                " SELECT 1 FROM anc WHERE id = ?", (parent, child)).fetchone()
            if cycle:
                raise Conflict(f"cannot link {parent} -> {child}: {child} is already an "
                                      f"ancestor of {parent} (that would make a cycle)")
            db.execute("INSERT INTO task_links(parent_id, child_id) VALUES (?, ?)", (parent, child))
            self._emit(child, "linked", {"parent": parent, "child": child}, now)
            if c["status"] == states.READY and p["status"] not in states.PARENT_SATISFIED:
                self._move(child, "demote", states.TODO, now)
                self._emit(child, "demoted", {"parent": parent}, now)
            return self.get_task(child)

    def unlink(self, parent: str, child: str, now: float) -> dict[str, Any]:
        with self._tx() as db:
            self._task_row(parent)
            c = self._task_row(child)
            cur = db.execute("DELETE FROM task_links WHERE parent_id=? AND child_id=?",
                             (parent, child))
            if cur.rowcount == 0:
                raise NotFound(f"{parent} is not a parent of {child}")
            self._emit(child, "unlinked", {"parent": parent, "child": child}, now)
            if c["status"] == states.TODO and not self._unfinished_parents(child):
                self._move(child, "promote_deps", states.READY, now)
                self._emit(child, "promoted", {"by": parent}, now)
            return self.get_task(child)

    def comment(self, task_id: str, author: str | None, body: str, now: float) -> dict[str, Any]:
        with self._tx() as db:
            self._task_row(task_id)
            cur = db.execute("INSERT INTO comments(task_id, author, body, created_at)"
                             " VALUES (?,?,?,?)", (task_id, author, body, now))
            self._emit(task_id, "commented", {"author": author, "len": len(body)}, now)
            return {"id": cur.lastrowid, "task_id": task_id, "author": author, "body": body,
                    "created_at": now}

    def promote(self, task_id: str, now: float) -> dict[str, Any]:
        with self._tx():
            task = self._task_row(task_id)
            if task["status"] != states.TRIAGE:
                raise states.refused("promote", task_id, task["status"])
            dst = states.TODO if self._unfinished_parents(task_id) else states.READY
            self._move(task_id, "promote", dst, now)
            self._emit(task_id, "promoted", {"from": "triage", "status": dst}, now)
            return self.get_task(task_id)

    def claim(self, task_id: str, *, claimer: str, profile: str | None, lease_ttl: float | None,
              token_hash: str, now: float) -> dict[str, Any]:
        """ready -> running; opens a run. The guard: ready, no lease, backoff over."""
        with self._tx() as db:
            task = self._task_row(task_id)
            if task["status"] != states.READY:
                raise states.refused("claim", task_id, task["status"])
            if task["current_run_id"] is not None:
                raise Conflict(f"cannot claim {task_id}: it holds a lease")
            if task["not_before"] is not None and task["not_before"] > now:
                raise Conflict(f"cannot claim {task_id}: retry backoff until "
                               f"{task['not_before']:.3f}",
                               {"task_id": task_id, "not_before": task["not_before"]})
            lease = now + lease_ttl if lease_ttl else None
            # The only place runs are made; it sets the task's started_at for good,
            # so a task without started_at has no runs (Board.show relies on it).
            run_id = _insert_new_id("r_", "runs.id", lambda i: db.execute(
                "INSERT INTO runs(id, task_id, profile, claimer, started_at, lease_expires,"
                " lease_ttl, token_hash) VALUES (?,?,?,?,?,?,?,?)",
                (i, task_id, profile, claimer, now, lease, lease_ttl, token_hash)))
            self._move(task_id, "claim", states.RUNNING, now, {
                "current_run_id": run_id,
                "started_at": task["started_at"] if task["started_at"] is not None else now})
            self._emit(task_id, "claimed", {"run_id": run_id, "claimer": claimer,
                                            "lease_expires": lease}, now, run_id)
            return self.get_run(run_id)

    def record_spawn(self, run_id: str, pid: int, start_time: float, profile: str,
                     now: float, log_offset: int = 0) -> None:
        with self._tx() as db:
            run = self.get_run(run_id)
            db.execute("UPDATE runs SET worker_pid = ?, worker_start_time = ?, log_offset = ?"
                       " WHERE id = ?", (pid, start_time, log_offset, run_id))
            self._emit(run["task_id"], "spawned", {"pid": pid, "profile": profile}, now, run_id)

    def heartbeat(self, task_id: str, note: str | None, now: float) -> dict[str, Any]:
        with self._tx() as db:
            task = self._task_row(task_id)
            if task["status"] != states.RUNNING or not task["current_run_id"]:
                raise states.refused("heartbeat", task_id, task["status"])
            run_id = task["current_run_id"]
            db.execute("UPDATE runs SET last_heartbeat_at = ?, heartbeat_note = ?,"
                       " lease_expires = CASE WHEN lease_ttl IS NULL THEN NULL"
                       " ELSE ? + lease_ttl END WHERE id = ?", (now, note, now, run_id))
            self._emit(task_id, "heartbeat", {"note": note}, now, run_id)
            return self.get_task(task_id)

    def complete(self, task_id: str, *, result: str | None, summary: str | None,
                 metadata: dict[str, Any] | None, now: float) -> dict[str, Any]:
        with self._tx() as db:
            task = self._task_row(task_id)
            run_id = task["current_run_id"]
            if run_id and task["status"] == states.RUNNING:
                self._close_run(run_id, "completed", now, summary=summary,
                                metadata=json.dumps(metadata) if metadata is not None else None)
            if result is None:
                result = summary if summary is not None else task["result"]
            self._move(task_id, "complete", states.DONE, now, {
                "completed_at": now, "result": result, "consecutive_failures": 0,
                "not_before": None, "current_run_id": None})
            self._emit(task_id, "completed", {"summary": _first_line(summary or result)}, now,
                       run_id)
            self._promote_children(task_id, now)
            return self.get_task(task_id)

    def block(self, task_id: str, reason: str | None, now: float) -> dict[str, Any]:
        with self._tx():
            task = self._task_row(task_id)
            run_id = task["current_run_id"]
            if run_id and task["status"] == states.RUNNING:
                self._close_run(run_id, "blocked", now, summary=reason)
            self._move(task_id, "block", states.BLOCKED, now, {"current_run_id": None})
            self._emit(task_id, "blocked", {"reason": reason}, now, run_id)
            return self.get_task(task_id)

    def unblock(self, task_id: str, now: float) -> dict[str, Any]:
        with self._tx():
            task = self._task_row(task_id)
            if task["status"] != states.BLOCKED:
                raise states.refused("unblock", task_id, task["status"])
            dst = states.TODO if self._unfinished_parents(task_id) else states.READY
            self._move(task_id, "unblock", dst, now, {"consecutive_failures": 0,
                                                     "not_before": None})
            self._emit(task_id, "unblocked", {"status": dst}, now)
            return self.get_task(task_id)

    def archive(self, task_id: str, now: float) -> dict[str, Any]:
        """A running task's run ends `reclaimed`; the caller kills its worker first."""
        with self._tx():
            task = self._task_row(task_id)
            run_id = task["current_run_id"]
            if run_id and task["status"] == states.RUNNING:
                self._close_run(run_id, "reclaimed", now, error="task archived")
                self._emit(task_id, "reclaimed", {"reason": "archived"}, now, run_id)
            self._move(task_id, "archive", states.ARCHIVED, now, {"current_run_id": None})
            self._emit(task_id, "archived", {"from": task["status"]}, now)
            self._promote_children(task_id, now)
            return self.get_task(task_id)

    def end_run(self, run_id: str, outcome: str, *, now: float, failure_limit: int,
                backoff: Callable[[int], float], cooldown: float = 0.0,
                error: str | None = None, exit_code: int | None = None,
                signal: int | None = None, payload: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        """Close an active run with a failure-table outcome (SPEC §4) and move its
        task per `states.OUTCOMES`: requeue with backoff, or give up into blocked."""
        counts, dst = states.OUTCOMES[outcome]
        with self._tx() as db:
            run = self.get_run(run_id)
            if run["outcome"] is not None:
                raise Conflict(f"run {run_id} has already ended ({run['outcome']})")
            task_id = run["task_id"]
            self._close_run(run_id, outcome, now, error=error, exit_code=exit_code,
                            signal=signal)
            self._emit(task_id, outcome, payload or {}, now, run_id)
            task = self._task_row(task_id)
            if task["current_run_id"] != run_id or task["status"] != states.RUNNING:
                return self.get_run(run_id)  # task already moved on (complete/block/archive)
            sets: dict[str, Any] = {"current_run_id": None}
            if counts:
                failures = task["consecutive_failures"] + 1
                sets.update(consecutive_failures=failures, last_failure_error=error)
                if failures >= failure_limit:
                    sets["not_before"] = None
                    self._move(task_id, "give_up", states.BLOCKED, now, sets)
                    self._emit(task_id, "gave_up", {"failures": failures, "last_outcome": outcome,
                                                    "error": error}, now, run_id)
                    return self.get_run(run_id)
                sets["not_before"] = now + backoff(failures)
            elif outcome == "rate_limited":
                sets["not_before"] = now + cooldown
            assert dst == states.READY
            self._move(task_id, "requeue", dst, now, sets)
            return self.get_run(run_id)

    def expire_leases(self, now: float, failure_limit: int,
                      backoff: Callable[[int], float]) -> list[str]:
        """Close every run whose lease ran out as `stale`. Returns the run ids."""
        expired = [r[0] for r in self._db.execute(
            "SELECT id FROM runs WHERE outcome IS NULL AND lease_expires IS NOT NULL"
            " AND lease_expires <= ? ORDER BY lease_expires", (now,))]
        for run_id in expired:
            run = self.get_run(run_id)
            self.end_run(run_id, "stale", now=now, failure_limit=failure_limit, backoff=backoff,
                         error=f"lease expired: no heartbeat from {run['claimer']}",
                         payload={"reason": "lease expired"})
        return expired


def _task(row: sqlite3.Row) -> dict[str, Any]:
    """A row of _TASK_SELECT as a dict; of _FAMILY too (its `side` comes last,
    past the columns named here, and is left out). Zipping with the known
    column names costs a third of dict(row)."""
    d = dict(zip(_TASK_COLUMNS, row))
    skills = d["skills"]
    d["skills"] = json.loads(skills) if skills and skills != "[]" else []
    return d


def _run(row: sqlite3.Row, internal: bool = False) -> dict[str, Any]:
    d = dict(row)
    d["metadata"] = json.loads(d["metadata"]) if d.get("metadata") else None
    if internal:
        return d
    return {k: d[k] for k in RUN_FIELDS}


def _events(rows: list[sqlite3.Row]) -> list[Event]:
    """Rows of (id, task_id, run_id, kind, payload, created_at) as events; all
    payloads are decoded by one json.loads (they are JSON objects we wrote)."""
    if not rows:
        return []
    payloads = json.loads("[" + ",".join(r[4] or "{}" for r in rows) + "]")
    return [{"id": r[0], "task_id": r[1], "run_id": r[2], "kind": r[3], "payload": p,
             "created_at": r[5]} for r, p in zip(rows, payloads)]
