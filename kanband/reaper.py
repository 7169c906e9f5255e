"""Owner of every worker process: spawn, watch, classify exit, kill ladder (SPEC §4).

- Workers start in a new session (own process group) through a tiny sh shim
  that keeps the command's exit status in the run directory, so an outcome
  survives a daemon restart, and re-raises a fatal signal so the daemon sees
  how the command died.
- Exit is noticed at once: a pidfd per worker on the event loop, plus SIGCHLD.
  Every child is reaped with waitpid(-1); kanband is a child subreaper, so
  orphaned grandchildren come back to it and are reaped too.
- Killing a run: SIGTERM to its process group and every process attributed to
  it (descendants, escaped `setsid` children found by KANBAN_RUN_ID in their
  environment), kill_grace, SIGKILL, and confirm they are gone.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import structlog

from kanband import logfiles
from kanband.config import Profile

log = structlog.get_logger("kanband.reaper")

EXIT_FILE = "exit_status"
# After the command: keep its status in the exit file ($f). A command killed by
# a signal shows as 128+N to sh: re-raise N on the shim so the daemon sees it.
# The shim's variables have names no worker environment is likely to hold (an
# exported variable of the same name would be changed for the command).
_SHIM_END = ('__kb_rc=$?; echo "$__kb_rc" > "$__kb_f"; '
             'if [ "$__kb_rc" -gt 128 ] && [ "$__kb_rc" -lt 160 ]; then '
             'trap - "$((__kb_rc-128))" 2>/dev/null; kill "-$((__kb_rc-128))" $$; fi; '
             'exit "$__kb_rc"')
# $1 = exit file, $2 = the soft RLIMIT_NOFILE to give back to the worker ("" to
# keep kanband's); the rest is the worker's argv.
_SHIM_START = '__kb_f=$1; [ -z "$2" ] || ulimit -S -n "$2" 2>/dev/null; '
SHIM = _SHIM_START + 'shift 2; "$@"; ' + _SHIM_END
# Helpers (git, notifiers): only the open-files limit given back, then exec.
HELPER_SHIM = 'ulimit -S -n "$1" 2>/dev/null; shift; exec "$@"'


def find_command(exe: str, env: dict[str, str]) -> str | None:
    """The executable file `exe` names (searched on env's PATH unless it holds a
    slash), or None."""
    if "/" not in exe:
        return shutil.which(exe, path=env.get("PATH"))
    return exe if os.access(exe, os.X_OK) and os.path.isfile(exe) else None


def helper_argv(argv: list[str], env: dict[str, str]) -> list[str]:
    """A helper's command line, under kanband's original open-files soft limit
    (see worker_nofile) when kanband raised its own. Raises FileNotFoundError,
    as Popen would, when the command cannot be found."""
    if worker_nofile is None:
        return argv
    exe = find_command(argv[0], env)
    if exe is None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", argv[0])
    return ["/bin/sh", "-c", HELPER_SHIM, "kanband-helper", str(worker_nofile), exe,
            *argv[1:]]
# The built-in shell profile: shell text (the task body) run in a subshell of the
# shim itself -- one sh process and no exec instead of two -- with no positional
# parameters and no shim variable set. The text comes in the environment, not
# argv: a command line is readable by every user, an environment only by ours.
# In a subshell $$ is the shim's pid and $PPID kanband's (POSIX); $0 is the
# shim's name, kanband-worker.
SHELL_TEXT = "KANBAN_SHELL_TEXT"
SHELL_SHIM = (_SHIM_START + f'__kb_b=${SHELL_TEXT}; unset {SHELL_TEXT}; '
              '( eval "set --; unset __kb_f __kb_b; $__kb_b" ); ' + _SHIM_END)
# The soft limit of open files kanband started with, before it raised its own
# (daemon._raise_nofile); workers get it back. None: not raised.
worker_nofile: int | None = None
# child_env's base once freeze_env has run (the daemon calls it at start-up).
_frozen_env: dict[str, str] | None = None


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment for a child, minus systemd's per-service
    variables (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*) and any KANBAN_* of ours:
    as frozen by freeze_env, else as os.environ holds it now. A new dict."""
    if _frozen_env is not None:
        env = dict(_frozen_env)
    else:
        env = {k: v for k, v in os.environ.items()
               if k != "NOTIFY_SOCKET" and not k.startswith(("WATCHDOG_", "LISTEN_", "KANBAN_"))}
    env.update(extra or {})
    return env


