"""Storage faults (SPEC §2, §10; issue 7 part 4): a full disk, a corrupt or foreign
database file, and online backups.

- A full disk (a small tmpfs mounted as kanband's home) gives writers a clean
  `unavailable` error, keeps reads and system.ping answering, corrupts nothing, and
  writes succeed again once space is freed.
- A corrupt file, a kanband database with a damaged page and a foreign SQLite file
  are refused at start with a clear message and a non-zero exit, byte for byte
  untouched.
- `kanbanctl backup PATH` makes a consistent copy while a writer is busy, and a new
  kanband opens it; it refuses to overwrite without --overwrite, makes a relative path
  absolute and reports a missing directory as a usage error.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from conftest import Kanband, integrity, snapshot, wait_for
from supervision_helpers import *  # noqa: F401,F403  (activates kill_leftovers)
from supervision_helpers import gone, read_pid, runs_of, toml, wcmd
from kanband.errors import KanbanError
from kanband.protocol import Client

BODY = "x" * (64 * 1024)


# -- helpers -------------------------------------------------------------------------
@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` on `path` for the block, unmounting it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a small tmpfs, which needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path}: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, leave: int = 0) -> int:
    """Write `path` until the filesystem is full, then give back `leave` bytes; returns
    the file's size."""
    chunk = b"\0" * (256 * 1024)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    os.truncate(path, max(0, os.path.getsize(path) - leave))
    return os.path.getsize(path)


def kill_ours(marker: str) -> None:
    """SIGKILL, by pid, every process with `marker` in KANBAN_SOCKET (a test's workers),
    so that their filesystem can be unmounted."""
    victims = []
    for p in psutil.process_iter(["pid"]):
        try:
            if marker in p.environ().get("KANBAN_SOCKET", ""):
                p.kill()
                victims.append(p)
        except psutil.Error:
            continue
    psutil.wait_procs(victims, timeout=5)


