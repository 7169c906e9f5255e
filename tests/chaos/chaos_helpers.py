"""Helpers for the crash test: the workload plan, and the threads that watch it.

The workload is a set of tasks whose bodies are small POSIX shell scripts run by a
`chaos` profile (`/bin/sh {script}`). Each body carries its plan: one behaviour per
attempt (complete, block, crash, hang, hangterm, rate), chosen by a seeded RNG, the
last one repeating. A body appends its run id to `attempts` in its workspace before
acting and, for complete/block, appends `RUN_ID VERB RC` to `acks` after kanbanctl
answered, so the test can hold the board to what it acknowledged to a worker.
"""

from __future__ import annotations

import random
import shlex
import sqlite3
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from conftest import integrity  # noqa: F401  (re-exported for test_chaos)
from kanband.errors import KanbanError
from kanband.protocol import Client, TimedOut, Unreachable

TERMINAL = {"done", "blocked", "archived"}
# Every outcome of SPEC §4; each is also the kind of the event that records it.
OUTCOMES = {"completed", "blocked", "crashed", "no_result", "timed_out", "stale",
            "spawn_failed", "rate_limited", "reclaimed", "interrupted", "lost"}
FAILING = ["crash", "hang", "hangterm"]  # behaviours that count as failures
FLAKY = FAILING + ["rate"]  # behaviours of attempts before the last


# -- the plan ------------------------------------------------------------------------
@dataclass
class Planned:
    """One task of the workload: its index, plan of behaviours and parent indices."""

    index: int
    plan: list[str]
    parents: list[int] = field(default_factory=list)
    work: float = 0.2  # seconds each attempt "works" before acting out its behaviour

    @property
    def key(self) -> str:
        return f"chaos-{self.index}"


def make_plan(rng: random.Random, n_tasks: int) -> list[Planned]:
    """Tasks in creation order: chains, fan-ins (several parents, one child) and loose
    tasks, each with 1..3 behaviours drawn from `rng`."""
    out: list[Planned] = []

    def plan() -> list[str]:
        roll = rng.random()
        if roll < 0.05:  # three failures in a row: gave_up, blocked
            return [rng.choice(FAILING) for _ in range(3)]
        flaky = [rng.choice(FLAKY) for _ in range(rng.choice([0, 0, 1, 1, 2]))]
        return flaky + ["block" if roll < 0.12 else "complete"]

    def add(parents: list[int]) -> int:
        out.append(Planned(len(out), plan(), parents, rng.choice([0.1, 0.2, 0.3, 0.5, 0.6])))
        return len(out) - 1

    while len(out) < n_tasks:
        shape = rng.random()
        if shape < 0.4:  # a chain of 3..6
            prev: int | None = None
            for _ in range(rng.randint(3, 6)):
                prev = add([] if prev is None else [prev])
        elif shape < 0.75:  # a fan-in: 2..5 parents, one child, sometimes a grandchild
            parents = [add([]) for _ in range(rng.randint(2, 5))]
            child = add(parents)
            if rng.random() < 0.5:
                add([child, rng.choice(parents)])
        else:
            add([])
    return out


def body_script(plan: list[str], work: float = 0.2, python: str = sys.executable) -> str:
    """The shell body that acts out `plan`, one behaviour per attempt, each after
    `work` seconds of pretend work."""
    py = shlex.quote(python)
    return f"""# chaos plan: {' '.join(plan)}
ws="$KANBAN_WORKSPACE"
echo "$KANBAN_RUN_ID" >> "$ws/attempts"
sleep {work}
n=$(wc -l < "$ws/attempts")
set -- {' '.join(plan)}
while [ "$n" -gt 1 ] && [ "$#" -gt 1 ]; do shift; n=$((n - 1)); done
case "$1" in
complete|block)
    i=0
    while :; do
        if [ "$1" = complete ]; then
            {py} -m kanbanctl complete "$KANBAN_TASK_ID" --summary "chaos $KANBAN_RUN_ID"
        else
            {py} -m kanbanctl block "$KANBAN_TASK_ID" "chaos plan says block"
        fi
        rc=$?
        echo "$KANBAN_RUN_ID $1 $rc" >> "$ws/acks"
        i=$((i + 1))
        if [ "$rc" -ne 3 ] || [ "$i" -ge 3 ]; then break; fi
    done
    exit 0;;
crash) exit 3;;
rate) exit 75;;
hang) exec sleep 30;;
hangterm) trap '' TERM; sleep 30; exit 0;;
esac
echo "unknown behaviour $1" >&2
exit 64
"""


