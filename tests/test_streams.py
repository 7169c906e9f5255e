"""Live event streams (SPEC §5 subscriptions, §6 tail/watch/log --follow/wait)."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from pathlib import Path

import msgpack
import pytest

from kanband.errors import KanbanError
from stream_helpers import (CtlProc, Sub, bg, comment_many, config, consecutive, head,
                            reap_leftovers, wait_for, worker_cmd)

assert reap_leftovers  # autouse: kills what a test left running


def _u() -> str:
    return uuid.uuid4().hex[:8]


def _live_split(sub: Sub) -> tuple[list[int], list[int]]:
    """Ids read before and after the subscription's single `live` notice."""
    lives = [i for i, (m, _) in enumerate(sub.notes) if m == "live"]
    assert len(lives) == 1, f"expected exactly one `live` notice, got {len(lives)}"
    i = lives[0]
    assert sub.notes[i][1]["subscription"] == sub.id
    before = [p["id"] for m, p in sub.notes[:i] if m == "event"]
    after = [p["id"] for m, p in sub.notes[i + 1:] if m == "event"]
    return before, after


# -- gap-free replay -> live ---------------------------------------------------------
def test_every_event_of_500_rapid_changes_arrives_once_in_order_across_replay_to_live(kd):
    """Subscribers (RPC and `kanbanctl watch --json`) that join while 500 changes are being
    written see every event exactly once, in id order, across the replay->live switch."""
    tid = kd.create("busy")["id"]
    comment_many(kd, tid, 1500)  # a history long enough that replay spans several batches
    progress = [0]
    gates = {100: threading.Event(), 250: threading.Event(), 400: threading.Event()}

    def writer() -> None:
        with kd.client() as c:
            for i in range(500):
                if i in gates:
                    assert gates[i].wait(30), f"writer gate {i} never opened"
                if i % 5 == 3:
                    c.call("task.create", {"title": f"w{i}", "assignee": "nobody-here"})
                elif i % 5 == 4:
                    c.call("task.assign", {"id": tid, "assignee": f"who{i}"})
                else:
                    c.call("task.comment", {"id": tid, "body": f"w{i}"})
                progress[0] = i + 1

    thread, result = bg(writer)
    watch = None
    subs: list[Sub] = []
    try:
        wait_for(lambda: progress[0] >= 100, 30, "100 changes written")
        # Subscribes from the start and is not read until the end: its replay stalls on a
        # full socket while the writer goes on, so ~400 live events queue during replay.
        a = Sub(kd, timeout=10, since=0)
        subs.append(a)
        gates[100].set()
        wait_for(lambda: progress[0] >= 250, 30, "250 changes written")
        watch = CtlProc(kd, "watch", "--json", "--since", "0")
        watch.wait_line(lambda ln: True, what="a first replayed event")
        gates[250].set()
        wait_for(lambda: progress[0] >= 400, 30, "400 changes written")
        mid = head(kd) - 700
        b = Sub(kd, timeout=10, since=mid)
        subs.append(b)
        gates[400].set()
        thread.join(60)
        assert result.get(timeout=1) is None
        # one more event after the burst: a subscriber that re-sent or skipped any
        # queued event shows it before this one
        kd.call("task.comment", id=tid, body="sentinel")
        final = head(kd)

        assert a.response["since"] == 0 and a.response["head"] < final
        a.read_to_event(final)
        consecutive(a.ids, 1, final)
        before, after = _live_split(a)
        assert before and before[-1] == a.response["head"] and after and after[0] == before[-1] + 1
        assert all(e["subscription"] == a.id for e in a.events)

        assert b.response["since"] == mid and mid < b.response["head"] < final
        b.read_to_event(final)
        consecutive(b.ids, mid + 1, final)
        before, after = _live_split(b)
        assert before[-1] == b.response["head"] and after

        watch.wait_line(lambda ln: json.loads(ln)["id"] >= final, 30, f"event #{final}")
        assert watch.interrupt() == 0
        docs = watch.json_lines()
        assert all(isinstance(d, dict) for d in docs)
        consecutive([d["id"] for d in docs], 1, final)
    finally:
        for g in gates.values():
            g.set()
        for s in subs:
            s.close()
        if watch is not None:
            watch.kill()


