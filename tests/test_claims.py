"""External claims (SPEC §3, §4, §5): one winner among concurrent claimers,
leases that expire to `stale`, heartbeats that renew them, and run tokens that
only ever change their own task and are never stored in the clear."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from conftest import (ctl_concurrently, events_of, kinds_of, rpc_error, run_concurrently,
                      snapshot, wait_for)
from kanband.errors import KanbanError


def test_eight_concurrent_claimers_exactly_one_wins(shared_kd):
    """Eight clients claiming the same ready task at once: one gets the run, seven get `conflict`."""
    kd = shared_kd
    tid = kd.create("contended")["id"]
    clients = [kd.client() for _ in range(8)]
    results = run_concurrently(
        8, lambda i: clients[i].call("task.claim", {"id": tid, "claimer": f"w{i}"}))
    for c in clients:
        c.close()
    wins = [r for r in results if isinstance(r, dict)]
    losses = [r for r in results if isinstance(r, KanbanError)]
    assert len(wins) == 1 and len(losses) == 7, results
    assert all(e.code == "conflict" for e in losses), [e.message for e in losses]
    runs = kd.call("task.runs", id=tid)["runs"]
    assert [r["id"] for r in runs] == [wins[0]["run_id"]]
    assert kd.task(tid)["current_run_id"] == wins[0]["run_id"]
    assert kinds_of(kd, tid).count("claimed") == 1


def test_eight_concurrent_kanbanctl_claims_exactly_one_wins(shared_kd):
    """Eight `kanbanctl claim` processes at once: exactly one exits 0 with a token, the others exit 1."""
    kd = shared_kd
    tid = kd.create("contended")["id"]
    outs = ctl_concurrently(kd, [["claim", tid, "--json"]] * 8)
    winners = [o for o in outs if o[0] == 0]
    assert len(winners) == 1, outs
    assert sorted(o[0] for o in outs) == [0] + [1] * 7, outs
    doc = json.loads(winners[0][1])
    assert doc["token"] and doc["run_id"] == kd.task(tid)["current_run_id"]
    assert all(tid in o[2] and o[1] == "" for o in outs if o[0] == 1)


def test_claim_opens_a_run_with_a_lease(shared_kd):
    """A claim records an `external:<who>` claimer, a lease of now + ttl and a fresh token per claim."""
    kd = shared_kd
    tid = kd.create("t")["id"]
    before = time.time()
    r = kd.call("task.claim", id=tid, ttl=300, claimer="alice")
    after = time.time()
    assert r["token"] and r["run_id"].startswith("r_")
    assert before + 300 <= r["lease_expires"] <= after + 300
    run = kd.call("task.runs", id=tid)["runs"][0]
    assert run["claimer"] == "external:alice" and run["outcome"] is None
    task = kd.task(tid)
    assert task["lease_expires"] == r["lease_expires"]
    assert task["status"] == "running"
    # a second claim after the first ends gets a different token
    kd.call("task.reclaim", id=tid)
    r2 = kd.call("task.claim", id=tid)
    assert r2["token"] != r["token"] and r2["run_id"] != r["run_id"]


def test_default_lease_is_claim_ttl(kanband_factory):
    """Without --ttl the lease is daemon.claim_ttl long."""
    kd = kanband_factory('[daemon]\nclaim_ttl = "2h"\n')
    tid = kd.create("t")["id"]
    before = time.time()
    r = kd.call("task.claim", id=tid)
    assert before + 7200 <= r["lease_expires"] <= time.time() + 7200


def test_lease_expiry_requeues_as_stale(shared_kd):
    """An unrenewed lease expires on its own: run outcome `stale`, task ready, failure counted, backoff set."""
    kd = shared_kd
    tid = kd.create("t")["id"]
    r = kd.call("task.claim", id=tid, ttl=1)
    task = kd.wait_status(tid, "ready", timeout=10)
    run = kd.call("task.runs", id=tid)["runs"][-1]
    assert run["id"] == r["run_id"] and run["outcome"] == "stale"
    assert run["ended_at"] >= r["lease_expires"] - 0.01
    assert "lease" in (run["error"] or "")
    assert task["consecutive_failures"] == 1
    assert task["last_failure_error"] and "lease" in task["last_failure_error"]
    assert task["current_run_id"] is None and task["lease_expires"] is None
    # retry backoff: default retry_backoff 10s after the first failure
    assert task["not_before"] is not None and task["not_before"] >= run["ended_at"] + 9
    assert "backoff" in task["waiting_reason"]
    assert kinds_of(kd, tid)[-1] == "stale"
    # the claim guard honours not_before
    err = rpc_error(kd, "task.claim", id=tid)
    assert err.code == "conflict" and tid in err.message


def test_consecutive_stale_leases_give_up(kanband_factory):
    """Each expired lease counts; at failure_limit the task is blocked with `gave_up`."""
    kd = kanband_factory('[daemon]\nfailure_limit = 2\nretry_backoff = "0s"\n')
    tid = kd.create("t")["id"]
    kd.call("task.claim", id=tid, ttl=1)
    t = kd.wait_status(tid, "ready", timeout=10)
    assert t["consecutive_failures"] == 1
    kd.call("task.claim", id=tid, ttl=1)
    t = kd.wait_status(tid, "blocked", timeout=10)
    assert t["consecutive_failures"] == 2
    assert [r["outcome"] for r in kd.call("task.runs", id=tid)["runs"]] == ["stale", "stale"]
    gave_up = events_of(kd, tid)[-1]
    assert gave_up["kind"] == "gave_up"
    assert gave_up["payload"]["failures"] == 2 and gave_up["payload"]["last_outcome"] == "stale"


def test_heartbeat_renews_the_lease(shared_kd):
    """Heartbeats keep a 2 s lease alive past its first expiry; when they stop, it expires."""
    kd = shared_kd
    tid = kd.create("t")["id"]
    r = kd.call("task.claim", id=tid, ttl=2)
    first_expiry = r["lease_expires"]
    seen = []

    def beat():
        t = kd.call("task.heartbeat", id=tid, note="working", token=r["token"])["task"]
        assert t["status"] == "running", t
        seen.append(t["lease_expires"])
        return time.time() > first_expiry + 0.5

    wait_for(beat, timeout=10, what="heartbeats past the first lease", interval=0.2)
    assert seen == sorted(seen) and seen[-1] > first_expiry + 2
    task = kd.task(tid)
    assert task["status"] == "running" and task["current_run_id"] == r["run_id"]
    assert task["last_heartbeat_at"] is not None
    hb = [e for e in events_of(kd, tid) if e["kind"] == "heartbeat"]
    assert len(hb) == len(seen) and hb[0]["payload"] == {"note": "working"}
    # no more heartbeats: the lease runs out
    kd.wait_status(tid, "ready", timeout=10)
    assert kd.call("task.runs", id=tid)["runs"][-1]["outcome"] == "stale"


def test_kanbanctl_heartbeat_with_note(shared_kd):
    """`kanbanctl heartbeat ID --note` records the note and renews the lease."""
    kd = shared_kd
    tid = kd.create("t")["id"]
    r = kd.call("task.claim", id=tid, ttl=600)
    out = kd.ctl_json("heartbeat", tid, "--note", "half way",
                      env={"KANBAN_RUN_TOKEN": r["token"]})
    assert out["id"] == tid and out["lease_expires"] >= r["lease_expires"]
    assert events_of(kd, tid)[-1]["payload"] == {"note": "half way"}


def test_expired_lease_survives_a_daemon_crash(kd):
    """A lease taken before a kill -9 of kanband still expires (as `stale`) after the restart."""
    tid = kd.create("t")["id"]
    kd.call("task.claim", id=tid, ttl=1)
    kd.kill9()
    kd.start()
    kd.wait_status(tid, "ready", timeout=10)
    assert kd.call("task.runs", id=tid)["runs"][-1]["outcome"] == "stale"


# -- token scoping -------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [
    ("task.complete", {}), ("task.block", {"reason": "x"}), ("task.heartbeat", {}),
    ("task.unblock", {}), ("task.archive", {}), ("task.assign", {"assignee": "x"}),
    ("task.claim", {}), ("task.reclaim", {}),
])
def test_token_cannot_change_another_task(shared_kd, method, params):
    """A run token used on another task's status/lease is `forbidden` and changes nothing."""
    kd = shared_kd
    a, b = kd.create("A")["id"], kd.create("B")["id"]
    tok = kd.call("task.claim", id=a)["token"]
    if method in ("task.heartbeat", "task.reclaim"):
        kd.call("task.claim", id=b)  # make these applicable to B
    if method == "task.unblock":
        kd.call("task.block", id=b)
    before = snapshot(kd)
    err = rpc_error(kd, method, id=b, token=tok, **params)
    assert err.code == "forbidden", err.message
    assert snapshot(kd) == before


