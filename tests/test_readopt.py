"""Re-adoption and shutdown (SPEC §4): kanband dies or stops while workers run.

`kill -9` of the daemon leaves its workers running (each is in its own session); a
restarted kanband adopts the live ones and closes the dead ones honestly: with the
exit status the worker's shim recorded in the run directory, else `lost`.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from conftest import events_of, kinds_of, wait_for
from supervision_helpers import *  # noqa: F401,F403  (also activates kill_leftovers)
from supervision_helpers import (alive, gone, live_workers, read_pid, runs_of, toml,
                                 wait_run, wcmd, zombies_under, daemon_pid)

BASE = {"kill_grace": 0.5, "retry_backoff": 60, "failure_limit": 3, "exit_grace": 2}


def ws_file(k, tid: str, name: str) -> Path:
    return Path(k.task(tid)["workspace_path"]) / name


def worker_pids(k, tid: str) -> tuple[int, int]:
    """The worker's own pid (from the pid file it writes in its workspace) and its shim's."""
    return read_pid(ws_file(k, tid, "pid")), k.task(tid)["worker_pid"]


def kill_tree_while_down(k, pid: int, shim: int) -> None:
    """Pause dispatch (nothing respawns after the restart), kill -9 kanband, then SIGKILL
    the worker's whole tree (the shim leads its process group) and wait until it is gone."""
    k.call("daemon.pause")
    k.kill9()
    os.killpg(shim, signal.SIGKILL)
    wait_for(lambda: gone(pid) and gone(shim), 10, "the worker tree to die")


def adopted_pids(k, tid: str) -> list[int]:
    return [e["payload"]["pid"] for e in events_of(k, tid) if e["kind"] == "adopted"]


def test_kill9_restart_adopts_running_workers_which_finish_honestly(kanband_factory):
    """After kill -9 of kanband its workers keep running; a restart adopts them (event
    `adopted` with the worker pid), and when they complete the runs end `completed` with
    their exit status recorded."""
    k = kanband_factory(toml(BASE, fake={
        "command": wcmd("--write-pid", "{workspace}/pid", "--wait-file", "{workspace}/go",
                        "--complete")}))
    ids = [k.create(f"adopt {i}", assignee="fake")["id"] for i in range(2)]
    pids = {t: read_pid(ws_file(k, t, "pid")) for t in ids}
    shims = {t: k.task(t)["worker_pid"] for t in ids}
    k.kill9()
    assert all(alive(p) for p in pids.values()), "workers must survive kill -9 of kanband"
    k.start()
    for t in ids:
        assert adopted_pids(k, t) == [shims[t]]
        task = k.task(t)
        assert task["status"] == "running" and task["worker_pid"] == shims[t]
    status = k.call("daemon.status")
    assert status["running_workers"] == 2
    assert sorted(w["task_id"] for w in status["workers"] if w["adopted"]) == sorted(ids)
    for t in ids:
        ws_file(k, t, "go").touch()
    for t in ids:
        k.wait_status(t, "done")
        run = wait_for(lambda: (r := runs_of(k, t)[0])["exit_code"] is not None and r, 10,
                       "the adopted worker's exit status to be recorded")
        assert run["outcome"] == "completed" and run["exit_code"] == 0
        assert len(runs_of(k, t)) == 1
    for p in list(pids.values()) + list(shims.values()):
        wait_for(lambda: gone(p), 10, f"adopted worker {p} to be gone")
    wait_for(lambda: k.call("daemon.status")["running_workers"] == 0, 10, "no worker left")


def test_adopted_worker_is_still_capped(kanband_factory):
    """The runtime cap keeps counting across a kill -9 restart: an adopted worker that
    ignores SIGTERM is still killed (timed_out) and nothing of it remains."""
    k = kanband_factory(toml({**BASE, "failure_limit": 1}, slow={
        "command": wcmd("--ignore-sigterm", "--write-pid", "{workspace}/pid", "--sleep", "inf"),
        "max_runtime": 4}))
    tid = k.create("capped across restart", assignee="slow")["id"]
    pid, shim = worker_pids(k, tid)
    k.kill9()
    k.start()
    assert adopted_pids(k, tid) == [shim]
    k.wait_status(tid, "blocked", timeout=20)
    assert gone(pid) and gone(shim), "adopted worker survived its runtime cap"
    assert runs_of(k, tid)[0]["outcome"] == "timed_out"
    ev = [e for e in events_of(k, tid) if e["kind"] == "timed_out"][0]["payload"]
    assert ev["sigkill"] is True and ev["elapsed_seconds"] >= 4


