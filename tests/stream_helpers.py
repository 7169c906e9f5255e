"""Helpers for the live-stream, notification and gc suites (test_streams, test_notify,
test_gc).

Import the autouse fixture `reap_leftovers` by name into a test module
(`from stream_helpers import reap_leftovers  # noqa: F401`) to have every process
the test started (workers, notifier commands, kanbanctl children) killed at teardown.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import WORKER, Kanband, wait_for
from bench.harness import _val
from supervision_helpers import kill_processes_of
from kanband.protocol import Client

PY = sys.executable


# -- config --------------------------------------------------------------------------
def config(daemon: dict[str, Any] | None = None,
           profiles: dict[str, dict[str, Any]] | None = None,
           notifiers: dict[str, list[str]] | None = None) -> str:
    """A kanband.toml with [daemon], [profiles.NAME] and [notifiers.PLATFORM] tables."""
    out = ["[daemon]"] + [f"{k} = {_val(v)}" for k, v in (daemon or {}).items()]
    for name, prof in (profiles or {}).items():
        out.append(f"\n[profiles.{name}]")
        out += [f"{k} = {_val(v)}" for k, v in prof.items()]
    for platform, command in (notifiers or {}).items():
        out.append(f"\n[notifiers.{platform}]")
        out.append(f"command = {_val(command)}")
    return "\n".join(out) + "\n"


def worker_cmd(*args: Any) -> list[str]:
    """The command list of a profile that runs tests/worker.py with these options."""
    return [PY, str(WORKER), *map(str, args)]


# -- a notifier command --------------------------------------------------------------
NOTIFIER_SOURCE = r'''
"""Test notifier: reads one JSON document from stdin.

usage: notifier.py OUT [--fail-first N] [--gate PATH] [--hold PATH]

