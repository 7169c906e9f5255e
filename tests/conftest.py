"""Test harness: a real kanband on a temp home, real kanbanctl processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from kanband.protocol import Client, Unreachable, TimedOut

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "worker.py"

# A run started in the background by a non-interactive shell (`.ci/run &`,
# nohup) inherits SIGINT ignored, and so would every kanbanctl it starts: Python
# leaves an ignored SIGINT ignored. The Ctrl-C tests of watch/tail need it
# delivered; a handler (unlike SIG_IGN) is reset to the default across exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> Any:
    """Poll `pred` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
        except Exception as e:  # keep polling; report the last error
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


# Every daemon not yet cleaned up (module-scoped ones too), with where its log
# stood when the current test began: the report below covers that test's lines.
_LIVE: dict["Kanband", int] = {}


@pytest.fixture(autouse=True)
def _mark_daemon_logs() -> Any:
    for k in _LIVE:
        _LIVE[k] = k.log_size()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    """A failed test shows each of its daemons' stalls (see kanband/stallwatch.py)
    and the end of its log: the home, log included, is gone after the test."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call":
        return
    for k, start in list(_LIVE.items()):
        lines = k.log_text(start).splitlines()
        stalls = [ln for ln in lines if '"loop_stalled"' in ln or '"loop_resumed"' in ln
                  or ln.startswith("Timeout (")]
        if item.get_closest_marker("stalls_expected") is None:
            _STALLS.extend((item.nodeid, ln) for ln in stalls if '"loop_resumed"' not in ln)
        if rep.failed:
            dumps = [i for i, ln in enumerate(lines) if ln.startswith("Timeout (")]
            dump = lines[dumps[0]:dumps[0] + 80] if dumps else []  # faulthandler's
            rep.sections.append((f"kanband {k.home}: stalls ({len(stalls)}) and last 40 log "
                                 "lines", "\n".join(stalls[-10:] + dump + ["..."]
                                                    + lines[-40:])))


_STALLS: list[tuple[str, str]] = []  # (test, loop_stalled line) over the whole run


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "stalls_expected: the test stalls kanband's loop on "
                            "purpose; leave its stalls out of the end-of-run list")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Loop stalls are bugs even in a passing test: list them at the end."""
    if not _STALLS:
        return
    terminalreporter.section(f"kanband loop stalls: {len(_STALLS)}")
    for nodeid, line in _STALLS:
        try:
            e = json.loads(line)
            where = e.get("stack", "").strip().splitlines()[-2:]
            terminalreporter.line(f"{nodeid}: {e.get('seconds')} s at {' | '.join(where)}")
        except ValueError:
            terminalreporter.line(f"{nodeid}: {line[:300]}")


