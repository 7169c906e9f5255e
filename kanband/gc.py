"""Garbage collection (SPEC §9): bounded disk use, never outside its roots.

- scratch workspaces and git worktrees of archived tasks;
- events older than N days of done/archived tasks;
- task log files older than N days (not of running tasks), and run
  directories of runs that ended more than N days ago.

Every tree is resolved (symlinks followed) and must lie inside its root
(`<home>/workspaces`, `<repo>/.worktrees`, `<home>/runs`); a log must be a
regular file directly in `<logs>`. A symlink in their place is refused and
counted, never followed or deleted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from kanband import logfiles, states, workspace
from kanband.paths import DaemonPaths
from kanband.store import Store

DAY = 86400.0
EVENTS_PER_CHUNK = 5000  # events deleted per transaction


def inside(path: Path, root: Path) -> bool:
    """True if `path`, with every symlink resolved, lies strictly inside `root`."""
    try:
        real, base = path.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return real != base and base in real.parents


def remove_inside(path: Path, root: Path) -> bool | None:
    """Remove the tree at `path` if it is no symlink and lies inside `root`.
    True: removed; False: refused; None: nothing there. File work only."""
    if not (path.exists() or path.is_symlink()):
        return None
    if path.is_symlink() or not inside(path, root):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _remove_tree(path: Path, root: Path, report: dict[str, Any], key: str) -> None:
    removed = remove_inside(path, root)
    if removed is False:
        report["refused"].append(str(path))
    elif removed:
        report[key] += 1


def _remove_trees(trees: list[tuple[Path, Path, str]], report: dict[str, Any]) -> None:
    """File work only (no board state): run on a worker thread."""
    for path, root, key in trees:
        _remove_tree(path, root, report, key)


def _old_logs(root: Path, cutoff: float) -> tuple[list[Path], list[str]]:
    """The `*.log` files directly in `root` last modified before `cutoff`, and
    the symlinks among its `*.log` entries (refused: never followed, never
    deleted); other entries (a directory, a FIFO) are left alone. Raises
    OSError if `root` cannot be listed. File work only: run on a worker
    thread."""
    old: list[Path] = []
    refused: list[str] = []
    with os.scandir(root) as entries:
        for e in entries:
            if not e.name.endswith(".log"):
                continue
            try:
                if e.is_symlink():
                    refused.append(os.path.join(root, e.name))
                elif e.is_file(follow_symlinks=False) and \
                        e.stat(follow_symlinks=False).st_mtime < cutoff:
                    old.append(root / e.name)
            except OSError:
                continue  # gone meanwhile
    return old, refused


async def _on_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on a worker thread. Cancelled meanwhile (the client went away,
    shutdown), it still waits for the thread to finish before it raises: the
    caller's clean-up must not run while the thread is still at work."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


def _unlink_logs(old: list[Path], cutoff: float, report: dict[str, Any]) -> None:
    """File work only (no board state): run on a worker thread."""
    for p in old:
        try:
            if logfiles.unlink_old(p, cutoff):
                report["logs"] += 1
        except OSError as e:
            report["errors"].append(f"{p}: {e.strerror}")


# Runs `git -C REPO ARGS...`; returns (exit status, its output).
GitRunner = Callable[[Path, list[str]], Awaitable[tuple[int, str]]]


async def collect(store: Store, paths: DaemonPaths, event_days: float, log_days: float,
                  now: float | None = None, git: GitRunner | None = None) -> dict[str, Any]:
    """One gc pass. In the daemon `git` runs git as a helper process the event
    loop awaits (Supervisor.git), and directory trees (workspaces, run
    directories: possibly large) are removed on a worker thread, so neither
    blocks the loop. So are the task logs looked through and unlinked; a log
    that a start opens meanwhile is kept (see kanband.logfiles)."""
    now = now if now is not None else time.time()
    report: dict[str, Any] = {"workspaces": 0, "worktrees": 0, "events": 0, "logs": 0,
                              "run_dirs": 0, "refused": [], "errors": []}
    trees: list[tuple[Path, Path, str]] = []
    for task in store.list_tasks(statuses=[states.ARCHIVED]):
        target = workspace.path_for(task, paths.workspaces)
        if task["workspace_kind"] == "scratch":
            trees.append((target, paths.workspaces, "workspaces"))
        elif task["workspace_kind"] == "worktree" and (target.exists() or target.is_symlink()):
            repo = Path(task["workspace_path"])
            root = repo / ".worktrees"
            if target.is_symlink() or not inside(target, root):
                report["refused"].append(str(target))
                continue
            if git is None:  # only the daemon's supervisor runs git
                report["errors"].append(f"{target}: no supervisor to run git")
                continue
            code, out = await git(repo, ["worktree", "remove", "--force", str(target)])
            if code == 0:
                report["worktrees"] += 1
            else:
                report["errors"].append(f"{target}: {out.strip()[:300]}")
    while True:  # in chunks, each its own transaction: the loop serves in between
        n = store.gc_events(now - event_days * DAY, limit=EVENTS_PER_CHUNK)
        report["events"] += n
        if n < EVENTS_PER_CHUNK:
            break
        await asyncio.sleep(0)
    cutoff = now - log_days * DAY
    if paths.logs.is_dir():
        # Looking through the logs (a home may hold 100k) and unlinking them runs
        # on a worker thread; only the board's answer (which tasks run) comes
        # from the loop. logfiles keeps a log opened meanwhile from being unlinked.
        logfiles.begin_pass()
        try:
            try:
                old, refused = await _on_thread(_old_logs, paths.logs, cutoff)
            except OSError as e:  # the directory went away or cannot be read
                old, refused = [], []
                report["errors"].append(f"{paths.logs}: {e.strerror}")
            report["refused"] += refused
            statuses = store.task_statuses([p.stem for p in old if p.stem.startswith("t_")])
            old = [p for p in old if statuses.get(p.stem) != states.RUNNING]
            await _on_thread(_unlink_logs, old, cutoff, report)
        finally:  # only once no thread of this pass unlinks any more
            logfiles.end_pass()
    trees += [(paths.runs / run_id, paths.runs, "run_dirs")
              for run_id in store.ended_run_ids(cutoff)]
    await asyncio.get_running_loop().run_in_executor(None, _remove_trees, trees, report)
    return report


def disk_usage(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total
