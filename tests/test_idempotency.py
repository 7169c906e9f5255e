"""Idempotency keys (SPEC §2, §6): enforced by the database, race-free, and
reusable once the task holding the key is archived."""

from __future__ import annotations

import json

from conftest import ctl_concurrently, kinds_of, run_concurrently


def live_tasks(kd):
    return kd.call("task.list", archived=True)["tasks"]


def test_eight_concurrent_creators_make_one_task(kd):
    """Eight clients creating with the same key at the same moment get one task, created once."""
    clients = [kd.client() for _ in range(8)]
    results = run_concurrently(
        8, lambda i: clients[i].call("task.create", {"title": f"job {i}",
                                                     "idempotency_key": "K1"}))
    for c in clients:
        c.close()
    assert all(isinstance(r, dict) for r in results), results
    ids = {r["task"]["id"] for r in results}
    assert len(ids) == 1
    assert sorted(r["created"] for r in results) == [False] * 7 + [True]
    tasks = live_tasks(kd)
    assert [t["id"] for t in tasks] == list(ids)
    assert tasks[0]["idempotency_key"] == "K1"
    assert kinds_of(kd, tasks[0]["id"]).count("created") == 1


def test_eight_concurrent_kanbanctl_creators_make_one_task(kd):
    """Eight `kanbanctl create --idempotency-key` processes at once: one task, exactly one says created."""
    outs = ctl_concurrently(kd, [["create", f"job {i}", "--idempotency-key", "K2", "--json"]
                                 for i in range(8)])
    assert all(o[0] == 0 for o in outs), outs
    docs = [json.loads(o[1]) for o in outs]
    assert len({d["id"] for d in docs}) == 1
    assert sorted(d["created"] for d in docs) == [False] * 7 + [True]
    assert len(live_tasks(kd)) == 1


def test_repeat_create_returns_the_existing_task_unchanged(kd):
    """A repeat with the same key returns the first task as it is (new title/body ignored) with created false."""
    first = kd.ctl_json("create", "original", "--idempotency-key", "K", "--body", "b1")
    assert first["created"] is True
    again = kd.ctl_json("create", "different", "--idempotency-key", "K", "--body", "b2",
                        "--priority", "9")
    assert again["created"] is False
    assert again["id"] == first["id"]
    assert (again["title"], again["body"], again["priority"]) == ("original", "b1", 0)
    assert len(live_tasks(kd)) == 1


def test_done_task_still_holds_its_key(kd):
    """A done task's key still matches: the repeat returns the done task."""
    t = kd.call("task.create", title="x", idempotency_key="K")["task"]
    kd.call("task.complete", id=t["id"])
    r = kd.call("task.create", title="x", idempotency_key="K")
    assert r["created"] is False and r["task"]["id"] == t["id"] and r["task"]["status"] == "done"


def test_archived_tasks_key_can_be_reused(kd):
    """Once the task holding a key is archived, the key creates a new task (and then matches that one)."""
    old = kd.call("task.create", title="x", idempotency_key="K")["task"]["id"]
    kd.call("task.archive", id=old)
    r = kd.call("task.create", title="x again", idempotency_key="K")
    assert r["created"] is True and r["task"]["id"] != old
    again = kd.call("task.create", title="x thrice", idempotency_key="K")
    assert again["created"] is False and again["task"]["id"] == r["task"]["id"]
    # the same through kanbanctl
    kd.call("task.archive", id=r["task"]["id"])
    doc = kd.ctl_json("create", "x cli", "--idempotency-key", "K")
    assert doc["created"] is True and doc["id"] not in (old, r["task"]["id"])


def test_different_keys_make_different_tasks(kd):
    """Different keys (and no key) never collapse into one task."""
    a = kd.call("task.create", title="x", idempotency_key="A")["task"]["id"]
    b = kd.call("task.create", title="x", idempotency_key="B")["task"]["id"]
    c = kd.call("task.create", title="x")["task"]["id"]
    d = kd.call("task.create", title="x")["task"]["id"]
    assert len({a, b, c, d}) == 4


def test_text_mode_repeat_says_it_exists(kd):
    """In text mode a repeat names the existing task instead of claiming a new one was created."""
    r1 = kd.ctl("create", "x", "--idempotency-key", "K")
    r2 = kd.ctl("create", "x", "--idempotency-key", "K")
    assert r1.returncode == r2.returncode == 0
    tid = live_tasks(kd)[0]["id"]
    assert "created" in r1.stdout and tid in r1.stdout
    assert tid in r2.stdout and not r2.stdout.startswith("created")
