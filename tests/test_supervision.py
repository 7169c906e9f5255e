"""Dispatch and supervision verbs (SPEC §1 profiles/worker environment, §4, §4.1, §6).

Real daemons, real kanbanctl, real workers (tests/worker.py and /bin/sh). Nothing is
asserted about how long anything took; waits have deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
from kanband.errors import KanbanError
from conftest import events_of, kinds_of, snapshot, wait_for
from supervision_helpers import *  # noqa: F401,F403  (also activates kill_leftovers)
from supervision_helpers import (EnvKanband, children_under, daemon_pid, fake_git, git_repo,
                                 live_workers, low_open_files_limit, runs_of, stalled_git,
                                 start_with_path, toml, wcmd, wdir, zombies_under)

BASE = {"kill_grace": 0.5, "retry_backoff": 60, "failure_limit": 3, "exit_grace": 2}


# -- the built-in shell profile, order, chains ------------------------------------------
def test_shell_task_runs_to_done_with_last_output_line_as_result(kd):
    """A task assigned to the built-in shell profile runs its body with /bin/sh in the
    workspace and ends done with the last non-empty output line as result."""
    tid = kd.create("build", assignee="shell",
                    body='echo "first line"\npwd\necho "the result"\necho\necho "   "\n')["id"]
    task = kd.wait_status(tid, "done")
    assert task["result"] == "the result"
    run = wait_for(lambda: (r := runs_of(kd, tid)[0])["exit_code"] is not None and r, 10,
                   "exit status recorded")
    assert run["outcome"] == "completed" and run["exit_code"] == 0
    assert run["profile"] == "shell" and run["claimer"].startswith("kanband@")
    log = kd.call("task.log", id=tid)["text"]
    assert "first line" in log and task["workspace_path"] in log  # ran in its workspace
    assert kinds_of(kd, tid)[:4] == ["created", "claimed", "spawned", "completed"]


def test_shell_body_runs_in_the_shim_with_a_clean_shell(kd):
    """The built-in profile's body runs in a subshell of the exit-status shim: no
    positional parameters, no shim variable, not the text in the environment; the
    log header names the first line; no script file is written for it."""
    body = ('echo "args=$# f=${__kb_f-unset} b=${__kb_b-unset} '
            'text=${KANBAN_SHELL_TEXT-unset}"\n'
            'echo "second line"\n')
    tid = kd.create("clean", assignee="shell", body=body)["id"]
    task = kd.wait_status(tid, "done")
    assert task["result"] == "second line"
    log = kd.call("task.log", id=tid)["text"]
    assert "args=0 f=unset b=unset text=unset" in log
    assert "(shell) started at" in log and 'sh: echo "args=$#' in log and " ..." in log
    run = runs_of(kd, tid)[0]
    run_dir = kd.home / "runs" / run["id"]
    assert (run_dir / "context.md").exists() and not (run_dir / "script.sh").exists()


def test_shell_body_text_stays_off_command_lines(kd):
    """The body is handed to the shim in its environment (readable by our user only),
    never on a command line, which every user can read."""
    secret = f"S3CRET{time.time_ns()}"
    tid = kd.create("secret", assignee="shell", body=f"X={secret}; sleep 30\n")["id"]
    pid = wait_for(lambda: kd.task(tid)["worker_pid"], 20, "worker to start")
    procs = wait_for(lambda: [p for p in children_under(pid) if p.name() == "sleep"]
                     and [psutil.Process(pid), *children_under(pid)], 20, "sleep to start")
    for p in procs:
        assert secret not in " ".join(p.cmdline()), p.cmdline()
    kd.call("task.archive", id=tid)


def test_long_shell_body_goes_through_a_script_file(kd):
    """A body of more than INLINE_BODY_MAX bytes (64 KiB) in UTF-8 is written to
    script.sh and sourced by the shim's subshell: it runs whole. Counted in
    bytes: 20,000 four-byte characters do not fit one environment string either."""
    filler = "# " + "x" * 78 + "\n"
    wide = "# " + "\N{GRINNING FACE}" * 20_000 + "\n"
    for name, middle in (("ascii", filler * 900), ("wide", wide)):
        body = "n=0\n" + "n=$((n+1))\n" * 100 + middle + 'echo "n=$n last"\n'
        assert len(body.encode()) > 64 * 1024
        tid = kd.create(name, assignee="shell", body=body)["id"]
        task = kd.wait_status(tid, "done")
        assert task["result"] == "n=100 last", name
        run = runs_of(kd, tid)[0]
        script = kd.home / "runs" / run["id"] / "script.sh"
        assert script.read_text() == body, name


def test_shell_body_just_under_the_cap_runs_without_a_file(kd):
    """A body of 60 KiB runs inline: no script file, and its last line is the result."""
    body = "# " + "y" * (60 * 1024) + "\necho inline-ok\n"
    tid = kd.create("big inline", assignee="shell", body=body)["id"]
    assert kd.wait_status(tid, "done")["result"] == "inline-ok"
    run = runs_of(kd, tid)[0]
    assert not (kd.home / "runs" / run["id"] / "script.sh").exists()


def test_profile_with_a_script_placeholder_gets_the_body_file(kanband_factory):
    """A configured profile naming {script} (also written {script:}) gets the body
    in a file; one that does not name it gets no file."""
    k = kanband_factory(toml(BASE, catter={"command": ["/bin/cat", "{script:}"],
                                           "complete_on_exit": True},
                             plain={"command": ["/bin/echo", "no script"],
                                    "complete_on_exit": True}))
    tid = k.create("cat", assignee="catter", body="first\nthe body's last line\n")["id"]
    assert k.wait_status(tid, "done")["result"] == "the body's last line"
    other = k.create("plain", assignee="plain", body="unused")["id"]
    assert k.wait_status(other, "done")["result"] == "no script"
    run = runs_of(k, other)[0]
    assert not (k.home / "runs" / run["id"] / "script.sh").exists()


def test_workers_get_the_open_files_limit_kanband_started_with(kanband_factory):
    """kanband raises its own soft RLIMIT_NOFILE to the hard limit (it holds many
    descriptors); its workers get the soft limit it started with back, as a
    program using select() expects."""
    with low_open_files_limit() as low:
        k = kanband_factory(toml(BASE, counter={"command": ["/bin/sh", "-c", "ulimit -n"],
                                                "complete_on_exit": True}))
    limits = Path(f"/proc/{daemon_pid(k)}/limits").read_text()
    own_soft = int(next(line for line in limits.splitlines()
                        if line.startswith("Max open files")).split()[3])
    assert own_soft > low  # kanband raised its own
    shell = k.create("limit", assignee="shell", body="ulimit -n")["id"]
    other = k.create("limit", assignee="counter")["id"]
    assert k.wait_status(shell, "done")["result"] == str(low)
    assert k.wait_status(other, "done")["result"] == str(low)


def test_helpers_get_the_open_files_limit_kanband_started_with(kanband_factory, home):
    """Helpers kanband runs (here git, adding a worktree) get the soft open-files
    limit it started with back, as workers do."""
    w = wdir(home)
    repo = git_repo(w / "repo")
    seen = w / "git-nofile"
    fake = fake_git(w, f"ulimit -S -n >> {seen}\n")
    with low_open_files_limit() as low:
        k = start_with_path(kanband_factory, toml(BASE), fake)
    tid = k.create("wt", assignee="shell", body="true", workspace=f"worktree:{repo}")["id"]
    k.wait_status(tid, "done")
    assert seen.read_text().split() and set(seen.read_text().split()) == {str(low)}


def test_shell_task_from_the_cli_and_wait(kd):
    """`kanbanctl create "build" --assignee shell --body ...` runs, and `wait` exits 0."""
    r = kd.ctl("create", "build", "--assignee", "shell", "--body", "echo make test ok", "-q")
    assert r.returncode == 0, r.stderr
    tid = r.stdout.strip()
    w = kd.ctl("wait", tid, "--timeout", "30")
    assert w.returncode == 0, w.stdout + w.stderr
    assert kd.task(tid)["result"] == "make test ok"


def test_failing_shell_script_crashes_with_exit_status_and_output(kanband_factory):
    """A shell body that exits non-zero ends `crashed` with its status and last output."""
    k = kanband_factory(toml({**BASE, "failure_limit": 1}))
    tid = k.create("fails", assignee="shell", body="echo compiling\necho 'error: nope' >&2\n"
                   "exit 2\n")["id"]
    k.wait_status(tid, "blocked")
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "crashed" and run["exit_code"] == 2
    assert "exit status 2" in run["error"] and "error: nope" in run["error"]


def test_result_comes_from_the_current_attempt_only(kanband_factory):
    """The shell result is the last line of this attempt's output: a retry that prints
    nothing does not inherit the failed attempt's last line from the shared task log."""
    k = kanband_factory(toml({**BASE, "retry_backoff": 0.2}))
    tid = k.create("retry", assignee="shell",
                   body="if [ -f seen ]; then exit 0; fi\ntouch seen\necho stale line\nexit 1\n")["id"]
    task = k.wait_status(tid, "done")
    assert [r["outcome"] for r in runs_of(k, tid)] == ["crashed", "completed"]
    assert task["result"] in (None, "")
    assert "stale line" in k.call("task.log", id=tid)["text"]