def test_adopted_workers_count_against_the_caps(kanband_factory):
    """Adopted workers hold their slots: with max_workers 1 and an adopted worker, a new
    ready task waits (cap full) until the adopted one finishes."""
    k = kanband_factory(toml({**BASE, "max_workers": 1}, fake={
        "command": wcmd("--write-pid", "{workspace}/pid", "--wait-file", "{workspace}/go",
                        "--complete")}))
    first = k.create("held", assignee="fake")["id"]
    read_pid(ws_file(k, first, "pid"))
    k.kill9()
    k.start()
    second = k.create("queued", assignee="shell", body="echo queued")["id"]
    assert k.call("board.dispatch")["spawned"] == []
    task = k.task(second)
    assert task["status"] == "ready" and "max_workers" in task["waiting_reason"]
    assert k.call("daemon.status")["running_workers"] == 1
    assert len(adopted_pids(k, first)) == 1
    ws_file(k, first, "go").touch()
    assert k.wait_status(second, "done")["result"] == "queued"
    assert k.task(first)["status"] == "done"
    assert [r["outcome"] for r in runs_of(k, first)] == ["completed"]


def test_adopted_worker_is_reclaimable(kanband_factory):
    """An adopted worker is killed by reclaim before the RPC returns, like a spawned one."""
    k = kanband_factory(toml(BASE, slow={
        "command": wcmd("--write-pid", "{workspace}/pid", "--sleep", "inf")}))
    tid = k.create("reclaim adopted", assignee="slow")["id"]
    pid, shim = worker_pids(k, tid)
    k.call("daemon.pause")
    k.kill9()
    k.start()
    assert adopted_pids(k, tid) == [shim]
    k.call("task.reclaim", id=tid)
    assert gone(pid) and gone(shim)
    assert runs_of(k, tid)[0]["outcome"] == "reclaimed"
    assert k.task(tid)["status"] == "ready"


def test_worker_that_exited_while_kanband_was_down_keeps_its_exit_status(kanband_factory):
    """A worker that exits 3 while kanband is down is closed on restart as `crashed` with
    exit status 3 and its output (read from the run directory), not as `lost`."""
    k = kanband_factory(toml(BASE, fake={
        "command": wcmd("--write-pid", "{workspace}/pid", "--wait-file", "{workspace}/go",
                        "--print", "bye from the dark", "--exit", 3)}))
    tid = k.create("exits while down", assignee="fake")["id"]
    pid, shim = worker_pids(k, tid)
    k.call("daemon.pause")  # nothing respawns after restart
    k.kill9()
    go = k.home / "workspaces" / tid / "go"
    go.touch()
    wait_for(lambda: gone(pid) and gone(shim), 10, "the worker to exit while kanband is down")
    k.start()
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "crashed"
    assert run["exit_code"] == 3 and run["signal"] is None
    assert "exit status 3" in run["error"] and "bye from the dark" in run["error"]
    task = k.task(tid)
    assert task["status"] == "ready" and task["consecutive_failures"] == 1
    assert "lost" not in kinds_of(k, tid)


def test_shell_task_that_finished_while_kanband_was_down_is_done(kanband_factory):
    """A complete_on_exit worker that exits 0 while kanband is down is done on restart,
    with its last output line as the result."""
    k = kanband_factory(toml(BASE, auto={
        "command": wcmd("--write-pid", "{workspace}/pid", "--wait-file", "{workspace}/go",
                        "--print", "final answer", "--exit", 0),
        "complete_on_exit": True}))
    tid = k.create("finishes while down", assignee="auto")["id"]
    pid, shim = worker_pids(k, tid)
    k.kill9()
    (k.home / "workspaces" / tid / "go").touch()
    wait_for(lambda: gone(pid) and gone(shim), 10, "the worker to exit while kanband is down")
    k.start()
    task = k.wait_status(tid, "done")
    assert task["result"] == "final answer"
    assert runs_of(k, tid)[0]["exit_code"] == 0


def test_worker_killed_while_kanband_was_down_ends_lost(kanband_factory):
    """A worker tree SIGKILLed while kanband is down (no exit status recorded) ends
    `lost` on restart: not counted as a failure, task requeued."""
    k = kanband_factory(toml(BASE, fake={
        "command": wcmd("--write-pid", "{workspace}/pid", "--sleep", "inf")}))
    tid = k.create("killed while down", assignee="fake")["id"]
    pid, shim = worker_pids(k, tid)
    kill_tree_while_down(k, pid, shim)
    k.start()
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "lost"
    task = k.task(tid)
    assert task["status"] == "ready" and task["consecutive_failures"] == 0
    assert task["not_before"] is None
    assert "lost" in kinds_of(k, tid) and "adopted" not in kinds_of(k, tid)