# -- threads -------------------------------------------------------------------------
class Creator(threading.Thread):
    """Creates the planned tasks in order, each with its idempotency key, retrying a
    create whose answer was lost to a daemon crash until the daemon answers."""

    def __init__(self, socket: str, planned: list[Planned], deadline: float) -> None:
        super().__init__(daemon=True, name="chaos-creator")
        self.socket = socket
        self.planned = planned
        self.deadline = deadline
        self.ids: dict[int, str] = {}  # planned index -> task id the daemon acknowledged
        self.retries = 0
        self.replayed = 0  # retries answered with created=False (the first had landed)
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        for t in self.planned:
            params = {"title": f"chaos {t.index}", "assignee": "chaos",
                      "body": body_script(t.plan, t.work), "idempotency_key": t.key,
                      "parents": [self.ids[p] for p in t.parents]}
            attempt = 0
            while not self.stop.is_set():
                attempt += 1
                try:
                    with Client(self.socket, timeout=10.0) as c:
                        r = c.call("task.create", params)
                except (Unreachable, TimedOut, OSError):
                    if time.monotonic() > self.deadline:
                        self.errors.append(f"gave up creating {t.key}: daemon unreachable")
                        return
                    self.retries += 1
                    self.stop.wait(0.05)  # a client's retry interval, not a synchronisation
                    continue
                except KanbanError as e:
                    self.errors.append(f"create {t.key} refused: {e.code}: {e.message}")
                    return
                if attempt > 1 and r.get("created") is False:
                    self.replayed += 1
                self.ids[t.index] = r["task"]["id"]
                break
            if t.index not in self.ids:  # stopped by the test
                return


class Follower(threading.Thread):
    """Follows events.subscribe across daemon restarts, resubscribing after the last
    event it saw, and keeps every event it was sent."""

    def __init__(self, socket: str) -> None:
        super().__init__(daemon=True, name="chaos-follower")
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self.subscriptions = 0
        self.lagged = 0
        self.stop = threading.Event()

    @property
    def cursor(self) -> int:
        return self.events[-1]["id"] if self.events else 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                c = Client(self.socket, timeout=2.0).connect()
            except Unreachable:
                self.stop.wait(0.05)
                continue
            try:
                c.call("events.subscribe", {"since": self.cursor})
                self.subscriptions += 1
                while not self.stop.is_set():
                    try:
                        method, params = c.next_notification()
                    except TimedOut:
                        continue  # quiet stream: look at the stop flag, read on
                    if method == "event":
                        self.events.append({k: params[k] for k in
                                            ("id", "kind", "task_id", "run_id")})
                    elif method == "lagged":
                        self.lagged += 1
                        break
            except (Unreachable, TimedOut, OSError, KanbanError):
                pass  # the daemon died or restarted: resubscribe from the cursor
            finally:
                c.close()


class Sampler(threading.Thread):
    """Samples the live processes of this board's runs (by KANBAN_SOCKET in their
    environment) and records every instant at which one task had processes of two
    different runs alive, or more runs were alive than max_workers."""

    def __init__(self, socket: str, max_workers: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="chaos-sampler")
        self.socket = socket
        self.max_workers = max_workers
        self.interval = interval
        self.samples = 0
        self.max_live_runs = 0
        self.double_runs: list[dict[str, Any]] = []
        self.over_cap: list[dict[str, Any]] = []
        self.seen: set[tuple[int, float]] = set()  # (pid, create time) of every process seen
        self.stop = threading.Event()

    def snapshot(self) -> dict[str, set[str]]:
        """task id -> run ids with a process alive at one common instant (listed, then
        each re-checked: a process alive at both moments was alive in between)."""
        seen: list[tuple[psutil.Process, float, str, str]] = []
        for p in psutil.process_iter(["pid"]):
            try:
                env = p.environ()
                if env.get("KANBAN_SOCKET") != self.socket or "KANBAN_RUN_ID" not in env:
                    continue
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                seen.append((p, p.create_time(), env.get("KANBAN_TASK_ID", "?"),
                             env["KANBAN_RUN_ID"]))
                self.seen.add((p.pid, seen[-1][1]))
            except psutil.Error:
                continue
        live: dict[str, set[str]] = defaultdict(set)
        for p, ctime, task, run in seen:
            try:
                q = psutil.Process(p.pid)
                if q.create_time() == ctime and q.status() != psutil.STATUS_ZOMBIE:
                    live[task].add(run)
            except psutil.Error:
                continue
        return live

    def run(self) -> None:
        while not self.stop.is_set():
            live = self.snapshot()
            self.samples += 1
            runs = sum(len(r) for r in live.values())
            self.max_live_runs = max(self.max_live_runs, runs)
            for task, rs in live.items():
                if len(rs) > 1:
                    self.double_runs.append({"task": task, "runs": sorted(rs),
                                             "at": time.time()})
            if runs > self.max_workers:
                self.over_cap.append({"runs": runs, "at": time.time(),
                                      "by_task": {t: sorted(r) for t, r in live.items()}})
            self.stop.wait(self.interval)


