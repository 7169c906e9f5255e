"""Supervision outcomes (SPEC §4): every way an attempt ends, with real worker processes.

Workers are tests/worker.py (or /bin/sh for the built-in shell profile). Every kill
is checked against the real process table: a pid that must be gone is checked with
psutil at the moment the daemon reports the outcome, not after some delay.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import events_of, kinds_of, wait_for
from supervision_helpers import *  # noqa: F401,F403  (also activates kill_leftovers)
from supervision_helpers import (alive, gone, live_workers, read_pid, runs_of, toml,
                                 wait_run, wcmd, wdir, zombies_under, children_under,
                                 daemon_pid)

BASE = {"kill_grace": 0.5, "retry_backoff": 60, "failure_limit": 3, "exit_grace": 1}


def daemon_cfg(**over: Any) -> dict[str, Any]:
    return {**BASE, **over}


def event(k, tid: str, kind: str) -> dict[str, Any]:
    evs = [e for e in events_of(k, tid) if e["kind"] == kind]
    assert evs, f"no {kind} event for {tid}: {kinds_of(k, tid)}"
    return evs[-1]


# -- failures and the budget -----------------------------------------------------------
def test_crash_retries_with_doubling_backoff_then_gives_up(kanband_factory):
    """A worker that exits non-zero is retried after retry_backoff, then twice that, and
    at failure_limit the task is blocked with a gave_up event."""
    k = kanband_factory(toml(daemon_cfg(retry_backoff=0.3, failure_limit=3),
                             fake={"command": wcmd("--print", "boom in {run_id}", "--exit", 3)}))
    tid = k.create("crashy", assignee="fake")["id"]
    task = k.wait_status(tid, "blocked", timeout=30)
    runs = runs_of(k, tid)
    assert [r["outcome"] for r in runs] == ["crashed"] * 3
    for r in runs:
        assert r["exit_code"] == 3 and r["signal"] is None
        assert "exit status 3" in r["error"]
        assert f"boom in {r['id']}" in r["error"], "error must carry the last log lines"
    # not_before = ended_at + backoff(n): 0.3 s after the first failure, 0.6 s after the second
    assert runs[1]["started_at"] >= runs[0]["ended_at"] + 0.3 - 0.005
    assert runs[2]["started_at"] >= runs[1]["ended_at"] + 0.6 - 0.005
    assert task["consecutive_failures"] == 3
    assert "exit status 3" in task["last_failure_error"]
    gave_up = event(k, tid, "gave_up")["payload"]
    assert gave_up["failures"] == 3 and gave_up["last_outcome"] == "crashed"
    assert "exit status 3" in gave_up["error"]
    crashed = [e for e in events_of(k, tid) if e["kind"] == "crashed"]
    assert len(crashed) == 3 and all(e["payload"]["exit_code"] == 3 for e in crashed)
    log = k.call("task.log", id=tid)["text"]  # every attempt appends to the task log
    assert all(f"boom in {r['id']}" in log for r in runs)


def test_failure_sets_not_before_and_dispatch_waits_for_it(kanband_factory):
    """After a counted failure the task is ready with not_before = end + retry_backoff,
    its waiting_reason names the backoff, and even a manual dispatch does not start it."""
    k = kanband_factory(toml(daemon_cfg(retry_backoff=60),
                             fake={"command": wcmd("--exit", 9)}))
    tid = k.create("crash once", assignee="fake")["id"]
    run = wait_run(k, tid, "crashed")
    task = k.wait_status(tid, "ready")
    assert task["consecutive_failures"] == 1
    assert task["not_before"] == pytest.approx(run["ended_at"] + 60, abs=0.01)
    assert "backoff" in task["waiting_reason"]
    report = k.call("board.dispatch")
    assert report["spawned"] == []
    assert len(runs_of(k, tid)) == 1 and k.task(tid)["status"] == "ready"


def test_signal_death_is_crashed_with_the_signal(kanband_factory):
    """A worker killed by a signal ends `crashed` with that signal recorded and named."""
    k = kanband_factory(toml(daemon_cfg(), fake={"command": wcmd("--print", "dying",
                                                                  "--kill-self", 9)}))
    tid = k.create("sigkill", assignee="fake")["id"]
    run = wait_run(k, tid, "crashed")
    assert run["signal"] == signal.SIGKILL and run["exit_code"] is None
    assert "SIGKILL" in run["error"] and "dying" in run["error"]
    assert event(k, tid, "crashed")["payload"]["signal"] == signal.SIGKILL
    assert k.wait_status(tid, "ready")["consecutive_failures"] == 1


def test_exit_zero_without_complete_is_no_result(kanband_factory):
    """Exit 0 without complete/block under complete_on_exit=false ends `no_result`,
    counted as a failure, with the last output in the error."""
    k = kanband_factory(toml(daemon_cfg(), fake={
        "command": wcmd("--print", "all fine, honest", "--exit", 0), "complete_on_exit": False}))
    tid = k.create("forgetful", assignee="fake")["id"]
    run = wait_run(k, tid, "no_result")
    assert run["exit_code"] == 0
    assert "all fine, honest" in run["error"]
    task = k.wait_status(tid, "ready")
    assert task["consecutive_failures"] == 1 and task["not_before"] is not None
    assert "no_result" in kinds_of(k, tid)


def test_exit_75_is_rate_limited_not_a_failure(kanband_factory):
    """Exit 75 ends `rate_limited`: not counted (even with failure_limit 1), and the task
    waits rate_limit_cooldown before it may run again."""
    k = kanband_factory(toml(daemon_cfg(failure_limit=1), fake={
        "command": wcmd("--print", "429 slow down", "--exit", 75), "rate_limit_cooldown": "60s"}))
    tid = k.create("busy api", assignee="fake")["id"]
    run = wait_run(k, tid, "rate_limited")
    assert run["exit_code"] == 75
    task = k.wait_status(tid, "ready")
    assert task["consecutive_failures"] == 0
    assert task["not_before"] == pytest.approx(run["ended_at"] + 60, abs=0.01)
    assert "cooldown" in task["waiting_reason"]
    assert event(k, tid, "rate_limited")["payload"]["retry_at"] == pytest.approx(
        task["not_before"], abs=0.01)
    assert "gave_up" not in kinds_of(k, tid)
    assert k.call("board.dispatch")["spawned"] == []


def test_spawn_failure_is_recorded_with_its_reason(kanband_factory):
    """A missing command ends the run `spawn_failed` with the reason in the run error and
    the spawn_failed event; it counts as a failure."""
    k = kanband_factory(toml(daemon_cfg(), ghost={"command": ["/nonexistent/kanban-ghost",
                                                              "{task_id}"]},
                             nopath={"command": ["no-such-kanban-cmd-xyz"]}))
    for profile, name in (("ghost", "/nonexistent/kanban-ghost"),
                          ("nopath", "no-such-kanban-cmd-xyz")):
        tid = k.create(f"spawn {profile}", assignee=profile)["id"]
        run = wait_run(k, tid, "spawn_failed")
        assert name in run["error"]
        assert run["worker_pid"] is None
        ev = event(k, tid, "spawn_failed")
        assert name in ev["payload"]["error"]
        task = k.wait_status(tid, "ready")
        assert task["consecutive_failures"] == 1 and task["not_before"] is not None
        assert name in k.call("task.log", id=tid)["text"]


def test_spawn_failure_of_the_workspace(kanband_factory):
    """A workspace that cannot be created ends the run `spawn_failed` naming the path."""
    k = kanband_factory(toml(daemon_cfg(), fake={"command": wcmd("--exit", 0)}))
    tid = k.create("bad ws", assignee="fake", workspace="dir:/proc/kanband-nope/ws")["id"]
    run = wait_run(k, tid, "spawn_failed")
    assert "/proc/kanband-nope/ws" in run["error"]
    assert k.wait_status(tid, "ready")["consecutive_failures"] == 1


# -- runtime caps, heartbeats, escaped descendants -------------------------------------
def test_runtime_cap_sigkills_a_worker_that_ignores_sigterm(kanband_factory, home):
    """A worker ignoring SIGTERM is SIGKILLed after kill_grace once its profile's runtime
    cap is reached: outcome timed_out, event timed_out with sigkill true, process gone."""
    pidf = wdir(home) / "pid"
    k = kanband_factory(toml(daemon_cfg(failure_limit=1), stubborn={
        "command": wcmd("--ignore-sigterm", "--write-pid", pidf, "--sleep", "inf"),
        "max_runtime": 1}))
    tid = k.create("stubborn", assignee="stubborn")["id"]
    pid = read_pid(pidf)
    shim = k.task(tid)["worker_pid"]
    task = k.wait_status(tid, "blocked", timeout=20)  # failure_limit 1: gave_up at once
    assert gone(pid) and gone(shim), "the worker outlived its recorded outcome"
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "timed_out"
    ev = event(k, tid, "timed_out")["payload"]
    assert ev["sigkill"] is True
    assert ev["limit_seconds"] == 1
    assert ev["elapsed_seconds"] >= 1
    assert event(k, tid, "gave_up")["payload"]["last_outcome"] == "timed_out"
    assert task["consecutive_failures"] == 1


def test_task_runtime_cap_overrides_profile_and_sigterm_suffices(kanband_factory, home):
    """A task's own max_runtime caps a worker whose profile has none; a worker that obeys
    SIGTERM is stopped without SIGKILL (sigkill false)."""
    pidf = wdir(home) / "pid"
    k = kanband_factory(toml(daemon_cfg(), sleeper={
        "command": wcmd("--write-pid", pidf, "--sleep", "inf")}))
    tid = k.create("capped", assignee="sleeper", max_runtime=1)["id"]
    pid = read_pid(pidf)
    run = wait_run(k, tid, "timed_out")
    assert gone(pid)
    ev = event(k, tid, "timed_out")["payload"]
    assert ev["sigkill"] is False and ev["limit_seconds"] == 1
    assert k.wait_status(tid, "ready")["consecutive_failures"] == 1
    assert run["signal"] == signal.SIGTERM


def test_runtime_cap_kills_a_setsid_grandchild_too(kanband_factory, home):
    """A grandchild that left the worker's process group with setsid() and ignores
    SIGTERM is killed with the run when the runtime cap fires."""
    w = wdir(home)
    k = kanband_factory(toml(daemon_cfg(failure_limit=1), escaper={
        "command": wcmd("--ignore-sigterm", "--pidfile", w / "gc", "--spawn-grandchild",
                        "--write-pid", w / "pid", "--sleep", "inf"),
        "max_runtime": 1}))
    tid = k.create("escaper", assignee="escaper")["id"]
    pid, gpid = read_pid(w / "pid"), read_pid(w / "gc")
    assert os.getpgid(gpid) != os.getpgid(pid), "the grandchild must be in its own group"
    k.wait_status(tid, "blocked", timeout=20)
    assert gone(pid), "worker survived the cap"
    assert gone(gpid), "setsid grandchild survived the cap"
    assert runs_of(k, tid)[0]["outcome"] == "timed_out"
    dpid = daemon_pid(k)
    wait_for(lambda: not zombies_under(dpid), 10, "no zombie under kanband")


def test_reclaim_kills_a_setsid_grandchild_before_returning(kanband_factory, home):
    """`kanbanctl reclaim` returns only after the worker and its setsid grandchild (both
    ignoring SIGTERM) are dead; the run ends `reclaimed` and no failure is counted."""
    w = wdir(home)
    k = kanband_factory(toml(daemon_cfg(), escaper={
        "command": wcmd("--ignore-sigterm", "--pidfile", w / "gc", "--spawn-grandchild",
                        "--write-pid", w / "pid", "--sleep", "inf")}))
    tid = k.create("escaper", assignee="escaper")["id"]
    pid, gpid = read_pid(w / "pid"), read_pid(w / "gc")
    shim = k.task(tid)["worker_pid"]
    k.call("daemon.pause")  # keep the requeued task from starting again
    r = k.ctl("reclaim", tid)
    assert r.returncode == 0, r.stderr
    assert gone(pid) and gone(shim), "worker alive after reclaim returned"
    assert gone(gpid), "setsid grandchild alive after reclaim returned"
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "reclaimed"
    task = k.task(tid)
    assert task["status"] == "ready" and task["consecutive_failures"] == 0
    assert task["not_before"] is None
    assert "reclaimed" in kinds_of(k, tid)


def test_worker_exit_leaves_no_descendant_behind(kanband_factory, home):
    """When a worker exits but leaves a setsid grandchild and an unreaped child, the
    daemon kills/reaps them before recording the outcome: nothing remains, no zombie."""
    w = wdir(home)
    k = kanband_factory(toml(daemon_cfg(), leaky={
        "command": wcmd("--orphan-child", "--pidfile", w / "gc", "--spawn-grandchild",
                        "--write-pid", w / "pid", "--print", "leaky result", "--exit", 0),
        "complete_on_exit": True}))
    tid = k.create("leaky", assignee="leaky")["id"]
    task = k.wait_status(tid, "done")
    gpid = read_pid(w / "gc")
    assert gone(gpid), "the escaped grandchild outlived the run"
    assert task["result"] == "leaky result"
    dpid = daemon_pid(k)
    wait_for(lambda: not zombies_under(dpid) and not children_under(dpid), 10,
             "kanband to have no child (zombie or not) left")


def test_no_zombie_under_kanband_after_many_worker_trees(kanband_factory, home):
    """After shell and forking workers finish, kanband has no zombie child (and no child)."""
    w = wdir(home)
    k = kanband_factory(toml(daemon_cfg(max_workers=4), forky={
        "command": wcmd("--orphan-child", "--orphan-child", "--print", "ok", "--exit", 0),
        "complete_on_exit": True}))
    ids = [k.create(f"f{i}", assignee="forky")["id"] for i in range(4)]
    ids += [k.create(f"s{i}", assignee="shell", body="(sleep 0.1 &) ; sh -c 'echo nested' ; "
                     "echo shell-ok")["id"] for i in range(4)]
    for tid in ids:
        k.wait_status(tid, "done")
    dpid = daemon_pid(k)
    wait_for(lambda: not zombies_under(dpid) and not children_under(dpid), 10,
             "kanband to have no zombie or child left")
    assert psutil.Process(dpid).status() != psutil.STATUS_ZOMBIE


def test_heartbeat_timeout_kills_a_wedged_worker(kanband_factory, home):
    """A worker that heartbeats once then stalls is killed after heartbeat_timeout:
    outcome stale, process gone."""
    pidf = wdir(home) / "pid"
    k = kanband_factory(toml(daemon_cfg(failure_limit=1), wedged={
        "command": wcmd("--write-pid", pidf, "--heartbeat-then-stall"),
        "heartbeat_timeout": 2}))
    tid = k.create("wedged", assignee="wedged")["id"]
    pid = read_pid(pidf)
    k.wait_status(tid, "blocked", timeout=20)
    assert gone(pid)
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "stale"
    assert "heartbeat" in run["error"]
    ks = kinds_of(k, tid)
    assert "heartbeat" in ks and ks.index("heartbeat") < ks.index("stale")
    assert event(k, tid, "gave_up")["payload"]["last_outcome"] == "stale"


# -- operator kills: archive, reclaim, assign --force ----------------------------------
def test_archive_of_running_task_kills_it_before_returning(kanband_factory, home):
    """Archiving a running task returns only after its worker (even one ignoring SIGTERM)
    is dead; the run ends `reclaimed` and the task is archived, never requeued."""
    pidf = wdir(home) / "pid"
    k = kanband_factory(toml(daemon_cfg(), stubborn={
        "command": wcmd("--ignore-sigterm", "--write-pid", pidf, "--sleep", "inf")}))
    tid = k.create("archive me", assignee="stubborn")["id"]
    pid = read_pid(pidf)
    shim = k.task(tid)["worker_pid"]
    out = k.call("task.archive", id=tid)
    assert gone(pid) and gone(shim), "worker alive after archive returned"
    assert out["task"]["status"] == "archived"
    runs = runs_of(k, tid)
    assert [r["outcome"] for r in runs] == ["reclaimed"]
    assert k.call("board.dispatch")["spawned"] == []
    assert len(runs_of(k, tid)) == 1
    ks = kinds_of(k, tid)
    assert ks.index("reclaimed") < ks.index("archived")


class Sampler(threading.Thread):
    """Counts, over and over, live worker processes and active runs of one task."""

    def __init__(self, k, tid: str) -> None:
        super().__init__(daemon=True)
        self.k, self.tid = k, tid
        self.stop_flag = threading.Event()
        self.max_procs = self.max_active = self.samples = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_flag.is_set():
                procs = [p for p in live_workers(self.k) if p[2] == self.tid]
                active = [r for r in self.k.call("task.runs", id=self.tid)["runs"]
                          if r["outcome"] is None]
                self.max_procs = max(self.max_procs, len(procs))
                self.max_active = max(self.max_active, len(active))
                self.samples += 1
        except BaseException as e:  # reported by the test
            self.error = e


def test_reclaim_never_lets_two_workers_of_a_task_coexist(kanband_factory, home):
    """Repeated reclaims of a running task (worker ignoring SIGTERM) kill the old worker
    before the new one starts: at every sample at most one live worker process and at
    most one active run, and the old pid is dead when reclaim returns."""
    pidf = wdir(home) / "pid"
    k = kanband_factory(toml(daemon_cfg(), stubborn={
        "command": wcmd("--ignore-sigterm", "--write-pid", pidf, "--sleep", "inf")}))
    tid = k.create("reclaim me", assignee="stubborn")["id"]
    sampler = Sampler(k, tid)
    sampler.start()
    try:
        seen = []
        for _ in range(3):
            pid = read_pid(pidf)
            seen.append(pid)
            pidf.unlink()
            r = k.ctl("reclaim", tid)
            assert r.returncode == 0, r.stderr
            assert gone(pid), "old worker alive after reclaim returned"
        read_pid(pidf)  # the fourth attempt started
    finally:
        sampler.stop_flag.set()
        sampler.join(10)
    assert sampler.error is None, repr(sampler.error)
    assert sampler.samples > 0
    assert sampler.max_procs == 1, f"{sampler.max_procs} workers of one task at once"
    assert sampler.max_active == 1, f"{sampler.max_active} active runs of one task at once"
    runs = runs_of(k, tid)
    assert [r["outcome"] for r in runs] == ["reclaimed"] * 3 + [None]
    assert k.task(tid)["consecutive_failures"] == 0
    assert len(set(seen)) == 3


def test_assign_force_kills_and_reassigns_a_running_task(kanband_factory, home):
    """`assign` of a running task is refused without --force; with --force the worker is
    dead when the command returns and the new profile runs the task."""
    w = wdir(home)
    k = kanband_factory(toml(daemon_cfg(), first={
        "command": wcmd("--ignore-sigterm", "--write-pid", w / "pid", "--sleep", "inf")},
        second={"command": wcmd("--print", "second ran", "--exit", 0), "complete_on_exit": True}))
    tid = k.create("reassign", assignee="first")["id"]
    pid = read_pid(w / "pid")
    r = k.ctl("assign", tid, "second")
    assert r.returncode == 1 and tid in r.stderr and "running" in r.stderr
    assert alive(pid) and k.task(tid)["assignee"] == "first"
    r = k.ctl("assign", tid, "second", "--force")
    assert r.returncode == 0, r.stderr
    assert gone(pid), "the first profile's worker is alive after assign --force returned"
    task = k.wait_status(tid, "done")
    assert task["assignee"] == "second" and task["result"] == "second ran"
    runs = runs_of(k, tid)
    assert [(r["profile"], r["outcome"]) for r in runs] == [("first", "reclaimed"),
                                                            ("second", "completed")]
    assert task["consecutive_failures"] == 0


def test_exit_grace_kills_a_worker_lingering_after_complete(kanband_factory, home):
    """A worker that completes its task but keeps running is killed after exit_grace;
    the run stays `completed`."""
    pidf = wdir(home) / "pid"
    k = kanband_factory(toml(daemon_cfg(exit_grace=0.5), lingering={
        "command": wcmd("--write-pid", pidf, "--complete", "--sleep", "inf")}))
    tid = k.create("linger", assignee="lingering")["id"]
    pid = read_pid(pidf)
    k.wait_status(tid, "done")
    wait_for(lambda: gone(pid), 10, "the lingering worker to be killed after exit_grace")
    run = wait_for(lambda: (r := runs_of(k, tid)[0])["signal"] is not None and r, 10,
                   "the exit status of the killed worker to be recorded")
    assert run["outcome"] == "completed"
    assert run["signal"] == signal.SIGTERM


def test_operator_block_of_running_task_kills_worker_after_exit_grace(kanband_factory, home):
    """An operator `block` of a running task closes the run `blocked` at once; the still
    running worker is killed after exit_grace and the task stays blocked."""
    pidf = wdir(home) / "pid"
    k = kanband_factory(toml(daemon_cfg(exit_grace=0.5), sleeper={
        "command": wcmd("--write-pid", pidf, "--sleep", "inf")}))
    tid = k.create("block me", assignee="sleeper")["id"]
    pid = read_pid(pidf)
    r = k.ctl("block", tid, "operator says stop")
    assert r.returncode == 0, r.stderr
    assert k.task(tid)["status"] == "blocked"
    wait_for(lambda: gone(pid), 10, "the worker to be killed after exit_grace")
    run = runs_of(k, tid)
    assert [x["outcome"] for x in run] == ["blocked"]
    assert run[0]["summary"] == "operator says stop"
    assert k.task(tid)["status"] == "blocked"


def test_unblock_during_exit_grace_never_runs_two_workers(kanband_factory, home):
    """A worker that blocked itself and lingers in exit_grace is gone before an unblocked
    retry of the same task starts a new worker (no task runs twice at once)."""
    w = wdir(home)
    k = kanband_factory(toml(daemon_cfg(exit_grace=30), lingering={
        "command": wcmd("--write-pid", "{workspace}/pid-{run_id}", "--block", "need input",
                        "--sleep", "inf")}))
    tid = k.create("linger blocked", assignee="lingering")["id"]
    k.wait_status(tid, "blocked")
    first = runs_of(k, tid)[0]
    ws = k.task(tid)["workspace_path"]
    old = read_pid(Path(ws) / f"pid-{first['id']}")
    assert alive(old)  # still inside its exit_grace
    r = k.ctl("unblock", tid)
    assert r.returncode == 0, r.stderr
    second = wait_for(lambda: len(rs := runs_of(k, tid)) > 1 and rs[1], 15, "a second run")
    new = read_pid(Path(ws) / f"pid-{second['id']}")
    assert gone(old), (f"the first worker {old} still runs next to the second {new} "
                       f"of the same task")
    assert len([p for p in live_workers(k) if p[2] == tid]) == 1


def test_block_then_nonzero_exit_stays_blocked_without_a_failure(kanband_factory):
    """A worker that blocks its task and then exits 2 keeps the `blocked` outcome; its exit
    status is recorded but no failure is counted."""
    k = kanband_factory(toml(daemon_cfg(), quitter={
        "command": wcmd("--block", "waiting on credentials", "--exit", 2)}))
    tid = k.create("quitter", assignee="quitter")["id"]
    task = k.wait_status(tid, "blocked")
    run = wait_for(lambda: (r := runs_of(k, tid)[0])["exit_code"] is not None and r, 10,
                   "the exit status to be recorded")
    assert run["outcome"] == "blocked" and run["exit_code"] == 2
    assert run["summary"] == "waiting on credentials"
    assert task["consecutive_failures"] == 0
    assert "crashed" not in kinds_of(k, tid) and "gave_up" not in kinds_of(k, tid)
    assert len(runs_of(k, tid)) == 1
