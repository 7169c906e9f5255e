"""The kanband process (SPEC §1, §2, §5, §8, §10): one daemon per home, stale
pidfile and socket replaced, clean signal shutdown, private files, config
errors that name the key, socket path limits, peer credentials, and nothing
committed lost to kill -9."""

from __future__ import annotations

import io
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys

import msgpack
import pytest

from conftest import Kanband, RawConn, snapshot, wait_for
from kanband import __version__
from kanband.errors import KanbanError


def run_kanband(k: Kanband, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run kanband to completion (for invocations that must refuse or exit at once)."""
    return subprocess.run([sys.executable, "-m", "kanband", "--log-format", "json", *args],
                          env=k.env, capture_output=True, text=True, timeout=timeout)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# -- one daemon per home -------------------------------------------------------------
def test_second_daemon_on_the_same_home_refuses(kd):
    """A second kanband on a home already served exits 1 saying "already running" with the first pid; the first keeps serving."""
    tid = kd.create("survivor")["id"]
    r = run_kanband(kd)
    assert r.returncode == 1, r
    assert "already running" in r.stderr and str(kd.proc.pid) in r.stderr
    assert kd.proc.poll() is None
    assert kd.socket.exists() and kd.pidfile.read_text().strip() == str(kd.proc.pid)
    assert kd.task(tid)["title"] == "survivor"
    assert kd.call("daemon.status")["pid"] == kd.proc.pid


def test_second_daemon_on_the_same_socket_refuses(kd, kanband_factory):
    """A kanband with another home but the first one's socket refuses to start and leaves the first serving."""
    other = kanband_factory(sub="other", start=False)
    r = run_kanband(other, "--socket", str(kd.socket))
    assert r.returncode != 0, r
    assert str(kd.socket) in r.stderr
    assert kd.proc.poll() is None
    assert kd.call("system.ping")["pong"] is True
    assert kd.call("daemon.status")["pid"] == kd.proc.pid


def test_stale_pidfile_and_socket_are_replaced(kanband_factory):
    """A pidfile naming a dead pid and a socket file nobody listens on are replaced, and the daemon starts."""
    k = kanband_factory(start=False)
    k.pidfile.write_text(f"{dead_pid()}\n")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(k.socket))
    s.close()
    assert k.socket.exists()
    k.start()
    assert k.pidfile.read_text().strip() == str(k.proc.pid)
    assert k.call("daemon.status")["pid"] == k.proc.pid
    assert stat.S_ISSOCK(os.stat(k.socket).st_mode)


def test_pidfile_holds_the_daemon_pid(kd):
    """While kanband runs, its pidfile holds its pid and `kill -HUP $(cat pidfile)` reaches it without stopping it."""
    pid = int(kd.pidfile.read_text())
    assert pid == kd.proc.pid
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "config_reloaded" for e in kd.log_events()),
             10, "a config_reloaded log line")
    assert kd.proc.poll() is None and kd.call("system.ping")["pong"]


# -- shutdown --------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_cleanly(kd, sig):
    """SIGTERM or SIGINT makes kanband exit 0 and remove its socket and pidfile; the data stays."""
    tid = kd.create("keep me")["id"]
    assert kd.stop(sig) == 0
    assert not kd.socket.exists() and not kd.pidfile.exists()
    assert (kd.home / "kanban.db").exists()
    assert any(e.get("event") == "stopped" for e in kd.log_events())
    kd.start()
    assert kd.task(tid)["title"] == "keep me"


def test_kill9_loses_nothing_committed(kd):
    """Every committed change survives kill -9 and a restart (which replaces the dead daemon's socket and pidfile)."""
    a = kd.create("a", body="body", assignee="bob", tenant="t", priority=3, skills=["x"])["id"]
    b = kd.create("b", parents=[a])["id"]
    c = kd.create("c")["id"]
    kd.call("task.comment", id=a, body="a comment", author="me")
    kd.call("task.claim", id=c, ttl=3600)
    kd.call("task.complete", id=kd.create("d")["id"], result="r")
    kd.call("task.block", id=kd.create("e")["id"], reason="why")
    kd.call("task.archive", id=kd.create("f")["id"])
    kd.create("g", triage=True, idempotency_key="key-g")
    before = snapshot(kd)
    shows = {t["id"]: kd.call("task.show", id=t["id"]) for t in before["tasks"]}
    old_pid = kd.proc.pid
    kd.kill9()
    assert kd.socket.exists() and kd.pidfile.exists()  # left behind by the crash
    kd.start()
    assert kd.proc.pid != old_pid
    assert snapshot(kd) == before
    for tid, show in shows.items():
        after = kd.call("task.show", id=tid)
        for key in ("comments", "events", "runs", "parents", "children"):
            if key in ("parents", "children"):
                assert [x["id"] for x in after[key]] == [x["id"] for x in show[key]], (tid, key)
            else:
                assert after[key] == show[key], (tid, key)
    assert kd.call("task.create", title="g", idempotency_key="key-g")["created"] is False
    assert kd.task(b)["status"] == "todo"