def test_failure_error_carries_a_bounded_log_tail(kanband_factory):
    """A crashed run's error holds the exit status and the last lines of the log, capped
    near 2 KiB, never the whole output."""
    k = kanband_factory(toml({**BASE, "failure_limit": 1}))
    body = ('i=0; while [ $i -lt 400 ]; do echo "line $i padding padding padding padding"; '
            'i=$((i+1)); done; exit 1\n')
    tid = k.create("noisy", assignee="shell", body=body)["id"]
    k.wait_status(tid, "blocked")
    err = runs_of(k, tid)[0]["error"]
    assert "exit status 1" in err and "line 399 padding" in err and "line 0 padding" not in err
    assert len(err.encode()) <= 2048 + 256
    assert len(k.call("task.log", id=tid)["text"]) > 10000


def test_dispatch_failure_limit_applies_to_the_runs_it_spawns(kanband_factory):
    """`dispatch --failure-limit 1` makes the first failure of the runs it starts give up."""
    k = kanband_factory(toml({**BASE, "failure_limit": 5}))
    k.call("daemon.pause")
    tid = k.create("one strike", assignee="shell", body="exit 4")["id"]
    r = k.ctl_json("dispatch", "--failure-limit", "1")
    assert [e["task_id"] for e in r["spawned"]] == [tid]
    task = k.wait_status(tid, "blocked")
    assert task["consecutive_failures"] == 1
    assert "gave_up" in kinds_of(k, tid)


