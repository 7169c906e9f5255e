"""Experiment, not product: run kanband with prototypes of the fixes that
docs/performance.md suggested (as of 338aab5; c3edace put equivalents of all
three into kanband itself, so on later code every patch reports "skipped"), applied by monkeypatching at start-up, to
estimate their effect before anyone edits kanband/.

    python -m bench --whatif [--only NAME]      # every daemon the bench starts
    python -m bench.whatif --home DIR ...       # by hand, same flags as kanband

Patches (each guarded: if the code it targets has moved, or kanband already
has the fix, it is skipped and named on stderr, so a stale prototype never
silently measures nothing -- or undoes a better fix):

  sweep     Reaper.refresh_known shares one parent->children map per sweep
            (psutil's ppid_map, read once) instead of psutil.Process.children()
            per worker, which reads /proc/*/stat for every process each time;
            and a worker's descendants are refreshed at most every 10 s.
  leftovers Reaper.has_leftovers lists the daemon's own children from
            /proc/self/task/*/children instead of psutil.Process().children().
  indexes   two indexes: dispatch order per assignee over ready tasks (so
            Store.dispatch_candidates stops walking every ready row), and
            completed work per assignee (Store.recent_completed, used by
            context.render on every spawn).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

APPLIED: list[str] = []
SKIPPED: list[str] = []


def _children_of(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


def patch_sweep() -> None:
    import psutil
    from psutil import _pslinux  # noqa: F401  (ppid_map lives there on Linux)

    from kanband import reaper
    if hasattr(reaper, "descendants_of") or hasattr(reaper, "children_of"):
        SKIPPED.append("sweep (kanband already walks /proc children files)")
        return
    if not hasattr(reaper.Reaper, "refresh_known") or not hasattr(psutil._pslinux, "ppid_map"):
        SKIPPED.append("sweep")
        return
    cache: dict[str, Any] = {"at": 0.0, "map": {}}
    last: dict[str, float] = {}

    def descendants(pid: int) -> list[int]:
        now = time.monotonic()
        if now - cache["at"] > 0.5:  # one /proc pass per sweep, shared by all workers
            kids: dict[int, list[int]] = {}
            for child, parent in psutil._pslinux.ppid_map().items():
                kids.setdefault(parent, []).append(child)
            cache["at"], cache["map"] = now, kids
        out, todo = [], [pid]
        while todo:
            for c in cache["map"].get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    def refresh_known(self: Any, w: Any) -> None:
        now = time.monotonic()
        if now - last.get(w.run_id, 0.0) < 10.0:
            return
        last[w.run_id] = now
        for pid in descendants(w.pid):
            try:
                w.known[pid] = psutil.Process(pid).create_time()
            except psutil.Error:
                pass
    reaper.Reaper.refresh_known = refresh_known
    APPLIED.append("sweep")


def patch_leftovers() -> None:
    import psutil

    from kanband import reaper
    if hasattr(reaper, "children_of"):
        SKIPPED.append("leftovers (kanband already reads /proc children files)")
        return
    if not hasattr(reaper.Reaper, "has_leftovers") or not hasattr(reaper, "_group_alive"):
        SKIPPED.append("leftovers")
        return

    def has_leftovers(self: Any, w: Any) -> bool:
        if reaper._group_alive(w.pgid):
            return True
        if any(reaper.same_process(pid, ct) for pid, ct in w.known.items()):
            return True
        for pid in _children_of(os.getpid()):
            if pid in self.by_pid:
                continue
            try:
                p = psutil.Process(pid)
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if p.environ().get("KANBAN_RUN_ID") == w.run_id:
                    return True
                for c in p.children(recursive=True):
                    if c.environ().get("KANBAN_RUN_ID") == w.run_id:
                        return True
            except psutil.Error:
                continue
        return False
    reaper.Reaper.has_leftovers = has_leftovers
    APPLIED.append("leftovers")


def patch_indexes() -> None:
    from kanband import store
    if "tasks_dispatch" in str(getattr(store, "_MIGRATIONS", "")):
        SKIPPED.append("indexes (kanband's schema has them)")
        return
    orig = store.Store._open

    def _open(self: Any, durability: str) -> Any:
        db = orig(self, durability)
        db.execute("CREATE INDEX IF NOT EXISTS whatif_dispatch ON tasks"
                   "(status, assignee, priority DESC, created_at, id)")
        db.execute("CREATE INDEX IF NOT EXISTS whatif_assignee_completed ON tasks"
                   "(assignee, completed_at) WHERE completed_at IS NOT NULL")
        return db
    store.Store._open = _open
    APPLIED.append("indexes")


def main() -> int:
    for p in (patch_sweep, patch_leftovers, patch_indexes):
        try:
            p()
        except Exception as e:  # a prototype must never stop the daemon starting
            SKIPPED.append(f"{p.__name__}: {e}")
    print(f"bench.whatif: applied {APPLIED}, skipped {SKIPPED}", file=sys.stderr, flush=True)
    from kanband.daemon import main as kanband_main
    return kanband_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
