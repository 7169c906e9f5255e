"""The board's RPC-facing operations: validate, check token scope, call one
store operation, wake the dispatcher, return a plain dict.

Handlers never fork or signal: killing a worker is the supervisor's job, and
handlers that need one ask it through `self.supervisor`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Any, Callable

from kanband import __version__, busypoll, context, gc, states, workspace
from kanband.config import Config
from kanband.dispatcher import Slots, waiting_reason
from kanband.errors import Conflict, Forbidden, InvalidArgument, NotFound
from kanband.params import MAX_TEXT, Params, check_skills, check_title
from kanband.paths import DaemonPaths
from kanband.store import Store

WAITING_STATUSES = frozenset({states.READY, states.TODO})  # the ones with a waiting_reason
# Methods through which a run-token holder may change only its own task.
TOKEN_SCOPED = frozenset({"task.complete", "task.block", "task.heartbeat", "task.unblock",
                          "task.archive", "task.assign", "task.claim", "task.reclaim",
                          "task.promote", "task.link", "task.unlink"})
# Board-wide switches a worker's token may not throw.
OPERATOR_ONLY = frozenset({"board.dispatch", "daemon.pause", "daemon.resume", "daemon.reload",
                           "board.gc", "board.backup"})


def _user_name(uid: int | None) -> str:
    import pwd
    try:
        return pwd.getpwuid(os.getuid() if uid is None else uid).pw_name
    except KeyError:
        return str(uid)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return "kt_" + secrets.token_urlsafe(32)


@dataclass
class Caller:
    """Who is asking: an operator (run is None) or the worker of one run."""

    run: dict[str, Any] | None = None
    uid: int | None = None
    pid: int | None = None


class Board:
    def __init__(self, store: Store, config: Config, paths: DaemonPaths,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.paths = paths
        self.clock = clock
        self.started_at = clock()
        self.started_mono = time.monotonic()
        self.host = socket.gethostname()
        self.wake: Callable[[], None] = lambda: None
        self.dispatch_info: Callable[[], dict[str, Any]] = lambda: {
            "paused": False, "running_by_profile": {}, "running": 0}
        self.supervisor: Any = None  # set by the daemon once supervision exists
        self._waiters: list[tuple[set[str], asyncio.Event]] = []
        self._log_bytes_cache: tuple[float, int] | None = None  # (monotonic, bytes)
        self._log_walk: "asyncio.Future[int] | None" = None
        self._gc_lock = asyncio.Lock()
        self._gc_tasks: set["asyncio.Task[dict[str, Any]]"] = set()
        store.on_commit(self.events_committed)

    # -- caller and scope --------------------------------------------------
    def caller_for(self, token: Any, uid: int | None = None, pid: int | None = None) -> Caller:
        if token is None:
            return Caller(uid=uid, pid=pid)
        if not isinstance(token, str) or not token:
            raise InvalidArgument("run_token: expected a string")
        run = self.store.run_by_token_hash(hash_token(token))
        if run is None:
            raise Forbidden("run token is not valid")
        return Caller(run=run, uid=uid, pid=pid)

    def check_scope(self, method: str, caller: Caller, task_id: str | None = None) -> None:
        if caller.run is None:
            return
        if method in OPERATOR_ONLY:
            raise Forbidden(f"{method} is for operators; a run token may not call it")
        if method not in TOKEN_SCOPED or task_id is None:
            return
        run = caller.run
        if run["task_id"] != task_id:
            raise Forbidden(f"run token of {run['task_id']} cannot change {task_id}")
        if run["outcome"] is not None:
            raise Forbidden(f"run {run['id']} of {task_id} has ended ({run['outcome']}); "
                            "its token no longer changes the task")

    # -- output ------------------------------------------------------------
    def task_out(self, task: dict[str, Any], slots: Slots | None = None,
                 busy: AbstractSet[str] | None = None) -> dict[str, Any]:
        t = dict(task)
        if t["workspace_path"] is None or t["workspace_kind"] == "worktree":
            t["workspace_path"] = workspace.path_str(task, self._workspaces)
        t["waiting_reason"] = self.waiting_reason(task, slots, busy) \
            if task["status"] in WAITING_STATUSES else None
        return t

    def _tasks_out(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """task_out for many rows: the slot counts and busy set are computed once."""
        if not any(t["status"] in WAITING_STATUSES for t in tasks):
            return [self.task_out(t) for t in tasks]  # no waiting_reason to work out
        slots = self.supervisor.slots() if self.supervisor is not None else Slots(self.config)
        busy = self.supervisor.busy_tasks() if self.supervisor is not None else set()
        return [self.task_out(t, slots, busy) for t in tasks]

    @property
    def _workspaces(self) -> str:
        return str(self.paths.workspaces)

    def waiting_reason(self, task: dict[str, Any], slots: Slots | None = None,
                       busy: AbstractSet[str] | None = None) -> str | None:
        """Why a ready/todo task is not running (see dispatcher.waiting_reason)."""
        if self.supervisor is not None:
            return self.supervisor.waiting_reason(task, self.clock(), slots, busy)
        return waiting_reason(task, now=self.clock(), slots=slots or Slots(self.config),
                              paused=False, unfinished_parents=self.store.unfinished_parents)

    # -- system --------------------------------------------------------------
    def ping(self, p: Params, caller: Caller) -> dict[str, Any]:
        p.done()
        return {"pong": True, "version": __version__, "time": self.clock()}

    def status(self, p: Params, caller: Caller) -> dict[str, Any]:
        p.done()
        info = self.dispatch_info()
        live_poll = busypoll.window()  # None in-process, without the daemon's loop
        return {"pid": os.getpid(), "version": __version__, "started_at": self.started_at,
                "uptime_seconds": round(time.monotonic() - self.started_mono, 3),
                "paths": self.paths.as_dict(), "config": self.config.source,
                "counts": self.store.counts_by_status(), "paused": info["paused"],
                "workers": info.get("workers", []), "running_workers": info["running"],
                "max_workers": self.config.max_workers,
                "busy_poll_us": round((self.config.busy_poll if live_poll is None
                                       else live_poll) * 1e6, 3),
                "profiles": sorted(self.config.profiles), "event_head": self.store.event_head()}

    # -- tasks ---------------------------------------------------------------
    def create(self, p: Params, caller: Caller) -> dict[str, Any]:
        title = check_title(p.str("title", required=True, max_bytes=MAX_TEXT, single_line=True))
        body = p.text("body") or ""
        assignee = p.str("assignee") or None
        if assignee == "none":
            assignee = None
        parents = p.str_list("parents")
        kind, wpath = workspace.parse_spec(p.str("workspace", max_bytes=4096))
        fields = {
            "title": title, "body": body, "assignee": assignee,
            "priority": p.int("priority") or 0, "tenant": p.str("tenant") or None,
            "workspace_kind": kind, "workspace_path": wpath,
            "created_by": p.str("created_by") or None,
            "skills": check_skills(p.str_list("skills")),
            "idempotency_key": p.str("idempotency_key") or None,
            "max_runtime_seconds": p.duration("max_runtime"),
        }
        triage = p.bool("triage")
        p.done()
        task, created = self.store.create_task(fields, parents, triage=triage, now=self.clock())
        if created and task["status"] == states.READY and assignee in self.config.profiles:
            self.wake()  # only a create that a worker could take needs a dispatch pass
        out = self.task_out(task)
        warning = None
        if created and out["status"] == states.READY and assignee and \
                assignee not in self.config.profiles:
            warning = (f"no profile named {assignee!r} is configured: the task waits for an "
                       f"external claimer (kanbanctl claim {task['id']})")
        return {"task": out, "created": created, "warning": warning}

    def list(self, p: Params, caller: Caller) -> dict[str, Any]:
        statuses = p.str_list("status")
        for s in statuses:
            if s not in states.STATUSES:
                raise InvalidArgument(f"status: unknown status {s!r} "
                                      f"(known: {', '.join(states.STATUSES)})")
        tasks = self.store.list_tasks(
            statuses=statuses or None, assignee=p.str("assignee"), tenant=p.str("tenant"),
            created_by=p.str("created_by"), include_archived=p.bool("archived"),
            limit=p.int("limit", minimum=1))
        p.done()
        return {"tasks": self._tasks_out(tasks)}

    def show(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id()
        p.done()
        task, parents, children = self.store.family(tid)
        out = self._tasks_out([task, *parents, *children])
        return {"task": out[0], "parents": out[1:1 + len(parents)],
                "children": out[1 + len(parents):],
                "comments": self.store.comments(tid),
                "events": self.store.events(task_id=tid),
                # never claimed (claim sets started_at once, for good): no runs to read
                "runs": self.store.runs(tid, check=False) if task["started_at"] is not None
                else []}

    def assign(self, p: Params, caller: Caller) -> Any:
        tid = p.task_id()
        assignee = p.str("assignee")
        force = p.bool("force")
        p.done()
        self.check_scope("task.assign", caller, tid)
        if assignee in (None, "", "none"):
            assignee = None
        task = self.store.get_task(tid)

        def assign() -> dict[str, Any]:
            t = self.store.assign(tid, assignee, self.clock())
            self.wake()
            return {"task": self.task_out(t)}
        if task["status"] == states.RUNNING and force:
            return self._reclaim(task, f"reassigned to {assignee or 'nobody'}", assign)
        return assign()

    def link(self, p: Params, caller: Caller) -> dict[str, Any]:
        parent, child = p.task_id("parent"), p.task_id("child")
        p.done()
        self.check_scope("task.link", caller, child)
        task = self.store.link(parent, child, self.clock())
        return {"task": self.task_out(task)}

    def unlink(self, p: Params, caller: Caller) -> dict[str, Any]:
        parent, child = p.task_id("parent"), p.task_id("child")
        p.done()
        self.check_scope("task.unlink", caller, child)
        task = self.store.unlink(parent, child, self.clock())
        self.wake()
        return {"task": self.task_out(task)}

    def claim(self, p: Params, caller: Caller) -> Any:
        tid = p.task_id()
        ttl = p.number("ttl", minimum=1)
        who = p.str("claimer") or _user_name(caller.uid)
        p.done()
        self.check_scope("task.claim", caller, tid)
        task = self.store.get_task(tid)
        if task["status"] != states.READY:  # before touching the workspace
            raise states.refused("claim", tid, task["status"])
        if self.supervisor is not None and tid in self.supervisor.busy_tasks():
            raise Conflict(f"cannot claim {tid}: its previous worker is still exiting",
                           {"task_id": tid, "status": task["status"]})
        if task["workspace_kind"] == "worktree" and self.supervisor is not None:
            return self._claim_in_worktree(task, ttl, who)  # git runs off the loop's time
        try:
            ws = workspace.prepare(task, self.paths.workspaces)
        except OSError as e:
            raise Conflict(f"cannot claim {tid}: {e}") from None
        return self._claim_now(task, ttl, who, ws)

    async def _claim_in_worktree(self, task: dict[str, Any], ttl: float | None,
                                 who: str) -> dict[str, Any]:
        try:
            ws = await self.supervisor.prepare_workspace(task)
        except OSError as e:
            raise Conflict(f"cannot claim {task['id']}: {e}") from None
        return self._claim_now(task, ttl, who, ws)

    def _claim_now(self, task: dict[str, Any], ttl: float | None, who: str,
                   ws: Path) -> dict[str, Any]:
        tid = task["id"]
        token = new_token()
        run = self.store.claim(tid, claimer=f"external:{who}", profile=task["assignee"],
                               lease_ttl=ttl or self.config.claim_ttl,
                               token_hash=hash_token(token), now=self.clock())
        self.on_lease_change()
        full = self.store.get_run(run["id"])
        return {"run_id": run["id"], "token": token, "workspace": str(ws),
                "lease_expires": full["lease_expires"], "task": self.task_out(
                    self.store.get_task(tid))}

    def comment(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id()
        body = p.text("body", required=True)
        author = p.str("author")
        p.done()
        if not body or not body.strip():
            raise InvalidArgument("body: a comment must not be empty")
        if author is None and caller.run is not None:
            author = caller.run["profile"] or caller.run["claimer"]
        return {"comment": self.store.comment(tid, author, body, self.clock())}

    def complete(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id()
        result, summary = p.text("result"), p.text("summary")
        metadata = p.metadata()
        p.done()
        self.check_scope("task.complete", caller, tid)
        run_id = self.store.get_task(tid)["current_run_id"]
        task = self.store.complete(tid, result=result, summary=summary, metadata=metadata,
                                   now=self.clock())
        self.after_run_closed(run_id)
        return {"task": self.task_out(task)}

    def block(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id()
        reason = p.text("reason")
        p.done()
        self.check_scope("task.block", caller, tid)
        run_id = self.store.get_task(tid)["current_run_id"]
        task = self.store.block(tid, reason, self.clock())
        self.after_run_closed(run_id)
        return {"task": self.task_out(task)}

    def unblock(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id()
        p.done()
        self.check_scope("task.unblock", caller, tid)
        task = self.store.unblock(tid, self.clock())
        self.wake()
        return {"task": self.task_out(task)}

    def archive(self, p: Params, caller: Caller) -> Any:
        tid = p.task_id()
        p.done()
        self.check_scope("task.archive", caller, tid)
        w = self._live_worker(self.store.get_task(tid))
        if w is None:
            return self._archive_now(tid)
        # shielded: a caller that goes away must not leave the kill done and the
        # archive not (the run would stay open with no worker)
        return asyncio.shield(self._archive_after_kill(tid, w))

    async def _archive_after_kill(self, tid: str, w: Any) -> dict[str, Any]:
        await self.supervisor.stop(w, "archived")
        return self._archive_now(tid, w)

    def _archive_now(self, tid: str, w: Any = None) -> dict[str, Any]:
        task = self.store.archive(tid, self.clock())
        if w is not None:
            self.store.record_exit_status(w.run_id, w.exit_code, w.signal)
        self.wake()
        return {"task": self.task_out(task)}

    def _live_worker(self, task: dict[str, Any]) -> Any:
        """The daemon-owned worker of a running task, if there is one."""
        if task["status"] != states.RUNNING or self.supervisor is None:
            return None
        return self.supervisor.workers.get(task["current_run_id"])

    def promote(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id()
        p.done()
        self.check_scope("task.promote", caller, tid)
        task = self.store.promote(tid, self.clock())
        self.wake()
        return {"task": self.task_out(task)}

    def reclaim(self, p: Params, caller: Caller) -> Any:
        tid = p.task_id()
        p.done()
        self.check_scope("task.reclaim", caller, tid)
        task = self.store.get_task(tid)
        if task["status"] != states.RUNNING:
            raise states.refused("reclaim", tid, task["status"])
        return self._reclaim(task, "operator reclaim", lambda: {
            "task": self.task_out(self.store.get_task(tid))})

    def _reclaim(self, task: dict[str, Any], reason: str, then: Callable[[], Any]) -> Any:
        """Kill the worker FIRST, then close the run `reclaimed` (no failure counted)."""
        run_id = task["current_run_id"]
        w = self._live_worker(task)

        def record() -> Any:
            if self.store.get_run(run_id)["outcome"] is None:
                self.store.end_run(run_id, "reclaimed", now=self.clock(),
                                   failure_limit=self.config.failure_limit,
                                   backoff=self.config.backoff, error=reason,
                                   exit_code=w.exit_code if w else None,
                                   signal=w.signal if w else None, payload={"reason": reason})
            self.wake()
            return then()
        if w is None:
            return record()

        async def after_kill() -> Any:
            await self.supervisor.stop(w, "reclaimed")
            return record()
        return asyncio.shield(after_kill())  # see archive

    def heartbeat(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id()
        note = p.str("note", max_bytes=MAX_TEXT)
        p.done()
        self.check_scope("task.heartbeat", caller, tid)
        task = self.store.heartbeat(tid, note, self.clock())
        self.on_lease_change()
        if self.supervisor is not None:
            self.supervisor.heartbeat_seen(task["current_run_id"])
        return {"task": self.task_out(task)}

    def runs(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id()
        p.done()
        return {"runs": self.store.runs(tid)}

    def context(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id()
        p.done()
        task = self.store.get_task(tid)
        ws = str(workspace.path_for(task, self.paths.workspaces))
        return {"task_id": tid, "text": context.render(self.store, task, ws)}

    # -- board -------------------------------------------------------------
    def stats(self, p: Params, caller: Caller) -> Any:
        p.done()
        log_bytes = self._log_bytes()
        if log_bytes is None:  # not measured yet: wait for the walk (off the loop)
            return self._stats_after(self._walk_logs())
        return self._stats(log_bytes)

    async def _stats_after(self, walk: "asyncio.Future[int]") -> dict[str, Any]:
        return self._stats(await asyncio.shield(walk))

    def _stats(self, log_bytes: int) -> dict[str, Any]:
        now = self.clock()
        by_status = {s: 0 for s in states.STATUSES}
        by_status.update(self.store.counts_by_status())
        oldest = self.store.oldest_ready_created_at()
        info = self.dispatch_info()
        return {"by_status": by_status,
                "by_assignee": self.store.counts_by_assignee(),
                "oldest_ready_age_seconds": None if oldest is None else round(now - oldest, 3),
                "running": by_status[states.RUNNING], "running_workers": info["running"],
                "total": sum(by_status.values()), "events": self.store.event_count(),
                "event_bytes": self.store.event_bytes(),
                "log_bytes": log_bytes,
                "event_head": self.store.event_head(), "db_bytes": self.store.db_size_bytes()}

    def _log_bytes(self, max_age: float = 30.0) -> int | None:
        """Disk used by worker logs as last measured (None: never, or gc ran
        since). The logs are walked on a worker thread -- 100k of them take
        about half a second -- and again once the figure is `max_age` seconds
        old; until the new walk ends, the old figure stands."""
        cached = self._log_bytes_cache
        if cached is None or time.monotonic() - cached[0] > max_age:
            self._walk_logs()
        return None if cached is None else cached[1]

    def _walk_logs(self) -> "asyncio.Future[int]":
        """The walk in progress, or a new one. Its result becomes the figure
        unless gc ran meanwhile (_forget_log_bytes)."""
        walk = self._log_walk
        if walk is None:
            started = time.monotonic()
            walk = self._log_walk = asyncio.ensure_future(
                asyncio.to_thread(gc.disk_usage, self.paths.logs))

            def done(f: "asyncio.Future[int]") -> None:
                if self._log_walk is not f:  # forgotten: gc ran while it walked
                    if not f.cancelled():
                        f.exception()  # read, so asyncio does not report it unread
                    return
                self._log_walk = None
                if not f.cancelled() and f.exception() is None:
                    self._log_bytes_cache = (started, f.result())
            walk.add_done_callback(done)
        return walk

    def _forget_log_bytes(self) -> None:
        """gc changed the logs: the next stats waits for a walk that starts after."""
        self._log_bytes_cache = None
        self._log_walk = None

    def assignees(self, p: Params, caller: Caller) -> dict[str, Any]:
        p.done()
        counts = self.store.counts_by_assignee()
        names = sorted(set(self.config.profiles) | {a for a in counts if a})
        return {"assignees": [
            {"name": n, "profile": n in self.config.profiles,
             "counts": counts.get(n, {}), "total": sum(counts.get(n, {}).values())}
            for n in names]}

    # -- supervision verbs ---------------------------------------------------
    def dispatch(self, p: Params, caller: Caller) -> Any:
        dry_run = p.bool("dry_run")
        max_spawn = p.int("max", minimum=0)
        failure_limit = p.int("failure_limit", minimum=1)
        p.done()
        self.check_scope("board.dispatch", caller)
        if self.supervisor is None:
            raise Conflict("supervision is not running")
        starts: list[Any] = []
        report = self.supervisor.dispatch(dry_run=dry_run, max_spawn=max_spawn,
                                          failure_limit=failure_limit, pending=starts)
        if not starts:
            return report

        async def spawned() -> dict[str, Any]:  # answer with the pids (or errors)
            await self.supervisor.finish_starts(starts)
            return report
        return spawned()

    def pause(self, p: Params, caller: Caller) -> dict[str, Any]:
        p.done()
        self.check_scope("daemon.pause", caller)
        return self._set_paused(True)

    def resume(self, p: Params, caller: Caller) -> dict[str, Any]:
        p.done()
        self.check_scope("daemon.resume", caller)
        return self._set_paused(False)

    def _set_paused(self, paused: bool) -> dict[str, Any]:
        self.store.set_meta("paused", "1" if paused else "0")
        if self.supervisor is not None:
            self.supervisor.paused = paused
        self.wake()
        return {"paused": paused}

    def reload(self, p: Params, caller: Caller) -> dict[str, Any]:
        p.done()
        self.check_scope("daemon.reload", caller)
        return self.reload_hook()

    def reload_hook(self) -> dict[str, Any]:
        raise Conflict("reload is not available")

    def log(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id()
        tail = p.int("tail", minimum=0, maximum=64 * 1024 * 1024)
        offset = p.int("offset", minimum=0, maximum=2 ** 62)
        p.done()
        self.store.get_task(tid)
        path = self.paths.logs / f"{tid}.log"
        limit = 4 * 1024 * 1024
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if offset is not None:
                    start = min(offset, size)
                elif tail is not None:
                    start = max(0, size - tail)
                else:
                    start = 0
                start = max(start, size - limit) if offset is None else start
                f.seek(start)
                data = f.read(min(size - start, limit))
        except FileNotFoundError:
            size, start, data = 0, 0, b""
        return {"task_id": tid, "path": str(path), "size": size, "offset": start,
                "next_offset": start + len(data), "text": data.decode("utf-8", "replace")}

    async def wait(self, p: Params, caller: Caller) -> dict[str, Any]:
        ids = p.str_list("ids")
        timeout = p.number("timeout", minimum=0)
        p.done()
        if not ids:
            raise InvalidArgument("ids: give at least one task id")
        for tid in ids:
            self.store.get_task(tid)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            tasks = [self.store.get_task(t) for t in ids]
            pending = [t["id"] for t in tasks if t["status"] not in states.TERMINAL]
            if not pending:
                return {"tasks": [{"id": t["id"], "status": t["status"]} for t in tasks],
                        "timed_out": False}
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return {"tasks": [{"id": t["id"], "status": t["status"]} for t in tasks],
                        "timed_out": True}
            changed = asyncio.Event()
            watch = set(pending)
            self._waiters.append((watch, changed))
            try:
                await asyncio.wait_for(changed.wait(), left)
            except asyncio.TimeoutError:
                pass
            finally:
                self._waiters.remove((watch, changed))

    def events_committed(self, events: list[dict[str, Any]]) -> None:
        """Store listener: wake `wait` callers whose tasks changed."""
        if not self._waiters:
            return
        touched = {e["task_id"] for e in events}
        for watch, changed in self._waiters:
            if watch & touched:
                changed.set()

    def gc(self, p: Params, caller: Caller) -> Any:
        event_days = p.number("event_retention_days", minimum=0, maximum=36500)
        log_days = p.number("log_retention_days", minimum=0, maximum=36500)
        p.done()
        self.check_scope("board.gc", caller)
        # The pass runs to its end even if the client goes away meanwhile.
        task = asyncio.ensure_future(self._gc(30.0 if event_days is None else event_days,
                                              30.0 if log_days is None else log_days))
        self._gc_tasks.add(task)
        task.add_done_callback(self._gc_tasks.discard)
        return asyncio.shield(task)

    async def _gc(self, event_days: float, log_days: float) -> dict[str, Any]:
        git = self.supervisor.git if self.supervisor is not None else None
        async with self._gc_lock:  # one pass at a time: they would remove the same things
            try:
                return await gc.collect(self.store, self.paths, event_days, log_days,
                                        now=self.clock(), git=git)
            finally:
                self._forget_log_bytes()  # stats after gc shows what gc freed

    def backup(self, p: Params, caller: Caller) -> dict[str, Any]:
        path = p.str("path", required=True, max_bytes=4096, allow_empty=False, single_line=True)
        overwrite = p.bool("overwrite")
        p.done()
        self.check_scope("board.backup", caller)
        assert path is not None
        if not os.path.isabs(path):
            raise InvalidArgument(f"path: must be absolute, got {path!r}")
        target = os.path.normpath(path)
        if os.path.realpath(target) in {os.path.realpath(str(self.paths.db)) + x
                                        for x in ("", "-wal", "-shm")}:
            raise InvalidArgument("path: that is the live database itself")
        if os.path.exists(target) and not overwrite:
            raise Conflict(f"{target} exists (pass overwrite to replace it)")
        if not os.path.isdir(os.path.dirname(target)):
            raise InvalidArgument(f"path: directory {os.path.dirname(target)} does not exist")
        return self.store.backup(target)

    # -- hooks the daemon fills in -------------------------------------------
    def on_lease_change(self) -> None:
        """Called after a claim or heartbeat so the lease timer can re-arm."""

    def after_run_closed(self, run_id: str | None) -> None:
        if self.supervisor is not None:
            self.supervisor.run_closed(run_id)
        self.wake()