def test_token_cannot_promote_link_or_unlink_another_task(shared_kd):
    """A run token cannot promote another task or change its dependencies (which would change its status)."""
    kd = shared_kd
    a = kd.create("A")["id"]
    tok = kd.call("task.claim", id=a)["token"]
    parked = kd.create("parked", triage=True)["id"]
    child = kd.create("child")["id"]
    linked = kd.create("linked", parents=[kd.create("P")["id"]])["id"]
    parent_of_linked = kd.call("task.show", id=linked)["parents"][0]["id"]
    before = snapshot(kd)
    for method, params in (("task.promote", {"id": parked}),
                           ("task.link", {"parent": a, "child": child}),
                           ("task.unlink", {"parent": parent_of_linked, "child": linked})):
        err = rpc_error(kd, method, token=tok, **params)
        assert err.code == "forbidden", (method, err.message)
    assert snapshot(kd) == before


def test_token_changes_its_own_task(shared_kd):
    """A run token may heartbeat and complete its own task."""
    kd = shared_kd
    a = kd.create("A")["id"]
    tok = kd.call("task.claim", id=a)["token"]
    kd.call("task.heartbeat", id=a, token=tok)
    assert kd.call("task.complete", id=a, summary="ok", token=tok)["task"]["status"] == "done"


