"""Notify subscriptions and delivery (SPEC §9; §6 notify-subscribe/list/unsubscribe)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from stream_helpers import (attempts, config, head, json_lines, notifier_cmd, reap_leftovers,
                            wait_for, worker_cmd)

assert reap_leftovers  # autouse: kills what a test left running

# a profile whose worker crashes at once; the long backoff keeps it from running again
CRASHER = {"command": worker_cmd("--exit", "3")}
DAEMON = {"retry_backoff": "10m", "retry_backoff_max": "10m", "failure_limit": 5}


def delivered(out: Path, n: int, what: str = "deliveries") -> list[dict[str, Any]]:
    """Wait until the notifier has written at least n documents to `out`; return them."""
    return wait_for(lambda: docs if len(docs := json_lines(out)) >= n else None, 20,
                    f"{n} {what} in {out.name}")


def cursor_at(k: Any, sub_id: int, event_id: int) -> None:
    """Wait until the subscription's cursor has reached event_id (delivery finished)."""
    wait_for(lambda: any(s["id"] == sub_id and s["last_event_id"] >= event_id
                         for s in subs_of(k)), 10, f"subscription {sub_id} to reach #{event_id}")


def subs_of(k: Any, task_id: str | None = None) -> list[dict[str, Any]]:
    return k.call("notify.list", **({"task_id": task_id} if task_id else {}))["subscriptions"]


def test_notifier_gets_crashed_blocked_and_completed_events_as_json_on_stdin(
        kanband_factory, home):
    """A [notifiers.chat] command receives the task's crashed, blocked and completed events,
    in order, each as one JSON document {event, task, subscription} on stdin."""
    out = home / "chat.jsonl"
    k = kanband_factory(config(DAEMON, profiles={"crasher": CRASHER},
                               notifiers={"chat": notifier_cmd(home, out)}))
    t = k.create("will crash", assignee="crasher", triage=True)["id"]
    sub = k.call("notify.subscribe", task_id=t, platform="chat", chat_id="c-1",
                 thread_id="th-9", user_id="u-7")
    assert sub["warning"] is None
    k.call("task.promote", id=t)
    # each change waits until the previous delivery is complete (cursor advanced); a
    # change made while a delivery is in flight is the next test's business
    [crashed] = delivered(out, 1, "crashed event")
    cursor_at(k, sub["subscription"]["id"], crashed["event"]["id"])
    k.call("task.block", id=t, reason="needs a human")
    blocked = delivered(out, 2)[1]
    cursor_at(k, sub["subscription"]["id"], blocked["event"]["id"])
    k.call("task.complete", id=t, summary="fixed by hand\nmore detail")
    docs = delivered(out, 3)

    assert [d["event"]["kind"] for d in docs] == ["crashed", "blocked", "completed"]
    ids = [d["event"]["id"] for d in docs]
    assert ids == sorted(ids) and len(set(ids)) == 3
    for d in docs:
        assert set(d) == {"event", "task", "subscription"}
        assert d["event"]["task_id"] == t and d["task"]["id"] == t
        assert d["task"]["title"] == "will crash" and d["task"]["assignee"] == "crasher"
        assert d["subscription"] == {"id": sub["subscription"]["id"], "platform": "chat",
                                     "chat_id": "c-1", "thread_id": "th-9", "user_id": "u-7"}
    assert crashed["event"]["payload"]["exit_code"] == 3
    assert docs[1]["event"]["payload"]["reason"] == "needs a human"
    assert docs[2]["event"]["payload"]["summary"] == "fixed by hand"
    assert docs[2]["task"]["status"] == "done"
    # exit 0 advanced the cursor: nothing was sent twice, and the task being done ends it
    assert len(attempts(out)) == 3
    wait_for(lambda: subs_of(k, t) == [], 10, "the subscription of the done task to end")


