"""The log walks of gc and stats run off the event loop (issue 6: a home with
100k task logs took about 4 s of gc and 0.4 s of stats, every 30 s, on the
loop), and a log a start opens while gc runs is never unlinked under it.

The loop checks use a real board, real files and real threads; where a slow
disk is needed, the walk or the unlink is held on a threading.Event, since a
disk cannot be made slow on demand here."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from kanband import config as config_mod
from kanband import gc, logfiles
from kanband.board import Board
from kanband.paths import resolve_daemon_paths
from kanband.store import Store
from stream_helpers import wait_for

DAY = 86400.0


def aged(path: Path, days: float = 40) -> Path:
    old = time.time() - days * DAY
    os.utime(path, (old, old), follow_symlinks=False)
    return path


def old_log(logs: Path, name: str, text: str = "output\n") -> Path:
    p = logs / name
    p.write_text(text)
    return aged(p)


def hold_first_unlink(monkeypatch: Any) -> tuple[threading.Event, threading.Event]:
    """A slow disk: gc's first unlink sets `held`, then waits for `release`."""
    held, release = threading.Event(), threading.Event()
    real = logfiles.unlink_old

    def slow_unlink(path: Any, cutoff: float) -> bool:
        if not held.is_set():
            held.set()
            assert release.wait(20), "the test never released the unlink"
        return real(path, cutoff)
    monkeypatch.setattr(logfiles, "unlink_old", slow_unlink)
    return held, release


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    paths = resolve_daemon_paths(str(tmp_path / "home"), env={})
    paths.home.mkdir(parents=True)
    paths.logs.mkdir(parents=True)
    store = Store(str(tmp_path / "board.db"))
    try:
        yield Board(store, config_mod.load(None), paths)
    finally:
        store.close()


def test_unlink_old_keeps_fresh_files_symlinks_and_logs_opened_during_the_pass(tmp_path):
    """unlink_old removes an old regular file only; once a pass began, a log opened
    through open_append is kept even though its mtime is old (coarse clocks)."""
    gone = old_log(tmp_path, "t_1.log")
    fresh = tmp_path / "t_2.log"
    fresh.write_text("new\n")
    link = tmp_path / "t_3.log"
    link.symlink_to(gone)
    aged(link)
    reopened = old_log(tmp_path, "t_4.log")
    cutoff = time.time() - 30 * DAY
    logfiles.begin_pass()
    try:
        os.close(logfiles.open_append(reopened))
        aged(reopened)  # as if the clock had not moved since
        assert logfiles.unlink_old(gone, cutoff) is True
        assert logfiles.unlink_old(fresh, cutoff) is False
        assert logfiles.unlink_old(link, cutoff) is False
        assert logfiles.unlink_old(reopened, cutoff) is False
        assert logfiles.unlink_old(tmp_path / "t_none.log", cutoff) is False
    finally:
        logfiles.end_pass()
    assert not gone.exists() and fresh.exists() and link.is_symlink() and reopened.exists()
    # with no pass running, nothing is noted: the same old log goes
    os.close(logfiles.open_append(reopened))
    aged(reopened)
    assert logfiles.unlink_old(reopened, cutoff) is True


def test_gc_unlinks_logs_off_the_loop_and_keeps_one_a_start_opens_meanwhile(board, monkeypatch):
    """While gc's unlinking is held (a slow disk), the loop keeps running; a log
    opened for a start in the meantime is kept, the other old logs go."""
    logs = board.paths.logs
    names = [f"t_{i:04x}.log" for i in range(20)]
    for n in names:
        old_log(logs, n)
    held, release = hold_first_unlink(monkeypatch)

    async def scenario() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        collecting = asyncio.ensure_future(gc.collect(board.store, board.paths, 30, 30))
        await _until(held.is_set)  # the loop runs while gc works
        for _ in range(5):  # ... and while the unlink is held
            await asyncio.sleep(0)
        assert not collecting.done()
        # a start opens the last log now (on a spawn thread, as the supervisor does)
        fd = await loop.run_in_executor(None, logfiles.open_append, logs / names[-1])
        os.close(fd)
        aged(logs / names[-1])
        release.set()
        return await collecting
    report = asyncio.run(scenario())
    assert report["logs"] == len(names) - 1 and report["errors"] == []
    assert sorted(p.name for p in logs.iterdir()) == [names[-1]]


def test_gc_refuses_a_symlinked_log_and_keeps_logs_of_running_tasks(board):
    """In-process: the off-loop look through still refuses symlinks and asks the board
    which tasks run."""
    logs = board.paths.logs
    running = board.store.create_task({"title": "r", "body": "", "assignee": "x",
                                       "workspace_kind": "scratch", "skills": []}, [],
                                      triage=False, now=time.time())[0]["id"]
    board.store.claim(running, claimer="ext", profile=None, lease_ttl=None, token_hash="h",
                      now=time.time())
    kept = old_log(logs, f"{running}.log")
    target = old_log(board.paths.home, "elsewhere.txt", "not ours\n")
    link = logs / "t_deadbeef.log"
    link.symlink_to(target)
    gone = old_log(logs, "t_0000.log")
    report = asyncio.run(gc.collect(board.store, board.paths, 30, 30))
    assert report["logs"] == 1 and report["refused"] == [str(link)]
    assert kept.exists() and link.is_symlink() and target.exists() and not gone.exists()