def freeze_env() -> None:
    """Make the environment as it is now the base of every child's. kanband does
    not change its own after start-up, and reading os.environ decodes every
    variable again: 20-40 us of each spawn, on the loop or a spawn thread."""
    global _frozen_env
    _frozen_env = None
    _frozen_env = child_env()
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def signal_name(sig: int | None) -> str:
    if sig is None:
        return "-"
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def describe_exit(exit_code: int | None, sig: int | None) -> str:
    if sig is not None:
        text = f"killed by {signal_name(sig)}"
        if sig == signal.SIGKILL:
            text += " (perhaps out of memory)"
        return text
    return f"exit status {exit_code}"


def tail_text(path: Path, offset: int, limit: int = 2048) -> str:
    """The last `limit` bytes written to `path` since `offset`."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(offset, size - limit)
            f.seek(start)
            return f.read(size - start).decode("utf-8", "replace")
    except OSError:
        return ""


def last_line(text: str) -> str | None:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return None


def children_of(pid: int | str = "self") -> list[int]:
    """Direct children of a process from /proc/<pid>/task/*/children: cost grows
    with the children, not with every process on the machine (as psutil's
    children() does, by reading every /proc/<pid>/stat)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out.extend(int(x) for x in _read_proc(f"/proc/{pid}/task/{tid}/children").split())
            except (FileNotFoundError, ProcessLookupError):
                continue
    except FileNotFoundError:
        return []
    except OSError:  # no CONFIG_PROC_CHILDREN: fall back to the full scan
        try:
            proc = psutil.Process() if pid == "self" else psutil.Process(int(pid))
            return [c.pid for c in proc.children()]
        except psutil.Error:
            return []
    return out


def descendants_of(pid: int) -> list[int]:
    seen: list[int] = []
    stack = children_of(pid)
    while stack:
        child = stack.pop()
        seen.append(child)
        stack.extend(children_of(child))
    return seen


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read_proc(path: str) -> bytes:
    """A small /proc file in three syscalls (open() would add fstat, ioctl, lseek)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        # A seq_file (a long children list) comes at most a page per read: read
        # on to the end unless the first read was well short of a page.
        while len(chunks[-1]) >= 1024:
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks)
    finally:
        os.close(fd)


# The boot time that process start times count from. /proc/stat's btime (what
# psutil uses) moves whenever the wall clock is stepped (NTP, an operator), so
# comparing a start time recorded before a step with one computed after would
# mistake a live worker for a reused pid. kanband fixes the basis once per boot
# and keeps it in the board (Supervisor.start -> keep_boot_time): start times
# stay comparable across clock steps and daemon restarts.
_BOOT_TIME: float | None = None


def boot_time() -> float:
    global _BOOT_TIME
    if _BOOT_TIME is None:
        _BOOT_TIME = psutil.boot_time()
    return _BOOT_TIME


def set_boot_time(value: float | None) -> None:
    """Count start times from `value`; None: from the boot time read afresh."""
    global _BOOT_TIME
    _BOOT_TIME = value


def boot_id() -> str | None:
    """This boot's random id (the kernel's); None if unreadable."""
    try:
        return _read_proc("/proc/sys/kernel/random/boot_id").decode().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat."""
    try:
        stat = _read_proc(f"/proc/{pid}/stat")
        fields = stat[stat.rindex(b")") + 2:].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_start_time(pid: int) -> float | None:
    """When the process started: boot time (see _BOOT_TIME) + its start in
    /proc/<pid>/stat, as psutil's create_time() computes it while the wall
    clock has not been stepped."""
    st = _proc_stat(pid)
    return None if st is None else _ticks_to_time(st[1])


def _ticks_to_time(ticks: int) -> float:
    return ticks / _CLOCK_TICKS + boot_time()


def boot_ticks() -> int:
    """CLOCK_BOOTTIME in clock ticks, rounded down as the kernel rounds a process's
    start time for /proc/<pid>/stat (nsec_to_clock_t)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) * _CLOCK_TICKS // 1_000_000_000


def same_process(pid: int, start_time: float | None) -> bool:
    """Alive (not a zombie) and the same process (not a reused pid): its start
    time, on kanband's boot-time basis, is the one recorded."""
    if not pid or start_time is None:
        return False
    st = _proc_stat(pid)
    return st is not None and st[0] not in (b"Z", b"X") and \
        abs(_ticks_to_time(st[1]) - start_time) < 0.05


@dataclass
class Worker:
    run_id: str
    task_id: str
    profile: Profile
    pid: int
    start_time: float | None
    started_mono: float
    log_path: Path
    log_offset: int
    run_dir: Path
    adopted: bool = False
    own_group: bool = True  # False when the pid may be reused: never signal its group
    failure_limit: int | None = None
    pidfd: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    signal: int | None = None
    stopping: str | None = None  # the outcome a kill in progress will record
    stop_task: asyncio.Future[None] | None = None  # Supervisor.stop's kill, once started
    stop_payload: dict[str, Any] = field(default_factory=dict)
    sigkilled: bool = False
    closed_by_board: bool = False  # complete/block closed the run; exit_grace runs
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    known: dict[int, float] = field(default_factory=dict)  # pid -> create_time
    known_at: float = field(default_factory=lambda: time.monotonic() - 8.0)  # first at ~2 s

    @property
    def pgid(self) -> int | None:
        return self.pid if self.own_group and self.pid > 1 else None

    def cancel_timers(self) -> None:
        for h in self.timers.values():
            h.cancel()
        self.timers.clear()

    def as_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "run_id": self.run_id, "pid": self.pid,
                "profile": self.profile.name, "adopted": self.adopted,
                "elapsed_seconds": round(time.monotonic() - self.started_mono, 3),
                "stopping": self.stopping}


class Reaper:
    """Tracks live workers by pid; the supervisor decides what their exit means."""

    def __init__(self, on_exit: Callable[[Worker], None]) -> None:
        self.by_pid: dict[int, Worker] = {}
        self.on_exit = on_exit
        self.loop: asyncio.AbstractEventLoop | None = None
        self.subreaper = False
        self.helpers: dict[int, asyncio.Future[int]] = {}  # pid -> exit code
        self._scan: _Scan | None = None  # the latest /proc scan (see scan())
        self._scanning: asyncio.Future[_Scan] | None = None
        self._turns = 0  # kill-path turns given in this loop step (see _turn)
        self._turn_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._step_pending = False  # _next_step is scheduled

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.subreaper = become_subreaper()
        loop.add_signal_handler(signal.SIGCHLD, self.reap_all)

    # -- spawning ----------------------------------------------------------------
    @staticmethod
    def open_log(argv: list[str], env: dict[str, str], log_path: Path,
                 header: str = "") -> tuple[int, int]:
        """Check the command exists, open the task log for appending and write the
        run's header line. Returns (fd, offset of the run's output). File work
        only: safe to call from a thread. Raises OSError with a reason."""
        exe = argv[0]
        if find_command(exe, env) is None:
            raise OSError(f"command not found or not executable: {exe}")
        try:
            fd = logfiles.open_append(log_path)
        except FileNotFoundError:  # the logs directory went away: make it again
            log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = logfiles.open_append(log_path)
        try:
            if header:
                os.write(fd, header.encode("utf-8", "replace"))
            return fd, os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise

    def spawn(self, argv: list[str], *, cwd: Path, env: dict[str, str], log_fd: int,
              run_dir: Path, shell: str | None = None
              ) -> tuple[subprocess.Popen[bytes], float | None]:
        """Start the worker (output to `log_fd`, which the caller closes) in its own
        session, under the exit-status shim: `argv`, or with `shell` that shell
        text run by the shim's own sh. Returns it with its start time (as
        proc_start_time gives it). On the loop thread only: a child must be
        tracked before reap_all can see it exit."""
        exit_file = str(run_dir / EXIT_FILE)
        nofile = "" if worker_nofile is None else str(worker_nofile)
        if shell is None:
            shim = ["/bin/sh", "-c", SHIM, "kanband-worker", exit_file, nofile, *argv]
        else:
            shim = ["/bin/sh", "-c", SHELL_SHIM, "kanband-worker", exit_file, nofile]
            env = {**env, SHELL_TEXT: shell}
        before = boot_ticks()
        popen = subprocess.Popen(shim,
                                 cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=log_fd,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 close_fds=True)
        # The kernel stamps the child's start (in clock ticks of CLOCK_BOOTTIME) at
        # fork, which lies between these two readings: when both fall in one tick,
        # that tick is the start time. Reading /proc/<pid>/stat instead would wait
        # (about 0.5 ms) until the child's exec is done.
        after = boot_ticks()
        return popen, (_ticks_to_time(before) if after == before
                       else proc_start_time(popen.pid))

    async def run_command(self, argv: list[str], *, stdin: bytes, log_path: Path,
                          timeout: float, env: dict[str, str] | None = None) -> int:
        """Run a helper command (e.g. a notifier) to completion; reaped like workers
        are, so it never races the daemon's waitpid. Returns its exit code
        (negative: killed by that signal); raises OSError if it cannot start."""
        import tempfile
        assert self.loop is not None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as inp:
            inp.write(stdin)
            inp.seek(0)
            out = logfiles.open_append(log_path)
            env = env if env is not None else child_env()
            try:
                p = subprocess.Popen(helper_argv(argv, env), stdin=inp, stdout=out,
                                     stderr=subprocess.STDOUT,
                                     start_new_session=True, close_fds=True, env=env)
            finally:
                os.close(out)
        fut: asyncio.Future[int] = self.loop.create_future()
        self.helpers[p.pid] = fut
        self.reap_all()
        try:
            code = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            code = await self._end_helper(p.pid, fut, grace=2.0)
        except asyncio.CancelledError:  # shutting down: the command must not outlive us
            await self._end_helper(p.pid, fut, grace=0.5)
            p.returncode = fut.result() if fut.done() else -signal.SIGKILL
            raise
        p.returncode = code  # reaped by us: Popen must never wait
        return code

    async def _end_helper(self, pid: int, fut: asyncio.Future[int], grace: float) -> int:
        """SIGTERM the helper's process group, then SIGKILL; returns its exit code."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            try:
                return await asyncio.wait_for(asyncio.shield(fut), grace)
            except asyncio.TimeoutError:
                continue
        try:
            return await asyncio.wait_for(asyncio.shield(fut), 5.0)
        except asyncio.TimeoutError:
            return -signal.SIGKILL

    def track(self, w: Worker) -> None:
        assert self.loop is not None
        self.by_pid[w.pid] = w
        try:
            w.pidfd = os.pidfd_open(w.pid)
        except OSError:
            w.pidfd = None  # already gone: SIGCHLD / the check below handles it
        if w.pidfd is not None:
            self.loop.add_reader(w.pidfd, self._pidfd_ready, w)
        if not w.adopted:
            self.reap_all()
        elif w.pidfd is None:
            self.loop.call_soon(self._adopted_gone, w)

    def _pidfd_ready(self, w: Worker) -> None:
        if w.adopted:
            self._adopted_gone(w)
        else:
            self.reap_all()

    def _untrack(self, w: Worker) -> None:
        self.by_pid.pop(w.pid, None)
        if w.pidfd is not None:
            assert self.loop is not None
            self.loop.remove_reader(w.pidfd)
            os.close(w.pidfd)
            w.pidfd = None

    def reap_all(self) -> None:
        """Reap every exited child: workers go to on_exit, orphans are just reaped."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.by_pid.get(pid)
            if w is None:
                fut = self.helpers.pop(pid, None)
                if fut is not None and not fut.done():
                    fut.set_result(os.waitstatus_to_exitcode(status))
                else:
                    log.debug("orphan_reaped", pid=pid, status=status)
                continue
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                w.exit_code, w.signal = None, -code
            else:
                w.exit_code, w.signal = code, None
            if w.popen is not None:
                w.popen.returncode = code  # we reaped it; Popen must never wait again
            self._untrack(w)
            w.exited.set()
            self.on_exit(w)

    def _adopted_gone(self, w: Worker) -> None:
        """An adopted worker is not our child: its status comes from the shim's file."""
        if w.pid not in self.by_pid:
            return
        self._untrack(w)
        status = read_exit_file(w.run_dir)
        if status is not None:
            w.exit_code, w.signal = status
        w.exited.set()
        self.on_exit(w)

    # -- attribution and killing ---------------------------------------------------
    def refresh_known(self, w: Worker) -> None:
        """Remember the worker's descendants while the tree is intact."""
        for pid in descendants_of(w.pid):
            if pid not in w.known:
                ct = proc_start_time(pid)
                if ct is not None:
                    w.known[pid] = ct

    async def scan(self, since: float | None = None) -> "_Scan":
        """Every live process of ours by KANBAN_RUN_ID, and the live process
        groups: one full /proc scan on a worker thread (not the event loop),
        shared by every kill in progress. Returns a scan that started at or
        after `since` (time.monotonic(); default: one under SCAN_TTL old)."""
        assert self.loop is not None
        fresh = since is not None  # must have started after `since` (after a signal)
        while True:
            if self._scanning is not None and self._scanning.done():
                # Finished, but its done-callback has not run yet (callbacks go
                # through the loop's queue). Awaiting a done future does not yield
                # to the loop, so without this a kill needing a newer scan would
                # spin here forever and the callback would never run.
                self._scanned(self._scanning)
            floor = since if since is not None else time.monotonic() - SCAN_TTL
            if self._scan is not None and self._scan.at >= floor:
                return self._scan
            if self._scanning is None:
                fut = self.loop.run_in_executor(None, _scan_processes, time.monotonic())
                self._scanning = fut
                fut.add_done_callback(self._scanned)
            got = await asyncio.shield(self._scanning)
            if not fresh or got.at >= floor:
                return got  # a scan in progress when asked is recent enough, unless `since`

    def _scanned(self, fut: "asyncio.Future[_Scan]") -> None:
        """A scan finished: keep it if it is the newest. Runs twice for some
        scans (see scan()); the second time changes nothing."""
        if self._scanning is fut:
            self._scanning = None
        if not fut.cancelled() and fut.exception() is None:
            if self._scan is None or fut.result().at >= self._scan.at:
                self._scan = fut.result()

    async def run_processes(self, w: Worker, since: float | None = None) -> list[psutil.Process]:
        """Every live process attributed to the run, the worker itself included:
        its tree, descendants seen earlier, and (from a shared scan, see scan())
        every process carrying its KANBAN_RUN_ID. Members of its process group
        without that variable are reached through the group."""
        await self._turn()  # the reads below cost 0.5-1 ms; kills come in bursts
        found: dict[int, psutil.Process] = {}

        def add(p: psutil.Process) -> None:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found[p.pid] = p
            except psutil.Error:
                pass

        if same_process(w.pid, w.start_time):
            for pid in (w.pid, *descendants_of(w.pid)):
                try:
                    add(psutil.Process(pid))
                except psutil.Error:
                    pass
        for pid, ctime in list(w.known.items()):
            if same_process(pid, ctime):
                add(psutil.Process(pid))
            else:
                w.known.pop(pid, None)
        for p in (await self.scan(since)).by_run.get(w.run_id, ()):
            if p.pid not in found:
                add(p)
        return list(found.values())

    async def group_alive(self, pgid: int | None) -> bool:
        """Any non-zombie member left in the process group? (A shared scan.)"""
        if not _group_exists(pgid):
            return False
        return pgid in (await self.scan()).live_groups

    def processes_by_run(self) -> dict[str, list[psutil.Process]]:
        """Every live process of ours carrying a KANBAN_RUN_ID (a full scan, here)."""
        return _scan_processes(time.monotonic()).by_run

    def has_leftovers(self, w: Worker) -> bool:
        """Cheap check after a worker exits: anything of its run still alive?
        Its process group (any member: kill_run then tells live ones from
        zombies, with a scan off the loop), descendants seen earlier, or orphans
        reparented to us (we are the subreaper) that carry its KANBAN_RUN_ID."""
        if _group_exists(w.pgid):
            return True
        if any(same_process(pid, ct) for pid, ct in w.known.items()):
            return True
        for pid in children_of():
            if pid in self.by_pid or pid in self.helpers:
                continue
            for cand in (pid, *descendants_of(pid)):
                try:
                    p = psutil.Process(cand)
                    if p.status() != psutil.STATUS_ZOMBIE and \
                            p.environ().get("KANBAN_RUN_ID") == w.run_id:
                        return True
                except psutil.Error:
                    continue
        return False

    async def kill_run(self, w: Worker, grace: float) -> bool:
        """SIGTERM, wait up to `grace`, SIGKILL; returns True if SIGKILL was needed.
        Returns only once every attributed process is gone (or unkillable)."""
        procs = await self.run_processes(w)
        if not procs and not await self.group_alive(w.pgid):
            return False
        await self._turn()
        sent = time.monotonic()
        self._send(w, procs, signal.SIGTERM)
        # the checks after a wait look at a scan made after the signal
        if await self._wait_gone(w, procs, grace) and not await self.run_processes(w, sent):
            return False
        log.warning("worker_sigkill", task_id=w.task_id, run_id=w.run_id, pid=w.pid,
                    grace_s=grace)
        procs = await self.run_processes(w, time.monotonic())
        await self._turn()
        sent = time.monotonic()
        self._send(w, procs, signal.SIGKILL)
        if not await self._wait_gone(w, procs, 10.0) or await self.run_processes(w, sent):
            log.error("worker_unkillable", task_id=w.task_id, run_id=w.run_id,
                      pids=[p.pid for p in await self.run_processes(w)])
        return True

    async def _turn(self) -> None:
        """Take one of this loop step's KILL_TURNS, or wait in line for one in a
        later step. Without contention it returns at once."""
        assert self.loop is not None
        if self._turns < KILL_TURNS and not self._turn_waiters:
            self._turns += 1
            self._schedule_step()
            return
        fut = self.loop.create_future()
        self._turn_waiters.append(fut)
        await fut  # _next_step gave us a turn

    def _schedule_step(self) -> None:
        if not self._step_pending:
            assert self.loop is not None
            self._step_pending = True
            self.loop.call_soon(self._next_step)

    def _next_step(self) -> None:
        """A new loop step: hand its turns to the first ones in line (they run in
        the step after; the turns are theirs, so newcomers queue behind them)."""
        self._step_pending = False
        self._turns = 0
        while self._turn_waiters and self._turns < KILL_TURNS:
            fut = self._turn_waiters.popleft()
            if not fut.done():  # a cancelled waiter (shutdown) needs no turn
                fut.set_result(None)
                self._turns += 1
        if self._turns:
            self._schedule_step()

    def _send(self, w: Worker, procs: list[psutil.Process], sig: int) -> None:
        if w.pgid is not None:
            try:
                os.killpg(w.pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    async def _wait_gone(self, w: Worker, procs: list[psutil.Process], timeout: float) -> bool:
        """Wait until the signalled processes and the process group are gone. The
        group check (a shared /proc scan) runs at most every SCAN_TTL."""
        deadline = time.monotonic() + timeout
        delay = 0.002
        next_scan = 0.0
        while True:
            await self._turn()
            self.reap_all()
            alive = [p for p in procs if _alive(p)]
            if not alive and not _group_exists(w.pgid):
                return True
            if not alive and time.monotonic() >= next_scan:
                next_scan = time.monotonic() + SCAN_TTL
                if not await self.group_alive(w.pgid):
                    return True  # only zombies left in the group
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.05)


SCAN_TTL = 0.25  # seconds a full /proc scan is shared by the kills in progress
# Kill-path steps (a signal sent, a check of whether the processes are gone) per
# loop step. Kills started together resume together -- after the shared scan, or
# from waits of the same length -- and each step costs 0.3-1.5 ms of /proc reads:
# 200 at once held the loop for 250 ms. A few at a time, the loop answers
# requests in between, and the kills take as long as before in total.
KILL_TURNS = 16


@dataclass
class _Scan:
    at: float  # time.monotonic() when the scan started
    by_run: dict[str, list[psutil.Process]]  # KANBAN_RUN_ID -> live processes
    live_groups: set[int]  # process groups with a non-zombie member


def _scan_processes(at: float) -> _Scan:
    """Every process on the machine once: its KANBAN_RUN_ID and its group. File
    reads only, no board state: run on a worker thread (Reaper.scan)."""
    by_run: dict[str, list[psutil.Process]] = {}
    groups: set[int] = set()
    me = os.getpid()
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            groups.add(os.getpgid(p.pid))
            run_id = p.environ().get("KANBAN_RUN_ID")
        except (psutil.Error, OSError):
            continue
        if run_id:
            by_run.setdefault(run_id, []).append(p)
    return _Scan(at, by_run, groups)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_exists(pgid: int | None) -> bool:
    """Does the process group still have members (zombies included)? No scan."""
    if pgid is None:
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def read_exit_file(run_dir: Path) -> tuple[int | None, int | None] | None:
    """(exit_code, signal) the shim recorded, or None."""
    try:
        rc = int((run_dir / EXIT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if 128 < rc < 160:
        return None, rc - 128
    return rc, None