# -- processes -----------------------------------------------------------------------
def zombie_set() -> set[tuple[int, float]]:
    """(pid, create time) of every zombie on the machine."""
    out = set()
    for p in psutil.process_iter(["pid", "status", "create_time"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            out.add((p.pid, p.info["create_time"]))
    return out


def new_zombies(before: set[tuple[int, float]], parents: set[int],
                ours: set[tuple[int, float]]) -> list[dict[str, Any]]:
    """Zombies not in `before` that are ours: their parent is one of `parents` (the test,
    its daemons), or they are processes seen alive as ours (e.g. orphans left to init)."""
    out = []
    for p in psutil.process_iter(["pid", "ppid", "status", "create_time", "name"]):
        i = p.info
        key = (i["pid"], i["create_time"])
        if i["status"] == psutil.STATUS_ZOMBIE and key not in before and (
                i["ppid"] in parents or key in ours):
            out.append({"pid": i["pid"], "ppid": i["ppid"], "name": i["name"]})
    return out


def processes_of(marker: str, exclude: set[int]) -> list[dict[str, Any]]:
    """Live processes (not zombies) with `marker` in their command line or in
    KANBAN_SOCKET/KANBAN_HOME, other than `exclude`."""
    out = []
    for p in psutil.process_iter(["pid"]):
        if p.pid in exclude:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = p.cmdline() or []
            env = p.environ()
            if any(marker in part for part in cmd) or any(
                    marker in env.get(k, "") for k in ("KANBAN_SOCKET", "KANBAN_HOME")):
                out.append({"pid": p.pid, "cmdline": cmd[:6],
                            "run": env.get("KANBAN_RUN_ID"), "task": env.get("KANBAN_TASK_ID")})
        except psutil.Error:
            continue
    return out


# -- the board, read straight from the database file -----------------------------------
def explained(tasks: dict[str, dict[str, Any]], parents: dict[str, list[str]]) -> dict[str, str]:
    """task id -> why it is where it is; a task missing from the result is unexplained.
    Terminal statuses explain themselves; a todo task is explained when each of its
    unfinished parents is blocked or is itself an explained todo task."""
    why: dict[str, str] = {t: s["status"] for t, s in tasks.items() if s["status"] in TERMINAL}
    changed = True
    while changed:
        changed = False
        for tid, t in tasks.items():
            if tid in why or t["status"] != "todo":
                continue
            waiting = [p for p in parents.get(tid, []) if tasks[p]["status"] not in
                       ("done", "archived")]
            if waiting and all(tasks[p]["status"] == "blocked" or
                               (tasks[p]["status"] == "todo" and p in why) for p in waiting):
                why[tid] = "todo behind blocked " + ",".join(waiting)
                changed = True
    return why


def read_board(db_path: Path) -> dict[str, Any]:
    """Tasks, links, runs and events, read from the database file (read-only)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        tasks = {r["id"]: dict(r) for r in db.execute("SELECT * FROM tasks")}
        parents: dict[str, list[str]] = defaultdict(list)
        for r in db.execute("SELECT parent_id, child_id FROM task_links"):
            parents[r["child_id"]].append(r["parent_id"])
        runs = [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY task_id, started_at")]
        events = [dict(r) for r in db.execute(
            "SELECT id, task_id, run_id, kind FROM events ORDER BY id")]
        return {"tasks": tasks, "parents": dict(parents), "runs": runs, "events": events}
    finally:
        db.close()


def check_board(board: dict[str, Any], planned: list[Planned], creator: Creator,
                follower: Follower, workspaces: Path) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Check the drained board against the invariants; returns (violations by
    invariant, figures)."""
    v: dict[str, list[Any]] = defaultdict(list)
    tasks, runs, events = board["tasks"], board["runs"], board["events"]

    # Nothing lost: every acknowledged create is there, once per idempotency key.
    by_key = defaultdict(list)
    for t in tasks.values():
        by_key[t["idempotency_key"]].append(t["id"])
    for t in planned:
        got = by_key.get(t.key, [])
        if len(got) != 1:
            v["task_per_key"].append({"key": t.key, "tasks": got})
        elif t.index in creator.ids and got[0] != creator.ids[t.index]:
            v["acknowledged_create_lost"].append({"key": t.key, "acked": creator.ids[t.index],
                                                  "found": got[0]})
        if t.index not in creator.ids:
            v["create_never_acknowledged"].append(t.key)

    # Every task terminal or explainable.
    why = explained(tasks, board["parents"])
    for tid, t in tasks.items():
        if tid not in why:
            v["unexplained_task"].append({"task": tid, "status": t["status"],
                                          "current_run_id": t["current_run_id"]})
        elif t["status"] != "running" and t["current_run_id"] is not None:
            v["stale_current_run"].append(tid)

    # Every run has exactly one outcome, recorded once as an event of that kind.
    run_ids = {r["id"] for r in runs}
    outcome_events: dict[str, list[str]] = defaultdict(list)
    for e in events:
        if e["kind"] in OUTCOMES and e["run_id"] is not None:
            outcome_events[e["run_id"]].append(e["kind"])
            if e["run_id"] not in run_ids:
                v["outcome_event_without_run"].append(e)
    for r in runs:
        if r["outcome"] is None:
            v["run_without_outcome"].append(r["id"])
        got = outcome_events.get(r["id"], [])
        if got != [r["outcome"]]:
            v["outcome_events_per_run"].append({"run": r["id"], "outcome": r["outcome"],
                                                "events": got})
        if r["outcome"] is not None and r["ended_at"] is None:
            v["ended_run_without_ended_at"].append(r["id"])

    # No two runs of one task overlap: each starts after the previous one ended.
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_task[r["task_id"]].append(r)
    for tid, rs in by_task.items():
        rs.sort(key=lambda r: r["started_at"])
        for a, b in zip(rs, rs[1:]):
            if a["ended_at"] is None or b["started_at"] < a["ended_at"]:
                v["runs_overlap"].append({"task": tid, "run": a["id"], "ended_at": a["ended_at"],
                                          "next": b["id"], "next_started_at": b["started_at"]})

    # The event table: ids 1..head with none missing.
    ids = [e["id"] for e in events]
    head = ids[-1] if ids else 0
    missing = sorted(set(range(1, head + 1)) - set(ids))
    if missing or len(ids) != head:
        v["event_gaps"].append({"head": head, "count": len(ids), "missing": missing[:20]})

    # The followed stream: gap-free across every restart, and every streamed event is
    # in the table unchanged (a pushed event was committed, and a commit survives kill -9).
    streamed = [e["id"] for e in follower.events]
    if streamed != list(range(1, len(streamed) + 1)):
        bad = next((i for i, (a, b) in enumerate(zip(streamed, range(1, len(streamed) + 1)))
                    if a != b), len(streamed))
        v["stream_gaps"].append({"count": len(streamed), "first_bad_index": bad,
                                 "around": streamed[max(0, bad - 3):bad + 3]})
    table = {e["id"]: e for e in events}
    for e in follower.events:
        row = table.get(e["id"])
        if row is None or (row["kind"], row["task_id"], row["run_id"]) != \
                (e["kind"], e["task_id"], e["run_id"]):
            v["streamed_event_lost_or_changed"].append({"streamed": e, "table": row})

    # What workers were told: a run that was told its complete/block succeeded ended
    # that way; every attempt a worker started belongs to a run the board knows.
    run_by_id = {r["id"]: r for r in runs}
    for tid, t in tasks.items():
        ws = workspaces / tid
        try:
            attempts = (ws / "attempts").read_text().split()
        except OSError:
            attempts = []
        for run_id, n in Counter(attempts).items():
            r = run_by_id.get(run_id)
            if r is None or r["task_id"] != tid:
                v["attempt_of_unknown_run"].append({"task": tid, "run": run_id})
            if n > 1:
                v["attempt_started_twice"].append({"task": tid, "run": run_id, "times": n})
        try:
            acks = [line.split() for line in (ws / "acks").read_text().splitlines()]
        except OSError:
            acks = []
        for run_id, verb, rc in acks:
            if rc != "0":
                continue
            want = ("completed", "done") if verb == "complete" else ("blocked", "blocked")
            r = run_by_id.get(run_id)  # the operator may have archived the task since
            if r is None or r["outcome"] != want[0] or t["status"] not in (want[1], "archived"):
                v["acknowledged_result_lost"].append({
                    "task": tid, "run": run_id, "verb": verb, "task_status": t["status"],
                    "run_outcome": r and r["outcome"]})

    figures = {
        "tasks": len(tasks),
        "tasks_by_status": dict(Counter(t["status"] for t in tasks.values())),
        "runs": len(runs),
        "outcomes": dict(Counter(r["outcome"] for r in runs).most_common()),
        "events": head,
        "events_streamed": len(streamed),
        "gave_up": sum(1 for e in events if e["kind"] == "gave_up"),
        "adopted": sum(1 for e in events if e["kind"] == "adopted"),
        "worker_acks": sum(1 for t in tasks
                           if (workspaces / t / "acks").exists()),
    }
    return dict(v), figures