def test_filters_task_id_kinds_assignee_tenant_apply_to_replay_and_live(shared_kd):
    """task_id, kinds, assignee and tenant filters (alone and combined) select the same
    events in the replayed history as in the live push, and nothing else."""
    k = shared_kd
    u = _u()
    alice, bob, acme, other = f"alice{u}", f"bob{u}", f"acme{u}", f"other{u}"
    h0 = head(k)
    owner: dict[str, tuple[str, str]] = {}

    def create(title: str, assignee: str, tenant: str) -> str:
        t = k.create(title, assignee=assignee, tenant=tenant)["id"]
        owner[t] = (assignee, tenant)
        return t

    a = create("a", alice, acme)
    b = create("b", bob, acme)
    c = create("c", alice, other)
    k.call("task.comment", id=b, body="on b")
    k.call("task.comment", id=a, body="on a")
    k.call("task.block", id=c, reason="stuck")

    preds = {
        "task": (dict(task_id=a), lambda e: e["task_id"] == a),
        "kinds": (dict(kinds=["commented", "blocked"]),
                  lambda e: e["kind"] in ("commented", "blocked")),
        "assignee": (dict(assignee=alice), lambda e: owner.get(e["task_id"], ("", ""))[0] == alice),
        "tenant": (dict(tenant=acme), lambda e: owner.get(e["task_id"], ("", ""))[1] == acme),
        "all": (dict(assignee=alice, tenant=acme, kinds=["commented"]),
                lambda e: owner.get(e["task_id"]) == (alice, acme) and e["kind"] == "commented"),
    }
    everything = Sub(k, since=h0)
    subs = {name: Sub(k, since=h0, **params) for name, (params, _) in preds.items()}
    try:
        for s in [everything, *subs.values()]:
            s.read_until(lambda m, p: m == "live", "the live notice")
        # live: changes that some filters match and others do not, ending with one
        # (a comment on `a`) that every filter matches
        d = create("d", alice, acme)
        k.call("task.comment", id=c, body="on c")
        k.call("task.comment", id=b, body="on b again")
        k.call("task.block", id=b, reason="later")
        k.call("task.comment", id=d, body="on d")
        k.call("task.unblock", id=c)
        k.call("task.comment", id=a, body="last")
        final = head(k)
        everything.read_to_event(final)
        consecutive(everything.ids, h0 + 1, final)
        replay, _ = _live_split(everything)
        for name, s in subs.items():
            _, pred = preds[name]
            s.read_to_event(final)
            got_replay, got_live = _live_split(s)
            want = [e for e in everything.events if pred(e)]
            assert got_replay == [e["id"] for e in want if e["id"] <= replay[-1]], name
            assert got_live == [e["id"] for e in want if e["id"] > replay[-1]], name
            assert [e["kind"] for e in s.events] == [e["kind"] for e in want], name
            assert got_live and got_replay, f"{name}: both phases should have events"
    finally:
        everything.close()
        for s in subs.values():
            s.close()


def test_subscribe_refuses_unknown_task_and_bad_since(shared_kd):
    """events.subscribe to a task that does not exist is not_found; a non-integer since is
    invalid_argument."""
    with shared_kd.client() as c:
        with pytest.raises(KanbanError) as ei:
            c.call("events.subscribe", {"task_id": "t_00000000"})
        assert ei.value.code == "not_found"
        with pytest.raises(KanbanError) as ei:
            c.call("events.subscribe", {"since": "yesterday"})
        assert ei.value.code == "invalid_argument"