def test_ended_runs_token_is_refused(shared_kd):
    """After its run ends (completed, or its lease expired) a token cannot change the task any more."""
    kd = shared_kd
    a = kd.create("A")["id"]
    tok = kd.call("task.claim", id=a)["token"]
    kd.call("task.complete", id=a, token=tok)
    for method, extra in (("task.heartbeat", {}), ("task.block", {}), ("task.archive", {})):
        err = rpc_error(kd, method, id=a, token=tok, **extra)
        assert err.code == "forbidden", (method, err.message)
    assert kd.task(a)["status"] == "done"

    # the stale case: the task is ready again, the old worker must not complete it
    b = kd.create("B")["id"]
    tok_b = kd.call("task.claim", id=b, ttl=1)["token"]
    kd.wait_status(b, "ready", timeout=10)
    before = snapshot(kd)
    err = rpc_error(kd, "task.complete", id=b, token=tok_b)
    assert err.code == "forbidden", err.message
    assert snapshot(kd) == before


def test_unknown_token_is_forbidden(shared_kd):
    """A request carrying a token that matches no run is `forbidden`."""
    kd = shared_kd
    a = kd.create("A")["id"]
    err = rpc_error(kd, "task.complete", id=a, token="kt_not-a-real-token")
    assert err.code == "forbidden"
    assert kd.task(a)["status"] == "ready"


def test_kanbanctl_sends_the_token_from_the_environment(shared_kd):
    """kanbanctl run with another task's $KANBAN_RUN_TOKEN is refused (exit 1) and the task is untouched."""
    kd = shared_kd
    a, b = kd.create("A")["id"], kd.create("B")["id"]
    tok = kd.call("task.claim", id=a)["token"]
    r = kd.ctl("complete", b, env={"KANBAN_RUN_TOKEN": tok})
    assert r.returncode == 1, r
    assert b in r.stderr
    assert kd.task(b)["status"] == "ready"
    r = kd.ctl("complete", a, "--summary", "done by worker", env={"KANBAN_RUN_TOKEN": tok})
    assert r.returncode == 0, r.stderr
    assert kd.task(a)["status"] == "done"


def test_tokens_are_stored_hashed(kd):
    """The token text appears nowhere in the database (runs table, any table, or the raw files)."""
    tids = [kd.create(f"t{i}")["id"] for i in range(3)]
    tokens = [kd.call("task.claim", id=t)["token"] for t in tids]
    kd.call("task.heartbeat", id=tids[0], token=tokens[0])
    kd.call("task.complete", id=tids[1], token=tokens[1])
    db = sqlite3.connect(f"file:{kd.home / 'kanban.db'}?mode=ro", uri=True)
    try:
        runs = db.execute("SELECT * FROM runs").fetchall()
        assert len(runs) == 3
        cols = [d[0] for d in db.execute("SELECT * FROM runs").description]
        assert "token_hash" in cols
        hashes = [row[cols.index("token_hash")] for row in runs]
        assert all(hashes) and len(set(hashes)) == 3
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f"SELECT * FROM {table}"):
                text = " ".join(str(v) for v in row)
                for tok in tokens:
                    assert tok not in text, f"token stored in {table}"
    finally:
        db.close()
    for f in kd.home.glob("kanban.db*"):
        raw = f.read_bytes()
        for tok in tokens:
            assert tok.encode() not in raw, f"token bytes in {f.name}"
    # and no read shows it again
    for tid, tok in zip(tids, tokens):
        assert tok not in json.dumps(kd.call("task.show", id=tid))


def test_show_lists_the_runs_of_every_task_that_has_any(kanband_factory):
    """task.show's runs match task.runs for a task never claimed (none: show skips
    the query), one whose lease expired and was requeued (started_at is kept, so its
    run still shows), and one run to done by the shell profile."""
    kd = kanband_factory('[daemon]\nretry_backoff = "0s"\n')
    queued = kd.create("queued", triage=True)["id"]
    requeued = kd.create("requeued")["id"]
    kd.call("task.claim", id=requeued, ttl=1)
    kd.wait_status(requeued, "ready", timeout=10)
    ran = kd.create("ran", assignee="shell", body="echo ok")["id"]
    kd.wait_status(ran, "done")
    for tid, n in ((queued, 0), (requeued, 1), (ran, 1)):
        shown = kd.call("task.show", id=tid)
        assert shown["runs"] == kd.call("task.runs", id=tid)["runs"], tid
        assert len(shown["runs"]) == n, tid
        assert (shown["task"]["started_at"] is None) == (n == 0), tid
