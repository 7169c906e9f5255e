"""Supervision: dispatch passes, spawning runs, recording honest outcomes (SPEC §4).

The dispatcher decides who may start; the reaper owns the processes; this
module joins them to the store: it opens a run before a worker starts, and
closes it with exactly one outcome once every process of the run is gone.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Any

import structlog

from kanband import context, gc, logfiles, states, workspace
from kanband import reaper as reaper_mod
from kanband.board import hash_token, new_token
from kanband.config import Config, Profile
from kanband.dispatcher import Slots, waiting_reason
from kanband.errors import Conflict, KanbanError, Unavailable
from kanband.paths import DaemonPaths
from kanband.reaper import (Reaper, child_env, Worker, describe_exit, last_line,
                            read_exit_file, same_process, tail_text)
from kanband.store import Store

log = structlog.get_logger("kanband.supervisor")

EXIT_RATE_LIMITED = 75
STUCK_PASSES = 6  # passes in a row with dispatchable work and no spawn ...
SPAWN_THREADS = 2  # threads that create a burst's run files while the loop serves
INLINE_BELOW = 4  # live workers under which a lone start prepares its files inline
# Shell bodies up to this many bytes (UTF-8) reach the shim in one environment
# string (Linux caps one "NAME=value" string at 128 KiB); longer ones are
# written to script.sh and sourced.
INLINE_BODY_MAX = 64 * 1024
STUCK_EVERY = 300.0  # ... before a dispatcher_stuck warning, at most this often


class _Live(dict):  # type: ignore[type-arg]
    """A dict that counts its changes: Supervisor.slots() and busy_tasks() are
    cached on the counts of `workers` and `starting`, so asking them for every
    task a request returns costs O(1), not O(live workers)."""

    version = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.version += 1
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self.version += 1
        return super().pop(*args)

    def popitem(self) -> Any:
        self.version += 1
        return super().popitem()

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def setdefault(self, *args: Any) -> Any:
        self.version += 1
        return super().setdefault(*args)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.version += 1
        super().update(*args, **kwargs)


class Supervisor:
    def __init__(self, store: Store, config: Config, paths: DaemonPaths) -> None:
        self.store = store
        self.config = config
        self.paths = paths
        self.host = socket.gethostname()
        self.workers: dict[str, Worker] = _Live()  # run_id -> live worker
        self.reaper = Reaper(self._on_exit)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.paused = store.get_meta("paused") == "1"
        self.stopping = False
        self._wake_pending = False
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stuck_passes = 0
        self._stuck_warned = 0.0
        self.unrecorded: dict[str, tuple[Worker, Any]] = {}  # outcomes the disk refused
        self._exits: list[Worker] = []  # exited this loop step, outcome not yet written
        self.starting: dict[str, _Start] = _Live()  # claimed runs whose files are being prepared
        self._slots: tuple[Any, Slots] | None = None  # (change counts, slots) of the last count
        self._busy: tuple[Any, frozenset[str]] | None = None
        self._to_record: list[_Start] = []  # started this loop step, pid not yet written
        self._pool: ThreadPoolExecutor | None = None
        store.before_write = self._flush_starts
        self._adding: dict[Path, asyncio.Future[Path]] = {}  # worktrees git is adding

    @property
    def claimer(self) -> str:
        return f"kanband@{self.host}"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.keep_boot_time()
        self.reaper.start(loop)

    def keep_boot_time(self) -> None:
        """Worker start times count from one boot time per boot, kept in the
        board, so that a clock step between a spawn and a later check (a kill,
        a restart's re-adoption) does not make a live worker look like a
        stranger (see reaper._BOOT_TIME). A new boot gets a new basis: nothing
        of the old one can be alive."""
        bid = reaper_mod.boot_id()
        if bid is not None and self.store.get_meta("boot_id") == bid:
            try:
                reaper_mod.set_boot_time(float(self.store.get_meta("boot_time") or ""))
                return
            except ValueError:
                pass
        reaper_mod.set_boot_time(None)  # this boot's, read afresh
        if bid is not None:
            try:
                self.store.set_meta("boot_time", repr(reaper_mod.boot_time()))
                self.store.set_meta("boot_id", bid)
            except KanbanError as e:  # a full disk, say: serve on; the next start retries
                log.warning("boot_time_not_kept", error=e.message)

    def _bg(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    # -- dispatch ----------------------------------------------------------------
    def wake(self) -> None:
        """Run a dispatch pass at once (coalesced with any already scheduled)."""
        if self.loop is None or self._wake_pending or self.stopping:
            return
        self._wake_pending = True
        self.loop.call_soon(self._wake_now)

    def _wake_now(self) -> None:
        self._wake_pending = False
        if not self.paused and not self.stopping:
            try:
                self.dispatch()
            except Exception:
                log.exception("dispatch_failed")

    def _live_version(self) -> tuple[int, int]:
        return self.workers.version, self.starting.version  # type: ignore[attr-defined]

    def slots(self) -> Slots:
        """Live workers against the caps: a fresh copy (dispatch takes from it),
        counted again only after a worker started or ended, or a reload."""
        version = self._live_version()
        cached = self._slots
        if cached is None or cached[0] != version or cached[1].config is not self.config:
            s = Slots(self.config)
            for w in self.workers.values():
                s.take(w.profile.name)
            for st in self.starting.values():
                s.take(st.profile.name)
            self._slots = cached = (version, s)
        s = cached[1]
        return Slots(s.config, s.running, dict(s.by_profile))

    def info(self) -> dict[str, Any]:
        s = self.slots()
        return {"paused": self.paused, "running": s.running, "running_by_profile": s.by_profile,
                "workers": [w.as_dict() for w in self.workers.values()]}

    def dispatch(self, *, dry_run: bool = False, max_spawn: int | None = None,
                 failure_limit: int | None = None,
                 pending: list["_Start"] | None = None) -> dict[str, Any]:
        """One pass: start ready tasks in priority order while caps allow.

        Choose and claim every task in one transaction (the claims are durable
        before any worker starts); then each start prepares its files -- inline
        when it is the only one, on the spawn threads in a burst -- and its
        worker is forked on the loop; the pids of the workers started in one
        loop step are recorded in one transaction. `pending` receives the
        starts, for callers that wait for them (see `finish_starts`)."""
        now = time.time()
        if self.stopping and not dry_run:  # no new work while shutting down
            return {"dry_run": False, "paused": self.paused, "spawned": [], "would_spawn": []}
        if not dry_run:
            self._end_superseded_lingerers()
        spawned: list[dict[str, Any]] = []
        starts: list[_Start] = []
        with self.store.batch():
            slots = self.slots()
            seen: set[str] = set(self.busy_tasks())  # one live worker per task, ever
            while max_spawn is None or len(spawned) < max_spawn:
                profiles = slots.open_profiles()
                batch = [t for t in self.store.dispatch_candidates(
                    profiles, now, slots.free_global() + len(seen)) if t["id"] not in seen]
                if not batch:
                    break
                progressed = False
                for task in batch:
                    if max_spawn is not None and len(spawned) >= max_spawn:
                        break
                    seen.add(task["id"])
                    if slots.full_reason(task["assignee"]) is not None:
                        continue
                    if not dry_run:
                        start = self._claim(task, failure_limit)
                        if start is None:
                            continue
                        starts.append(start)
                    slots.take(task["assignee"])
                    progressed = True
                    spawned.append({"task_id": task["id"], "profile": task["assignee"],
                                    "title": task["title"]})
                if not progressed:
                    break
            if not dry_run:
                self._arm_backoff_timer(now)
                self._check_stuck(now, bool(spawned))
        for entry, st in zip(spawned, starts):
            entry["run_id"] = st.run_id
            st.entry = entry
        self._begin_starts(starts)
        if pending is not None:
            pending.extend(starts)
        report: dict[str, Any] = {"dry_run": dry_run, "paused": self.paused,
                                  "spawned": spawned if not dry_run else [],
                                  "would_spawn": spawned if dry_run else []}
        if dry_run:
            report["waiting"] = self._waiting(now, slots, {e["task_id"] for e in spawned})
        return report

    def _check_stuck(self, now: float, spawned: bool) -> None:
        """Warn (at most once per 5 minutes) when dispatchable work -- assigned to
        a known profile, no backoff, caps not full -- waited through 6 passes in a
        row with nothing spawned."""
        slots = self.slots()
        busy = self.busy_tasks()
        waiting = [] if spawned or self.paused else [
            t for t in self.store.dispatch_candidates(slots.open_profiles(), now, 20)
            if t["id"] not in busy]
        self._stuck_passes = 0 if not waiting else self._stuck_passes + 1
        if self._stuck_passes >= STUCK_PASSES and now - self._stuck_warned >= STUCK_EVERY:
            self._stuck_warned = now
            log.warning("dispatcher_stuck", passes=self._stuck_passes,
                        tasks=[t["id"] for t in waiting[:10]], running=slots.running)

    def _end_superseded_lingerers(self) -> None:
        """A worker still in exit_grace whose task is ready again (e.g. unblocked)
        has nothing left to do: kill it now so the next attempt can start."""
        for w in list(self.workers.values()):
            if w.closed_by_board and w.stopping is None and \
                    self.store.get_task(w.task_id)["status"] == states.READY:
                self._bg(self.stop(w, "superseded"))

    def _waiting(self, now: float, slots: Slots, chosen: set[str]) -> list[dict[str, Any]]:
        out = []
        for t in self.store.list_tasks(statuses=[states.READY, states.TODO]):
            if t["id"] in chosen:
                continue
            out.append({"task_id": t["id"], "status": t["status"],
                        "reason": self.waiting_reason(t, now, slots)})
        return out

    def waiting_reason(self, task: dict[str, Any], now: float, slots: Slots | None = None,
                       busy: AbstractSet[str] | None = None) -> str | None:
        return waiting_reason(task, now=now, slots=slots or self.slots(), paused=self.paused,
                              unfinished_parents=self.store.unfinished_parents,
                              busy=self.busy_tasks() if busy is None else busy)

    def _arm_backoff_timer(self, now: float) -> None:
        """Wake when the earliest backoff of a dispatchable task ends."""
        assert self.loop is not None
        if self._backoff_timer is not None:
            self._backoff_timer.cancel()
            self._backoff_timer = None
        nxt = self.store.next_not_before(sorted(self.config.profiles), now)
        if nxt is not None:
            self._backoff_timer = self.loop.call_later(max(0.0, nxt - time.time()) + 0.001,
                                                       self.wake)

    # -- spawning ------------------------------------------------------------------
    def _claim(self, task: dict[str, Any], failure_limit: int | None) -> "_Start | None":
        """Open the run (inside the dispatch pass's transaction) and gather what
        the worker needs from the board; None if the claim was refused."""
        profile = self.config.profiles[task["assignee"]]
        token = new_token()
        try:
            run = self.store.claim(task["id"], claimer=self.claimer, profile=profile.name,
                                   lease_ttl=None, token_hash=hash_token(token), now=time.time())
        except KanbanError as e:
            log.warning("claim_failed", task_id=task["id"], profile=profile.name,
                        error=e.message)
            return None
        task = self.store.get_task(task["id"])
        ws = workspace.path_for(task, self.paths.workspaces)
        assert self.loop is not None
        return _Start(task=task, profile=profile, run_id=run["id"], token=token,
                      context=context.render(self.store, task, str(ws)),
                      failure_limit=failure_limit, run_dir=self.paths.runs / run["id"],
                      log_path=self.paths.logs / f"{task['id']}.log",
                      done=self.loop.create_future())

    def _begin_starts(self, starts: list["_Start"]) -> None:
        """Prepare each start's files: inline for a lone start on a quiet daemon
        (lowest latency), otherwise -- a burst, or many workers live -- on the
        spawn threads, so the loop keeps serving and reaping while the kernel
        creates the files on another core."""
        assert self.loop is not None
        inline = len(starts) == 1 and not self.starting and len(self.workers) < INLINE_BELOW
        for st in starts:
            self.starting[st.run_id] = st
            if st.task["workspace_kind"] == "worktree":
                self._bg(self._start_in_worktree(st))
                continue
            if inline:
                self._prepare(st)
                self._prepared(st, fresh=True)
            else:
                self._prepare_on_pool(st)

    def _prepare_on_pool(self, st: "_Start") -> None:
        """Prepare the start's files on a spawn thread, then fork its worker on
        the loop (_prepared)."""
        assert self.loop is not None
        fut = self.loop.run_in_executor(self._spawn_pool(), self._prepare, st)
        fut.add_done_callback(lambda _f, st=st: self._prepared(st))

    def _spawn_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(SPAWN_THREADS, thread_name_prefix="kanband-spawn")
        return self._pool

    async def _start_in_worktree(self, st: "_Start") -> None:
        """A start whose workspace is a git worktree: git first (a helper process,
        while the loop goes on), then the start's files and fork as in a burst."""
        try:
            st.ws = await self.prepare_workspace(st.task)
        except OSError as e:
            st.error = str(e)
        except asyncio.CancelledError:  # shutting down: end the start, then go
            self._prepared(st)
            raise
        except Exception as e:  # never leave a start without an end
            log.exception("worktree_failed", task_id=st.task["id"], run_id=st.run_id)
            st.error = f"{type(e).__name__}: {e}"
        if self.stopping:  # the spawn threads may be gone; nothing more to start
            self._prepared(st)
            return
        self._prepare_on_pool(st)

    async def prepare_workspace(self, task: dict[str, Any]) -> Path:
        """The task's workspace, made if missing. A worktree is added by `git
        worktree add`, run as a helper (reaped like workers; the loop serves on
        meanwhile), its output appended to the task's log."""
        if task["workspace_kind"] != "worktree":
            return workspace.prepare(task, self.paths.workspaces)
        target, repo, branch = workspace.worktree_plan(task, self.paths.workspaces)
        # One git per worktree at a time (a start and an external claim may race),
        # and a caller that goes away does not kill git halfway through a checkout.
        adding = self._adding.get(target)
        if adding is None:
            if target.is_dir() and self.store.get_meta(_adding_key(target)) is None:
                return target
            adding = asyncio.ensure_future(self._add_worktree(task, target, repo, branch))
            self._adding[target] = adding
            adding.add_done_callback(lambda _f: self._adding.pop(target, None))
        return await asyncio.shield(adding)

    async def _add_worktree(self, task: dict[str, Any], target: Path, repo: Path,
                            branch: str) -> Path:
        """`git worktree add`, marked in the board while it runs: a kanband killed
        halfway leaves the mark, and the next start removes the half-made
        worktree and adds it again instead of running a worker in it."""
        log_path = self.paths.logs / f"{task['id']}.log"
        key = _adding_key(target)
        if self.store.get_meta(key) is not None and (target.exists() or target.is_symlink()):
            _log_note(log_path, f"removing {target}: a half-made worktree (an earlier "
                                "`git worktree add` did not finish)")
            # twice --force: git keeps a worktree it is still adding locked
            await self._git(repo, ["worktree", "remove", "--force", "--force", str(target)],
                            log_path, 60.0)
            # gc's rule: never a symlink, never outside <repo>/.worktrees
            await asyncio.to_thread(gc.remove_inside, target, repo / ".worktrees")
            await self._git(repo, ["worktree", "prune"], log_path, 60.0)
        try:
            self.store.set_meta(key, str(time.time()))
        except KanbanError as e:
            raise OSError(f"cannot prepare workspace {target}: {e.message}") from None
        _log_note(log_path, f"git worktree add {target} ({branch})")
        have = await self._git(repo, ["show-ref", "--verify", "--quiet", f"refs/heads/{branch}"],
                               log_path, 60.0) == 0
        code, out = await self._git_output(repo, ["worktree", "add", str(target)]
                                           + ([branch] if have else ["-b", branch]),
                                           log_path, 120.0)
        if code != 0:
            why = out.strip() or (
                f"exit status {code}" if code > 0 else f"killed by signal {-code} (timeout)")
            raise OSError(f"cannot prepare workspace {target}: git worktree add failed: "
                          f"{why[-500:]}")
        try:
            self.store.delete_meta(key)
        except KanbanError as e:  # the next start re-adds it; this one can run
            log.warning("worktree_mark_kept", task_id=task["id"], error=e.message)
        return target

    async def git(self, repo: Path, args: list[str], timeout: float = 120.0) -> tuple[int, str]:
        """`git -C repo args...` as a helper process; (exit status, its output).
        The output also stays in <logs>/git.log."""
        return await self._git_output(repo, args, self.paths.logs / "git.log", timeout)

    async def _git_output(self, repo: Path, args: list[str], log_path: Path,
                          timeout: float) -> tuple[int, str]:
        """_git, and what it appended to `log_path`."""
        start = log_path.stat().st_size if log_path.exists() else 0
        code = await self._git(repo, args, log_path, timeout)
        return code, tail_text(log_path, start)

    async def _git(self, repo: Path, args: list[str], log_path: Path, timeout: float) -> int:
        try:
            return await self.reaper.run_command(["git", "-C", str(repo), *args], stdin=b"",
                                                 log_path=log_path, timeout=timeout)
        except OSError as e:
            raise OSError(f"cannot run git: {e}") from None

    def _prepare(self, st: "_Start") -> None:
        """The file work of a start (run directory, workspace, context, script,
        log). Touches no board state: it may run on a spawn thread."""
        if st.error is not None:
            return
        task, profile, run_id = st.task, st.profile, st.run_id
        try:
            st.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            ws = st.ws or workspace.prepare(task, self.paths.workspaces)
            st.ws = ws
            ctx_file = st.run_dir / "context.md"
            _write(ctx_file, st.context)
            script = st.run_dir / "script.sh"
            body = task["body"]
            if profile.builtin:  # the shell profile: the shim's sh runs the body itself
                too_big = len(body) > INLINE_BODY_MAX // 4 and len(  # <= 4 bytes a character
                    body.encode("utf-8", "surrogateescape")) > INLINE_BODY_MAX
                if too_big or "\0" in body:
                    _write(script, body)
                    st.shell = f". {shlex.quote(str(script))}"
                else:
                    st.shell = body
                st.argv = ["/bin/sh"]
                text = body.strip()
                first = text.split("\n", 1)[0]
                what = f"sh: {first[:200]}" + (" ..." if len(first) > 200 or first != text else "")
            else:
                if profile.uses_script:
                    _write(script, body)
                values = {"task_id": task["id"], "run_id": run_id, "profile": profile.name,
                          "workspace": str(ws), "context_file": str(ctx_file),
                          "script": str(script)}
                st.argv = [part.format_map(values) for part in profile.command]
                what = " ".join(st.argv)[:500]
            st.env = self.worker_env(task, run_id, st.token, ws, ctx_file, profile)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            header = f"=== kanband: run {run_id} ({profile.name}) started at {stamp}: {what}\n"
            st.log_fd, st.log_offset = self.reaper.open_log(st.argv, st.env, st.log_path,
                                                             header)
        except (OSError, ValueError, KeyError) as e:
            st.error = str(e)
        except Exception as e:  # never leave a start without an end
            st.error = f"{type(e).__name__}: {e}"

    def _prepared(self, st: "_Start", fresh: bool = False) -> None:
        """On the loop: fork the worker of a prepared start (unless its run was
        closed meanwhile, or kanband is stopping), then queue its record.
        `fresh`: prepared in the loop step that claimed it (nothing can have
        closed the run since)."""
        self.starting.pop(st.run_id, None)
        try:
            if st.error is None:
                if self.stopping:
                    st.cancelled = "kanband shut down before the worker started"
                elif not fresh and self.store.get_run(st.run_id)["outcome"] is not None:
                    st.cancelled = "the run was closed before the worker started"
                else:
                    self._fork(st)
        except Exception as e:  # never leave a claimed run without an outcome
            log.exception("start_failed", task_id=st.task["id"], run_id=st.run_id)
            st.error = st.error or f"{type(e).__name__}: {e}"
        finally:
            if st.log_fd is not None:
                os.close(st.log_fd)
                st.log_fd = None
        if st.error is not None:
            log.warning("spawn_failed", task_id=st.task["id"], run_id=st.run_id,
                        profile=st.profile.name, error=st.error)
            _log_note(st.log_path, f"spawn failed: {st.error}")
        if st.entry is not None:
            st.entry.update({"pid": st.worker.pid} if st.worker else
                            {"error": st.error or st.cancelled})
        self._to_record.append(st)
        if fresh:  # a lone start on a quiet daemon: record its pid at once
            self._record_starts()
        elif len(self._to_record) == 1:
            assert self.loop is not None
            self.loop.call_soon(self._record_starts)

    def _fork(self, st: "_Start") -> None:
        assert st.log_fd is not None and st.ws is not None and st.env is not None
        try:
            popen, started = self.reaper.spawn(st.argv, cwd=st.ws, env=st.env,
                                               log_fd=st.log_fd, run_dir=st.run_dir,
                                               shell=st.shell)
        except (OSError, ValueError) as e:
            st.error = str(e)
            return
        task, profile = st.task, st.profile
        w = Worker(run_id=st.run_id, task_id=task["id"], profile=profile, pid=popen.pid,
                   start_time=started, started_mono=time.monotonic(),
                   log_path=st.log_path, log_offset=st.log_offset, run_dir=st.run_dir,
                   failure_limit=st.failure_limit, popen=popen)
        st.worker = w
        self.workers[st.run_id] = w
        log.info("worker_spawned", task_id=task["id"], run_id=st.run_id, pid=popen.pid,
                 profile=profile.name)
        self._arm_timers(w, task, elapsed=0.0)
        self.reaper.track(w)

    def _record_starts(self) -> None:
        """One transaction for the starts of this loop step: the pid of every
        started worker; `spawn_failed` or `interrupted` for the others. A daemon
        that dies before this commits still finds the workers on restart (by
        KANBAN_RUN_ID), and the shim's exit file tells how they ended."""
        starts, self._to_record = self._to_record, []
        if not starts:
            return
        now = time.time()
        try:
            with self.store.batch():
                for st in starts:
                    w = st.worker
                    if w is not None:
                        self.store.record_spawn(w.run_id, w.pid, w.start_time or 0.0,
                                                w.profile.name, now, log_offset=w.log_offset)
        except Unavailable as e:  # supervised all the same; only re-adoption needs the pid
            log.error("spawn_not_recorded", runs=[st.run_id for st in starts], error=e.message)
        for st in starts:
            try:
                if st.error is not None:
                    self.store.end_run(st.run_id, "spawn_failed", now=now,
                                       failure_limit=st.failure_limit or self.config.failure_limit,
                                       backoff=self.config.backoff, error=st.error,
                                       payload={"error": st.error})
                elif st.cancelled and self.stopping and \
                        self.store.get_run(st.run_id)["outcome"] is None:
                    self.store.end_run(st.run_id, "interrupted", now=now,
                                       failure_limit=st.failure_limit or self.config.failure_limit,
                                       backoff=self.config.backoff, error=st.cancelled)
            except KanbanError as e:
                log.error("outcome_not_recorded", task_id=st.task["id"], run_id=st.run_id,
                          error=e.message)
            finally:
                if not st.done.done():
                    st.done.set_result(None)
        self.wake()

    def _flush_starts(self) -> None:
        """Before any other write: a run's `spawned` record must come before
        whatever ends it (an exit recorded, an operator's complete or archive)."""
        if self._to_record:
            self._record_starts()

    async def finish_starts(self, starts: list["_Start"]) -> None:
        """Wait until these starts have their worker (or their failure) recorded."""
        if starts:  # shielded: a caller that goes away must not cancel the starts
            await asyncio.gather(*(asyncio.shield(st.done) for st in starts))

    def worker_env(self, task: dict[str, Any], run_id: str, token: str, ws: Path,
                   ctx_file: Path, profile: Profile) -> dict[str, str]:
        env = child_env()
        env.update(KANBAN_TASK_ID=task["id"], KANBAN_RUN_ID=run_id, KANBAN_RUN_TOKEN=token,
                   KANBAN_WORKSPACE=str(ws), KANBAN_CONTEXT_FILE=str(ctx_file),
                   KANBAN_SOCKET=str(self.paths.socket), KANBAN_PROFILE=profile.name)
        if task["tenant"]:
            env["KANBAN_TENANT"] = task["tenant"]
        env.update(profile.env)
        return env

    def _runtime_cap(self, task: dict[str, Any], profile: Profile) -> float | None:
        return (task["max_runtime_seconds"] or profile.max_runtime
                or self.config.default_max_runtime)

    def _arm_timers(self, w: Worker, task: dict[str, Any], elapsed: float) -> None:
        assert self.loop is not None
        cap = self._runtime_cap(task, w.profile)
        if cap:
            w.timers["runtime"] = self.loop.call_later(max(0.0, cap - elapsed),
                                                       self._runtime_exceeded, w, cap)
        if w.profile.heartbeat_timeout:
            self._arm_heartbeat(w)

    def _arm_heartbeat(self, w: Worker) -> None:
        assert self.loop is not None
        run = self.store.get_run(w.run_id)
        last = run["last_heartbeat_at"] or run["started_at"]
        due = last + (w.profile.heartbeat_timeout or 0) - time.time()
        w.timers["heartbeat"] = self.loop.call_later(max(0.0, due), self._heartbeat_due, w)

    def _runtime_exceeded(self, w: Worker, cap: float) -> None:
        if w.stopping or w.finished.is_set():
            return
        elapsed = time.monotonic() - w.started_mono
        log.warning("run_timed_out", task_id=w.task_id, run_id=w.run_id, pid=w.pid,
                    profile=w.profile.name, limit_s=cap, elapsed_s=round(elapsed, 3))

        def record(w: Worker) -> None:
            self._fail(w, "timed_out", f"runtime cap of {cap:g}s reached",
                       {"elapsed_seconds": round(time.monotonic() - w.started_mono, 3),
                        "limit_seconds": cap, "sigkill": w.sigkilled})
        self._bg(self.stop(w, "timed_out", record))

    def _heartbeat_due(self, w: Worker) -> None:
        if w.stopping or w.finished.is_set() or not w.profile.heartbeat_timeout:
            return
        run = self.store.get_run(w.run_id)
        if run["outcome"] is not None:
            return
        last = run["last_heartbeat_at"] or run["started_at"]
        if time.time() - last < w.profile.heartbeat_timeout:
            self._arm_heartbeat(w)
            return
        log.warning("run_stale", task_id=w.task_id, run_id=w.run_id, pid=w.pid,
                    profile=w.profile.name, heartbeat_timeout_s=w.profile.heartbeat_timeout)
        reason = f"no heartbeat for {w.profile.heartbeat_timeout:g}s (heartbeat_timeout)"
        self._bg(self.stop(w, "stale", lambda w: self._fail(w, "stale", reason,
                                                             {"reason": reason})))

    def heartbeat_seen(self, run_id: str | None) -> None:
        """A heartbeat renewed the run: push its staleness check out."""
        w = self.workers.get(run_id or "")
        if w is not None and "heartbeat" in w.timers and not w.stopping:
            w.timers.pop("heartbeat").cancel()
            self._arm_heartbeat(w)

    # -- stopping --------------------------------------------------------------------
    async def stop(self, w: Worker, reason: str, record: Any = None) -> Worker:
        """Kill the run's whole tree, then (still in one loop step) `record(w)`.
        Only one stop or exit path finalizes a worker; later callers wait for it.
        The kill runs in a task of its own: a caller that goes away (its client
        disconnected, say) cannot leave a worker half-stopped."""
        if w.stop_task is None:
            if w.stopping is not None:  # exiting on its own: that path finalizes it
                await w.finished.wait()
                return w
            w.stopping = reason
            w.cancel_timers()
            w.stop_task = asyncio.ensure_future(self._stop_now(w, reason, record))
        await asyncio.shield(w.stop_task)
        return w

    async def _stop_now(self, w: Worker, reason: str, record: Any) -> None:
        try:
            w.sigkilled = await self.reaper.kill_run(w, self.config.kill_grace)
        except Exception:  # still finalize below: nobody may wait on this worker forever
            log.exception("kill_failed", task_id=w.task_id, run_id=w.run_id, pid=w.pid)
        if not w.exited.is_set():
            try:
                await asyncio.wait_for(w.exited.wait(), 5.0)
            except asyncio.TimeoutError:
                log.error("worker_exit_unseen", task_id=w.task_id, run_id=w.run_id, pid=w.pid)
        log.info("worker_killed", task_id=w.task_id, run_id=w.run_id, pid=w.pid,
                 profile=w.profile.name, reason=reason, sigkill=w.sigkilled)
        try:
            if record is not None:
                self._record(w, record)
            elif not self._run_active(w):  # else the caller records right after we return
                self._record(w, lambda w: self.store.record_exit_status(
                    w.run_id, w.exit_code, w.signal))
        finally:
            self._finalize(w)

    async def stop_run(self, run_id: str, reason: str) -> Worker | None:
        w = self.workers.get(run_id)
        if w is None:
            return None
        return await self.stop(w, reason)

    def run_closed(self, run_id: str | None) -> None:
        """complete/block closed a run whose worker may still be alive: exit_grace."""
        w = self.workers.get(run_id or "")
        if w is None or w.stopping or self.loop is None:
            return
        self._start_exit_grace(w, self.config.exit_grace)

    def _start_exit_grace(self, w: Worker, delay: float) -> None:
        assert self.loop is not None
        w.closed_by_board = True
        for name in ("runtime", "heartbeat"):
            h = w.timers.pop(name, None)
            if h:
                h.cancel()
        w.timers["exit_grace"] = self.loop.call_later(
            delay, lambda: self._bg(self.stop(w, "exit_grace")))

    def busy_tasks(self) -> frozenset[str]:
        """Tasks that still have a live worker (e.g. one lingering in exit_grace),
        or one being started (counted again only after a change, as slots())."""
        version = self._live_version()
        if self._busy is None or self._busy[0] != version:
            busy = {w.task_id for w in self.workers.values()}
            busy.update(st.task["id"] for st in self.starting.values())
            self._busy = (version, frozenset(busy))
        return self._busy[1]

    def _run_active(self, w: Worker) -> bool:
        return self.store.get_run(w.run_id)["outcome"] is None

    def _finalize(self, w: Worker) -> None:
        w.cancel_timers()
        self.workers.pop(w.run_id, None)
        w.finished.set()
        self.wake()

    # -- exits -----------------------------------------------------------------------
    def _on_exit(self, w: Worker) -> None:
        log.info("worker_exited", task_id=w.task_id, run_id=w.run_id, pid=w.pid,
                 profile=w.profile.name, exit_code=w.exit_code,
                 signal=w.signal, duration_s=round(time.monotonic() - w.started_mono, 3))
        if w.stopping is not None:
            return
        w.stopping = "exited"
        if self.reaper.has_leftovers(w):  # leftovers of the tree: no orphan survives
            self._bg(self._after_exit(w))
            return
        # The usual case: record at the end of this loop step, together with the
        # other exits reaped in it (one transaction for all of them).
        self._exits.append(w)
        if len(self._exits) == 1:
            assert self.loop is not None
            self.loop.call_soon(self._record_exits)

    def _record_exits(self) -> None:
        exits, self._exits = self._exits, []
        try:
            with self.store.batch():
                for w in exits:
                    self._classify(w)
        except Unavailable as e:  # nothing of the batch is durable: retry each from the sweep
            for w in exits:
                log.error("outcome_not_recorded", task_id=w.task_id, run_id=w.run_id,
                          error=e.message, retry="every sweep")
                self.unrecorded[w.run_id] = (w, self._classify)
        except Exception:  # one bad exit must not spoil the others: record each alone
            log.exception("outcome_batch_failed", runs=[w.run_id for w in exits])
            for w in exits:
                try:
                    self._record(w, self._classify)
                except Exception:
                    log.exception("outcome_not_recorded", task_id=w.task_id, run_id=w.run_id)
                    self.unrecorded[w.run_id] = (w, self._classify)
        finally:
            for w in exits:
                self._finalize(w)

    async def _after_exit(self, w: Worker) -> None:
        try:
            await self.reaper.kill_run(w, self.config.kill_grace)
            self._record(w, self._classify)
        finally:
            self._finalize(w)

    def _record(self, w: Worker, record: Any) -> None:
        """Write a run's outcome; if the board cannot be written (disk full), keep
        it and retry from the sweep, so no run is left without its outcome."""
        try:
            record(w)
        except Unavailable as e:
            log.error("outcome_not_recorded", task_id=w.task_id, run_id=w.run_id,
                      error=e.message, retry="every sweep")
            self.unrecorded[w.run_id] = (w, record)

    def retry_unrecorded(self) -> None:
        for run_id, (w, record) in list(self.unrecorded.items()):
            try:
                record(w)
            except Unavailable:
                return  # still failing: try again next sweep
            except Exception:  # this one is broken; the others still get their turn
                log.exception("outcome_not_recorded", task_id=w.task_id, run_id=run_id,
                              retry="every sweep")
                continue
            del self.unrecorded[run_id]
            log.info("outcome_recorded_late", task_id=w.task_id, run_id=run_id)
            self.wake()

    def _classify(self, w: Worker) -> None:
        """Exactly one outcome per run, from the §4 table."""
        run = self.store.get_run(w.run_id)
        if run["outcome"] is not None:  # complete/block/archive closed it already
            self.store.record_exit_status(w.run_id, w.exit_code, w.signal)
            return
        tail = tail_text(w.log_path, w.log_offset)
        if w.exit_code is None and w.signal is None:
            self._end(w, "lost", "the worker ended while kanband was away; its exit status "
                      "is unknown", {})
        elif w.signal is None and w.exit_code == 0:
            if w.profile.complete_on_exit:
                task = self.store.complete(w.task_id, result=last_line(tail), summary=None,
                                           metadata=None, now=time.time())
                self.store.record_exit_status(w.run_id, 0, None)
                log.info("run_completed", task_id=w.task_id, run_id=w.run_id,
                         result=(task["result"] or "")[:200])
            else:
                self._fail(w, "no_result", _with_tail(
                    "exited 0 without kanbanctl complete or block", tail), {})
        elif w.signal is None and w.exit_code == EXIT_RATE_LIMITED:
            retry_at = time.time() + w.profile.rate_limit_cooldown
            self._end(w, "rate_limited", f"exit status {EXIT_RATE_LIMITED} (rate limited)",
                      {"retry_at": retry_at}, cooldown=w.profile.rate_limit_cooldown)
        else:
            self._fail(w, "crashed", _with_tail(describe_exit(w.exit_code, w.signal), tail),
                       {"exit_code": w.exit_code, "signal": w.signal})

    def _fail(self, w: Worker, outcome: str, error: str, payload: dict[str, Any]) -> None:
        self._end(w, outcome, error, payload)

    def _end(self, w: Worker, outcome: str, error: str, payload: dict[str, Any],
             cooldown: float = 0.0) -> None:
        try:
            self.store.end_run(w.run_id, outcome, now=time.time(),
                               failure_limit=w.failure_limit or self.config.failure_limit,
                               backoff=self.config.backoff, cooldown=cooldown, error=error,
                               exit_code=w.exit_code, signal=w.signal, payload=payload)
        except Conflict:
            self.store.record_exit_status(w.run_id, w.exit_code, w.signal)
            return
        task = self.store.get_task(w.task_id)
        if task["status"] == states.BLOCKED:
            log.warning("gave_up", task_id=w.task_id, run_id=w.run_id, profile=w.profile.name,
                        failures=task["consecutive_failures"], last_outcome=outcome)
        log.info("run_ended", task_id=w.task_id, run_id=w.run_id, outcome=outcome,
                 exit_code=w.exit_code, signal=w.signal, error=error.splitlines()[0][:200])

    # -- restart: re-adoption ------------------------------------------------------
    async def readopt(self) -> dict[str, int]:
        """For every active daemon-spawned run: adopt a live worker, or close the run
        with the outcome its exit file records, else `lost` -- after killing whatever
        of it survives. Processes of runs that already ended (a worker lingering in
        exit_grace when kanband died) get the rest of their exit_grace, then die."""
        strays = self.reaper.processes_by_run()
        adopted = ended = 0
        for run in self.store.active_runs():
            if not run["claimer"].startswith("kanband@"):
                continue
            w = self._worker_from_run(run)
            procs = strays.pop(run["id"], [])
            if run["worker_pid"] and same_process(run["worker_pid"], run["worker_start_time"]):
                self._adopt(w, self.store.get_task(run["task_id"]), run)
                adopted += 1
                continue
            status = read_exit_file(w.run_dir)
            if status is not None:
                w.exit_code, w.signal = status
            w.stopping = "exited"
            w.own_group = False  # the shim is gone: its pid may belong to someone else now
            if procs:
                await self.reaper.kill_run(w, self.config.kill_grace)
            self._classify(w)
            ended += 1
        for run_id, procs in strays.items():
            try:
                run = self.store.get_run(run_id)
            except KanbanError:
                run = None
            if run is None or not run["claimer"].startswith("kanband@"):
                continue  # not ours to judge (another board, or an external claim)
            w = self._worker_from_run(run)
            if run["worker_pid"] and same_process(run["worker_pid"], run["worker_start_time"]):
                self._adopt(w, None, run)
                left = (run["ended_at"] or time.time()) + self.config.exit_grace - time.time()
                self._start_exit_grace(w, max(0.0, left))
            else:
                w.own_group, w.stopping = False, "exit_grace"
                self._bg(self.reaper.kill_run(w, self.config.kill_grace))
        return {"adopted": adopted, "ended": ended}

    def _worker_from_run(self, run: dict[str, Any]) -> Worker:
        profile = self.config.profiles.get(run["profile"] or "") or Profile(
            name=run["profile"] or "?", command=("?",))
        run_dir = self.paths.runs / run["id"]
        offset = run.get("log_offset") or 0
        return Worker(run_id=run["id"], task_id=run["task_id"], profile=profile,
                      pid=run["worker_pid"] or 0, start_time=run["worker_start_time"],
                      started_mono=time.monotonic() - max(0.0, time.time() - run["started_at"]),
                      log_path=self.paths.logs / f"{run['task_id']}.log", log_offset=offset,
                      run_dir=run_dir, adopted=True)

    def _adopt(self, w: Worker, task: dict[str, Any] | None, run: dict[str, Any]) -> None:
        self.workers[w.run_id] = w
        if run["outcome"] is None:
            self.store.adopt(w.run_id, w.pid, time.time())
        log.info("worker_adopted", task_id=w.task_id, run_id=w.run_id, pid=w.pid,
                 profile=w.profile.name, run_outcome=run["outcome"])
        if task is not None:
            self._arm_timers(w, task, elapsed=time.time() - run["started_at"])
        self.reaper.track(w)

    # -- shutdown ----------------------------------------------------------------------
    async def shutdown(self) -> None:
        self.stopping = True
        if self._backoff_timer is not None:
            self._backoff_timer.cancel()
        # Starts in flight end `interrupted` without a worker (see _prepared).
        pending = [st.done for st in self.starting.values()]
        if pending:
            await asyncio.wait(pending, timeout=30.0)
        if self._to_record:
            self._record_starts()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self.config.on_stop == "keep":
            for w in list(self.workers.values()):
                w.cancel_timers()
                self.reaper._untrack(w)
            log.info("workers_kept", count=len(self.workers))
            return

        def interrupted(w: Worker) -> None:
            if self._run_active(w):
                self._end(w, "interrupted", "kanband shut down", {})
            else:
                self.store.record_exit_status(w.run_id, w.exit_code, w.signal)
        await asyncio.gather(*(self.stop(w, "interrupted", interrupted)
                               for w in list(self.workers.values())), return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()


@dataclass
class _Start:
    """A claimed run on its way to a worker (see Supervisor.dispatch)."""

    task: dict[str, Any]
    profile: Profile
    run_id: str
    token: str
    context: str
    failure_limit: int | None
    run_dir: Path
    log_path: Path
    done: asyncio.Future[None]  # set once the start's record is written
    ws: Path | None = None
    argv: list[str] = field(default_factory=list)
    shell: str | None = None  # built-in shell profile: the text its shim runs
    env: dict[str, str] | None = None
    log_fd: int | None = None
    log_offset: int = 0
    entry: dict[str, Any] | None = None  # the dispatch report's line for it
    worker: Worker | None = None
    error: str | None = None  # spawn_failed
    cancelled: str | None = None  # not started: run closed, or kanband stopping


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = text.encode("utf-8", "surrogateescape")
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def _with_tail(text: str, tail: str) -> str:
    tail = tail.strip()
    if not tail:
        return text
    return f"{text}\n--- last output ---\n{tail[-2048:]}"


def _adding_key(target: Path) -> str:
    """The board's mark (meta table) of a `git worktree add` in progress."""
    return f"worktree_adding:{target}"


def _log_note(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = logfiles.open_append(path)
        try:
            os.write(fd, f"=== kanband: {text}\n".encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError:
        pass


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if isinstance(exc, KanbanError):
            log.warning("background_refused", error=exc.message)
        else:
            log.error("background_failed", error=repr(exc), exc_info=exc)