def test_unsubscribe_stops_pushes_and_is_per_connection(shared_kd):
    """After events.unsubscribe no event of that subscription arrives; another
    connection cannot end it."""
    k = shared_kd
    t = k.create("quiet")["id"]
    s = Sub(k, task_id=t)
    try:
        s.read_until(lambda m, p: m == "live", "live")
        k.call("task.comment", id=t, body="one")
        s.read_event(lambda e: e["kind"] == "commented", "the first comment")
        with k.client() as other:
            with pytest.raises(KanbanError) as ei:
                other.call("events.unsubscribe", {"subscription": s.id})
            assert ei.value.code == "invalid_argument"
        assert s.client.call("events.unsubscribe", {"subscription": s.id})["ended"] is True
        mark = len(s.notes)
        k.call("task.comment", id=t, body="two: nobody listens")
        s2 = s.client.call("events.subscribe", {"task_id": t})["subscription"]
        k.call("task.comment", id=t, body="three")
        got = s.read_event(lambda e: e["subscription"] == s2, "an event of the new subscription")
        assert got[-1]["payload"]["len"] == len("three")
        stale = [p for m, p in s.notes[mark:] if m == "event" and p["subscription"] == s.id]
        assert stale == [], f"events pushed after unsubscribe: {stale}"
    finally:
        s.close()


# -- tail / watch --------------------------------------------------------------------
def test_tail_no_follow_prints_the_history_of_a_finished_task(shared_kd):
    """`tail ID --no-follow` of a done task prints each of its events once and exits 0; with
    --json every stdout line is one JSON object, in event order."""
    k = shared_kd
    t = k.create("finished")["id"]
    k.call("task.comment", id=t, body="hello", author="me")
    k.call("task.complete", id=t, summary="all finished\nsecond line")
    events = k.call("task.show", id=t)["events"]
    assert [e["kind"] for e in events] == ["created", "commented", "completed"]

    r = k.ctl("tail", t, "--no-follow")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(events), r.stdout
    for line, e in zip(lines, events):
        assert f"#{e['id']}" in line and t in line and e["kind"] in line, line
    assert "summary=all finished" in lines[-1]

    r = k.ctl("tail", "t_00000000", "--no-follow")
    assert r.returncode == 1 and "t_00000000" in r.stderr

    r = k.ctl("tail", t, "--no-follow", "--json")
    assert r.returncode == 0, r.stderr
    docs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert all(isinstance(d, dict) for d in docs)
    assert [d["id"] for d in docs] == [e["id"] for e in events]
    assert [d["kind"] for d in docs] == ["created", "commented", "completed"]
    assert all(d["task_id"] == t for d in docs)
    assert docs[1]["payload"] == {"author": "me", "len": 5}
    assert docs[2]["payload"]["summary"] == "all finished"


def test_tail_follows_new_events_and_exits_0_on_ctrl_c(shared_kd):
    """`tail ID` prints the history, then an event that happens later, and Ctrl-C ends
    it with status 0 and no traceback."""
    k = shared_kd
    t = k.create("followed")["id"]
    with CtlProc(k, "tail", t) as p:
        p.wait_line(lambda ln: "created" in ln and t in ln, what="the created event")
        k.call("task.block", id=t, reason="waiting-for-review")
        p.wait_line(lambda ln: "blocked" in ln and "reason=waiting-for-review" in ln,
                    what="the live blocked event")
        assert p.interrupt() == 0
        assert not any("Traceback" in ln for ln in p.err), p.err


def test_watch_json_prints_live_events_as_json_lines_and_exits_0_on_ctrl_c(shared_kd):
    """`watch --json` (from now) prints each later event as one JSON object per line, with
    no gap, and Ctrl-C ends it with status 0."""
    k = shared_kd
    t = k.create("watched")["id"]
    with CtlProc(k, "watch", "--json") as p:
        # it prints nothing until something happens: poke until the first line shows
        wait_for(lambda: p.lines or k.call("task.comment", id=t, body="poke") and False,
                 15, "watch to print a first event", interval=0.1)
        k.call("task.block", id=t, reason="look")
        p.wait_line(lambda ln: json.loads(ln)["kind"] == "blocked", what="the blocked event")
        assert p.interrupt() == 0
        docs = p.json_lines()
        assert all(isinstance(d, dict) and "subscription" not in d for d in docs)
        consecutive([d["id"] for d in docs], docs[0]["id"], docs[-1]["id"])
        assert docs[-1]["kind"] == "blocked" and docs[-1]["task_id"] == t
        assert docs[-1]["payload"] == {"reason": "look"}


