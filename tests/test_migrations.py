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
    db.execute("INSERT INTO tasks(id, title, status, created_at) VALUES ('t_0000abcd', 'old', 'ready', 1.0)")
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
