"""Garbage collection and disk usage (SPEC §9 gc; §6 gc, stats)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kanband.errors import KanbanError
from stream_helpers import reap_leftovers, wait_for
from supervision_helpers import git_repo, stalled_git, start_with_path

assert reap_leftovers  # autouse: kills what a test left running

DAY = 86400


def shell_task(k: Any, title: str, script: str = "echo hello > out.txt; echo ok",
               **params: Any) -> str:
    """A task run by the built-in shell profile; waits until it is done."""
    t = k.create(title, assignee="shell", body=script, **params)["id"]
    k.wait_status(t, "done")
    return t


def age(path: Path, days: float) -> None:
    """Make a file look `days` old."""
    old = time.time() - days * DAY
    os.utime(path, (old, old), follow_symlinks=False)


def gc(k: Any, *args: str) -> dict[str, Any]:
    return k.ctl_json("gc", *args)


def test_gc_removes_only_archived_tasks_scratch_workspaces(kd, home):
    """gc deletes the scratch workspace of an archived task, keeps a done task's, and never
    touches the directory of an archived task's dir: workspace."""
    ws = kd.home / "workspaces"
    archived = shell_task(kd, "to archive")
    done = shell_task(kd, "stays done")
    own = home / "own-dir"
    dir_task = shell_task(kd, "in my dir", workspace=f"dir:{own}")
    for t in (archived, done):
        assert (ws / t / "out.txt").read_text() == "hello\n"
    assert (own / "out.txt").exists()
    kd.call("task.archive", id=archived)
    kd.call("task.archive", id=dir_task)

    r = gc(kd)
    assert r["workspaces"] == 1 and r["refused"] == [] and r["errors"] == []
    assert not (ws / archived).exists()
    assert (ws / done / "out.txt").read_text() == "hello\n"
    assert (own / "out.txt").read_text() == "hello\n"
    assert gc(kd)["workspaces"] == 0  # nothing left to do


def test_gc_refuses_a_workspace_symlinked_outside_its_root(kd, home):
    """An archived task's scratch workspace replaced by a symlink to a directory outside
    <home>/workspaces is reported in `refused` and nothing behind it is deleted."""
    t = shell_task(kd, "hijacked")
    kd.call("task.archive", id=t)
    outside = home / "outside"
    outside.mkdir()
    (outside / "marker").write_text("keep me")
    link = kd.home / "workspaces" / t
    subprocess.run(["rm", "-rf", str(link)], check=True)
    link.symlink_to(outside, target_is_directory=True)

    # and a symlink inside an archived workspace is removed, never followed
    inner = shell_task(kd, "holds a link")
    kd.call("task.archive", id=inner)
    (kd.home / "workspaces" / inner / "escape").symlink_to(outside, target_is_directory=True)

    r = gc(kd)
    assert r["workspaces"] == 1
    assert not (kd.home / "workspaces" / inner).exists()
    assert str(link) in r["refused"]
    assert (outside / "marker").read_text() == "keep me"
    assert link.is_symlink()

    text = kd.ctl("gc")
    assert text.returncode == 0
    assert "refused" in text.stderr and str(link) in text.stderr
    assert (outside / "marker").exists()


def test_gc_worktree_of_an_archived_task_is_removed_inside_the_repo_only(kd, home):
    """An archived task's git worktree is removed with `git worktree remove`, leaving the
    repository and a done task's worktree in place."""
    repo = git_repo(home / "repo", {"README": "r\n"})
    gone = shell_task(kd, "wt archived", workspace=f"worktree:{repo}")
    kept = shell_task(kd, "wt done", workspace=f"worktree:{repo}")
    assert (repo / ".worktrees" / gone / "out.txt").exists()
    kd.call("task.archive", id=gone)

    r = gc(kd)
    assert r["worktrees"] == 1, r
    assert not (repo / ".worktrees" / gone).exists()
    assert (repo / ".worktrees" / kept / "out.txt").exists()
    assert (repo / "README").read_text() == "r\n"


def test_gc_deletes_old_events_of_done_and_archived_tasks_only(kd):
    """gc with --event-retention-days 0 deletes every event of done and archived tasks and
    none of a ready task; the default 30 days deletes nothing recent; stats shrink."""
    done = kd.create("done")["id"]
    kd.call("task.comment", id=done, body="x")
    kd.call("task.complete", id=done)
    archived = kd.create("archived")["id"]
    kd.call("task.archive", id=archived)
    ready = kd.create("ready")["id"]
    kd.call("task.comment", id=ready, body="still here")
    blocked = kd.create("blocked")["id"]
    kd.call("task.block", id=blocked, reason="r")

    def events(t: str) -> list[dict[str, Any]]:
        return kd.call("task.show", id=t)["events"]

    keep = {t: events(t) for t in (ready, blocked)}
    n_gone = len(events(done)) + len(events(archived))
    before = kd.call("board.stats")
    assert isinstance(before["event_bytes"], int) and before["event_bytes"] > 0

    assert gc(kd)["events"] == 0  # default retention: 30 days
    r = gc(kd, "--event-retention-days", "0")
    assert r["events"] == n_gone
    assert events(done) == [] and events(archived) == []
    assert {t: events(t) for t in (ready, blocked)} == keep
    after = kd.call("board.stats")
    assert after["events"] == before["events"] - n_gone
    assert 0 < after["event_bytes"] < before["event_bytes"]
    assert after["event_head"] == before["event_head"]  # ids are never reused


