"""The spawn pipeline (kanband/supervisor.py): a dispatch pass claims every chosen task
in one transaction; each claimed run ("start") prepares its files inline (a lone
start) or on the spawn threads (a burst); the worker is forked on the loop; the pids of
one loop step are recorded together (`spawned` events); exits of one loop step are
classified together. A start in flight holds a slot and keeps its task busy; a start
whose run was closed meanwhile starts no worker; a start caught by shutdown ends
`interrupted` without one.

Real daemons, real workers (tests/worker.py and /bin/sh). Bursts are sent as one
socket write. Waits have deadlines; nothing is asserted about how long anything took.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import psutil

from conftest import Kanband, RawConn, events_of, wait_for
from kanband.protocol import REQUEST, pack
from supervision_helpers import *  # noqa: F401,F403  (also activates kill_leftovers)
from supervision_helpers import (PY, WORKER, alive, daemon_pid, live_workers, runs_of,
                                 toml, wcmd, wdir, zombies_under)

BASE = {"kill_grace": 0.5, "retry_backoff": 60, "failure_limit": 3, "exit_grace": 1}
TERMINAL = {"completed", "blocked", "crashed", "no_result", "timed_out", "stale",
            "spawn_failed", "rate_limited", "reclaimed", "interrupted", "lost"}


# -- helpers -----------------------------------------------------------------------------
def pipelined(k: Kanband, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Send every request in ONE socket write; return each answer as (error, result)."""
    with RawConn(k.socket, timeout=30) as c:
        c.send_bytes(b"".join(pack([REQUEST, i, m, [p]]) for i, (m, p) in enumerate(calls)))
        got: dict[int, Any] = {}
        while len(got) < len(calls):
            msg = c.read()
            if msg[0] == 1:
                got[msg[1]] = (msg[2], msg[3])
    return [got[i] for i in range(len(calls))]


def create_burst(k: Kanband, specs: list[dict[str, Any]]) -> list[str]:
    """Create tasks with one socket write; return their ids in order."""
    answers = pipelined(k, [("task.create", s) for s in specs])
    for err, _ in answers:
        assert err is None, err
    return [res["task"]["id"] for _, res in answers]