class Kanband:
    """One kanband process on its own home directory."""

    def __init__(self, home: Path, config: str | None = None) -> None:
        _LIVE[self] = 0
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.socket = home / "kanband.sock"
        self.pidfile = home / "kanband.pid"
        self.log = home / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if config is not None:
            self.write_config(config)

    def write_config(self, text: str) -> None:
        (self.home / "kanband.toml").write_text(text)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KANBAN_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
        env["KANBAN_HOME"] = str(self.home)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, *args: str, wait: bool = True) -> "Kanband":
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kanband", "--log-format", "json",
                                      *args], env=self.env, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"kanband exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                self.call("system.ping")
                return True
            except (Unreachable, TimedOut):
                return False
        wait_for(up, timeout, "kanband to answer system.ping")

    def log_text(self, start: int = 0) -> str:
        """The daemon's log, from byte `start` on."""
        try:
            with open(self.log, "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def client(self, timeout: float = 15.0, token: str | None = None) -> Client:
        return Client(str(self.socket), timeout=timeout, token=token).connect()

    def call(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
        with Client(str(self.socket), timeout=15.0, token=kw.pop("token", None)) as c:
            return c.call(method, {**(params or {}), **kw})

    def ctl(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        e = self.env
        if env:
            e.update(env)
        return subprocess.run([sys.executable, "-m", "kanbanctl", *args], env=e,
                              capture_output=True, text=True, timeout=timeout, input=input)

    def ctl_json(self, *args: str, env: dict[str, str] | None = None) -> Any:
        r = self.ctl(*args, "--json", env=env)
        assert r.returncode == 0, f"kanbanctl {' '.join(args)} failed ({r.returncode}): {r.stderr}"
        return json.loads(r.stdout)

    def create(self, title: str = "t", **params: Any) -> dict[str, Any]:
        return self.call("task.create", title=title, **params)["task"]

    def task(self, task_id: str) -> dict[str, Any]:
        return self.call("task.show", id=task_id)["task"]

    def wait_status(self, task_id: str, status: str | set[str], timeout: float = 20.0) -> dict[str, Any]:
        want = {status} if isinstance(status, str) else status
        return wait_for(lambda: (t := self.task(task_id))["status"] in want and t,
                        timeout, f"{task_id} to reach {want}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._logf.close()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._logf.close()

    def cleanup(self) -> None:
        _LIVE.pop(self, None)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def home() -> Any:
    # Short paths: a Unix socket path must fit in 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="kb", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def kanband_factory(home: Path) -> Any:
    made: list[Kanband] = []

    def make(config: str | None = None, sub: str = "h", start: bool = True,
             args: tuple[str, ...] = ()) -> Kanband:
        k = Kanband(home / sub, config)
        made.append(k)
        if start:
            k.start(*args)
        return k

    yield make
    for k in made:
        k.cleanup()


@pytest.fixture
def kd(kanband_factory: Any) -> Kanband:
    """A running kanband with the default config."""
    return kanband_factory()


# -- helpers added for the board-core suite ------------------------------------------
import socket as _socket  # noqa: E402
import threading  # noqa: E402

import msgpack  # noqa: E402

from kanband.errors import KanbanError  # noqa: E402


def rpc_error(k: Kanband, method: str, **params: Any) -> KanbanError:
    """Call `method`, which must be refused; return the error it raised."""
    with pytest.raises(KanbanError) as ei:
        k.call(method, **params)
    return ei.value


def events_of(k: Kanband, task_id: str) -> list[dict[str, Any]]:
    return k.call("task.show", id=task_id)["events"]


def kinds_of(k: Kanband, task_id: str) -> list[str]:
    return [e["kind"] for e in events_of(k, task_id)]


def integrity(db: Path) -> str:
    """PRAGMA integrity_check of a database file, read-only."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return "; ".join(r[0] for r in c.execute("PRAGMA integrity_check"))
    finally:
        c.close()


def snapshot(k: Kanband, runs: bool = False) -> dict[str, Any]:
    """Every task (archived included), with `runs` every task's runs too, and the event
    head: equal snapshots = nothing changed."""
    tasks = k.call("task.list", archived=True)["tasks"]
    for t in tasks:
        t.pop("waiting_reason", None)  # derived from the clock, not stored
    snap: dict[str, Any] = {"tasks": sorted(tasks, key=lambda t: t["id"])}
    if runs:
        snap["runs"] = {t["id"]: k.call("task.runs", id=t["id"])["runs"] for t in tasks}
    snap["event_head"] = k.call("board.stats")["event_head"]
    return snap


def run_concurrently(n: int, fn: Callable[[int], Any], timeout: float = 30.0) -> list[Any]:
    """Run fn(0) .. fn(n-1) on n threads released together by a barrier; return each
    call's result, or the KanbanError it raised, in order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except KanbanError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def ctl_concurrently(k: Kanband, argvs: list[list[str]],
                     timeout: float = 60.0) -> list[tuple[int, str, str]]:
    """Start one `kanbanctl ARGV` process per argv at once; return (exit code, stdout,
    stderr) of each, in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "kanbanctl", *argv], env=k.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    return [(p.wait(timeout), *p.communicate()) for p in procs]


class RawConn:
    """A raw msgpack-rpc connection to a daemon socket, for protocol-level tests."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.closed = False

    def send(self, obj: Any) -> None:
        self.sock.sendall(msgpack.packb(obj, use_bin_type=True))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_in_background(self, data: bytes) -> threading.Thread:
        """Send `data` from a started daemon thread (the daemon may close mid-stream)."""
        def push() -> None:
            try:
                self.send_bytes(data)
            except OSError:
                pass  # the daemon may close mid-stream
        t = threading.Thread(target=push, daemon=True)
        t.start()
        return t

    def request(self, msgid: int, method: str, params: Any = None) -> None:
        self.send([0, msgid, method, [params if params is not None else {}]])

    def read(self) -> Any:
        """The next message; fails the test if the daemon closed the connection first."""
        msg = self.read_or_eof()
        if msg is None:
            pytest.fail("the daemon closed the connection instead of answering")
        return msg

    def read_or_eof(self) -> Any:
        while True:
            for msg in self.unpacker:
                return msg
            if self.closed:
                return None
            try:
                data = self.sock.recv(256 * 1024)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
            else:
                self.unpacker.feed(data)

    def read_until_eof(self) -> list[Any]:
        """Every message until the daemon closes the connection (times out if it never does)."""
        out = []
        while (msg := self.read_or_eof()) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawConn":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def module_kanband(config: str | None = None, prefix: str = "kb") -> Any:
    """Start one kanband on a fresh temp home, yield it, clean up: the body of
    module-scoped daemon fixtures."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    k = Kanband(d / "h", config)
    try:
        k.start()
        yield k
    finally:
        k.cleanup()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_kd() -> Any:
    """One kanband shared by a module's tests: for tests that do not need an empty board."""
    yield from module_kanband()