def test_context_file_lists_prior_attempts(kanband_factory, home):
    """The second attempt's context file lists the first attempt with its outcome and error."""
    k = kanband_factory(toml({**BASE, "retry_backoff": 0.2, "failure_limit": 2}, ctx={
        "command": wcmd("--env-dump", "{workspace}/dump-{run_id}.json", "--print",
                        "first failure 7c1", "--exit", 3)}))
    tid = k.create("ctx", assignee="ctx", body="body for context")["id"]
    k.wait_status(tid, "blocked")
    r1, r2 = runs_of(k, tid)
    ws = Path(k.task(tid)["workspace_path"])
    c1 = json.loads((ws / f"dump-{r1['id']}.json").read_text())["context"]
    c2 = json.loads((ws / f"dump-{r2['id']}.json").read_text())["context"]
    assert "body for context" in c1 and "(none)" in c1.split("## Prior attempts")[1]
    prior = c2.split("## Prior attempts")[1].split("##")[0]
    assert r1["id"] in prior and "crashed" in prior and "first failure 7c1" in prior
    assert k.call("task.context", id=tid)["text"].startswith(f"# {tid}: ctx")


def test_chain_runs_in_dependency_order(kd):
    """A -> B -> C of shell tasks: each child starts only after its parent completed."""
    kd.call("daemon.pause")
    a = kd.create("A", assignee="shell", body="echo A-done")["id"]
    b = kd.create("B", assignee="shell", body="echo B-done", parents=[a])["id"]
    c = kd.create("C", assignee="shell", body="echo C-done", parents=[b])["id"]
    assert [kd.task(x)["status"] for x in (a, b, c)] == ["ready", "todo", "todo"]
    assert a in kd.task(b)["waiting_reason"]
    kd.call("daemon.resume")
    kd.wait_status(c, "done")
    ra, rb, rc = (runs_of(kd, x) for x in (a, b, c))
    assert len(ra) == len(rb) == len(rc) == 1
    assert ra[0]["ended_at"] <= rb[0]["started_at"]
    assert rb[0]["ended_at"] <= rc[0]["started_at"]

    def ev(tid: str, kind: str) -> int:
        return [e["id"] for e in events_of(kd, tid) if e["kind"] == kind][0]
    assert ev(a, "completed") < ev(b, "promoted") < ev(b, "claimed") < ev(b, "completed")
    assert ev(b, "completed") < ev(c, "promoted") < ev(c, "claimed")
    assert [kd.task(x)["result"] for x in (a, b, c)] == ["A-done", "B-done", "C-done"]


def test_dispatch_order_is_priority_then_age(kanband_factory):
    """With one worker slot, ready tasks start by priority desc, then created_at asc."""
    k = kanband_factory(toml({**BASE, "max_workers": 1}))
    k.call("daemon.pause")
    ids = {}
    for name, prio in (("low", 0), ("high", 5), ("mid-old", 1), ("mid-new", 1)):
        ids[name] = k.create(name, assignee="shell", body=f"echo {name}", priority=prio)["id"]
    k.call("daemon.resume")
    for tid in ids.values():
        k.wait_status(tid, "done")
    started = sorted(ids, key=lambda n: runs_of(k, ids[n])[0]["started_at"])
    assert started == ["high", "mid-old", "mid-new", "low"]


# -- caps ----------------------------------------------------------------------------------
def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda p: (p[0], p[1]))
    cur = best = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def test_caps_hold_while_twenty_ready_tasks_drain(kanband_factory, home):
    """With 20 ready tasks, max_workers (3) and each profile's max_concurrency (2) are never
    exceeded: not in daemon.status samples, not in live process counts, not in the
    workers' own start/end records."""
    rec = wdir(home) / "record.jsonl"
    cmd = wcmd("--record", rec, "--sleep", 0.3, "--exit", 0)
    k = kanband_factory(toml({**BASE, "max_workers": 3},
                             a={"command": cmd, "max_concurrency": 2, "complete_on_exit": True},
                             b={"command": cmd, "max_concurrency": 2, "complete_on_exit": True}))
    k.call("daemon.pause")
    # the 14 `a` tasks come first: without the per-profile cap, 3 of them would run at once
    ids = [k.create(f"t{i}", assignee="a" if i < 14 else "b")["id"] for i in range(20)]
    caps = {"a": 2, "b": 2}
    k.call("daemon.resume")
    samples = 0
    peak_status = peak_procs = 0
    deadline = time.monotonic() + 60
    while True:
        st = k.call("daemon.status")
        assert st["running_workers"] <= 3, st["workers"]
        assert len(st["workers"]) <= 3
        for prof, cap in caps.items():
            assert sum(w["profile"] == prof for w in st["workers"]) <= cap, st["workers"]
        procs = live_workers(k)
        assert len(procs) <= 3, procs
        for prof, cap in caps.items():
            assert sum(p[1] == prof for p in procs) <= cap, procs
        peak_status = max(peak_status, st["running_workers"])
        peak_procs = max(peak_procs, len(procs))
        samples += 1
        if st["counts"].get("done", 0) == 20:
            break
        assert time.monotonic() < deadline, f"20 tasks not done in 60s: {st['counts']}"
    for tid in ids:
        assert k.task(tid)["status"] == "done"
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert len(lines) == 20
    assert _max_overlap([(x["start"], x["end"]) for x in lines]) <= 3
    for prof, cap in caps.items():
        assert _max_overlap([(x["start"], x["end"]) for x in lines if x["profile"] == prof]) <= cap
    assert peak_status >= 2 and peak_procs >= 1, "the caps were never even approached"
    dpid = daemon_pid(k)
    wait_for(lambda: not zombies_under(dpid), 10, "no zombie under kanband")