def test_pid_reuse_is_not_adopted_nor_killed(kanband_factory):
    """If a dead worker's pid now belongs to an unrelated process (start time differs),
    a restart does not adopt it and does not signal it: the run ends `lost`."""
    k = kanband_factory(toml(BASE, fake={
        "command": wcmd("--write-pid", "{workspace}/pid", "--sleep", "inf")}))
    tid = k.create("pid reuse", assignee="fake")["id"]
    pid, shim = worker_pids(k, tid)
    run_id = k.task(tid)["current_run_id"]
    running_by = time.time()  # the worker has started by now
    kill_tree_while_down(k, pid, shim)
    # An unrelated process, leading its own group, takes over the recorded pid. A
    # real reuse comes long after the worker's start: same_process accepts start
    # times 50 ms apart (clock-tick rounding), so the stranger must start later.
    wait_for(lambda: time.time() > running_by + 0.2, 5, "0.2 s past the worker's start")
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        db = sqlite3.connect(k.home / "kanban.db")
        with db:
            db.execute("UPDATE runs SET worker_pid = ? WHERE id = ?", (stranger.pid, run_id))
        db.close()
        k.start()
        run = runs_of(k, tid)[0]
        assert run["outcome"] == "lost"
        assert "adopted" not in kinds_of(k, tid)
        assert alive(stranger.pid), "kanband signalled a process that is not its worker"
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_orphaned_worker_of_a_lost_run_is_killed_before_requeue(kanband_factory):
    """If only the worker's shim died while kanband was down, the run's surviving
    process (same KANBAN_RUN_ID) is killed before the task is requeued, so two workers
    of the task never coexist."""
    k = kanband_factory(toml(BASE, fake={
        "command": wcmd("--write-pid", "{workspace}/pid", "--sleep", "inf")}))
    tid = k.create("half dead", assignee="fake")["id"]
    pidfile = ws_file(k, tid, "pid")
    pid = read_pid(pidfile)
    shim = k.task(tid)["worker_pid"]
    k.kill9()
    os.kill(shim, signal.SIGKILL)  # the shim only: the real worker lives on, orphaned
    wait_for(lambda: gone(shim), 10, "the shim to die")
    assert alive(pid)
    pidfile.unlink()
    k.start()
    wait_run(k, tid, count=1)
    assert gone(pid), "the lost run's worker is still alive after its run was closed"
    newpid = read_pid(pidfile)  # the task is redispatched
    assert newpid != pid
    workers = [p for p in live_workers(k) if p[2] == tid]
    assert len(workers) == 1, f"two workers of {tid} at once: {workers}"


def test_on_stop_terminate_kills_workers_and_runs_end_interrupted(kanband_factory):
    """SIGTERM to kanband (on_stop=terminate, the default) kills every worker, including
    one ignoring SIGTERM, before kanband exits 0; the runs end `interrupted`, no failure."""
    k = kanband_factory(toml(BASE, fake={
        "command": wcmd("--write-pid", "{workspace}/pid", "--sleep", "inf")},
        stubborn={"command": wcmd("--ignore-sigterm", "--write-pid", "{workspace}/pid",
                                  "--sleep", "inf")}))
    ids = [k.create("polite", assignee="fake")["id"], k.create("stubborn", assignee="stubborn")["id"]]
    pids = [read_pid(ws_file(k, t, "pid")) for t in ids]
    shims = [k.task(t)["worker_pid"] for t in ids]
    k.call("daemon.pause")  # after restart, nothing is respawned
    assert k.stop() == 0
    left = [p for p in pids + shims if alive(p)]
    assert not left, f"workers alive after kanband exited: {left}"
    assert not k.socket.exists() and not k.pidfile.exists()
    k.start()
    for t in ids:
        run = runs_of(k, t)[0]
        assert run["outcome"] == "interrupted"
        task = k.task(t)
        assert task["status"] == "ready" and task["consecutive_failures"] == 0
        assert "interrupted" in kinds_of(k, t)


def test_on_stop_keep_leaves_workers_and_restart_adopts_them(kanband_factory):
    """With on_stop=keep, SIGTERM leaves workers running; a restart adopts them and they
    finish with an honest outcome."""
    k = kanband_factory(toml({**BASE, "on_stop": "keep"}, fake={
        "command": wcmd("--write-pid", "{workspace}/pid", "--wait-file", "{workspace}/go",
                        "--complete")}))
    tid = k.create("kept", assignee="fake")["id"]
    pid, shim = worker_pids(k, tid)
    assert k.stop() == 0
    assert alive(pid) and alive(shim), "on_stop=keep must leave the worker running"
    k.start()
    assert adopted_pids(k, tid) == [shim]
    ws_file(k, tid, "go").touch()
    k.wait_status(tid, "done")
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "completed" and len(runs_of(k, tid)) == 1
    wait_for(lambda: gone(pid) and gone(shim), 10, "the adopted worker to exit")