def test_watch_cli_filters_by_assignee_tenant_and_kinds_with_since(shared_kd):
    """`watch --since N --assignee A --tenant T --kinds a,b` replays and then pushes only
    the matching events."""
    k = shared_kd
    u = _u()
    h0 = head(k)
    x = k.create("x", assignee=f"ann{u}", tenant=f"t{u}")["id"]
    y = k.create("y", assignee=f"ann{u}", tenant=f"o{u}")["id"]
    z = k.create("z", assignee=f"ben{u}", tenant=f"t{u}")["id"]
    for t in (x, y, z):
        k.call("task.block", id=t, reason=f"r-{t}")
    with CtlProc(k, "watch", "--json", "--since", str(h0), "--assignee", f"ann{u}",
                 "--tenant", f"t{u}", "--kinds", "blocked,completed") as p:
        p.wait_line(lambda ln: json.loads(ln)["kind"] == "blocked", what="the replayed block")
        for t in (z, y, x):
            k.call("task.complete", id=t)
        p.wait_line(lambda ln: json.loads(ln)["kind"] == "completed", what="x completed")
        assert p.interrupt() == 0
        docs = p.json_lines()
    assert [(d["task_id"], d["kind"]) for d in docs] == [(x, "blocked"), (x, "completed")]


def test_watch_exits_3_with_a_clear_message_when_the_daemon_stops(kanband_factory):
    """A running `watch` ends with exit status 3 and a message naming what happened and how
    to resume when kanband stops; with no daemon at all it also exits 3."""
    k = kanband_factory()
    t = k.create("before the stop")["id"]
    with CtlProc(k, "watch", "--since", "0") as p:
        p.wait_line(lambda ln: t in ln and "created" in ln, what="the replayed event")
        last = head(k)
        assert k.stop() == 0
        assert p.wait_exit() == 3
        err = "\n".join(p.err)
        assert "daemon closed the stream" in err and f"watch --since {last}" in err, err
        assert "Traceback" not in err
    r = k.ctl("watch")
    assert r.returncode == 3
    assert "not running" in r.stderr