def test_manual_dispatch_respects_caps_and_max(kanband_factory, home):
    """`kanbanctl dispatch` by hand honours max_concurrency and --max like automatic passes."""
    w = wdir(home)
    k = kanband_factory(toml(BASE, slow={
        "command": wcmd("--wait-file", w / "go", "--exit", 0), "max_concurrency": 2,
        "complete_on_exit": True}))
    k.call("daemon.pause")
    ids = [k.create(f"s{i}", assignee="slow")["id"] for i in range(4)]
    one = k.ctl_json("dispatch", "--max", "1")
    assert len(one["spawned"]) == 1 and one["spawned"][0]["task_id"] == ids[0]
    rest = k.ctl_json("dispatch")
    assert [e["task_id"] for e in rest["spawned"]] == [ids[1]]
    assert k.ctl_json("dispatch")["spawned"] == []
    waiting = k.task(ids[2])["waiting_reason"]
    assert "max_concurrency" in waiting or "paused" in waiting
    assert k.call("daemon.status")["running_workers"] == 2
    (w / "go").touch()
    k.call("daemon.resume")
    for tid in ids:
        k.wait_status(tid, "done")


# -- dry run, unknown assignees, pause -------------------------------------------------
def test_dispatch_dry_run_changes_nothing_and_explains(kanband_factory, home):
    """`dispatch --dry-run` reports what would spawn and why every other task waits,
    and changes nothing: same tasks, same runs, same event head, no process."""
    w = wdir(home)
    k = kanband_factory(toml({**BASE, "max_workers": 1}, gate={
        "command": wcmd("--wait-file", w / "go", "--exit", 0), "complete_on_exit": True}))
    k.call("daemon.pause")
    first = k.create("first", assignee="gate", priority=2)["id"]
    second = k.create("second", assignee="shell", body="echo 2")["id"]
    ext = k.create("external", assignee="alice")["id"]
    child = k.create("child", assignee="shell", body="echo c", parents=[first])["id"]
    unassigned = k.create("nobody")["id"]
    before = snapshot(k, runs=True)
    r = k.ctl_json("dispatch", "--dry-run")
    assert r["dry_run"] is True and r["spawned"] == []
    assert [(e["task_id"], e["profile"]) for e in r["would_spawn"]] == [(first, "gate")]
    why = {x["task_id"]: x["reason"] for x in r["waiting"]}
    assert set(why) == {second, ext, child, unassigned}
    assert "max_workers" in why[second] or "paused" in why[second]
    assert "alice" in why[ext] and "external claimer" in why[ext]
    assert first in why[child]
    assert "assignee" in why[unassigned]
    text = k.ctl("dispatch", "--dry-run")
    assert text.returncode == 0 and first in text.stdout and ext in text.stdout
    assert snapshot(k, runs=True) == before
    assert not (k.home / "logs" / f"{first}.log").exists()
    assert k.call("daemon.status")["running_workers"] == 0
    assert live_workers(k) == []

    k.call("daemon.resume")  # `first` takes the only slot and holds it
    k.wait_status(first, "running")
    before = snapshot(k, runs=True)
    r = k.ctl_json("dispatch", "--dry-run")
    assert r["would_spawn"] == []
    why = {x["task_id"]: x["reason"] for x in r["waiting"]}
    assert "max_workers" in why[second]
    assert "max_workers" in k.task(second)["waiting_reason"]
    assert snapshot(k, runs=True) == before
    (w / "go").touch()
    k.wait_status(second, "done")


def test_unknown_assignee_waits_for_an_external_claimer(kanband_factory):
    """A ready task whose assignee has no profile is never spawned nor failed: it stays
    ready, waiting_reason says it waits for an external claimer, create warns."""
    k = kanband_factory(toml(BASE))
    r = k.ctl("create", "for alice", "--assignee", "alice", "-q")
    assert r.returncode == 0
    tid = r.stdout.strip()
    assert "alice" in r.stderr and "external claimer" in r.stderr
    assert k.ctl_json("dispatch")["spawned"] == []
    k.call("daemon.reload")  # another pass
    task = k.task(tid)
    assert task["status"] == "ready" and task["consecutive_failures"] == 0
    assert task["not_before"] is None and runs_of(k, tid) == []
    assert "external claimer" in task["waiting_reason"] and "alice" in task["waiting_reason"]
    show = k.ctl("show", tid)
    assert "external claimer" in show.stdout
    assert k.ctl_json("show", tid)["task"]["waiting_reason"] == task["waiting_reason"]