Every attempt appends the document to OUT.attempts. The attempt fails (exit 1) if
it is one of the first N, or while the --gate PATH does not exist; otherwise the
document is appended to OUT as one JSON line and the command exits 0 -- with
--hold, only once the hold PATH exists (at most 30 s later).
"""
import json, os, sys, time

args = sys.argv[1:]
out, fail_first, gate, hold = args[0], 0, None, None
i = 1
while i < len(args):
    if args[i] == "--fail-first":
        fail_first = int(args[i + 1])
    elif args[i] == "--gate":
        gate = args[i + 1]
    elif args[i] == "--hold":
        hold = args[i + 1]
    i += 2
doc = json.loads(sys.stdin.read())
line = json.dumps(doc) + "\n"
with open(out + ".attempts", "a") as f:
    f.write(line)
with open(out + ".attempts") as f:
    attempts = sum(1 for _ in f)
if attempts <= fail_first or (gate is not None and not os.path.exists(gate)):
    print(f"notifier: failing attempt {attempts} on purpose", flush=True)
    sys.exit(1)
with open(out, "a") as f:
    f.write(line)
deadline = time.monotonic() + 30
while hold is not None and not os.path.exists(hold) and time.monotonic() < deadline:
    time.sleep(0.02)
'''


def notifier_cmd(home: Path, out: Path, *opts: str) -> list[str]:
    """Write the test notifier script under `home` and return the command that runs it."""
    script = home / "notifier.py"
    if not script.exists():
        script.write_text(NOTIFIER_SOURCE)
    return [PY, str(script), str(out), *opts]


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of a file (none if it does not exist yet)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def attempts(out: Path) -> list[dict[str, Any]]:
    return json_lines(Path(str(out) + ".attempts"))


# -- board ---------------------------------------------------------------------------
def head(k: Kanband) -> int:
    return k.call("board.stats")["event_head"]


def comment_many(k: Kanband, task_id: str, n: int, batch: int = 500,
                 author: str = "bulk", client: Client | None = None) -> None:
    """Add n comments, pipelined in batches of `batch` requests."""
    c = client or k.client(timeout=30.0)
    try:
        left = n
        while left > 0:
            m = min(batch, left)
            results = c.call_many([("task.comment", {"id": task_id, "body": f"c{i}",
                                                     "author": author}) for i in range(m)])
            bad = [r for r in results if isinstance(r, Exception)]
            assert not bad, f"comments refused: {bad[:3]}"
            left -= m
    finally:
        if client is None:
            c.close()


# -- subscriptions -------------------------------------------------------------------
class Sub:
    """One events.subscribe on its own blocking connection."""

    def __init__(self, k: Kanband, timeout: float = 15.0, **params: Any) -> None:
        self.client = k.client(timeout=timeout)
        self.response = self.client.call("events.subscribe", params)
        self.id = self.response["subscription"]
        self.notes: list[tuple[str, Any]] = []  # every notification read, in order

    @property
    def events(self) -> list[dict[str, Any]]:
        return [p for m, p in self.notes if m == "event"]

    @property
    def ids(self) -> list[int]:
        return [e["id"] for e in self.events]

    def next(self) -> tuple[str, Any]:
        note = self.client.next_notification()
        self.notes.append(note)
        return note

    def read_until(self, pred: Callable[[str, Any], bool], what: str) -> list[tuple[str, Any]]:
        """Read notifications until one satisfies pred; return those read by this call.
        Fails (via the client's socket timeout) if the stream goes quiet first."""
        start = len(self.notes)
        while True:
            try:
                m, p = self.next()
            except Exception as e:
                pytest.fail(f"subscription {self.id}: stream ended or went quiet waiting for "
                            f"{what}: {e!r}; last notifications: {self.notes[-3:]!r}")
            if pred(m, p):
                return self.notes[start:]

    def read_to_event(self, event_id: int) -> list[dict[str, Any]]:
        """Read until the event with this id (or a later one) arrives; return new events."""
        got = self.read_until(lambda m, p: m == "event" and p["id"] >= event_id,
                              f"event #{event_id}")
        return [p for m, p in got if m == "event"]

    def read_event(self, pred: Callable[[dict[str, Any]], bool], what: str) -> list[dict[str, Any]]:
        got = self.read_until(lambda m, p: m == "event" and pred(p), what)
        return [p for m, p in got if m == "event"]

    def close(self) -> None:
        self.client.close()


def consecutive(ids: list[int], first: int, last: int) -> None:
    """Assert ids are exactly first, first+1, ..., last (no gap, no duplicate, in order)."""
    want = list(range(first, last + 1))
    if ids == want:
        return
    seen: set[int] = set()
    dups = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    missing = sorted(set(want) - set(ids))
    disorder = next((f"#{a} before #{b}" for a, b in zip(ids, ids[1:]) if b <= a), None)
    pytest.fail(f"expected ids {first}..{last} once each in order; got {len(ids)} ids "
                f"({ids[:3]}..{ids[-3:]}); duplicates {dups[:10]}, missing {missing[:10]}, "
                f"first disorder: {disorder}, extra {sorted(set(ids) - set(want))[:10]}")


# -- kanbanctl as a long-running process --------------------------------------------
class CtlProc:
    """`kanbanctl ARGS` running in the background; stdout/stderr collected by threads."""

    def __init__(self, k: Kanband, *args: str, env: dict[str, str] | None = None) -> None:
        e = k.env
        if env:
            e.update(env)
        self.args = args
        self.proc = subprocess.Popen([PY, "-m", "kanbanctl", *args], env=e,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[str] = []
        self.err: list[str] = []
        self._new = threading.Condition()
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.err),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._new:
                into.append(line.rstrip("\n"))
                self._new.notify_all()

    def wait_line(self, pred: Callable[[str], bool], timeout: float = 15.0,
                  what: str = "a line") -> str:
        """Wait until some stdout line satisfies pred; return it."""
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for ln in self.lines:
                    if pred(ln):
                        return ln
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._alive()):
                    pytest.fail(f"kanbanctl {' '.join(self.args)}: no {what} within {timeout}s "
                                f"(exit {self.proc.poll()}); stdout {self.lines[-5:]!r}, "
                                f"stderr {self.err[-5:]!r}")
                self._new.wait(min(left, 0.2))

    def _alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def json_lines(self) -> list[dict[str, Any]]:
        with self._new:
            return [json.loads(ln) for ln in self.lines]

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"kanbanctl {' '.join(self.args)} did not exit within {timeout}s; "
                        f"stderr {self.err[-5:]!r}")
        for t in self._threads:
            t.join(5)
        return rc

    def interrupt(self, timeout: float = 15.0) -> int:
        """Send SIGINT (Ctrl-C) and return the exit status."""
        self.proc.send_signal(signal.SIGINT)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "CtlProc":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()


# -- teardown ------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def reap_leftovers(home: Path) -> Any:
    """Teardown: SIGKILL, by pid, every process of this test still alive after its
    daemons were stopped (they carry the test's home in argv or environment)."""
    yield
    kill_processes_of(home)


def bg(fn: Callable[[], Any]) -> tuple[threading.Thread, queue.Queue[Any]]:
    """Run fn on a daemon thread; its result (or exception) lands in the queue."""
    q: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            q.put(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            q.put(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, q


__all__ = ["PY", "WORKER", "Sub", "CtlProc", "config", "worker_cmd", "notifier_cmd",
           "json_lines", "attempts", "head", "comment_many", "consecutive", "bg",
           "wait_for", "reap_leftovers"]
