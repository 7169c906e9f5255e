"""Schema migrations: an older board is upgraded in place with nothing lost."""

import sqlite3

from kanband import store


def _v1_board(path):
    db = sqlite3.connect(path)
    for stmt in store._MIGRATIONS[1].split(";"):
        if stmt.strip():
            db.execute(stmt)
    db.execute(f"PRAGMA application_id={store.APPLICATION_ID}")
    db.execute("PRAGMA user_version=1")
    # as kanband wrote it: a claim sets the task's started_at with its first run
    db.execute("INSERT INTO tasks(id, title, status, created_at, started_at)"
               " VALUES ('t_0000abcd', 'old', 'ready', 1.0, 1.0)")
    db.execute("INSERT INTO runs(id, task_id, claimer, started_at) VALUES ('r_0000abcd', 't_0000abcd', 'external:x', 1.0)")
    db.commit()
    db.close()


def test_v1_board_is_migrated_and_keeps_its_tasks(kanband_factory):
    """kanband opens a schema-1 board, upgrades it to the current version (new indexes and the runs.log_offset column) and serves its old tasks."""
    k = kanband_factory(start=False)
    _v1_board(k.home / "kanban.db")
    k.start()
    assert k.task("t_0000abcd")["title"] == "old"
    assert k.call("task.runs", id="t_0000abcd")["runs"][0]["id"] == "r_0000abcd"
    assert [r["id"] for r in k.call("task.show", id="t_0000abcd")["runs"]] == ["r_0000abcd"]
    k.stop()
    db = sqlite3.connect(k.home / "kanban.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"tasks_dispatch", "tasks_assignee_completed"} <= indexes
    assert "log_offset" in {r[1] for r in db.execute("PRAGMA table_info(runs)")}


def test_newer_schema_is_refused(kanband_factory):
    """A board written by a newer kanband (higher user_version) is refused with a message, untouched."""
    k = kanband_factory(start=False)
    _v1_board(k.home / "kanban.db")
    db = sqlite3.connect(k.home / "kanban.db")
    db.execute(f"PRAGMA user_version={store.SCHEMA_VERSION + 5}")
    db.commit()
    db.close()
    before = (k.home / "kanban.db").read_bytes()
    k.start(wait=False)
    assert k.proc.wait(30) == 1
    assert "newer than this kanband understands" in k.log_text()
    assert (k.home / "kanban.db").read_bytes() == before


def _v2_board_with_events(path):
    """A schema-2 board (events with AUTOINCREMENT) whose newest events were deleted:
    AUTOINCREMENT remembers id 7 in sqlite_sequence."""
    db = sqlite3.connect(path)
    for v in (1, 2):
        for stmt in store._MIGRATIONS[v].split(";"):
            if stmt.strip():
                db.execute(stmt)
    db.execute(f"PRAGMA application_id={store.APPLICATION_ID}")
    db.execute("PRAGMA user_version=2")
    # as kanband wrote it: a claim sets the task's started_at with its first run
    db.execute("INSERT INTO tasks(id, title, status, created_at, started_at)"
               " VALUES ('t_0000abcd', 'old', 'ready', 1.0, 1.0)")
    for i in range(1, 8):
        db.execute("INSERT INTO events(task_id, kind, payload, created_at) VALUES (?, ?, ?, ?)",
                   ("t_0000abcd", "commented", f'{{"n": {i}}}', float(i)))
    db.execute("DELETE FROM events WHERE id > 5")
    db.commit()
    db.close()


def test_v2_events_keep_their_ids_and_new_ids_follow_the_newest(tmp_path):
    """Schema 3 rebuilds `events` without AUTOINCREMENT: every old event keeps its id
    and payload; ids handed out before (7, though 6 and 7 were deleted) are never
    reused -- a `schema_upgraded` marker holds the old sequence's place -- and the
    indexes that writes no longer pay for are gone."""
    path = tmp_path / "kanban.db"
    _v2_board_with_events(path)
    s = store.Store(path)
    try:
        old = s.events(task_id="t_0000abcd")
        assert [(e["id"], e["payload"]) for e in old] == [(i, {"n": i}) for i in range(1, 6)]
        marker = s.events(since=5)
        assert [(e["id"], e["kind"], e["task_id"]) for e in marker] == [
            (7, "schema_upgraded", None)]
        s.comment("t_0000abcd", None, "new", 9.0)
        assert s.event_head() == 8
        db = sqlite3.connect(path)
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "tasks_status_order" not in indexes and {"events_task", "tasks_tenant"} <= indexes
        assert "AUTOINCREMENT" not in db.execute(
            "SELECT sql FROM sqlite_master WHERE name='events'").fetchone()[0]
        db.close()
    finally:
        s.close()


def test_gc_never_deletes_the_newest_event(tmp_path):
    """With event ids taken as max(id) + 1, deleting the newest event would hand its id
    out again (a subscriber at that cursor would miss the new event): gc keeps it."""
    s = store.Store(tmp_path / "kanban.db")
    try:
        t, _ = s.create_task({"title": "x"}, [], triage=False, now=1.0)
        s.complete(t["id"], result="ok", summary=None, metadata=None, now=2.0)
        head = s.event_head()
        assert s.gc_events(before=1e12) == head - 1
        assert [e["id"] for e in s.events()] == [head]
        s.comment(t["id"], None, "after gc", 3.0)
        assert s.event_head() == head + 1
    finally:
        s.close()


def test_gc_deletes_events_in_chunks_to_the_same_end(tmp_path):
    """gc deletes events a chunk at a time (one transaction each, so the daemon
    serves in between); the chunks add up to the one-go result, newest kept."""
    s = store.Store(tmp_path / "kanban.db")
    try:
        for i in range(7):
            t, _ = s.create_task({"title": f"t{i}"}, [], triage=False, now=1.0)
            s.complete(t["id"], result="ok", summary=None, metadata=None, now=2.0)
        head = s.event_head()
        chunks = []
        while (n := s.gc_events(before=1e12, limit=3)) == 3:
            chunks.append(n)
        chunks.append(n)
        assert sum(chunks) == head - 1 and all(c <= 3 for c in chunks) and len(chunks) > 2
        assert [e["id"] for e in s.events()] == [head]
        assert s.event_count() == 1
    finally:
        s.close()
