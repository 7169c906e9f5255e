"""Process plumbing for the benchmarks: temp homes, daemons, cleanup, statistics.

Everything the suite starts is registered here and killed by `cleanup_all()`,
which `bench.run` calls from a `finally` (and from SIGTERM/SIGINT handlers).
The bench process makes itself a child subreaper, so workers orphaned by a
daemon we killed come back to us and can be found and reaped, whatever
session or process group they moved to.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import psutil

from kanband.protocol import Client, TimedOut, Unreachable

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent

_roots: list[Path] = []
PROFILE_DIR: Path | None = None  # --profile: attach `py-spy record` to every daemon
CURRENT = "bench"  # the metric running now (names profile files)
TMP_BASE = "/tmp"  # --tmp: where temp homes go (socket paths must stay short)
_profiled = 0
_procs: list[subprocess.Popen[bytes]] = []
_daemons: list["Daemon"] = []


# -- statistics ----------------------------------------------------------------------
def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def pct(xs: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); honest for small samples (p99 of
    50 samples is the maximum)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, int(-(-p * len(xs) // 100)) - 1))
    return xs[k]


def summary(xs: list[float], scale: float = 1.0, nd: int = 3) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": round(median(xs) * scale, nd), "p99": round(pct(xs, 99) * scale, nd),
            "min": round(min(xs) * scale, nd), "max": round(max(xs) * scale, nd)}


# -- process hygiene -----------------------------------------------------------------
def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def new_root(prefix: str = "kbench") -> Path:
    """A short temp directory under /tmp (Unix socket paths must fit 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=TMP_BASE))
    _roots.append(d)
    return d