def digest(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_kanband(k: Kanband) -> subprocess.CompletedProcess[str]:
    """Run kanband on k's home to completion (it is expected to refuse to start)."""
    return subprocess.run([sys.executable, "-m", "kanband", "--log-format", "json"],
                          env=k.env, capture_output=True, text=True, timeout=30)


def unavailable(k: Kanband, method: str, **params: Any) -> KanbanError:
    """Call a write that must fail because the board cannot be written; its error."""
    with pytest.raises(KanbanError) as ei:
        k.call(method, **params)
    assert ei.value.code == "unavailable", ei.value
    assert "could not be written" in ei.value.message, ei.value.message
    return ei.value


# -- full disk -----------------------------------------------------------------------
def test_full_disk_gives_clean_errors_keeps_reads_and_recovers(kanband_factory, home):
    """On a full filesystem every write is refused as `unavailable` (kanbanctl exit 1,
    saying the board could not be written) and changes nothing, reads and ping go on,
    and once a filler file is deleted writes work again and the DB checks ok."""
    k = kanband_factory(start=False)
    k.log = home / "daemon.log"  # the daemon's own log stays off the full disk
    with tmpfs(k.home, "8m"):
        try:
            k.start()
            before = [k.create(f"before {i}", body=BODY)["id"] for i in range(5)]
            k.call("task.comment", id=before[0], body="a comment before the disk filled")
            fill(k.home / "filler", leave=1024 * 1024)
            made = []
            for i in range(200):  # fill the board with the last free megabyte
                try:
                    made.append(k.create(f"filling {i}", body=BODY)["id"])
                except KanbanError as e:
                    assert e.code == "unavailable", e
                    assert "could not be written" in e.message and "full" in e.message, e
                    break
            else:
                pytest.fail("200 creates of 64 KiB fitted in the last free megabyte")
            assert len(made) >= 1, "the board should have taken some of the free space"

            snap = snapshot(k, runs=True)
            unavailable(k, "task.create", title="one too many", body=BODY)
            unavailable(k, "task.comment", id=before[1], body=BODY)
            unavailable(k, "task.block", id=before[2], reason="x" * 200_000)
            r = k.ctl("create", "from the cli", "--body", BODY)
            assert r.returncode == 1, (r.returncode, r.stderr)
            assert "could not be written" in r.stderr and "full" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr

            # Reads and ping go on; nothing the refused writes touched has changed.
            assert k.call("system.ping")
            assert snapshot(k, runs=True) == snap
            r = k.ctl("list")
            assert r.returncode == 0 and before[0] in r.stdout, r.stderr
            shown = k.call("task.show", id=before[0])
            assert [c["body"] for c in shown["comments"]] == ["a comment before the disk filled"]
            assert k.proc.poll() is None

            # Space returns: writes succeed again, and what was acknowledged is all there.
            (k.home / "filler").unlink()
            r = k.ctl("create", "after the disk was freed", "--body", BODY, "--json")
            assert r.returncode == 0, r.stderr
            after = json.loads(r.stdout)["id"]
            k.call("task.comment", id=before[1], body="written after space returned")
            k.call("task.block", id=before[2], reason="works again")
            ids = {t["id"] for t in k.call("task.list")["tasks"]}
            assert set(before) | set(made) | {after} == ids
            assert k.stop() == 0
            assert integrity(k.home / "kanban.db") == "ok"
        finally:
            k.cleanup()


def test_worker_exit_while_the_disk_is_full_is_recorded_once_space_returns(kanband_factory,
                                                                            home):
    """A worker that crashes while the board cannot be written still gets its one
    honest outcome (crashed, exit 3) once space returns, and its task moves on,
    instead of staying `running` with no worker and a run without an outcome."""
    k = kanband_factory(toml({"retry_backoff": 0.2, "failure_limit": 3}, fake={
        "command": wcmd("--write-pid", str(home / "pid"), "--wait-file", str(home / "go"),
                        "--exit", 3)}), start=False)
    k.log = home / "daemon.log"
    config = (k.home / "kanband.toml").read_text()
    with tmpfs(k.home, "8m"):
        try:
            k.write_config(config)  # the mount hid the file written before it
            k.start()
            tid = k.create("crashes while the disk is full", assignee="fake")["id"]
            pid = read_pid(home / "pid")
            fill(k.home / "filler")
            (home / "go").touch()  # outside the full filesystem
            wait_for(lambda: gone(pid), 10, "the worker to exit")
            unavailable(k, "task.comment", id=tid, body="the disk is still full")
            assert k.call("system.ping")
            (k.home / "filler").unlink()
            run = wait_for(lambda: (r := runs_of(k, tid)[0])["outcome"] and r, 20,
                           "the crashed run to get its outcome after space returned")
            assert run["outcome"] == "crashed" and run["exit_code"] == 3, run
            wait_for(lambda: k.task(tid)["status"] != "running", 10,
                     "the task to leave running")
            assert k.stop() == 0
            assert integrity(k.home / "kanban.db") == "ok"
        finally:
            k.cleanup()
            kill_ours(str(home))


# -- refusing files that are not a sound kanband database ------------------------------
def assert_refused(k: Kanband, *words: str) -> None:
    """kanband refuses k's kanban.db with `words` in its message and leaves the file,
    and nothing beside it, as it was."""
    db = k.home / "kanban.db"
    want = digest(db)
    r = run_kanband(k)
    assert r.returncode != 0, r.stdout + r.stderr
    assert str(db) in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert digest(db) == want, "the refused database file was modified"
    assert not (k.home / "kanban.db-wal").exists() and not (k.home / "kanban.db-journal").exists()
    assert not k.socket.exists() and not k.pidfile.exists()


def test_random_bytes_database_is_refused_untouched(kanband_factory):
    """A kanban.db of random bytes is refused at start ("not a kanband database"),
    with a non-zero exit, and left byte for byte as it was."""
    k = kanband_factory(start=False)
    (k.home / "kanban.db").write_bytes(random.Random(7).randbytes(64 * 1024))
    assert_refused(k, "not a kanband database")


def test_foreign_sqlite_database_is_refused_untouched(kanband_factory):
    """A valid SQLite database of another application is refused at start ("foreign
    SQLite file"), with a non-zero exit, and left byte for byte as it was."""
    k = kanband_factory(start=False)
    db = sqlite3.connect(k.home / "kanban.db")
    db.execute("CREATE TABLE invoices(id INTEGER PRIMARY KEY, amount REAL)")
    db.executemany("INSERT INTO invoices(amount) VALUES (?)", [(i * 1.5,) for i in range(100)])
    db.commit()
    db.close()
    assert_refused(k, "not a kanband database", "foreign")


def test_damaged_kanband_database_fails_its_check_and_is_left_alone(kanband_factory):
    """A kanband database with a damaged b-tree page fails PRAGMA quick_check at start:
    kanband refuses it with a clear message and leaves the file untouched."""
    k = kanband_factory()
    for i in range(300):
        k.create(f"task {i}", body="b" * 500)
    assert k.stop() == 0
    db = k.home / "kanban.db"
    c = sqlite3.connect(db)
    page_size = c.execute("PRAGMA page_size").fetchone()[0]
    (root,) = c.execute("SELECT rootpage FROM sqlite_master WHERE name = 'tasks'").fetchone()
    c.close()
    data = bytearray(db.read_bytes())
    start = (root - 1) * page_size  # the tasks table's root page: an interior page now
    data[start:start + page_size] = random.Random(3).randbytes(page_size)
    db.write_bytes(bytes(data))
    assert_refused(k, "integrity check")


# -- backup --------------------------------------------------------------------------
class Writer(threading.Thread):
    """Creates tasks one after another until stopped; keeps the acknowledged ids in order."""

    def __init__(self, k: Kanband) -> None:
        super().__init__(daemon=True)
        self.k = k
        self.ids: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with Client(str(self.k.socket), timeout=15) as c:
                n = 0
                while not self.stop.is_set() and n < 20_000:
                    self.ids.append(c.call("task.create", {"title": f"w{n}",
                                                           "body": "y" * 2000})["task"]["id"])
                    n += 1
        except BaseException as e:  # reported by the test
            self.error = e


def read_copy(path: Path) -> dict[str, Any]:
    """What the tests look at in a backup copy, read-only."""
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {
            "check": "; ".join(r[0] for r in c.execute("PRAGMA integrity_check")),
            "journal": c.execute("PRAGMA journal_mode").fetchone()[0],
            "tasks": [r[0] for r in c.execute("SELECT id FROM tasks")],
            "events": [r[0] for r in c.execute("SELECT id FROM events ORDER BY id")],
            "created_events": {r[0] for r in c.execute(
                "SELECT task_id FROM events WHERE kind = 'created'")},
        }
    finally:
        c.close()


def test_backup_is_a_consistent_online_copy_that_a_new_kanband_opens(kanband_factory, home):
    """`kanbanctl backup PATH` taken while a writer creates tasks is a sound, self-
    consistent snapshot (exactly the first N acknowledged creates, events 1..head), and
    a new kanband started on it lists those tasks and takes new writes."""
    k = kanband_factory()
    writer = Writer(k)
    writer.start()
    try:
        wait_for(lambda: len(writer.ids) >= 50 or writer.error, 20, "the writer to get going")
        copies = []
        for i in range(3):
            acked_before = len(writer.ids)
            target = home / f"copy{i}.db"
            r = k.ctl("backup", str(target), "--json")
            assert r.returncode == 0, r.stderr
            copies.append((target, json.loads(r.stdout), acked_before))
            wait_for(lambda n=len(writer.ids): len(writer.ids) > n + 20 or writer.error, 20,
                     "more writes between backups")
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None, repr(writer.error)
    for target, reply, acked_before in copies:
        assert reply["path"] == str(target) and target.stat().st_size == reply["bytes"]
        assert oct(target.stat().st_mode & 0o777) == oct(0o600)
        copy = read_copy(target)
        assert copy["check"] == "ok" and copy["journal"] == "delete"
        n = len(copy["tasks"])
        assert n == reply["tasks"] and n >= acked_before, (n, reply, acked_before)
        assert set(copy["tasks"]) == set(writer.ids[:n]), "the copy is not one instant's board"
        assert copy["events"] == list(range(1, reply["event_head"] + 1))
        assert copy["created_events"] == set(copy["tasks"])
    assert not list(home.glob("copy*.db.tmp-*")), "a temporary file was left behind"

    target, reply, _ = copies[-1]
    restored = kanband_factory(start=False, sub="restored")
    shutil.copy(target, restored.home / "kanban.db")
    restored.start()
    tasks = restored.call("task.list", archived=True)["tasks"]
    assert {t["id"] for t in tasks} == set(read_copy(target)["tasks"])
    assert restored.call("board.stats")["event_head"] == reply["event_head"]
    t = restored.create("written to the restored board")
    assert restored.task(t["id"])["title"] == "written to the restored board"
    assert restored.stop() == 0 and integrity(restored.home / "kanban.db") == "ok"


def test_backup_refuses_existing_file_and_missing_directory_and_resolves_relative(kd, home):
    """backup refuses an existing file unless --overwrite (exit 1, file untouched),
    reports a missing directory as a usage error (exit 2), refuses the live database,
    and resolves a relative PATH against the caller's working directory."""
    kd.create("something to back up")
    existing = home / "existing.db"
    existing.write_bytes(b"keep me")
    r = kd.ctl("backup", str(existing))
    assert r.returncode == 1 and "exists" in r.stderr and "overwrite" in r.stderr, r.stderr
    assert existing.read_bytes() == b"keep me"
    r = kd.ctl("backup", str(existing), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert read_copy(existing)["check"] == "ok"

    r = kd.ctl("backup", str(home / "no" / "such" / "dir" / "b.db"))
    assert r.returncode == 2 and "does not exist" in r.stderr, (r.returncode, r.stderr)
    assert not (home / "no").exists()

    live = kd.home / "kanban.db"
    r = kd.ctl("backup", str(live), "--overwrite")
    assert r.returncode == 2 and "live database" in r.stderr, (r.returncode, r.stderr)
    assert integrity(live) == "ok" and kd.call("task.list")["tasks"]

    cwd = home / "elsewhere"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "kanbanctl", "backup", "rel.db", "--json"],
                       env=kd.env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(cwd / "rel.db")
    assert read_copy(cwd / "rel.db")["check"] == "ok"



@pytest.mark.stalls_expected  # the write waits out SQLite's busy timeout on the loop
def test_first_start_of_a_boot_that_cannot_write_still_serves(kanband_factory):
    """The first start of each boot writes the boot time that start times count
    from (see reaper._BOOT_TIME). If that write fails (here: another process
    holds the database's write lock past SQLite's busy timeout), kanband says
    so and serves on, rather than refusing to start."""
    k = kanband_factory()
    tid = k.create("made before")["id"]
    assert k.stop() == 0
    holder = sqlite3.connect(k.home / "kanban.db", isolation_level=None)
    try:
        # as if the machine had rebooted since, and then someone holds the lock
        holder.execute("UPDATE meta SET value = 'another-boot' WHERE key = 'boot_id'")
        holder.execute("BEGIN IMMEDIATE")
        k.start()
        warned = [e for e in k.log_events() if e["event"] == "boot_time_not_kept"]
        assert warned and "could not be written" in warned[0]["error"], k.log_text()[-2000:]
        assert k.call("system.ping")
    finally:
        holder.close()
    assert k.call("task.show", id=tid)["task"]["title"] == "made before"
    k.create("written once the lock is gone")


def test_start_on_a_full_disk_says_so(kanband_factory, home):
    """After a clean stop SQLite must create its -wal and -shm files again to open
    the board; on a full disk that fails. kanband refuses to start with an error
    that says what failed, not that the file is not a kanband database."""
    k = kanband_factory(start=False)
    k.log = home / "daemon.log"
    with tmpfs(k.home, "4m"):
        try:
            k.start()
            k.create("made before the disk filled")
            assert k.stop() == 0
            fill(k.home / "filler")
            r = run_kanband(k)
            assert r.returncode != 0
            assert "cannot open the database" in r.stderr and "disk full" in r.stderr, r.stderr
            assert "not a kanband database" not in r.stderr and "Traceback" not in r.stderr
            (k.home / "filler").unlink()
            k.start()
            assert [t["title"] for t in k.call("task.list")["tasks"]] == \
                ["made before the disk filled"]
        finally:
            k.cleanup()
