"""The status machine of SPEC §3: every transition of the one table, walked on a
real daemon, and every refusal (naming the task and its status, changing nothing)."""

from __future__ import annotations

import pytest

from conftest import Kanband, events_of, kinds_of, rpc_error, snapshot
from kanband import states

# SPEC §3, row by row.
SPEC_PAIRS = {
    ("new", "triage"), ("new", "ready"), ("new", "todo"),
    ("triage", "todo"), ("triage", "ready"),
    ("ready", "todo"),
    ("todo", "ready"),
    ("ready", "running"),
    ("running", "ready"),
    ("running", "blocked"), ("ready", "blocked"),
    ("blocked", "ready"), ("blocked", "todo"),
    ("running", "done"), ("ready", "done"), ("blocked", "done"),
    *((s, "archived") for s in ("triage", "todo", "ready", "running", "blocked", "done")),
}
KNOWN_ACTIONS = {"create", "promote", "demote", "promote_deps", "claim", "requeue", "block",
                 "give_up", "unblock", "complete", "archive"}
# SPEC §4 outcome table: outcome -> (counts as failure, status the task goes to)
SPEC_OUTCOMES = {
    "completed": (False, "done"), "blocked": (False, "blocked"),
    "crashed": (True, "ready"), "no_result": (True, "ready"), "timed_out": (True, "ready"),
    "stale": (True, "ready"), "spawn_failed": (True, "ready"),
    "rate_limited": (False, "ready"), "reclaimed": (False, "ready"),
    "interrupted": (False, "ready"), "lost": (False, "ready"),
}


# -- the table itself (pure) --------------------------------------------------------
def test_table_holds_only_known_statuses_and_actions():
    """Every (from, to) pair uses known statuses, nothing leaves archived or enters `new`, and every action is known."""
    for (src, dst), actions in states.TRANSITIONS.items():
        assert src in (*states.STATUSES, states.NEW), src
        assert dst in states.STATUSES, dst
        assert src != states.ARCHIVED and dst != states.NEW and src != dst
        assert actions and set(actions) <= KNOWN_ACTIONS, (src, dst, actions)
    assert states.ACTIONS <= KNOWN_ACTIONS
    assert set(states.STATUSES) == {"triage", "todo", "ready", "running", "blocked", "done",
                                    "archived"}


def test_table_is_exactly_the_spec_table():
    """The transition table has exactly the rows of SPEC §3, no more and no fewer."""
    assert set(states.TRANSITIONS) == SPEC_PAIRS


def test_outcome_table_matches_spec():
    """Each run outcome counts as a failure and moves the task exactly as SPEC §4 says."""
    assert states.OUTCOMES == SPEC_OUTCOMES


def test_refusal_wording_names_task_and_status():
    """Refusal text reads `cannot <verb> <task>: status is <status>`."""
    assert states.refusal("complete", "t_1a2b3c4d", "archived") == \
        "cannot complete t_1a2b3c4d: status is archived"


# -- getting a task into a status on a real daemon -------------------------------------
def claim(kd: Kanband, tid: str, ttl: float | None = None) -> dict:
    params = {"id": tid} if ttl is None else {"id": tid, "ttl": ttl}
    return kd.call("task.claim", **params)


def make(kd: Kanband, status: str) -> str:
    """A fresh task in `status`, reached through the public RPC surface."""
    if status == "triage":
        return kd.create("triage task", triage=True)["id"]
    if status == "todo":
        parent = kd.create("parent")["id"]
        return kd.create("child", parents=[parent])["id"]
    tid = kd.create(f"{status} task")["id"]
    if status == "running":
        claim(kd, tid)
    elif status == "blocked":
        kd.call("task.block", id=tid, reason="stuck")
    elif status == "done":
        kd.call("task.complete", id=tid, result="ok")
    elif status == "archived":
        kd.call("task.archive", id=tid)
    assert kd.task(tid)["status"] == status
    return tid


# -- every transition, one driver each ----------------------------------------------
def new_triage(kd):
    t = kd.create("parked", triage=True)
    assert t["status"] == "triage"
    ev = events_of(kd, t["id"])
    assert [e["kind"] for e in ev] == ["created"]
    assert ev[0]["payload"]["status"] == "triage"