def test_event_committed_during_a_delivery_is_still_delivered_before_the_end(
        kanband_factory, home):
    """A task completed while the notifier is still busy with its previous (blocked) event
    gets its completed event delivered too; only then does the subscription end."""
    out, hold = home / "chat.jsonl", home / "hold"
    k = kanband_factory(config(DAEMON, notifiers={
        "chat": notifier_cmd(home, out, "--hold", str(hold))}))
    t = k.create("finished mid-delivery")["id"]
    k.call("notify.subscribe", task_id=t, platform="chat")
    k.call("task.block", id=t, reason="first")
    delivered(out, 1, "the blocked event (its notifier still running)")
    k.call("task.complete", id=t, summary="second")  # while that delivery is in flight
    hold.touch()
    wait_for(lambda: subs_of(k, t) == [], 20, "the subscription to end")
    # it ended (the task is done): by then every terminal event must have been sent
    docs = json_lines(out)
    assert [d["event"]["kind"] for d in docs] == ["blocked", "completed"], (
        "the subscription ended without delivering the completed event")


def test_failing_notifier_is_retried_and_does_not_hold_up_another_platform(
        kanband_factory, home):
    """A notifier that fails is retried with backoff until it succeeds (once, no duplicate),
    while another platform's subscription to the same task is delivered meanwhile."""
    flaky, good, gate = home / "flaky.jsonl", home / "good.jsonl", home / "gate"
    k = kanband_factory(config(DAEMON, notifiers={
        "flaky": notifier_cmd(home, flaky, "--fail-first", "2", "--gate", str(gate)),
        "good": notifier_cmd(home, good)}))
    t = k.create("watched by two")["id"]
    k.call("notify.subscribe", task_id=t, platform="flaky", chat_id="f")
    k.call("notify.subscribe", task_id=t, platform="good", chat_id="g")
    k.call("task.complete", id=t, summary="shipped")

    [doc] = delivered(good, 1, "delivery to the good platform")
    assert doc["event"]["kind"] == "completed" and doc["subscription"]["platform"] == "good"
    assert json_lines(flaky) == []  # its gate is still closed: it cannot have succeeded
    wait_for(lambda: len(attempts(flaky)) >= 1, 10, "a first (failing) attempt")
    # the good subscription is done (task done, all delivered); the flaky one waits
    wait_for(lambda: [s["platform"] for s in subs_of(k, t)] == ["flaky"], 10,
             "only the failing subscription to remain")

    wait_for(lambda: len(attempts(flaky)) >= 2, 20, "a retry of the failed delivery")
    gate.touch()
    [fdoc] = delivered(flaky, 1, "the retried delivery")
    assert fdoc["event"] == doc["event"]
    assert len(attempts(flaky)) >= 3
    assert all(a["event"]["id"] == doc["event"]["id"] for a in attempts(flaky))
    wait_for(lambda: subs_of(k, t) == [], 10, "the retried subscription to end")
    assert len(json_lines(flaky)) == 1 and len(json_lines(good)) == 1
    warnings = [e for e in k.log_events() if e.get("event") == "notify_failed"]
    assert warnings and all(w["platform"] == "flaky" for w in warnings)


def test_new_subscription_does_not_replay_earlier_events(kanband_factory, home):
    """A subscription made after a crash starts at the event head: only later terminal
    events are delivered, never the earlier crash."""
    out = home / "chat.jsonl"
    k = kanband_factory(config(DAEMON, profiles={"crasher": CRASHER},
                               notifiers={"chat": notifier_cmd(home, out)}))
    t = k.create("crashes first", assignee="crasher")["id"]
    wait_for(lambda: "crashed" in [e["kind"] for e in k.call("task.show", id=t)["events"]],
             20, "the crash")
    h = head(k)
    r = k.ctl("notify-subscribe", t, "--platform", "chat", "--chat-id", "late", "--json")
    assert r.returncode == 0, r.stderr
    sub = json.loads(r.stdout)
    assert sub["task_id"] == t and sub["platform"] == "chat" and sub["last_event_id"] == h
    k.call("task.block", id=t, reason="after subscribing")
    docs = delivered(out, 1)
    # delivery is in event order, so a replayed crash would have come first
    assert [d["event"]["kind"] for d in docs] == ["blocked"]
    assert docs[0]["event"]["id"] > h
    assert [a["event"]["kind"] for a in attempts(out)] == ["blocked"]


