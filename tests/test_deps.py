"""Dependencies (SPEC §2 task_links, §3): promotion through chains and fan-ins,
cycle and self-link refusal, demotion on link, promotion on unlink, archived
parents, and triage tasks that parents never promote."""

from __future__ import annotations

from conftest import events_of, kinds_of, rpc_error, snapshot


def status(kd, tid):
    return kd.task(tid)["status"]


def test_chain_promotes_one_step_at_a_time(shared_kd):
    """In A -> B -> C, completing A readies B only, and completing B then readies C, at once."""
    kd = shared_kd
    a = kd.create("A")["id"]
    b = kd.create("B", parents=[a])["id"]
    c = kd.create("C", parents=[b])["id"]
    assert [status(kd, x) for x in (a, b, c)] == ["ready", "todo", "todo"]
    kd.call("task.complete", id=a)
    assert [status(kd, x) for x in (b, c)] == ["ready", "todo"]
    promoted = [e for e in events_of(kd, b) if e["kind"] == "promoted"]
    assert len(promoted) == 1
    kd.call("task.complete", id=b)
    assert status(kd, c) == "ready"
    assert kinds_of(kd, c).count("promoted") == 1


def test_fan_in_waits_for_every_parent(shared_kd):
    """A child with parents A and B stays todo until both are done, then becomes ready."""
    kd = shared_kd
    a, b = kd.create("A")["id"], kd.create("B")["id"]
    c = kd.create("C", parents=[a, b])["id"]
    assert status(kd, c) == "todo"
    reason = kd.task(c)["waiting_reason"]
    assert a in reason and b in reason  # names the unfinished parents
    kd.call("task.complete", id=a)
    t = kd.task(c)
    assert t["status"] == "todo" and b in t["waiting_reason"] and a not in t["waiting_reason"]
    assert "promoted" not in kinds_of(kd, c)
    kd.call("task.complete", id=b)
    assert status(kd, c) == "ready"
    assert kinds_of(kd, c).count("promoted") == 1
    show = kd.call("task.show", id=c)
    assert sorted(p["id"] for p in show["parents"]) == sorted([a, b])
    assert [x["id"] for x in kd.call("task.show", id=a)["children"]] == [c]


def test_archived_parent_satisfies_its_children(shared_kd):
    """Archiving an unfinished parent promotes its waiting child; a done + archived fan-in is satisfied."""
    kd = shared_kd
    a, b = kd.create("A")["id"], kd.create("B")["id"]
    c = kd.create("C", parents=[a, b])["id"]
    kd.call("task.complete", id=a)
    kd.call("task.archive", id=b)
    assert status(kd, c) == "ready"
    assert kinds_of(kd, c)[-1] == "promoted"


def test_create_under_finished_parents_is_ready(shared_kd):
    """A task created with only done or archived parents starts ready; with one unfinished parent, todo."""
    kd = shared_kd
    done = kd.create("done")["id"]
    kd.call("task.complete", id=done)
    archived = kd.create("archived")["id"]
    kd.call("task.archive", id=archived)
    assert kd.create("child", parents=[done, archived])["status"] == "ready"
    live = kd.create("live")["id"]
    assert kd.create("child2", parents=[done, live])["status"] == "todo"


def test_cycle_is_refused(shared_kd):
    """Linking that would close a cycle (direct or through a chain) is refused and stores nothing."""
    kd = shared_kd
    a = kd.create("A")["id"]
    b = kd.create("B", parents=[a])["id"]
    c = kd.create("C", parents=[b])["id"]
    before = snapshot(kd)
    for parent, child in ((c, a), (b, a), (c, b)):
        err = rpc_error(kd, "task.link", parent=parent, child=child)
        assert err.code == "conflict", err.message
        assert "cycle" in err.message and parent in err.message and child in err.message
    assert snapshot(kd) == before
    assert [p["id"] for p in kd.call("task.show", id=a)["parents"]] == []


def test_self_link_is_refused(shared_kd):
    """A task cannot be its own parent; nothing is stored."""
    kd = shared_kd
    a = kd.create("A")["id"]
    before = snapshot(kd)
    err = rpc_error(kd, "task.link", parent=a, child=a)
    assert err.code in ("invalid_argument", "conflict"), err.message
    assert a in err.message
    assert snapshot(kd) == before
    assert kd.call("task.show", id=a)["parents"] == []


def test_create_with_unknown_parent_is_not_found(shared_kd):
    """Creating a task with an unknown parent is `not_found` and creates nothing."""
    kd = shared_kd
    before = snapshot(kd)
    err = rpc_error(kd, "task.create", title="orphan", parents=["t_00000000"])
    assert err.code == "not_found" and "t_00000000" in err.message
    assert snapshot(kd) == before