def new_ready(kd):
    t = kd.create("free")
    assert t["status"] == "ready"
    assert events_of(kd, t["id"])[0]["payload"] == {"assignee": None, "status": "ready",
                                                    "parents": [], "tenant": None}


def new_todo(kd):
    p = kd.create("parent")["id"]
    t = kd.create("child", parents=[p], assignee="bob", tenant="acme")
    assert t["status"] == "todo"
    assert events_of(kd, t["id"])[0]["payload"] == {"assignee": "bob", "status": "todo",
                                                    "parents": [p], "tenant": "acme"}


def triage_todo(kd):
    p = kd.create("parent")["id"]
    t = kd.create("parked child", triage=True, parents=[p])["id"]
    assert kd.task(t)["status"] == "triage"
    assert kd.call("task.promote", id=t)["task"]["status"] == "todo"
    assert kinds_of(kd, t)[-1] == "promoted"


def triage_ready(kd):
    t = make(kd, "triage")
    assert kd.call("task.promote", id=t)["task"]["status"] == "ready"
    assert kinds_of(kd, t)[-1] == "promoted"


def ready_todo(kd):
    p, c = kd.create("parent")["id"], kd.create("child")["id"]
    assert kd.call("task.link", parent=p, child=c)["task"]["status"] == "todo"
    assert kinds_of(kd, c)[-2:] == ["linked", "demoted"]


def todo_ready(kd):
    p = kd.create("parent")["id"]
    c = kd.create("child", parents=[p])["id"]
    kd.call("task.complete", id=p)
    assert kd.task(c)["status"] == "ready"  # at once: no polling
    assert kinds_of(kd, c)[-1] == "promoted"


def ready_running(kd):
    t = make(kd, "ready")
    r = claim(kd, t)
    task = kd.task(t)
    assert task["status"] == "running"
    assert task["current_run_id"] == r["run_id"] and task["started_at"] is not None
    runs = kd.call("task.runs", id=t)["runs"]
    assert [x["id"] for x in runs] == [r["run_id"]] and runs[0]["outcome"] is None
    ev = events_of(kd, t)[-1]
    assert ev["kind"] == "claimed" and ev["run_id"] == r["run_id"]
    assert set(ev["payload"]) == {"run_id", "claimer", "lease_expires"}


def running_ready(kd):
    t = make(kd, "running")
    run_id = kd.task(t)["current_run_id"]
    out = kd.call("task.reclaim", id=t)["task"]
    assert out["status"] == "ready" and out["current_run_id"] is None
    assert out["consecutive_failures"] == 0 and out["not_before"] is None  # not a failure
    run = kd.call("task.runs", id=t)["runs"][-1]
    assert run["id"] == run_id and run["outcome"] == "reclaimed" and run["ended_at"]
    assert "reclaimed" in kinds_of(kd, t)


def running_blocked(kd):
    t = make(kd, "ready")
    tok = claim(kd, t)["token"]
    out = kd.call("task.block", id=t, reason="needs a human", token=tok)["task"]
    assert out["status"] == "blocked" and out["current_run_id"] is None
    assert kd.call("task.runs", id=t)["runs"][-1]["outcome"] == "blocked"
    ev = events_of(kd, t)[-1]
    assert ev["kind"] == "blocked" and ev["payload"] == {"reason": "needs a human"}


def ready_blocked(kd):
    t = make(kd, "ready")
    assert kd.call("task.block", id=t, reason="later")["task"]["status"] == "blocked"
    assert kinds_of(kd, t)[-1] == "blocked"


def blocked_ready(kd):
    t = make(kd, "blocked")
    out = kd.call("task.unblock", id=t)["task"]
    assert out["status"] == "ready" and out["consecutive_failures"] == 0
    assert kinds_of(kd, t)[-1] == "unblocked"


def blocked_todo(kd):
    t = make(kd, "blocked")
    p = kd.create("late parent")["id"]
    kd.call("task.link", parent=p, child=t)
    assert kd.task(t)["status"] == "blocked"  # linking does not unblock
    assert kd.call("task.unblock", id=t)["task"]["status"] == "todo"  # parents re-checked
    assert kinds_of(kd, t)[-1] == "unblocked"