def test_subscriptions_end_when_their_task_is_done_or_archived(kanband_factory, home):
    """notify-list shows a subscription until its task is done or archived; a blocked
    task's subscription stays until notify-unsubscribe removes it."""
    out = home / "chat.jsonl"
    k = kanband_factory(config(DAEMON, notifiers={"chat": notifier_cmd(home, out)}))
    archived, done, blocked = (k.create(n)["id"] for n in ("to archive", "to finish", "to block"))
    for t in (archived, done, blocked):
        r = k.ctl("notify-subscribe", t, "--platform", "chat", "--chat-id", t)
        assert r.returncode == 0 and "subscribed #" in r.stdout and t in r.stdout, r.stderr
    assert sorted(s["task_id"] for s in k.ctl_json("notify-list")) == sorted(
        [archived, done, blocked])

    k.call("task.archive", id=archived)
    k.call("task.complete", id=done)
    k.call("task.block", id=blocked, reason="wait")
    wait_for(lambda: [s["task_id"] for s in k.ctl_json("notify-list")] == [blocked], 15,
             "the archived and done tasks' subscriptions to end")
    docs = delivered(out, 2)
    assert sorted((d["event"]["task_id"], d["event"]["kind"]) for d in docs) == sorted(
        [(done, "completed"), (blocked, "blocked")])
    # the blocked task's subscription stays, with its cursor at the delivered event
    [s] = k.ctl_json("notify-list", blocked)
    blocked_doc = next(d for d in docs if d["event"]["task_id"] == blocked)
    wait_for(lambda: k.ctl_json("notify-list", blocked)[0]["last_event_id"]
             == blocked_doc["event"]["id"], 10, "the cursor to advance")

    r = k.ctl("notify-unsubscribe", blocked, "--platform", "chat")
    assert r.returncode == 0 and "removed 1" in r.stdout, r.stderr
    assert k.ctl_json("notify-list") == []
    r = k.ctl("notify-unsubscribe", blocked, "--platform", "chat")
    assert r.returncode == 1 and blocked in r.stderr
    r = k.ctl("notify-list")
    assert r.returncode == 0 and "(no subscriptions)" in r.stdout


def test_subscribe_to_unconfigured_platform_warns_and_delivers_after_reload(
        kanband_factory, home):
    """Subscribing to a platform with no [notifiers] command warns; its events wait and are
    delivered once the command is configured and the config reloaded."""
    out = home / "late.jsonl"
    k = kanband_factory(config(DAEMON))
    t = k.create("early")["id"]
    r = k.ctl("notify-subscribe", t, "--platform", "late")
    assert r.returncode == 0
    assert "warning" in r.stderr and "[notifiers.late]" in r.stderr
    k.call("task.complete", id=t, summary="before the notifier existed")
    wait_for(lambda: any(e.get("event") == "notify_no_notifier" for e in k.log_events()), 10,
             "the daemon to log that no notifier is configured")
    assert [s["task_id"] for s in subs_of(k)] == [t]  # kept: not delivered yet
    k.write_config(config(DAEMON, notifiers={"late": notifier_cmd(home, out)}))
    assert k.ctl("reload").returncode == 0
    [doc] = delivered(out, 1)
    assert doc["event"]["kind"] == "completed" and doc["event"]["task_id"] == t
    wait_for(lambda: subs_of(k) == [], 10, "the subscription to end after delivery")


def test_notify_subscribe_refuses_unknown_task_and_empty_platform(shared_kd):
    """notify-subscribe to a task that does not exist exits 1 naming it; an empty platform
    is refused."""
    r = shared_kd.ctl("notify-subscribe", "t_00000000", "--platform", "chat")
    assert r.returncode == 1 and "t_00000000" in r.stderr
    t = shared_kd.create("x")["id"]
    with pytest.raises(Exception) as ei:
        shared_kd.call("notify.subscribe", task_id=t, platform=" ")
    assert getattr(ei.value, "code", None) == "invalid_argument"


def _stuck_cmd(marker: Path) -> list[str]:
    """A notifier command that records its pid in `marker`, then never exits."""
    return [sys.executable, "-c", "import os, sys, time\n"
            "open(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(3600)", str(marker)]