def test_gc_deletes_old_log_files_but_not_recent_or_running_ones(kd, home):
    """gc deletes task logs older than --log-retention-days (and old run directories),
    keeps recent logs and a running task's log however old, and refuses a symlinked log."""
    logs = kd.home / "logs"
    old = shell_task(kd, "old log")
    recent = shell_task(kd, "recent log")
    gate = home / "gate"
    running = kd.create("running", assignee="shell",
                        body=f"echo started; while [ ! -e {gate} ]; do sleep 0.05; done")["id"]
    kd.wait_status(running, "running")
    wait_for(lambda: "started" in (logs / f"{running}.log").read_text(), 10,
             "the running task's output")
    outside = home / "secret.log"
    outside.write_text("not kanband's\n")
    fake = logs / "t_0badc0de.log"
    fake.symlink_to(outside)
    for p in (logs / f"{old}.log", logs / f"{running}.log", outside, fake):
        age(p, 40)
    stats = kd.call("board.stats")
    sizes = sum(p.lstat().st_size for p in logs.rglob("*") if not p.is_dir())
    assert stats["log_bytes"] == sizes and stats["log_bytes"] > 0

    r = gc(kd)  # default: 30 days
    assert r["logs"] == 1
    assert not (logs / f"{old}.log").exists()
    assert (logs / f"{recent}.log").exists() and (logs / f"{running}.log").exists()
    assert str(fake) in r["refused"] and outside.read_text() == "not kanband's\n"
    assert kd.call("board.stats")["log_bytes"] < stats["log_bytes"]

    runs = kd.home / "runs"
    ended = [run["id"] for t in (old, recent) for run in kd.call("task.runs", id=t)["runs"]]
    live_run = kd.task(running)["current_run_id"]
    assert all((runs / rid).is_dir() for rid in [*ended, live_run])
    r = gc(kd, "--log-retention-days", "0")
    assert r["logs"] == 1 and r["run_dirs"] == len(ended)  # the recent log, the ended runs
    assert not (logs / f"{recent}.log").exists()
    assert (logs / f"{running}.log").exists() and (runs / live_run).is_dir()
    assert not any((runs / rid).exists() for rid in ended)
    gate.touch()
    kd.wait_status(running, "done")


def test_stats_reports_event_and_log_disk_usage(kd):
    """stats --json has integer event_bytes and log_bytes, and the text form shows them."""
    shell_task(kd, "writes a log", "echo some output")
    s = kd.ctl_json("stats")
    assert isinstance(s["event_bytes"], int) and s["event_bytes"] > 0
    assert isinstance(s["log_bytes"], int) and s["log_bytes"] > 0
    r = kd.ctl("stats")
    assert r.returncode == 0 and "disk:" in r.stdout and "worker logs" in r.stdout


def test_gc_is_an_operator_verb(kd):
    """A request carrying a run token may not run gc (forbidden); bad retention values are
    invalid_argument / usage errors."""
    t = kd.create("claimed")["id"]
    token = kd.call("task.claim", id=t, claimer="ext")["token"]
    with pytest.raises(KanbanError) as ei:
        kd.call("board.gc", token=token)
    assert ei.value.code == "forbidden"
    with pytest.raises(KanbanError) as ei:
        kd.call("board.gc", event_retention_days=-1)
    assert ei.value.code == "invalid_argument"
    assert kd.ctl("gc", "--log-retention-days", "soon").returncode == 2
    assert json.loads(kd.ctl("gc", "--json").stdout)["refused"] == []


def test_gc_answers_other_clients_while_git_removes_a_worktree(kanband_factory, home):
    """`git worktree remove` runs as a helper process: while a (deliberately stalled)
    git is removing an archived task's worktree, kanband answers other clients; gc
    answers once git is done."""
    import threading

    repo = git_repo(home / "repo", {"README": "r\n"})
    fake, started, release = stalled_git(home, "worktree remove")
    k = start_with_path(kanband_factory, None, fake)
    gone = shell_task(k, "wt archived", workspace=f"worktree:{repo}")
    k.call("task.archive", id=gone)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=gc(k)), daemon=True)
    t.start()
    wait_for(started.exists, 20, "git worktree remove to start")
    with k.client(timeout=5) as c:  # answered while git is still held
        assert c.call("system.ping")["pong"] is True
    assert not release.exists() and "r" not in result
    release.touch()
    t.join(30)
    assert result["r"]["worktrees"] == 1, result
    assert not (repo / ".worktrees" / gone).exists()