def test_pause_stops_dispatch_manual_pass_still_runs_resume_restarts(kanband_factory):
    """While paused no task is started automatically, `dispatch` by hand still runs one
    pass, and `resume` restarts automatic dispatch; the state shows in status."""
    k = kanband_factory(toml(BASE))
    r = k.ctl("pause")
    assert r.returncode == 0 and k.call("daemon.status")["paused"] is True
    t1 = k.create("one", assignee="shell", body="echo one")["id"]
    k.call("daemon.reload")  # reload and create both trigger passes
    k.call("system.ping")
    task = k.task(t1)
    assert task["status"] == "ready" and runs_of(k, t1) == []
    assert "paused" in task["waiting_reason"]
    out = k.ctl("dispatch")
    assert out.returncode == 0 and t1 in out.stdout
    k.wait_status(t1, "done")
    t2 = k.create("two", assignee="shell", body="echo two")["id"]
    k.call("system.ping")
    assert k.task(t2)["status"] == "ready"
    r = k.ctl("resume")
    assert r.returncode == 0 and k.call("daemon.status")["paused"] is False
    assert k.wait_status(t2, "done")["result"] == "two"


def test_pause_survives_a_restart(kanband_factory):
    """A paused board stays paused across a daemon restart."""
    k = kanband_factory(toml(BASE))
    k.call("daemon.pause")
    assert k.stop() == 0
    k.start()
    assert k.call("daemon.status")["paused"] is True
    tid = k.create("still paused", assignee="shell", body="echo x")["id"]
    k.call("system.ping")
    assert k.task(tid)["status"] == "ready"


# -- reload --------------------------------------------------------------------------------
def test_reload_picks_up_a_new_profile_and_refuses_a_bad_config(kanband_factory, home):
    """`kanbanctl reload` adds a new profile (its waiting task then runs); a bad config is
    refused with the old one kept; SIGHUP reloads too."""
    k = kanband_factory(toml(BASE))
    tid = k.create("needs newp", assignee="newp")["id"]
    assert "external claimer" in k.task(tid)["waiting_reason"]
    k.write_config(toml(BASE, newp={"command": wcmd("--print", "newp ran", "--exit", 0),
                                    "complete_on_exit": True}))
    r = k.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert k.wait_status(tid, "done")["result"] == "newp ran"
    assert "newp" in k.call("daemon.status")["profiles"]

    k.write_config("[daemon\nmax_workers = ")
    r = k.ctl("reload")
    assert r.returncode != 0  # the exact code is checked in the test below
    assert "kanband.toml" in r.stderr and "TOML" in r.stderr
    k.write_config(toml({**BASE, "max_workers": 0}))
    r = k.ctl("reload")
    assert r.returncode != 0 and "max_workers" in r.stderr
    assert "newp" in k.call("daemon.status")["profiles"]
    t2 = k.create("newp again", assignee="newp")["id"]
    assert k.wait_status(t2, "done")["result"] == "newp ran"
    assert any(e.get("event") == "config_reload_failed" for e in k.log_events())

    k.write_config(toml(BASE, newp={"command": wcmd("--exit", 0), "complete_on_exit": True},
                        hup={"command": wcmd("--print", "hup ran", "--exit", 0),
                             "complete_on_exit": True}))
    os.kill(daemon_pid(k), signal.SIGHUP)
    wait_for(lambda: "hup" in k.call("daemon.status")["profiles"], 10, "SIGHUP reload")
    t3 = k.create("via hup", assignee="hup")["id"]
    assert k.wait_status(t3, "done")["result"] == "hup ran"
    k.write_config("not = [valid")
    os.kill(daemon_pid(k), signal.SIGHUP)
    wait_for(lambda: sum(e.get("event") == "config_reload_failed" for e in k.log_events()) >= 3,
             10, "the bad SIGHUP reload to be logged")
    assert "hup" in k.call("daemon.status")["profiles"]


def test_reload_of_a_bad_config_is_a_refusal_exit_1(kanband_factory):
    """`kanbanctl reload` with a broken config file exits 1 (refused), not 2: the command
    line was fine, the daemon refused (SPEC §6 exit codes)."""
    k = kanband_factory(toml(BASE))
    k.write_config("[daemon\nmax_workers = ")
    r = k.ctl("reload")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert k.call("system.ping")["pong"] is True


# -- log, wait -------------------------------------------------------------------------------
def test_log_tail_returns_worker_output(kanband_factory):
    """`kanbanctl log ID` prints the worker's output; `--tail N` only its last N bytes."""
    k = kanband_factory(toml(BASE, talk={
        "command": wcmd("--print", "line one", "--print", "line two", "--print", "last-line-xyz",
                        "--exit", 0), "complete_on_exit": True}))
    tid = k.create("talker", assignee="talk")["id"]
    k.wait_status(tid, "done")
    full = k.ctl("log", tid)
    assert full.returncode == 0
    assert "line one" in full.stdout and "last-line-xyz" in full.stdout
    tail = k.ctl("log", tid, "--tail", "14")
    assert tail.returncode == 0
    assert tail.stdout == "last-line-xyz\n"
    js = k.ctl_json("log", tid, "--tail", "5")
    assert js["text"] == "-xyz\n"


def test_wait_exit_codes(kanband_factory):
    """`wait` exits 0 when all are done, 1 when one ended blocked, 4 on timeout."""
    k = kanband_factory(toml(BASE, blocker={"command": wcmd("--block", "need a human")}))
    done = k.create("ok", assignee="shell", body="echo ok")["id"]
    blocked = k.create("stuck", assignee="blocker")["id"]
    never = k.create("never", assignee="nobody-has-this")["id"]
    assert k.ctl("wait", done, "--timeout", "30").returncode == 0
    r = k.ctl("wait", blocked, "--timeout", "30")
    assert r.returncode == 1, r.stdout + r.stderr
    assert k.task(blocked)["status"] == "blocked"
    run = runs_of(k, blocked)[0]
    assert run["outcome"] == "blocked" and run["summary"] == "need a human"
    assert k.ctl("wait", done, blocked, "--timeout", "30").returncode == 1
    r = k.ctl("wait", never, "--timeout", "0.5")
    assert r.returncode == 4 and "timed out" in r.stderr