def runs_by_task(k: Kanband, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    answers = pipelined(k, [("task.runs", {"id": t}) for t in ids])
    out = {}
    for tid, (err, res) in zip(ids, answers):
        assert err is None, err
        out[tid] = sorted(res["runs"], key=lambda r: r["started_at"])
    return out


def max_overlap(spans: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda p: (p[0], p[1]))  # an end before a start at the same instant
    cur = best = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def check_spawned_before_end(k: Kanband, tid: str, runs: list[dict[str, Any]],
                             forked: bool = True, order: bool = True) -> None:
    """Each ended run of `tid` has exactly one terminal event; a forked run has exactly
    one `spawned` event, carrying the run's worker pid, before it (`order=False` skips
    the order check)."""
    evs = events_of(k, tid)
    for run in runs:
        mine = [e for e in evs if e["run_id"] == run["id"]]
        kinds = [e["kind"] for e in mine]
        ends = [i for i, e in enumerate(mine) if e["kind"] in TERMINAL]
        assert len(ends) == 1, f"run {run['id']} of {tid}: terminal events {kinds}"
        assert mine[ends[0]]["kind"] == run["outcome"], (run["outcome"], kinds)
        spawned = [i for i, e in enumerate(mine) if e["kind"] == "spawned"]
        if not forked:
            assert spawned == [], kinds
            continue
        assert len(spawned) == 1, f"run {run['id']} of {tid}: {kinds}"
        if order:
            assert spawned[0] < ends[0], f"spawned after the end: {kinds}"
        pid = mine[spawned[0]]["payload"]["pid"]
        assert isinstance(pid, int) and pid > 0 and pid == run["worker_pid"], (pid, run)


def _live_processes() -> Iterator[tuple[int, list[str], dict[str, str]]]:
    """(pid, argv, environment) of every live (non-zombie) process we may read."""
    for p in psutil.process_iter(["pid"]):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            yield p.pid, p.cmdline() or [], p.environ()
        except psutil.Error:
            continue


def processes_of_home(home: Path) -> list[tuple[int, list[str]]]:
    """Live (non-zombie) processes carrying `home` in argv or environment."""
    marker = str(home)
    return [(pid, cmd) for pid, cmd, env in _live_processes()
            if any(marker in part for part in cmd)
            or any(marker in env.get(v, "") for v in ("KANBAN_SOCKET", "KANBAN_HOME"))]


def task_processes(home: Path, task_ids: set[str]) -> list[tuple[int, str]]:
    """Live processes (any depth) whose environment names one of these tasks."""
    marker = str(home)
    return [(pid, env["KANBAN_TASK_ID"]) for pid, _cmd, env in _live_processes()
            if marker in env.get("KANBAN_SOCKET", "") and env.get("KANBAN_TASK_ID") in task_ids]


def db_read(home: Path, sql: str) -> list[tuple[Any, ...]]:
    c = sqlite3.connect(f"file:{home / 'kanban.db'}?mode=ro", uri=True)
    try:
        return c.execute(sql).fetchall()
    finally:
        c.close()


def shell_worker_body(rec: Path, sleep: float) -> str:
    """A shell-profile body that becomes tests/worker.py (so live_workers sees it)."""
    return f"exec {PY} {WORKER} --record {rec} --sleep {sleep} --exit 0\n"


# -- bursts and caps ---------------------------------------------------------------------
def test_burst_of_forty_shell_tasks_never_exceeds_max_workers(kanband_factory, home):
    """40 ready shell tasks created in one write with max_workers=4: at no sample do the
    daemon's slots, its running tasks or the live worker processes exceed 4, nor do the
    workers' own start/end records; every task ends done with exactly one run, whose
    `spawned` event (with the run's pid) precedes its `completed` event."""
    rec = wdir(home) / "rec.jsonl"
    k = kanband_factory(toml({**BASE, "max_workers": 4}))
    body = shell_worker_body(rec, 0.25)
    ids = create_burst(k, [{"title": f"b{i}", "assignee": "shell", "body": body}
                           for i in range(40)])
    peak = samples = 0
    deadline = time.monotonic() + 60
    with k.client() as c:
        while True:
            st, stats = c.call_many([("daemon.status", {}), ("board.stats", {})])
            assert st["running_workers"] <= 4, st
            assert len(st["workers"]) <= 4, st["workers"]
            assert stats["running"] <= 4, stats["by_status"]
            assert stats["running_workers"] <= 4, stats
            procs = live_workers(k)
            assert len(procs) <= 4, procs
            peak = max(peak, st["running_workers"], len(procs))
            samples += 1
            if stats["by_status"]["done"] == 40:
                break
            assert time.monotonic() < deadline, f"not all done in 60s: {stats['by_status']}"
    assert peak >= 2, f"the cap was never approached ({samples} samples)"
    spans = [(r["start"], r["end"]) for r in records(rec)]
    assert len(spans) == 40
    assert max_overlap(spans) <= 4
    runs = runs_by_task(k, ids)
    for tid in ids:
        assert [r["outcome"] for r in runs[tid]] == ["completed"], runs[tid]
        check_spawned_before_end(k, tid, runs[tid])
    assert len({r["worker_pid"] for rs in runs.values() for r in rs}) == 40
    dpid = daemon_pid(k)
    wait_for(lambda: not zombies_under(dpid), 10, "no zombie under kanband")


def test_burst_respects_each_profiles_max_concurrency(kanband_factory, home):
    """A burst over two profiles (caps 2 and 3, max_workers 8 so only the profile caps
    bind): no sample and no record shows more than a profile's cap at once."""
    rec = wdir(home) / "rec.jsonl"
    cmd = wcmd("--record", rec, "--sleep", 0.2, "--exit", 0)
    caps = {"a": 2, "b": 3}
    k = kanband_factory(toml({**BASE, "max_workers": 8},
                             a={"command": cmd, "max_concurrency": 2, "complete_on_exit": True},
                             b={"command": cmd, "max_concurrency": 3, "complete_on_exit": True}))
    # `a` first: without its cap the first pass would start many `a` workers at once
    specs = [{"title": f"a{i}", "assignee": "a"} for i in range(14)] + \
            [{"title": f"b{i}", "assignee": "b"} for i in range(14)]
    ids = create_burst(k, specs)
    peak = {"a": 0, "b": 0}
    deadline = time.monotonic() + 60
    with k.client() as c:
        while True:
            st = c.call("daemon.status")
            assert st["running_workers"] <= 5, st
            procs = live_workers(k)
            for prof, cap in caps.items():
                n_status = sum(w["profile"] == prof for w in st["workers"])
                n_procs = sum(p[1] == prof for p in procs)
                assert n_status <= cap, st["workers"]
                assert n_procs <= cap, procs
                peak[prof] = max(peak[prof], n_status, n_procs)
            if st["counts"].get("done", 0) == len(ids):
                break
            assert time.monotonic() < deadline, f"not all done in 60s: {st['counts']}"
    lines = records(rec)
    assert len(lines) == len(ids)
    for prof, cap in caps.items():
        assert max_overlap([(x["start"], x["end"]) for x in lines if x["profile"] == prof]) <= cap
    assert max_overlap([(x["start"], x["end"]) for x in lines]) <= 5
    assert peak["a"] >= 1 and peak["b"] >= 1
    runs = runs_by_task(k, ids)
    for tid in ids:
        assert [r["outcome"] for r in runs[tid]] == ["completed"], runs[tid]


# -- manual dispatch: the answer carries pids ----------------------------------------------
def test_manual_dispatch_answers_with_each_runs_pid_or_its_error(kanband_factory, home):
    """board.dispatch answers once its starts are recorded: every `spawned` entry has
    its run_id and either the worker's pid (the run's worker_pid, a live process of that
    run) or the spawn error (the run ends spawn_failed with it). Both the lone-start
    path (--max 1) and the burst path."""
    w = wdir(home)
    gate = w / "go"
    k = kanband_factory(toml(
        BASE,
        slow={"command": wcmd("--wait-file", gate, "--exit", 0), "complete_on_exit": True},
        ghost={"command": ["/nonexistent/kanband-ghost-cmd", "{task_id}"]}))
    k.call("daemon.pause")
    ids = [k.create(f"s{i}", assignee="slow")["id"] for i in range(3)]
    ghost = k.create("ghost", assignee="ghost")["id"]

    one = k.call("board.dispatch", max=1)  # a lone start: prepared inline
    rest = k.call("board.dispatch")  # a burst: prepared on the spawn threads
    entries = one["spawned"] + rest["spawned"]
    assert len(one["spawned"]) == 1
    assert sorted(e["task_id"] for e in entries) == sorted(ids + [ghost])
    by_task = {e["task_id"]: e for e in entries}
    for tid in ids:
        e = by_task[tid]
        assert e["run_id"] and "error" not in e, e
        assert isinstance(e["pid"], int) and e["pid"] > 0
        assert alive(e["pid"]), f"the pid of {tid} in the answer is not a live process"
        assert psutil.Process(e["pid"]).environ().get("KANBAN_RUN_ID") == e["run_id"]
        run = runs_of(k, tid)[-1]
        assert run["id"] == e["run_id"] and run["worker_pid"] == e["pid"]
        assert run["outcome"] is None
    g = by_task[ghost]
    assert g["run_id"] and "pid" not in g, g
    assert "/nonexistent/kanband-ghost-cmd" in g["error"]
    grun = wait_run_outcome(k, ghost, "spawn_failed")
    assert grun["id"] == g["run_id"] and grun["worker_pid"] is None
    assert "/nonexistent/kanband-ghost-cmd" in grun["error"]
    assert "spawned" not in [e["kind"] for e in events_of(k, ghost)]
    gtask = k.wait_status(ghost, "ready")
    assert gtask["consecutive_failures"] == 1
    gate.touch()
    for tid in ids:
        k.wait_status(tid, "done")
        runs = runs_of(k, tid)
        assert [r["outcome"] for r in runs] == ["completed"]
        assert runs[0]["worker_pid"] == by_task[tid]["pid"]
        check_spawned_before_end(k, tid, runs)


def wait_run_outcome(k: Kanband, tid: str, outcome: str) -> dict[str, Any]:
    def check() -> Any:
        runs = runs_of(k, tid)
        return runs and runs[-1]["outcome"] == outcome and runs[-1]
    return wait_for(check, 15, f"{tid} to end {outcome}")


# -- runs closed while their start is in flight --------------------------------------------
def test_archive_reclaim_complete_right_after_create_leave_no_worker_and_no_open_run(
        kanband_factory, home):
    """Bursts of tasks whose runs are archived, reclaimed or completed by the operator
    the moment their creates are answered -- before, while or after their starts are in
    flight (max_workers large: one pass starts the whole burst on the spawn threads).
    Repeated 20 times: an archived task never keeps (or later gains) a live worker,
    and every run of every task ends with exactly one outcome."""
    k = kanband_factory(toml({**BASE, "max_workers": 40, "exit_grace": 0.2}))
    body = "sleep 30\n"  # a wrongly started worker would still be alive at the end
    archived: set[str] = set()
    all_ids: list[str] = []
    verbs = ["task.archive", "task.reclaim", "task.complete"]
    for rnd in range(20):
        ids = create_burst(k, [{"title": f"r{rnd}.{i}", "assignee": "shell", "body": body}
                               for i in range(6)])
        all_ids += ids
        first = [(verbs[(rnd + i) % 3], {"id": t}) for i, t in enumerate(ids)]
        rest = []
        for tid, (verb, _), (err, _res) in zip(ids, first, pipelined(k, first)):
            # reclaim of a task no pass started yet is refused (not running): fine
            assert err is None or (verb == "task.reclaim" and err["code"] == "conflict"), \
                (verb, err)
            if not (verb == "task.archive" and err is None):
                rest.append(tid)
        for err, res in pipelined(k, [("task.archive", {"id": t}) for t in rest]):
            assert err is None, err
            assert res["task"]["status"] == "archived"
        archived.update(ids)
        # archive kills a live worker before it answers: nothing of these tasks runs now
        # (a process tree being reaped may take a moment to vanish: deadline)
        wait_for(lambda: not task_processes(home, set(ids)), 10,
                 f"no worker of round {rnd}'s archived tasks")
    # Nothing starts later either: the daemon is idle, no worker of any archived task.
    st = wait_for(lambda: (s := k.call("daemon.status"))["running_workers"] == 0 and s,
                  15, "no worker nor start in flight")
    assert st["workers"] == []
    assert task_processes(home, archived) == []
    assert live_workers(k) == []
    runs = runs_by_task(k, all_ids)
    assert sum(len(r) for r in runs.values()) >= len(all_ids) // 2, "few runs ever started"
    for tid in all_ids:
        assert k.task(tid)["status"] == "archived"
        for r in runs[tid]:
            assert r["outcome"] is not None, f"run {r['id']} of {tid} never ended: {r}"
            assert r["ended_at"] is not None
        evs = events_of(k, tid)
        for r in runs[tid]:
            ends = [e["kind"] for e in evs if e["run_id"] == r["id"] and e["kind"] in TERMINAL]
            assert ends == [r["outcome"]], (tid, r["id"], ends)
            kinds = [e["kind"] for e in evs if e["run_id"] == r["id"]]
            if "spawned" in kinds:  # a forked run's pid is recorded before its end
                assert kinds.index("spawned") < kinds.index(r["outcome"]), (tid, kinds)
    assert db_read(home / "h", "SELECT count(*) FROM runs WHERE outcome IS NULL") == [(0,)]


# -- shutdown during a burst ---------------------------------------------------------------
def test_shutdown_right_after_a_burst_leaves_no_open_run_and_no_worker(kanband_factory, home):
    """SIGTERM the moment a burst of creates is answered (starts in flight, workers
    forking): kanband exits 0; every run has an outcome, no task is left running, no
    process of the home survives. Three rounds on the same home; the next start re-runs
    the interrupted work, and a final round lets everything finish."""
    k = kanband_factory(toml({**BASE, "max_workers": 12}))
    ids: list[str] = []
    for rnd in range(3):
        ids += create_burst(k, [{"title": f"s{rnd}.{i}", "assignee": "shell",
                                 "body": "sleep 30\n"} for i in range(12)])
        assert k.stop(signal.SIGTERM) == 0, k.log_text()[-3000:]
        assert db_read(home / "h", "SELECT id, task_id FROM runs WHERE outcome IS NULL") == []
        assert db_read(home / "h", "SELECT id FROM tasks WHERE status = 'running'") == []
        wait_for(lambda: not processes_of_home(home), 10, "no process of the home survives")
        outcomes = dict(db_read(home / "h", "SELECT outcome, count(*) FROM runs GROUP BY 1"))
        assert set(outcomes) <= {"interrupted"}, outcomes
        k.start()
    # the last start finds the interrupted tasks ready and runs them again; let them end
    st = wait_for(lambda: (s := k.call("daemon.status"))["running_workers"] > 0 and s,
                  15, "the interrupted work to start again")
    assert st["counts"].get("running", 0) <= 12
    assert k.stop(signal.SIGTERM) == 0
    assert db_read(home / "h", "SELECT count(*) FROM runs WHERE outcome IS NULL") == [(0,)]
    assert db_read(home / "h", "SELECT count(*) FROM tasks WHERE status = 'running'") == [(0,)]
    wait_for(lambda: not processes_of_home(home), 10, "no process of the home survives")
    rows = db_read(home / "h", "SELECT status, count(*) FROM tasks GROUP BY 1")
    assert dict(rows) == {"ready": len(ids)}, rows


# -- exits reaped together -----------------------------------------------------------------
# A worker that exits before its pid is recorded (reaped by the reaper.track() of its
# own fork) once got `claimed, completed, spawned`; Store.before_write now writes held
# spawn records before any other transaction, so the order is asserted below.
def test_quick_exits_each_get_exactly_one_outcome_and_a_failure_stays_its_own(
        kanband_factory):
    """30 `true` tasks and one `exit 3` in one burst: exits reaped in the same loop
    step are classified together, yet each run gets exactly one outcome: every `true`
    task is done with one `completed` run (after its `spawned` event), and the failing
    one crashes (exit 3, counted, retried after backoff) without touching the others."""
    k = kanband_factory(toml({**BASE, "max_workers": 8}))
    specs = [{"title": f"q{i}", "assignee": "shell", "body": "true\n"} for i in range(30)]
    specs.insert(15, {"title": "bad", "assignee": "shell", "body": "echo bad-news\nexit 3\n"})
    ids = create_burst(k, specs)
    bad = ids.pop(15)
    wait_for(lambda: k.call("board.stats")["by_status"]["done"] == 30, 30, "30 tasks done")
    crashed = wait_run_outcome(k, bad, "crashed")
    assert crashed["exit_code"] == 3 and crashed["signal"] is None
    assert "exit status 3" in crashed["error"] and "bad-news" in crashed["error"]
    task = k.wait_status(bad, "ready")
    assert task["consecutive_failures"] == 1 and task["not_before"] is not None
    assert task["not_before"] >= crashed["ended_at"] + 60 - 0.01
    bad_evs = [e for e in events_of(k, bad) if e["kind"] == "crashed"]
    assert len(bad_evs) == 1 and bad_evs[0]["payload"]["exit_code"] == 3
    check_spawned_before_end(k, bad, runs_of(k, bad))
    runs = runs_by_task(k, ids)
    for tid in ids:
        assert [(r["outcome"], r["exit_code"]) for r in runs[tid]] == [("completed", 0)], \
            runs[tid]
        check_spawned_before_end(k, tid, runs[tid])
        assert [e["kind"] for e in events_of(k, tid)].count("completed") == 1
    st = k.call("daemon.status")
    assert st["running_workers"] == 0 and st["workers"] == []
    assert st["counts"] == {"done": 30, "ready": 1}
    dpid = daemon_pid(k)
    wait_for(lambda: not zombies_under(dpid), 10, "no zombie under kanband")


def test_a_deleted_logs_directory_is_made_again_at_the_next_start(kanband_factory, home):
    """The task log is opened without making its directory first; if an operator
    removed <home>/logs, the next start makes it again and the run is logged."""
    import shutil
    k = kanband_factory(toml(BASE))
    first = k.create("before", assignee="shell", body="echo first-7c1")["id"]
    k.wait_status(first, "done")
    shutil.rmtree(k.home / "logs")
    tid = k.create("after", assignee="shell", body="echo second-7c1")["id"]
    k.wait_status(tid, "done")
    assert [r["outcome"] for r in runs_of(k, tid)] == ["completed"]
    assert "second-7c1" in (k.home / "logs" / f"{tid}.log").read_text()
    assert "second-7c1" in k.call("task.log", id=tid)["text"]
