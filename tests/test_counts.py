"""stats and status counts are kept in memory (O(1) in board size); they must
always equal what the database holds, through every kind of change."""

from __future__ import annotations

import sqlite3
from typing import Any

from conftest import Kanband, wait_for
from supervision_helpers import toml


def db_counts(k: Kanband) -> tuple[dict[str, dict[str, int]], int]:
    db = sqlite3.connect(f"file:{k.home / 'kanban.db'}?mode=ro", uri=True)
    try:
        by: dict[str, dict[str, int]] = {}
        for a, st, n in db.execute("SELECT coalesce(assignee, ''), status, count(*) FROM tasks"
                                   " GROUP BY 1, 2"):
            by.setdefault(a, {})[st] = n
        return by, db.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        db.close()


def check(k: Kanband) -> dict[str, Any]:
    stats = k.call("board.stats")
    by, events = db_counts(k)
    assert stats["by_assignee"] == by
    totals: dict[str, int] = {}
    for counts in by.values():
        for st, n in counts.items():
            totals[st] = totals.get(st, 0) + n
    assert {s: n for s, n in stats["by_status"].items() if n} == totals
    assert stats["total"] == sum(totals.values())
    assert stats["events"] == events
    assert k.call("daemon.status")["counts"] == dict(sorted(totals.items()))
    return stats


def test_counts_follow_every_change_and_survive_a_restart(kanband_factory):
    """Creates, dispatch and exits, retries and give-up, promote, assign, external
    claim, block, unblock, archive (with a child promoted), a refused create, gc of
    events, a restart: after each step stats and status equal the database's counts."""
    k = kanband_factory(toml({"retry_backoff": 0.1, "failure_limit": 2}))
    ok = [k.create(f"ok {i}", assignee="shell", body="true")["id"] for i in range(3)]
    bad = k.create("bad", assignee="shell", body="exit 3")["id"]
    tri = k.create("triage", triage=True)["id"]
    ext = k.create("external", assignee="someone")["id"]
    for tid in ok:
        k.wait_status(tid, "done")
    k.wait_status(bad, "blocked", timeout=30)  # two crashes, then gave up
    check(k)
    k.call("task.promote", id=tri)
    k.call("task.assign", id=tri, assignee="nobody-yet")
    k.call("task.assign", id=ext, assignee=None)
    claim = k.call("task.claim", id=ext, claimer="me")
    k.call("task.block", id=ext, run_token=claim["token"], reason="waiting")
    k.call("task.unblock", id=ext)
    k.call("task.archive", id=ok[0])
    child = k.create("child", parents=[bad])["id"]
    k.call("task.archive", id=bad)  # promotes the child
    check(k)
    # A failing request changes nothing, counts included.
    try:
        k.call("task.create", title="orphan", parents=["t_00000000"])
    except Exception:
        pass
    wait_for(lambda: k.task(child)["status"] == "ready", 10, "child promoted")
    k.call("board.gc", event_retention_days=0)
    stats = check(k)
    assert stats["events"] >= 1
    k.stop()
    k.start()  # counts are loaded from the database again
    again = check(k)
    assert (again["by_assignee"], again["events"]) == (stats["by_assignee"], stats["events"])


def test_counts_drop_the_changes_of_rolled_back_operations(tmp_path):
    """Inside a group commit an operation that fails takes its count changes with
    it; a batch that fails as a whole changes no count; reads inside a batch see
    its own changes."""
    from kanband.errors import NotFound
    from kanband.store import Store

    s = Store(tmp_path / "b.db")
    try:
        with s.batch():
            s.create_task({"title": "a", "assignee": "x"}, [], triage=False, now=1.0)
            try:
                s.create_task({"title": "b"}, ["t_00000000"], triage=False, now=1.0)
            except NotFound:
                pass
            assert s.counts_by_assignee() == {"x": {"ready": 1}}
        try:
            with s.batch():
                s.create_task({"title": "c", "assignee": "x"}, [], triage=True, now=2.0)
                raise RuntimeError("the whole batch goes")
        except RuntimeError:
            pass
        assert s.counts_by_assignee() == {"x": {"ready": 1}}
        assert s.counts_by_status() == {"ready": 1}
        assert s.event_count() == s._db.execute("SELECT count(*) FROM events").fetchone()[0] == 1
    finally:
        s.close()