def test_wait_returns_when_a_running_task_finishes(kanband_factory, home):
    """`wait` started before a task finishes returns 0 once it is done."""
    w = wdir(home)
    k = kanband_factory(toml(BASE, gated={"command": wcmd("--wait-file", w / "go", "--complete")}))
    tid = k.create("gated", assignee="gated")["id"]
    k.wait_status(tid, "running")
    proc = subprocess.Popen([sys.executable, "-m", "kanbanctl", "wait", tid, "--timeout", "60"],
                            env=k.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (w / "go").touch()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + err
        assert "done" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_heartbeats_keep_a_worker_alive_past_heartbeat_timeout(kanband_factory):
    """A worker that keeps heartbeating is not killed as stale, even when its whole run
    is longer than heartbeat_timeout."""
    k = kanband_factory(toml(BASE, beating={
        "command": wcmd("--heartbeat", "a", "--sleep", 1, "--heartbeat", "b", "--sleep", 1,
                        "--heartbeat", "c", "--sleep", 1, "--heartbeat", "d", "--complete"),
        "heartbeat_timeout": 3}))
    tid = k.create("beating", assignee="beating")["id"]
    k.wait_status(tid, "done", timeout=30)
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "completed"
    assert run["ended_at"] - run["started_at"] > 3, "the run must outlast heartbeat_timeout"
    assert kinds_of(k, tid).count("heartbeat") == 4 and "stale" not in kinds_of(k, tid)


# -- the worker's side: environment, context, token --------------------------------------
def test_worker_environment_context_and_stripped_systemd_vars(kanband_factory, home):
    """The worker gets KANBAN_* variables, the profile env and the daemon's own environment
    minus NOTIFY_SOCKET/WATCHDOG_*/LISTEN_*; it runs in its workspace, in its own
    session, with stdin /dev/null, and the context file holds the task."""
    dump = wdir(home) / "env.json"
    k = kanband_factory(toml(BASE, envy={
        "command": wcmd("--env-dump", dump, "--print", "{profile}:{task_id}:{run_id}",
                        "--print", "ws={workspace} ctx={context_file}",
                        "--exit", 0),
        "complete_on_exit": True, "env": {"MODEL": "x-model", "KB_PROFILE_VAR": "pv"}}),
        start=False)
    k.__class__ = EnvKanband
    k.extra_env = {"NOTIFY_SOCKET": str(home / "no-notify.sock"), "WATCHDOG_USEC": "5000000",
                   "WATCHDOG_PID": "1", "LISTEN_FDS": "1", "LISTEN_PID": "1",
                   "LISTEN_FDNAMES": "x", "KB_INHERITED": "from-daemon"}
    k.start()
    tid = k.create("Context title 4f2a", assignee="envy", body="the body text 91c",
                   tenant="acme")["id"]
    task = k.wait_status(tid, "done")
    run = runs_of(k, tid)[0]
    d = json.loads(dump.read_text())
    env = d["env"]
    assert env["KANBAN_TASK_ID"] == tid
    assert env["KANBAN_RUN_ID"] == run["id"]
    assert env["KANBAN_RUN_TOKEN"]
    assert env["KANBAN_WORKSPACE"] == task["workspace_path"]
    assert env["KANBAN_SOCKET"] == str(k.socket)
    assert env["KANBAN_PROFILE"] == "envy"
    assert env["KANBAN_TENANT"] == "acme"
    assert env["MODEL"] == "x-model" and env["KB_PROFILE_VAR"] == "pv"
    assert env["KB_INHERITED"] == "from-daemon"
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES"):
        assert var not in env, f"{var} leaked into the worker environment"
    ctx = Path(env["KANBAN_CONTEXT_FILE"])
    assert ctx == k.home / "runs" / run["id"] / "context.md"
    assert "Context title 4f2a" in d["context"] and "the body text 91c" in d["context"]
    assert ctx.exists() and "Context title 4f2a" in ctx.read_text()
    assert os.path.realpath(d["cwd"]) == os.path.realpath(task["workspace_path"])
    assert d["stdin"] == "/dev/null"
    assert d["sid"] != os.getsid(daemon_pid(k)) and d["pgid"] == run["worker_pid"]
    assert f"envy:{tid}:{run['id']}" in k.call("task.log", id=tid)["text"]
    assert f"ws={task['workspace_path']} ctx={ctx}" in k.call("task.log", id=tid)["text"]
    assert "KANBAN_RUN_TOKEN" not in json.dumps(k.call("task.show", id=tid))
    assert env["KANBAN_RUN_TOKEN"] not in k.call("task.log", id=tid)["text"]


def test_worker_completes_its_own_task_with_its_token(kanband_factory, home):
    """A worker calling `kanbanctl complete $KANBAN_TASK_ID` (token from its environment)
    completes its task; the same token is forbidden on another task."""
    w = wdir(home)
    k = kanband_factory(toml(BASE))
    other = k.create("someone else's", assignee="nobody-here")["id"]
    k.write_config(toml(BASE, selfish={
        "command": wcmd("--ctl-out", w / "ctl.jsonl", "--ctl", f"complete {other}",
                        "--result", "my own result", "--complete")}))
    k.call("daemon.reload")
    tid = k.create("mine", assignee="selfish")["id"]
    task = k.wait_status(tid, "done")
    assert task["result"] == "my own result"
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "completed" and run["summary"].startswith("worker ")
    attempt = json.loads((w / "ctl.jsonl").read_text().splitlines()[0])
    assert attempt["rc"] == 1 and other in attempt["stderr"], attempt
    assert k.task(other)["status"] == "ready"
    wait_for(lambda: runs_of(k, tid)[0]["exit_code"] == 0, 10, "the worker's exit status")


def test_workspace_dir_and_worktree(kanband_factory, home):
    """`dir:PATH` workspaces are created if missing; `worktree:REPO` runs the worker in
    REPO/.worktrees/<id> on branch kanban/<id>, created by the daemon."""
    w = wdir(home)
    k = kanband_factory(toml(BASE, where={
        "command": wcmd("--env-dump", "{workspace}/../dump-{task_id}.json", "--exit", 0),
        "complete_on_exit": True}))
    target = w / "dirs" / "made" / "here"
    t1 = k.create("dir ws", assignee="where", workspace=f"dir:{target}")["id"]
    k.wait_status(t1, "done")
    assert target.is_dir()
    d = json.loads((target.parent / f"dump-{t1}.json").read_text())
    assert os.path.realpath(d["cwd"]) == os.path.realpath(target)

    repo = git_repo(w / "repo")
    t2 = k.create("wt ws", assignee="where", workspace=f"worktree:{repo}")["id"]
    k.wait_status(t2, "done")
    wt = repo / ".worktrees" / t2
    assert (wt / "README").exists()
    d = json.loads((repo / ".worktrees" / f"dump-{t2}.json").read_text())
    assert os.path.realpath(d["cwd"]) == os.path.realpath(wt)
    branch = subprocess.run(["git", "-C", str(wt), "rev-parse", "--abbrev-ref", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert branch == f"kanban/{t2}"


def held_worktree_add(kanband_factory, home, body: str):
    """A kanband whose `git worktree add` is held (see stalled_git) and a shell
    task in a worktree of a fresh repository, its git started and held.
    Returns (kanband, repo, task id, git's started file, its release file)."""
    w = wdir(home)
    repo = git_repo(w / "repo")
    fake, started, release = stalled_git(w, "worktree add")
    k = start_with_path(kanband_factory, toml(BASE), fake)
    tid = k.create("wt", assignee="shell", body=body, workspace=f"worktree:{repo}")["id"]
    wait_for(started.exists, 20, "git worktree add to start")
    return k, repo, tid, started, release


def test_worktree_git_runs_while_kanband_serves(kanband_factory, home):
    """`git worktree add` runs as a helper process, not on the daemon's time: while a
    (deliberately stalled) git is running, kanband answers; the worker starts once
    git is done, and git's output is in the task log."""
    k, repo, tid, started, release = held_worktree_add(kanband_factory, home, "pwd\n")
    with k.client(timeout=5) as c:  # answered while git is still held
        assert c.call("system.ping")["pong"] is True
        assert c.call("task.show", {"id": tid})["task"]["status"] == "running"
    assert not release.exists()
    release.touch()
    task = k.wait_status(tid, "done")
    assert os.path.realpath(task["result"]) == os.path.realpath(repo / ".worktrees" / tid)
    log = k.call("task.log", id=tid)["text"]
    assert "Preparing worktree" in log and log.index("Preparing worktree") < log.index(
        "=== kanband: run")


def test_half_made_worktree_after_kill9_is_made_again(kanband_factory, home):
    """kanband killed while `git worktree add` runs leaves a half-checked-out
    worktree (git marks it locked while adding). The board keeps a mark for
    each add in progress, so the retry does not run its worker in the broken
    tree: it removes it and adds it again."""
    k, repo, tid, started, release = held_worktree_add(kanband_factory, home,
                                                       "test -f README && echo whole\n")
    k.kill9()
    for p in psutil.process_iter(["cmdline"]):  # the held git must never go on
        if str(started) in " ".join(p.info["cmdline"] or []):
            p.kill()
    # what a git killed halfway leaves: a locked worktree, some files missing
    target = repo / ".worktrees" / tid
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "-q", str(target),
                    "-b", f"kanban/{tid}"], check=True)
    subprocess.run(["git", "-C", str(repo), "worktree", "lock", "--reason", "initializing",
                    str(target)], check=True)
    (target / "README").unlink()
    release.touch()  # the restarted daemon's git runs straight through
    k.start()
    task = k.wait_status(tid, "done")
    assert task["result"] == "whole"
    assert (target / "README").read_text() == "hi\n"
    assert "half-made worktree" in k.call("task.log", id=tid)["text"]
    db = sqlite3.connect(k.home / "kanban.db")
    marks = db.execute("SELECT key FROM meta WHERE key LIKE 'worktree_adding:%'").fetchall()
    db.close()
    assert marks == []


def test_worktree_made_outside_kanband_is_used_as_it_is(kanband_factory, home):
    """A worktree already at the task's path with no add of kanband's in
    progress (made by hand, or by an older kanband) is used as it is."""
    repo = git_repo(wdir(home) / "repo")
    k = kanband_factory(toml(BASE))
    tid = k.create("wt", body="cat mine\n", workspace=f"worktree:{repo}")["id"]  # unassigned
    target = repo / ".worktrees" / tid
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "-q", str(target)], check=True)
    (target / "mine").write_text("kept\n")
    k.call("task.assign", id=tid, assignee="shell")
    task = k.wait_status(tid, "done")
    assert task["result"] == "kept"