def track(p: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    _procs.append(p)
    return p


def _killpg(pgid: int, sig: int) -> None:
    if pgid <= 1 or pgid == os.getpgrp():
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _ours(p: psutil.Process, roots: list[str]) -> bool:
    """A process started for a benchmark: it lives under one of our temp roots."""
    try:
        env = p.environ()
    except (psutil.Error, OSError):
        return False
    for key in ("KANBAN_SOCKET", "KANBAN_HOME", "KANBAN_WORKSPACE", "BENCH_ROOT"):
        v = env.get(key)
        if v and any(v == r or v.startswith(r + "/") for r in roots):
            return True
    return False


def kill_strays(roots: list[Path] | None = None, descendants: bool = False) -> int:
    """SIGKILL every process (and its process group) that belongs to a benchmark
    root (with `descendants`, every descendant of this process too); then reap
    what came back to us. Returns how many processes were signalled."""
    rs = [str(r) for r in (roots if roots is not None else _roots)]
    me = os.getpid()
    victims: dict[int, psutil.Process] = {}
    if descendants:
        try:
            for c in psutil.Process(me).children(recursive=True):
                victims[c.pid] = c
        except psutil.Error:
            pass
    if rs:
        for p in psutil.process_iter(["pid"]):
            if p.pid != me and p.pid not in victims and _ours(p, rs):
                victims[p.pid] = p
    for p in victims.values():
        try:
            _killpg(os.getpgid(p.pid), signal.SIGKILL)
        except OSError:
            pass
        try:
            p.kill()
        except psutil.Error:
            pass
    reap()
    return len(victims)


def reap() -> None:
    """Reap exited children (orphans reparented to us as subreaper included)."""
    for p in list(_procs):
        if p.poll() is not None:
            _procs.remove(p)
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def cleanup_all() -> None:
    for d in list(_daemons):
        d.stop(graceful=False)
    for p in list(_procs):
        if p.poll() is None:
            _killpg(p.pid, signal.SIGKILL)
            try:
                p.kill()
            except OSError:
                pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
    for _ in range(3):
        if not kill_strays(descendants=True):
            break
        time.sleep(0.2)
    for p in list(_procs):
        p.poll()
    for r in _roots:
        shutil.rmtree(r, ignore_errors=True)
    _roots.clear()


# -- config ----------------------------------------------------------------------------
def _val(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_val(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


# [daemon] settings every bench daemon gets (`--busy-poll`), under its own.
DAEMON_DEFAULTS: dict[str, Any] = {}


def toml(daemon: dict[str, Any] | None = None, **profiles: dict[str, Any]) -> str:
    """A kanband.toml: `toml({"max_workers": 2}, fake={"command": [...]})`. The
    test suite builds its configs with this too."""
    out = ["[daemon]"]
    for k, v in {**DAEMON_DEFAULTS, **(daemon or {})}.items():
        out.append(f"{k} = {_val(v)}")
    for name, prof in profiles.items():
        out.append(f"\n[profiles.{name}]")
        for k, v in prof.items():
            out.append(f"{k} = {_val(v)}")
    return "\n".join(out) + "\n"


# -- a kanband on a temp home ------------------------------------------------------------
class Daemon:
    def __init__(self, config: str = "", name: str = "h") -> None:
        self.root = new_root()
        self.home = self.root / name
        self.home.mkdir()
        self.socket = self.home / "kanband.sock"
        self.log_path = self.home / "daemon.log"
        (self.home / "kanband.toml").write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self._logf: Any = None
        self.spy: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KANBAN_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
        env["KANBAN_HOME"] = str(self.home)
        env["BENCH_ROOT"] = str(self.root)
        env["PYTHONUNBUFFERED"] = "1"
        # Run from up-to-date bytecode, as an installed kanbanctl does: with
        # PYTHONDONTWRITEBYTECODE set and a source newer than its .pyc, every
        # call would compile kanbanctl/cli.py again (~10 ms).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> "Daemon":
        self._logf = open(self.log_path, "ab")
        self.proc = track(subprocess.Popen(
            [PY, "-m", "kanband", "--home", str(self.home), "--log-format", "json"],
            env=self.env, stdout=self._logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=str(self.root)))
        _daemons.append(self)
        if PROFILE_DIR is not None:
            self._attach_profiler()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kanband exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                self.call("system.ping")
                return self
            except (Unreachable, TimedOut):
                if time.monotonic() > deadline:
                    raise RuntimeError("kanband did not answer system.ping in time") from None
                time.sleep(0.05)

    def _attach_profiler(self) -> None:
        global _profiled
        spy = Path(PY).parent / "py-spy"
        if not spy.exists():
            raise RuntimeError(f"--profile needs py-spy: {Path(PY).parent}/pip install py-spy")
        assert PROFILE_DIR is not None and self.proc is not None
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        _profiled += 1
        out = PROFILE_DIR / f"{CURRENT}-{_profiled}.txt"
        self.spy = track(subprocess.Popen(
            [str(spy), "record", "--pid", str(self.proc.pid), "--rate", "250", "--format", "raw",
             "--nonblocking", "--output", str(out)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True))

    def _detach_profiler(self) -> None:
        if self.spy is not None and self.spy.poll() is None:
            self.spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.spy.wait(30)
            except subprocess.TimeoutExpired:
                self.spy.kill()
        self.spy = None

    def client(self, timeout: float = 120.0) -> Client:
        return Client(str(self.socket), timeout=timeout).connect()

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
        with Client(str(self.socket), timeout=timeout) as c:
            return c.call(method, params or {})

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "kanbanctl", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self, graceful: bool = True, timeout: float = 30.0) -> None:
        """SIGTERM (the daemon kills its workers), then SIGKILL whatever is left
        of the daemon, its group and anything under our temp root."""
        self._detach_profiler()
        if self.proc is not None and self.proc.poll() is None:
            if graceful:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            _killpg(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.kill()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        kill_strays([self.root])
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        self._report_stalls()
        if self in _daemons:
            _daemons.remove(self)

    def _report_stalls(self) -> None:
        """A stalled event loop skews every figure taken meanwhile: print each
        `loop_stalled` line the daemon logged (see kanband/stallwatch.py)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for i, line in enumerate(lines):  # one pass; only stall lines are parsed
            if line.startswith("Timeout ("):  # faulthandler's dump: the GIL was held
                print(f"\n  WARNING: {CURRENT}: kanband's loop stuck (faulthandler):\n    "
                      + "\n    ".join(lines[i:i + 40]), file=sys.stderr, flush=True)
            elif '"loop_stalled"' in line:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                where = " | ".join(str(e.get("stack", "")).strip().splitlines()[-4:])
                print(f"\n  WARNING: {CURRENT}: kanband's loop stalled {e.get('seconds')} s "
                      f"at: {where}", file=sys.stderr, flush=True)

    def counts(self, c: Client | None = None) -> dict[str, Any]:
        """Status counts and live workers, the cheap way (daemon.status: no
        full-table scans, unlike board.stats), so polling does not skew a metric."""
        st = c.call("daemon.status") if c is not None else self.call("daemon.status")
        return {"by_status": st["counts"], "running_workers": st["running_workers"]}

    def wait_running(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            got = self.counts()["running_workers"]
            if got >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.25)


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            return v
        time.sleep(interval)


def unix_socket_path_ok(path: Path) -> bool:
    return len(os.fsencode(str(path))) <= 107


def fs_probe(base: str, n: int = 100) -> float:
    """Microseconds to create one directory holding one small file under `base`:
    the spawn path does several of these, the baselines none. The files stay
    until cleanup_all: on ext4 without a journal, creating inodes is many times
    slower for a minute or so after many deletions (the allocator skips
    recently deleted inodes one by one), so nothing is deleted mid-run."""
    d = Path(tempfile.mkdtemp(prefix="kbfs", dir=base))
    _roots.append(d)
    t = time.perf_counter()
    for i in range(n):
        (d / str(i)).mkdir()
        (d / str(i) / "f").write_text("x")
    return (time.perf_counter() - t) / n * 1e6


def code_version() -> dict[str, Any]:
    """Which kanband was measured: HEAD and whether kanband/ or kanbanctl/ differ from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "kanband", "kanbanctl"))}


def machine_info(probe: bool = True) -> dict[str, Any]:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import platform
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "sqlite": __import__("sqlite3").sqlite_version,
            "mem_total_mib": psutil.virtual_memory().total // (1024 * 1024),
            "hostname": socket.gethostname(), "tmp_base": TMP_BASE,
            "fs_create_us": fs_probes() if probe else {}}


def fs_probes() -> dict[str, float]:
    return {b: round(fs_probe(b), 1) for b in dict.fromkeys([TMP_BASE, "/dev/shm"])
            if os.path.isdir(b) and os.access(b, os.W_OK)}