def running_done(kd):
    t = make(kd, "ready")
    child = kd.create("child", parents=[t])["id"]
    r = claim(kd, t)
    out = kd.call("task.complete", id=t, summary="did it", metadata={"tests": 3},
                  token=r["token"])["task"]
    assert out["status"] == "done" and out["completed_at"] and out["current_run_id"] is None
    assert out["result"] == "did it"  # result defaults to the summary
    run = kd.call("task.runs", id=t)["runs"][-1]
    assert (run["outcome"], run["summary"], run["metadata"]) == ("completed", "did it", {"tests": 3})
    ev = events_of(kd, t)[-1]
    assert ev["kind"] == "completed" and ev["payload"] == {"summary": "did it"}
    assert kd.task(child)["status"] == "ready"  # children promoted at once


def ready_done(kd):
    t = make(kd, "ready")
    out = kd.call("task.complete", id=t, result="42")["task"]
    assert out["status"] == "done" and out["result"] == "42"


def blocked_done(kd):
    t = make(kd, "blocked")
    assert kd.call("task.complete", id=t)["task"]["status"] == "done"


def to_archived(src):
    def drive(kd):
        t = make(kd, src)
        run_id = kd.task(t)["current_run_id"]
        out = kd.call("task.archive", id=t)["task"]
        assert out["status"] == "archived" and out["current_run_id"] is None
        ev = events_of(kd, t)[-1]
        assert ev["kind"] == "archived"
        if src == "running":  # the run is closed as reclaimed
            run = kd.call("task.runs", id=t)["runs"][-1]
            assert run["id"] == run_id and run["outcome"] == "reclaimed"
            assert "reclaimed" in kinds_of(kd, t)
        assert t not in [x["id"] for x in kd.call("task.list")["tasks"]]  # hidden by default
    return drive


DRIVERS = {
    ("new", "triage"): new_triage, ("new", "ready"): new_ready, ("new", "todo"): new_todo,
    ("triage", "todo"): triage_todo, ("triage", "ready"): triage_ready,
    ("ready", "todo"): ready_todo, ("todo", "ready"): todo_ready,
    ("ready", "running"): ready_running, ("running", "ready"): running_ready,
    ("running", "blocked"): running_blocked, ("ready", "blocked"): ready_blocked,
    ("blocked", "ready"): blocked_ready, ("blocked", "todo"): blocked_todo,
    ("running", "done"): running_done, ("ready", "done"): ready_done,
    ("blocked", "done"): blocked_done,
    **{(s, "archived"): to_archived(s)
       for s in ("triage", "todo", "ready", "running", "blocked", "done")},
}


def test_every_table_row_has_a_driver():
    """The walk below covers every (from, to) pair of the transition table."""
    assert set(DRIVERS) == set(states.TRANSITIONS)


def test_walk_every_transition(kd):
    """Every (from, to) pair of the transition table happens on a real daemon, with its events."""
    for pair, drive in sorted(DRIVERS.items()):
        try:
            drive(kd)
        except AssertionError as e:
            raise AssertionError(f"transition {pair[0]} -> {pair[1]}: {e}") from e


# -- the causes that need special set-ups ---------------------------------------------
def test_failure_limit_gives_up_into_blocked(kanband_factory):
    """A counted failure that reaches failure_limit moves running -> blocked with a `gave_up` event."""
    kd = kanband_factory("[daemon]\nfailure_limit = 1\n")
    t = kd.create("flaky")["id"]
    claim(kd, t, ttl=1)
    task = kd.wait_status(t, {"blocked", "ready"}, timeout=15)
    assert task["status"] == "blocked", task
    assert task["consecutive_failures"] == 1 and task["current_run_id"] is None
    ev = events_of(kd, t)
    assert [e["kind"] for e in ev][-2:] == ["stale", "gave_up"]
    gave_up = ev[-1]["payload"]
    assert gave_up["failures"] == 1 and gave_up["last_outcome"] == "stale"
    assert set(gave_up) == {"failures", "last_outcome", "error"}
    # unblock resets the failure counter
    out = kd.call("task.unblock", id=t)["task"]
    assert out["status"] == "ready" and out["consecutive_failures"] == 0 and out["not_before"] is None


