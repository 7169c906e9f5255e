"""Helpers for the supervision suites (test_supervision, test_outcomes, test_readopt).

Imported by those test modules; the autouse fixture `kill_leftovers` below becomes
active in every module that imports it with `from supervision_helpers import *`.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from bench.harness import toml
from conftest import WORKER, Kanband, wait_for

__all__ = ["PY", "WORKER", "toml", "wcmd", "alive", "gone", "read_pid", "runs_of",
           "last_run", "daemon_pid", "zombies_under", "children_under", "live_workers",
           "EnvKanband", "kill_leftovers", "wdir", "wait_run"]

PY = sys.executable


# -- config --------------------------------------------------------------------------
def wcmd(*args: Any) -> list[str]:
    """The command list of a profile that runs tests/worker.py with these options."""
    return [PY, str(WORKER), *map(str, args)]


# -- processes -----------------------------------------------------------------------
def alive(pid: int | None) -> bool:
    """The process exists and is not a zombie."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def gone(pid: int | None) -> bool:
    return not alive(pid)


def read_pid(path: Path, timeout: float = 15.0) -> int:
    """Wait for a worker to write its pid file, and return the pid."""
    def get() -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None
    return wait_for(get, timeout, f"pid file {path}")


def daemon_pid(k: Kanband) -> int:
    assert k.proc is not None
    return k.proc.pid


def children_under(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def zombies_under(pid: int) -> list[int]:
    out = []
    for c in children_under(pid):
        try:
            if c.status() == psutil.STATUS_ZOMBIE:
                out.append(c.pid)
        except psutil.Error:
            pass
    return out


def live_workers(k: Kanband) -> list[tuple[int, str | None, str | None]]:
    """(pid, profile, task) of the worker.py processes of this daemon that were all alive
    at one common instant: list them, then re-check each one (same create time, not a
    zombie). A process alive at listing and at re-check was alive in between, so all
    survivors were alive together at the moment the listing finished."""
    sock = str(k.socket)
    seen: list[tuple[psutil.Process, float, str | None, str | None]] = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if not cmd or cmd[0] == "/bin/sh" or str(WORKER) not in cmd:
                continue
            env = p.environ()
            if env.get("KANBAN_SOCKET") != sock:
                continue
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            seen.append((p, p.create_time(), env.get("KANBAN_PROFILE"),
                         env.get("KANBAN_TASK_ID")))
        except psutil.Error:
            continue
    # A worker forking a helper (e.g. kanbanctl) shows its command line in the
    # child until exec: count process trees, not processes.
    pids = {p.pid for p, *_ in seen}
    roots = []
    for entry in seen:
        try:
            if entry[0].ppid() in pids:
                continue
        except psutil.Error:
            continue
        roots.append(entry)
    seen = roots
    out = []
    for p, ctime, profile, task in seen:
        try:
            q = psutil.Process(p.pid)
            if q.create_time() == ctime and q.status() != psutil.STATUS_ZOMBIE:
                out.append((p.pid, profile, task))
        except psutil.Error:
            continue
    return out


def _ours(p: psutil.Process, marker: str) -> bool:
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if any(marker in part for part in (p.cmdline() or [])):
            return True
        env = p.environ()
        return any(marker in env.get(k, "") for k in ("KANBAN_SOCKET", "KANBAN_HOME"))
    except psutil.Error:
        return False


@pytest.fixture(autouse=True)
def kill_leftovers(home: Path) -> Any:
    """Teardown: SIGKILL, by pid, every process this test started that is still alive
    (workers, shims, escaped grandchildren: all carry the test's home in their
    environment or command line). Runs after the daemons are stopped."""
    yield
    kill_processes_of(home)


def kill_processes_of(home: Path) -> None:
    """SIGKILL, by pid, every live process carrying `home` in argv or environment."""
    marker = str(home)
    me = os.getpid()
    for _ in range(3):
        victims = [p for p in psutil.process_iter(["pid"]) if p.pid != me and _ours(p, marker)]
        if not victims:
            return
        for p in victims:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except OSError:
                pass
        psutil.wait_procs(victims, timeout=3)


# -- board ---------------------------------------------------------------------------
def wdir(home: Path) -> Path:
    """A per-test directory for worker pid files, marks and dumps."""
    d = home / "w"
    d.mkdir(exist_ok=True)
    return d


def git_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    """A git repository at `path` with one commit of `files` (default: a README)."""
    path.mkdir(parents=True)
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    for name, text in (files or {"README": "hi\n"}).items():
        (path / name).write_text(text)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "init"], check=True)
    return path


def fake_git(where: Path, before: str) -> Path:
    """A `git` for the front of a daemon's PATH (see start_with_path): runs the
    shell text `before` (git's arguments in "$@"), then the real git. Returns
    its directory."""
    real_git = subprocess.run(["sh", "-c", "command -v git"], capture_output=True,
                              text=True, check=True).stdout.strip()
    fake = where / "bin"
    fake.mkdir()
    (fake / "git").write_text(f'#!/bin/sh\n{before}exec {real_git} "$@"\n')
    (fake / "git").chmod(0o755)
    return fake


def stalled_git(where: Path, step: str) -> tuple[Path, Path, Path]:
    """A fake_git that holds `git ... <step> ...` (e.g. "worktree add") until a
    release file exists (at most 30 s), then runs the real git. Returns (its
    directory, the file it creates once holding, the release file)."""
    started, release = where / "git-started", where / "git-release"
    fake = fake_git(where, f'case "$*" in *"{step}"*) touch {started}; i=0\n'
                           f'  while [ ! -e {release} ] && [ $i -lt 600 ]; do sleep 0.05; '
                           'i=$((i+1)); done;; esac\n')
    return fake, started, release


def start_with_path(kanband_factory: Any, config: str | None, bin_dir: Path) -> Kanband:
    """A started kanband whose daemon finds `bin_dir` first on its PATH."""
    k = kanband_factory(config, start=False)
    k.__class__ = EnvKanband
    k.extra_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    k.start()
    return k


@contextmanager
def low_open_files_limit() -> Iterator[int]:
    """Our soft RLIMIT_NOFILE lowered for the block (a daemon started in it
    inherits it), to 256 or half a smaller hard limit; yields that limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256 if hard == resource.RLIM_INFINITY or hard > 256 else hard // 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        yield low
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def runs_of(k: Kanband, task_id: str) -> list[dict[str, Any]]:
    """Runs of a task, oldest first."""
    return sorted(k.call("task.runs", id=task_id)["runs"], key=lambda r: r["started_at"])


def last_run(k: Kanband, task_id: str) -> dict[str, Any]:
    runs = runs_of(k, task_id)
    assert runs, f"{task_id} has no run"
    return runs[-1]


def wait_run(k: Kanband, task_id: str, outcome: str | None = None, count: int = 1,
             timeout: float = 20.0) -> dict[str, Any]:
    """Wait until the task has `count` runs and the last one ended (with `outcome`)."""
    def check() -> Any:
        runs = runs_of(k, task_id)
        if len(runs) < count or runs[count - 1]["outcome"] is None:
            return None
        r = runs[count - 1]
        return r if outcome is None or r["outcome"] == outcome else None
    return wait_for(check, timeout, f"run #{count} of {task_id} to end {outcome or ''}")


class EnvKanband(Kanband):
    """A Kanband whose daemon starts with extra environment variables."""

    extra_env: dict[str, str] = {}

    @property
    def env(self) -> dict[str, str]:
        e = super().env
        e.update(self.extra_env)
        return e