def test_duplicate_link_is_refused(shared_kd):
    """Linking the same parent and child twice is refused the second time."""
    kd = shared_kd
    a = kd.create("A")["id"]
    b = kd.create("B", parents=[a])["id"]
    before = snapshot(kd)
    err = rpc_error(kd, "task.link", parent=a, child=b)
    assert err.code == "conflict"
    assert snapshot(kd) == before


def test_link_demotes_a_ready_child(shared_kd):
    """Linking a ready child to an unfinished parent moves it to todo with events `linked` then `demoted`."""
    kd = shared_kd
    p, c = kd.create("P")["id"], kd.create("C")["id"]
    out = kd.call("task.link", parent=p, child=c)["task"]
    assert out["status"] == "todo"
    ev = events_of(kd, c)
    assert [e["kind"] for e in ev][-2:] == ["linked", "demoted"]
    assert ev[-2]["payload"] == {"parent": p, "child": c}


def test_link_to_a_done_parent_keeps_the_child_ready(shared_kd):
    """Linking to a parent that is already done does not demote the child."""
    kd = shared_kd
    p, c = kd.create("P")["id"], kd.create("C")["id"]
    kd.call("task.complete", id=p)
    assert kd.call("task.link", parent=p, child=c)["task"]["status"] == "ready"
    assert "demoted" not in kinds_of(kd, c)


def test_unlink_promotes_when_no_unfinished_parent_is_left(shared_kd):
    """Unlinking the last unfinished parent promotes the child; with another one left it stays todo."""
    kd = shared_kd
    a, b = kd.create("A")["id"], kd.create("B")["id"]
    c = kd.create("C", parents=[a, b])["id"]
    out = kd.call("task.unlink", parent=a, child=c)["task"]
    assert out["status"] == "todo"
    out = kd.call("task.unlink", parent=b, child=c)["task"]
    assert out["status"] == "ready"
    ev = events_of(kd, c)
    assert [e["kind"] for e in ev][-2:] == ["unlinked", "promoted"]
    assert ev[-2]["payload"] == {"parent": b, "child": c}
    assert kd.call("task.show", id=c)["parents"] == []


def test_unlink_of_a_missing_link_is_refused(shared_kd):
    """Unlinking two tasks that are not linked is refused and changes nothing."""
    kd = shared_kd
    a, b = kd.create("A")["id"], kd.create("B")["id"]
    before = snapshot(kd)
    err = rpc_error(kd, "task.unlink", parent=a, child=b)
    assert err.code in ("not_found", "conflict")
    assert snapshot(kd) == before


def test_triage_child_is_never_promoted_by_parents(shared_kd):
    """A triage task stays in triage when its parents finish; promote then applies the parent rule."""
    kd = shared_kd
    a = kd.create("A")["id"]
    b = kd.create("B")["id"]
    t1 = kd.create("parked 1", triage=True, parents=[a])["id"]
    t2 = kd.create("parked 2", triage=True, parents=[b])["id"]
    kd.call("task.complete", id=a)
    assert status(kd, t1) == "triage"
    assert "promoted" not in kinds_of(kd, t1)
    # promote: parent done -> ready; parent unfinished -> todo, then promoted by the parent
    assert kd.call("task.promote", id=t1)["task"]["status"] == "ready"
    assert kd.call("task.promote", id=t2)["task"]["status"] == "todo"
    kd.call("task.complete", id=b)
    assert status(kd, t2) == "ready"


def test_blocked_child_is_not_promoted_by_parents(shared_kd):
    """Completing a parent leaves a blocked child blocked (only todo children are promoted)."""
    kd = shared_kd
    a = kd.create("A")["id"]
    c = kd.create("C")["id"]
    kd.call("task.block", id=c, reason="wait")
    kd.call("task.link", parent=a, child=c)
    kd.call("task.complete", id=a)
    assert status(kd, c) == "blocked"
    assert kd.call("task.unblock", id=c)["task"]["status"] == "ready"


def test_link_and_unlink_via_kanbanctl(shared_kd):
    """`kanbanctl link` / `unlink` change the dependency and print the child's new status."""
    kd = shared_kd
    p, c = kd.create("P")["id"], kd.create("C")["id"]
    r = kd.ctl("link", p, c)
    assert r.returncode == 0, r.stderr
    assert c in r.stdout and "todo" in r.stdout
    assert status(kd, c) == "todo"
    out = kd.ctl_json("unlink", p, c)
    assert out["id"] == c and out["status"] == "ready"
    r = kd.ctl("link", c, c)
    assert r.returncode != 0 and c in r.stderr
    assert kd.ctl("link", p, c).returncode == 0
    r = kd.ctl("link", c, p)
    assert r.returncode == 1 and "cycle" in r.stderr, r