# -- a slow subscriber ---------------------------------------------------------------
def _raw_subscribe(path: Path) -> tuple[socket.socket, msgpack.Unpacker, int]:
    """Subscribe on a raw socket with a tiny receive buffer; read only the response."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(15)
    s.connect(str(path))
    s.sendall(msgpack.packb([0, 1, "events.subscribe", [{}]], use_bin_type=True))
    unp = msgpack.Unpacker(raw=False, strict_map_key=False)
    while True:
        unp.feed(s.recv(512))
        for msg in unp:
            assert msg[0] == 1 and msg[1] == 1 and msg[2] is None, msg
            return s, unp, msg[3]["subscription"]


def test_slow_subscriber_is_dropped_with_lagged_while_another_keeps_receiving(kd):
    """A subscriber that never reads is dropped (a `lagged` notice, then the connection
    closes) once its queue overflows, while the daemon keeps answering pings and a second
    subscriber receives every event."""
    t = kd.create("firehose")["id"]
    h0 = head(kd)
    bad, unp, bad_id = _raw_subscribe(kd.socket)
    good = Sub(kd, timeout=30)
    target = [0]

    def read_good() -> None:
        last = 0
        while not target[0] or last < target[0]:
            m, p = good.next()
            if m == "event":
                last = p["id"]

    reader, reader_result = bg(read_good)

    def dropped() -> bool:
        return any(e.get("event") == "subscriber_dropped" and e.get("subscription") == bad_id
                   for e in kd.log_events())

    try:
        with kd.client(timeout=30) as writer:
            for _ in range(60):  # up to 30,000 events; the queue holds 10,000
                comment_many(kd, t, 500, client=writer)
                assert kd.call("system.ping")["pong"] is True
                if dropped():
                    break
            assert dropped(), "the subscriber that never reads was not dropped"
            comment_many(kd, t, 500, client=writer)  # the board goes on after the drop
        assert kd.call("system.ping")["pong"] is True
        final = head(kd)
        target[0] = final + 1
        kd.call("task.comment", id=t, body="sentinel: wakes the reader if it is caught up")
        assert head(kd) == final + 1
        reader.join(60)
        assert reader_result.get(timeout=1) is None
        consecutive(good.ids, h0 + 1, final + 1)

        # now read what the dropped subscriber was sent: events, `lagged`, then EOF
        msgs = list(unp)
        while True:
            data = bad.recv(1 << 20)
            if not data:
                break
            unp.feed(data)
            msgs.extend(unp)
        notes = [(m[1], m[2][0]) for m in msgs if m[0] == 2]
        assert notes[-1][0] == "lagged", notes[-3:]
        lagged = notes[-1][1]
        assert lagged["subscription"] == bad_id
        assert "resubscribe" in lagged["message"]
        ids = [p["id"] for m, p in notes if m == "event"]
        consecutive(ids, h0 + 1, lagged["cursor"])
        assert lagged["cursor"] < final
    finally:
        bad.close()
        good.close()


def test_unread_backlog_of_large_events_is_bounded_in_bytes(kd):
    """A subscriber that never reads is dropped before the daemon holds 80 MiB of events
    for it (ten times the 8 MiB per-connection buffer cap of SPEC §5), not only after
    10,000 events however large."""
    t = kd.create("big reasons")["id"]
    bad, _unp, bad_id = _raw_subscribe(kd.socket)
    reason = "r" * (200 * 1024)  # `blocked` events carry the whole reason

    def dropped() -> bool:
        return any(e.get("event") == "subscriber_dropped" and e.get("subscription") == bad_id
                   for e in kd.log_events())

    try:
        with kd.client(timeout=30) as c:
            for _ in range(40):  # 400 blocked events of 200 KiB: 80 MiB unread
                results = c.call_many([m for _ in range(10) for m in (
                    ("task.block", {"id": t, "reason": reason}), ("task.unblock", {"id": t}))])
                assert not [r for r in results if isinstance(r, Exception)]
                if dropped():
                    break
        assert kd.call("system.ping")["pong"] is True
        assert dropped(), ("a subscriber with 80 MiB of unread events was not dropped: the "
                           "per-subscriber queue is bounded by event count only")
    finally:
        bad.close()


# -- log --follow and wait -----------------------------------------------------------
def test_log_follow_shows_worker_output_as_it_is_written(kanband_factory, home):
    """`log ID --follow` prints a running worker's first line before the worker goes on,
    then its later output, and exits 0 once the task has finished."""
    gate = home / "gate"
    k = kanband_factory(config(profiles={"talker": {"command": worker_cmd(
        "--print", "first-line", "--wait-file", gate, "--print", "second-line", "--complete")}}))
    t = k.create("talk", assignee="talker")["id"]
    k.wait_status(t, "running")
    with CtlProc(k, "log", t, "--follow") as p:
        p.wait_line(lambda ln: ln == "first-line", what="the first line")
        assert not gate.exists() and "second-line" not in p.lines
        gate.touch()
        p.wait_line(lambda ln: ln == "second-line", what="the second line")
        assert p.wait_exit(30) == 0
        assert p.lines.index("first-line") < p.lines.index("second-line")
    assert k.task(t)["status"] == "done"


def test_wait_returns_when_tasks_end_with_the_documented_exit_codes(shared_kd):
    """`wait ID` blocks until the task ends: exit 0 when done, 1 when blocked, 4 on
    timeout."""
    k = shared_kd
    done, blocked, idle = (k.create(n)["id"] for n in ("to finish", "to block", "idle"))
    with CtlProc(k, "wait", done, "--timeout", "30") as p1, \
            CtlProc(k, "wait", blocked, "--timeout", "30") as p2:
        k.call("task.complete", id=done)
        k.call("task.block", id=blocked, reason="no")
        assert p1.wait_exit(30) == 0
        assert p2.wait_exit(30) == 1
        assert any(done in ln and "done" in ln for ln in p1.lines), p1.lines
    r = k.ctl("wait", idle, "--timeout", "0.2")
    assert r.returncode == 4, r.stderr
    assert "timed out" in r.stderr