def test_worker_kanbanctl_waits_out_a_daemon_restart(kanband_factory):
    """A worker whose `kanbanctl complete` runs while kanband is down retries until the
    restarted daemon (which adopted it) answers, and the task ends done."""
    k = kanband_factory(toml(BASE, fake={
        "command": wcmd("--write-pid", "{workspace}/pid", "--wait-file", "{workspace}/go",
                        "--complete")}))
    tid = k.create("complete during restart", assignee="fake")["id"]
    pid = read_pid(ws_file(k, tid, "pid"))
    k.kill9()
    (k.home / "workspaces" / tid / "go").touch()
    k.start()
    task = k.wait_status(tid, "done", timeout=60)
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "completed" and run["summary"].startswith("worker ")
    wait_for(lambda: gone(pid), 10, "the worker to exit")
    dpid = daemon_pid(k)
    wait_for(lambda: not zombies_under(dpid), 10, "no zombie under kanband")


def test_worker_lingering_after_complete_is_still_killed_after_a_restart(kanband_factory):
    """A worker that completed its task but lingers in exit_grace when kanband is
    kill -9'd is still killed (exit_grace honoured) by the restarted daemon: no orphan
    survives its run."""
    k = kanband_factory(toml({**BASE, "exit_grace": 2}, lingering={
        "command": wcmd("--write-pid", "{workspace}/pid", "--complete", "--sleep", "inf")}))
    tid = k.create("linger across restart", assignee="lingering")["id"]
    pid = read_pid(ws_file(k, tid, "pid"))
    k.wait_status(tid, "done")
    k.kill9()
    assert alive(pid)
    k.start()
    wait_for(lambda: gone(pid), 10, "the lingering worker of a completed run to be killed")
    assert runs_of(k, tid)[0]["outcome"] == "completed"


def test_a_clock_step_does_not_turn_a_live_worker_into_a_stranger(kanband_factory):
    """Start times are wall-clock times counted from the boot time, which moves
    when the clock is stepped (NTP). kanband keeps one boot time per boot in
    the board, so a worker recorded before a step is still recognised after
    it. The test plays a 5 s step: the run's start time and the board's boot
    time are both 5 s off what /proc/stat says now, as if the clock had
    moved since the first daemon started. The restart must adopt the worker,
    not end its run `lost` and run the task again."""
    k = kanband_factory(toml(BASE, fake={
        "command": wcmd("--write-pid", "{workspace}/pid", "--sleep", "inf")}))
    tid = k.create("clock step", assignee="fake")["id"]
    pid, shim = worker_pids(k, tid)
    run_id = k.task(tid)["current_run_id"]
    k.kill9()
    db = sqlite3.connect(k.home / "kanban.db")
    with db:
        basis = float(db.execute("SELECT value FROM meta WHERE key = 'boot_time'").fetchone()[0])
        db.execute("UPDATE meta SET value = ? WHERE key = 'boot_time'", (repr(basis + 5.0),))
        db.execute("UPDATE runs SET worker_start_time = worker_start_time + 5.0 WHERE id = ?",
                   (run_id,))
    db.close()
    k.start()
    assert adopted_pids(k, tid) == [shim]
    assert runs_of(k, tid)[0]["outcome"] is None and alive(pid)
    k.call("task.archive", id=tid)  # kills it: found through its recorded start time
    wait_for(lambda: gone(pid) and gone(shim), 10, "the adopted worker to be killed")


def test_a_new_boot_gets_a_new_boot_time(kanband_factory):
    """The kept boot time belongs to one boot (the kernel's boot_id): a board
    carried over a reboot starts counting from the new boot's time."""
    k = kanband_factory(toml(BASE))
    k.stop()
    db = sqlite3.connect(k.home / "kanban.db")
    with db:
        db.execute("UPDATE meta SET value = 'another-boot' WHERE key = 'boot_id'")
        db.execute("UPDATE meta SET value = '12345.0' WHERE key = 'boot_time'")
    db.close()
    k.start()
    k.stop()
    db = sqlite3.connect(k.home / "kanban.db")
    meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('boot_id', 'boot_time')"))
    db.close()
    assert meta["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert float(meta["boot_time"]) == float(
        Path("/proc/stat").read_text().split("btime")[1].split()[0])