def test_stats_walks_the_logs_off_the_loop_and_answers_from_the_last_walk(board, monkeypatch):
    """The first stats waits for a walk (run on a thread: the loop goes on); a later
    one, once the figure is stale, answers from the previous walk at once while a
    new walk runs; after gc, stats waits for a new walk again."""
    (board.paths.logs / "t_1.log").write_text("x" * 100)
    gate = threading.Event()
    walks: list[int] = []
    real = gc.disk_usage

    def walk(path: Path) -> int:
        walks.append(1)
        assert gate.wait(20), "the test never let the walk finish"
        return real(path)
    monkeypatch.setattr(gc, "disk_usage", walk)

    async def scenario() -> None:
        first = board.stats(_params(), None)
        assert asyncio.iscoroutine(first)
        waiting = asyncio.ensure_future(first)
        await _until(lambda: len(walks) == 1)  # the loop runs while the walk is held
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done() and len(walks) == 1
        gate.set()
        assert (await waiting)["log_bytes"] == 100
        # fresh: no walk; stale: the old figure at once, and one new walk
        assert board.stats(_params(), None)["log_bytes"] == 100 and len(walks) == 1
        gate.clear()
        (board.paths.logs / "t_2.log").write_text("y" * 50)
        board._log_bytes_cache = (time.monotonic() - 31, 100)
        assert board.stats(_params(), None)["log_bytes"] == 100
        assert board.stats(_params(), None)["log_bytes"] == 100  # one walk for both
        await _until(lambda: len(walks) == 1 + 1)
        gate.set()
        await _until(lambda: board._log_walk is None)
        assert board.stats(_params(), None)["log_bytes"] == 150 and len(walks) == 2
        board._forget_log_bytes()  # as gc does
        again = board.stats(_params(), None)
        assert asyncio.iscoroutine(again) and (await again)["log_bytes"] == 150
    asyncio.run(scenario())


def _params() -> Any:
    from kanband.params import Params
    return Params({})


async def _until(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_daemon_stats_and_gc_see_a_big_logs_directory(kanband_factory, tmp_path, monkeypatch):
    """A real daemon whose logs directory ($LOGS_DIRECTORY, on tmpfs when there is
    one) holds 3,000 old logs: stats counts their bytes, gc removes them all while
    the daemon keeps answering pings, and stats after gc shows what it freed."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    logs = Path(os.path.realpath(base)) / f"kblogs-{os.getpid()}-{time.monotonic_ns()}"
    logs.mkdir()
    try:
        for i in range(3000):
            old_log(logs, f"t_{i:06x}.log", "z" * 10)
        monkeypatch.setenv("LOGS_DIRECTORY", str(logs))
        k = kanband_factory()
        assert k.call("board.stats")["log_bytes"] == 30000
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(r=k.call("board.gc")), daemon=True)
        t.start()
        with k.client(timeout=10) as c:
            while t.is_alive():
                assert c.call("system.ping")["pong"] is True
                t.join(0.01)
        assert result["r"]["logs"] == 3000, result
        wait_for(lambda: not any(logs.iterdir()), 5, "the logs to be gone")
        assert k.call("board.stats")["log_bytes"] == 0
    finally:
        for p in logs.iterdir():
            p.unlink()
        logs.rmdir()


def test_a_cancelled_gc_keeps_guarding_logs_until_its_thread_is_done(board, monkeypatch):
    """A gc pass cancelled while its unlink thread works (a client gone, shutdown)
    ends the pass only once the thread is done: a log a start opens meanwhile is
    still kept."""
    logs = board.paths.logs
    names = [f"t_{i:04x}.log" for i in range(10)]
    for n in names:
        old_log(logs, n)
    held, release = hold_first_unlink(monkeypatch)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        collecting = asyncio.ensure_future(gc.collect(board.store, board.paths, 30, 30))
        await _until(held.is_set)
        collecting.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not collecting.done()  # still waiting for its thread
        fd = await loop.run_in_executor(None, logfiles.open_append, logs / names[-1])
        os.close(fd)
        aged(logs / names[-1])
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await collecting
    asyncio.run(scenario())
    assert (logs / names[-1]).exists()
    assert sorted(p.name for p in logs.iterdir()) == [names[-1]]


def test_gc_reports_a_logs_directory_it_cannot_list_and_goes_on(board, monkeypatch):
    """A logs directory that cannot be listed is one error in the report; the rest of
    the pass (run directories) still runs."""
    def unreadable(root: Path, cutoff: float) -> Any:
        raise PermissionError(13, "Permission denied", str(root))
    monkeypatch.setattr(gc, "_old_logs", unreadable)
    run_dir = board.paths.runs / "r_gone"
    run_dir.mkdir(parents=True)
    monkeypatch.setattr(board.store, "ended_run_ids", lambda cutoff: ["r_gone"])
    report = asyncio.run(gc.collect(board.store, board.paths, 30, 30))
    assert report["errors"] == [f"{board.paths.logs}: Permission denied"]
    assert report["run_dirs"] == 1 and not run_dir.exists()