def test_assign_force_reclaims_a_running_task(kd):
    """`assign --force` on a running task ends its run `reclaimed` (no failure) and requeues it to the new assignee."""
    t = make(kd, "running")
    run_id = kd.task(t)["current_run_id"]
    out = kd.call("task.assign", id=t, assignee="carol", force=True)["task"]
    assert out["status"] == "ready" and out["assignee"] == "carol"
    assert out["consecutive_failures"] == 0 and out["not_before"] is None
    run = kd.call("task.runs", id=t)["runs"][-1]
    assert run["id"] == run_id and run["outcome"] == "reclaimed"


def test_completed_event_summary_is_the_first_line_capped_at_400(kd):
    """The `completed` event carries the summary's first line, at most 400 characters."""
    a, b = kd.create("a")["id"], kd.create("b")["id"]
    kd.call("task.complete", id=a, summary="headline\nmore detail\neven more")
    kd.call("task.complete", id=b, summary="y" * 1000)
    assert events_of(kd, a)[-1]["payload"] == {"summary": "headline"}
    assert events_of(kd, b)[-1]["payload"] == {"summary": "y" * 400}


# -- refusals ---------------------------------------------------------------------
REFUSALS = [
    # (verb, status it is refused in)
    *(("complete", s) for s in ("triage", "todo", "done", "archived")),
    *(("block", s) for s in ("triage", "todo", "blocked", "done", "archived")),
    *(("unblock", s) for s in ("triage", "todo", "ready", "running", "done", "archived")),
    *(("promote", s) for s in ("todo", "ready", "running", "blocked", "done", "archived")),
    *(("claim", s) for s in ("triage", "todo", "running", "blocked", "done", "archived")),
    *(("heartbeat", s) for s in ("triage", "todo", "ready", "blocked", "done", "archived")),
    *(("reclaim", s) for s in ("triage", "todo", "ready", "blocked", "done", "archived")),
    ("archive", "archived"),
    ("assign", "running"),
    ("assign", "archived"),
]


@pytest.mark.parametrize("verb,status", REFUSALS, ids=[f"{v}-{s}" for v, s in REFUSALS])
def test_refusal_names_task_and_status_and_changes_nothing(shared_kd, verb, status):
    """A verb applied in a status the table does not allow is a conflict naming the task and its status; nothing changes."""
    kd = shared_kd
    t = make(kd, status)
    params = {"assignee": "dave"} if verb == "assign" else {}
    before = snapshot(kd)
    err = rpc_error(kd, f"task.{verb}", id=t, **params)
    assert err.code == "conflict", err.message
    assert t in err.message and f"status is {status}" in err.message, err.message
    assert err.message.startswith(f"cannot {verb} {t}"), err.message
    assert snapshot(kd) == before


def test_cli_refusal_exits_1_with_the_message(shared_kd):
    """`kanbanctl complete` of an archived task exits 1 and says `cannot complete <id>: status is archived` on stderr."""
    kd = shared_kd
    t = make(kd, "archived")
    r = kd.ctl("complete", t)
    assert r.returncode == 1, r
    assert f"cannot complete {t}: status is archived" in r.stderr
    assert r.stdout == ""
    assert kd.task(t)["status"] == "archived"


def test_unknown_task_is_not_found(shared_kd):
    """Every status-changing verb on an id that does not exist is `not_found`."""
    kd = shared_kd
    for verb in ("complete", "block", "unblock", "archive", "promote", "claim", "heartbeat",
                 "reclaim"):
        err = rpc_error(kd, f"task.{verb}", id="t_00000000")
        assert err.code == "not_found", (verb, err.message)
        assert "t_00000000" in err.message


def test_reads_never_change_state(kd):
    """list, show, runs, context, stats, assignees and status leave tasks and events untouched."""
    for s in ("triage", "todo", "ready", "running", "blocked", "done", "archived"):
        make(kd, s)
    before = snapshot(kd)
    ids = [t["id"] for t in before["tasks"]]
    for _ in range(2):
        kd.call("task.list")
        kd.call("task.list", archived=True, status=["ready", "todo"])
        kd.call("board.stats")
        kd.call("board.assignees")
        kd.call("daemon.status")
        for tid in ids:
            kd.call("task.show", id=tid)
            kd.call("task.runs", id=tid)
            kd.call("task.context", id=tid)
    assert snapshot(kd) == before