def test_worktree_that_git_refuses_is_spawn_failed_with_gits_words(kanband_factory, home):
    """A worktree workspace in a directory that is not a git repository ends the
    attempt spawn_failed, with git's own message in the error."""
    notrepo = wdir(home) / "plain"
    notrepo.mkdir()
    k = kanband_factory(toml({**BASE, "failure_limit": 1}))
    tid = k.create("no repo", assignee="shell", body="true",
                   workspace=f"worktree:{notrepo}")["id"]
    k.wait_status(tid, "blocked")
    run = runs_of(k, tid)[0]
    assert run["outcome"] == "spawn_failed"
    assert "git worktree add failed" in run["error"] and "git repository" in run["error"]


def test_external_claim_of_a_worktree_task_gets_the_worktree(kd, home):
    """An external claimer of a worktree task gets the worktree, made by git for it."""
    repo = git_repo(wdir(home) / "repo2")
    tid = kd.create("ext", workspace=f"worktree:{repo}")["id"]
    got = kd.call("task.claim", id=tid)
    assert os.path.realpath(got["workspace"]) == os.path.realpath(repo / ".worktrees" / tid)
    assert (Path(got["workspace"]) / "README").exists()
    branch = subprocess.run(["git", "-C", got["workspace"], "rev-parse", "--abbrev-ref", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert branch == f"kanban/{tid}"


def test_shutdown_during_an_archive_whose_client_left_does_not_hang(kanband_factory, home):
    """A client archives a task whose worker ignores SIGTERM, then kanband is told
    to stop while that kill is still in its grace period (which closes the client's
    connection): the kill carries on, the archive is recorded, and kanband exits."""
    w = wdir(home)
    pidf = w / "stubborn.pid"
    k = kanband_factory(toml({**BASE, "kill_grace": 3}, stubborn={
        "command": wcmd("--ignore-sigterm", "--write-pid", pidf, "--sleep", "inf")}))
    tid = k.create("stubborn", assignee="stubborn")["id"]
    wait_for(lambda: pidf.exists() and pidf.read_text().strip(), 20, "the worker to start")
    c = k.client(timeout=30)
    c.send("task.archive", {"id": tid})
    wait_for(lambda: [w for w in k.call("daemon.status")["workers"]
                      if w["stopping"] == "archived"], 10, "the archive's kill to begin")
    k.proc.send_signal(signal.SIGTERM)  # during the archive's kill_grace
    k.proc.wait(30)  # raises TimeoutExpired if kanband hangs
    c.close()
    k.start()
    task = k.task(tid)
    assert task["status"] == "archived", task
    assert not live_workers(k)


def test_two_claims_racing_for_a_worktree_task_get_one_whole_worktree(kd, home):
    """Two external claims of one worktree task sent together: git adds the worktree
    once, the claim that wins gets it complete, the other is refused."""
    repo = git_repo(wdir(home) / "big", {"README": "hi\n", **{
        f"f{i:03d}.txt": f"{i}\n" * 50 for i in range(400)}})
    tid = kd.create("raced", workspace=f"worktree:{repo}")["id"]
    a, b = kd.client(timeout=60), kd.client(timeout=60)
    ma, mb = a.send("task.claim", {"id": tid}), b.send("task.claim", {"id": tid})
    results = []
    for c, m in ((a, ma), (b, mb)):
        try:
            results.append(c.receive(m))
        except KanbanError as e:
            results.append(e)
    wins = [r for r in results if isinstance(r, dict)]
    assert len(wins) == 1, results
    assert isinstance(next(r for r in results if not isinstance(r, dict)), KanbanError)
    ws = Path(wins[0]["workspace"])
    assert len(list(ws.glob("f*.txt"))) == 400  # whole when the winner got it
    log = kd.call("task.log", id=tid)["text"]
    assert log.count("=== kanband: git worktree add") == 1, log


def test_slot_counts_follow_workers_starting_and_ending(kanband_factory, tmp_path):
    """With max_workers = 1, what dispatch and waiting_reason see of the live
    workers (counted once per change, not per request) follows each start and
    end: B waits for the slot while A runs, starts as soon as A ends, and C then
    waits for B's slot in turn."""
    k = kanband_factory('[daemon]\nmax_workers = 1\n')
    gate = tmp_path / "go"

    def gated(name: str) -> str:
        return k.create(name, assignee="shell",
                        body=f'while [ ! -e "{gate}-{name}" ]; do sleep 0.05; done')["id"]
    a = gated("a")
    k.wait_status(a, "running")
    b = gated("b")
    for _ in range(3):  # asked again and again: still the same answer
        assert "max_workers" in k.task(b)["waiting_reason"]
    assert "max_workers" in k.call("task.show", id=b)["task"]["waiting_reason"]
    (tmp_path / "go-a").touch()
    k.wait_status(a, "done")
    k.wait_status(b, "running")
    c = gated("c")
    assert k.task(c)["status"] == "ready" and "max_workers" in k.task(c)["waiting_reason"]
    (tmp_path / "go-b").touch()
    (tmp_path / "go-c").touch()
    k.wait_status(c, "done")
    assert k.task(b)["status"] == "done"