# -- files ------------------------------------------------------------------------------
def test_socket_and_database_are_private(kd):
    """The socket and the database files are mode 0600."""
    kd.create("x")
    assert stat.S_ISSOCK(os.stat(kd.socket).st_mode)
    assert mode(kd.socket) == 0o600
    db = kd.home / "kanban.db"
    assert mode(db) == 0o600
    for extra in ("kanban.db-wal", "kanban.db-shm"):
        if (kd.home / extra).exists():
            assert mode(kd.home / extra) == 0o600, extra


def test_socket_mode_from_config(kanband_factory):
    """daemon.socket_mode = "0660" gives the socket mode 0660."""
    k = kanband_factory('[daemon]\nsocket_mode = "0660"\n')
    assert mode(k.socket) == 0o660


def test_database_is_wal_with_a_schema_version(kd):
    """The database uses WAL and records its schema version in PRAGMA user_version."""
    kd.create("x")
    db = sqlite3.connect(f"file:{kd.home / 'kanban.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"tasks", "task_links", "comments", "events", "runs", "notify_subs"} <= tables
        (tid,) = db.execute("SELECT id FROM tasks").fetchone()
        assert tid.startswith("t_")
    finally:
        db.close()


def test_foreign_database_is_refused(kanband_factory):
    """kanband will not adopt an SQLite file that is not a kanband database, and says so."""
    k = kanband_factory(start=False)
    db = sqlite3.connect(k.home / "kanban.db")
    db.execute("CREATE TABLE other(x)")
    db.commit()
    db.close()
    r = run_kanband(k)
    assert r.returncode != 0
    assert "kanban.db" in r.stderr and "not a kanband database" in r.stderr
    assert not k.socket.exists()


# -- command line and config -----------------------------------------------------------
def test_version(kanband_factory):
    """`kanband --version` prints the version and exits 0."""
    r = run_kanband(kanband_factory(start=False), "--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_check_config_accepts_a_good_config(kanband_factory):
    """`kanband --check-config` on a valid config exits 0 without starting a daemon."""
    k = kanband_factory('[daemon]\nmax_workers = 2\nclaim_ttl = "30m"\n\n'
                        '[profiles.coder]\ncommand = ["echo", "{task_id}"]\n', start=False)
    r = run_kanband(k, "--check-config")
    assert r.returncode == 0, r.stderr
    assert "coder" in r.stdout
    assert not k.socket.exists() and not k.pidfile.exists()


BAD_CONFIGS = [
    ("[daemon]\nmax_workers = 0\n", "daemon.max_workers"),
    ("[daemon]\nmax_workers = \"many\"\n", "daemon.max_workers"),
    ("[daemon]\nclaim_ttl = \"soon\"\n", "daemon.claim_ttl"),
    ("[daemon]\nfailure_limit = 0\n", "daemon.failure_limit"),
    ("[daemon]\non_stop = \"maybe\"\n", "daemon.on_stop"),
    ("[daemon]\nsocket_mode = \"0400\"\n", "daemon.socket_mode"),
    ("[daemon]\nbogus = 1\n", "daemon.bogus"),
    ("[bogus]\nx = 1\n", "bogus"),
    ("[profiles.x]\ncommand = []\n", "profiles.x.command"),
    ("[profiles.x]\ncommand = [\"a\"]\nfoo = 1\n", "profiles.x.foo"),
    ("[profiles.x]\ncommand = [\"a\", \"{nope}\"]\n", "profiles.x.command"),
    ("this is [ not toml\n", "TOML"),
]


@pytest.mark.parametrize("text,key", BAD_CONFIGS, ids=[k for _, k in BAD_CONFIGS])
def test_check_config_names_the_bad_key(kanband_factory, text, key):
    """`kanband --check-config` on a bad config exits 2 with a message naming the key (and the file)."""
    k = kanband_factory(text, start=False)
    r = run_kanband(k, "--check-config")
    assert r.returncode == 2, r
    assert key in r.stderr and "kanband.toml" in r.stderr


def test_daemon_refuses_to_start_on_a_bad_config(kanband_factory):
    """Started with an unknown config key, kanband exits 2 naming it and binds nothing."""
    k = kanband_factory("[daemon]\nmax_wrokers = 3\n", start=False)
    r = run_kanband(k)
    assert r.returncode == 2, r
    assert "daemon.max_wrokers" in r.stderr
    assert not k.socket.exists() and not k.pidfile.exists()


def test_explicit_config_must_exist(kanband_factory):
    """--config naming a missing file is an error, not silent defaults."""
    k = kanband_factory(start=False)
    r = run_kanband(k, "--config", str(k.home / "missing.toml"), "--check-config")
    assert r.returncode == 2 and "missing.toml" in r.stderr


def test_socket_path_over_107_bytes_is_refused(kanband_factory):
    """A socket path longer than 107 bytes is refused with a message suggesting --socket, and nothing is bound."""
    k = kanband_factory(start=False)
    long = "/tmp/" + "s" * 110 + ".sock"
    r = run_kanband(k, "--socket", long)
    assert r.returncode == 2, r
    assert "107" in r.stderr and "--socket" in r.stderr
    assert not os.path.exists(long)
    # the same when the home is so deep that <home>/kanband.sock does not fit
    deep = k.home / ("d" * 100)
    deep.mkdir()
    r = subprocess.run([sys.executable, "-m", "kanband"], capture_output=True, text=True,
                       timeout=30, env={**k.env, "KANBAN_HOME": str(deep)})
    assert r.returncode == 2, r
    assert "--socket" in r.stderr and "KANBAN_SOCKET" in r.stderr


def test_socket_path_of_exactly_107_bytes_works(kanband_factory):
    """A socket path of exactly 107 bytes fits and is served."""
    k = kanband_factory(start=False)
    base = str(k.home) + "/"
    name = "s" * (107 - len(base) - len(".sock")) + ".sock"
    path = base + name
    assert len(path.encode()) == 107
    k.socket = k.home / name
    k.start("--socket", path)
    assert k.call("system.ping")["pong"] is True
    r = k.ctl("--socket", path, "list")
    assert r.returncode == 0, r.stderr


def test_socket_and_pidfile_options(kanband_factory, home):
    """--socket and --pidfile put the socket and the pidfile where they say."""
    k = kanband_factory(start=False)
    k.socket = home / "alt.sock"
    pidfile = home / "alt.pid"
    k.start("--socket", str(k.socket), "--pidfile", str(pidfile))
    assert pidfile.read_text().strip() == str(k.proc.pid)
    assert not (k.home / "kanband.sock").exists()
    st = k.call("daemon.status")
    assert st["paths"]["socket"] == str(k.socket) and st["paths"]["pidfile"] == str(pidfile)
    assert k.stop() == 0
    assert not pidfile.exists() and not k.socket.exists()


def test_logs_are_json_lines_with_started_and_ready(kd):
    """With --log-format json every log line is a JSON object, and `started` and `ready` are logged."""
    lines = [ln for ln in kd.log_text().splitlines() if ln.strip()]
    events = kd.log_events()
    assert lines and len(events) == len(lines)
    kinds = [e.get("event") for e in events]
    assert "started" in kinds and "ready" in kinds
    assert kinds.index("started") < kinds.index("ready")


# -- peer credentials (§5) -----------------------------------------------------------------
NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_other_users_are_refused_by_peer_credentials(kanband_factory, home):
    """A client of another uid (not root, not socket_group) that can reach the socket is refused with `forbidden` and logged."""
    pub = home / "pub"
    pub.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    os.chmod(pub, 0o755)
    k = kanband_factory('[daemon]\nsocket_mode = "0666"\n', start=False)
    k.socket = pub / "k.sock"
    k.start("--socket", str(k.socket))
    request = msgpack.packb([0, 1, "system.ping", [{}]])
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, talk, report what came back
        code = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(str(k.socket))
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            os.write(wfd, data)
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    got = b""
    while chunk := os.read(rfd, 65536):
        got += chunk
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    msgs = list(msgpack.Unpacker(io.BytesIO(got), raw=False))
    assert len(msgs) == 1 and msgs[0][:2] == [2, "error"], msgs
    assert msgs[0][2][0]["code"] == "forbidden"
    refused = [e for e in k.log_events() if e.get("event") == "rpc_client_refused"]
    assert refused and refused[0]["peer_uid"] == NOBODY
    with RawConn(k.socket) as c:  # our own uid is still served
        c.request(1, "system.ping")
        assert c.read()[:3] == [1, 1, None]


@pytest.mark.stalls_expected
def test_a_stuck_event_loop_is_logged_with_its_stack(kd):
    """Another process holding the database's write lock keeps kanband's next
    write waiting (SQLite's busy timeout) on the event loop, which then answers
    nobody: the stall watch logs `loop_stalled` with the loop's stack, and
    `loop_resumed` once the loop turns again."""
    holder = sqlite3.connect(kd.home / "kanban.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with kd.client(timeout=30) as c:
            msgid = c.send("task.create", {"title": "waits for the lock"})
            stalled = wait_for(lambda: [e for e in kd.log_events() if e["event"] == "loop_stalled"],
                               20, "a loop_stalled line")
            holder.execute("ROLLBACK")
            holder.close()
            holder = None
            try:  # answered once the lock is free: created, or refused as unavailable
                c.receive(msgid)
            except KanbanError as e:
                assert e.code == "unavailable", e
    finally:
        if holder is not None:
            holder.close()
    assert stalled[0]["level"] == "error" and stalled[0]["seconds"] >= 2
    assert "store.py" in stalled[0]["stack"] and "create" in stalled[0]["stack"], stalled[0]
    resumed = wait_for(lambda: [e for e in kd.log_events() if e["event"] == "loop_resumed"],
                       10, "a loop_resumed line")
    assert resumed[0]["stalled_seconds"] >= 2
    assert kd.call("system.ping")["pong"]