def test_hanging_notifier_does_not_hold_up_another_platform(kanband_factory, home):
    """While one platform's notifier command hangs, another platform's subscription to the
    same task is delivered."""
    good, marker = home / "good.jsonl", home / "stuck.pid"
    k = kanband_factory(config(DAEMON, notifiers={"stuck": _stuck_cmd(marker),
                                                  "good": notifier_cmd(home, good)}))
    t = k.create("one hangs")["id"]
    k.call("notify.subscribe", task_id=t, platform="stuck")
    k.call("notify.subscribe", task_id=t, platform="good")
    k.call("task.complete", id=t)
    wait_for(marker.exists, 10, "the stuck notifier to start")
    [doc] = delivered(good, 1)
    assert doc["event"]["kind"] == "completed"
    wait_for(lambda: [s["platform"] for s in subs_of(k, t)] == ["stuck"], 10,
             "the delivered subscription to end and the stuck one to remain")
    assert k.call("system.ping")["pong"] is True


def test_notifier_running_at_shutdown_does_not_outlive_kanband(kanband_factory, home):
    """A notifier command still running when kanband stops cleanly is ended with it, not
    left behind as an orphan."""
    marker = home / "stuck.pid"
    k = kanband_factory(config(DAEMON, notifiers={"stuck": _stuck_cmd(marker)}))
    t = k.create("stopped mid-delivery")["id"]
    k.call("notify.subscribe", task_id=t, platform="stuck")
    k.call("task.complete", id=t)
    pid = int(wait_for(lambda: marker.read_text().strip(), 10, "the notifier's pid"))
    assert k.stop() == 0

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_for(gone, 5, f"notifier pid {pid} to be gone after kanband exited")


def test_undelivered_notification_survives_a_daemon_restart(kanband_factory, home):
    """A delivery still failing when kanband stops is retried after it starts again, and
    sent exactly once."""
    out, gate = home / "chat.jsonl", home / "gate"
    k = kanband_factory(config(DAEMON, notifiers={
        "chat": notifier_cmd(home, out, "--gate", str(gate))}))
    t = k.create("across a restart")["id"]
    k.call("notify.subscribe", task_id=t, platform="chat", chat_id="r")
    k.call("task.complete", id=t, summary="before the restart")
    wait_for(lambda: len(attempts(out)) >= 1, 10, "a first (failing) attempt")
    assert k.stop() == 0
    gate.touch()
    k.start()
    [doc] = delivered(out, 1)
    assert doc["event"]["kind"] == "completed" and doc["event"]["task_id"] == t
    wait_for(lambda: subs_of(k) == [], 10, "the subscription to end")
    assert len(json_lines(out)) == 1


def test_gc_keeps_events_a_subscription_has_not_delivered(kanband_factory, home):
    """gc with no event retention deletes old events of finished tasks, but not the
    ones a notify subscription still has to deliver: they go out once the notifier
    works, and are collected after that."""
    out = home / "kept.jsonl"
    k = kanband_factory(config(DAEMON))
    t = k.create("watched")["id"]
    other = k.create("unwatched")["id"]
    k.call("notify.subscribe", task_id=t, platform="later")
    k.call("task.complete", id=t, summary="done while nobody could be told")
    k.call("task.complete", id=other, summary="nobody asked")
    k.create("newest event")  # the board's newest event is always kept: not these
    wait_for(lambda: any(e.get("event") == "notify_no_notifier" for e in k.log_events()), 10,
             "the daemon to log that no notifier is configured")
    k.call("board.gc", event_retention_days=0, log_retention_days=30)
    kinds = [e["kind"] for e in k.call("task.show", id=t)["events"]]
    assert "completed" in kinds, kinds
    assert k.call("task.show", id=other)["events"] == []
    k.write_config(config(DAEMON, notifiers={"later": notifier_cmd(home, out)}))
    assert k.ctl("reload").returncode == 0
    [doc] = delivered(out, 1)
    assert doc["event"]["kind"] == "completed" and doc["event"]["task_id"] == t
    wait_for(lambda: subs_of(k) == [], 10, "the subscription to end after delivery")
    k.call("board.gc", event_retention_days=0, log_retention_days=30)
    assert k.call("task.show", id=t)["events"] == []
