"""systemd and operations (SPEC §1, §8), unit level: no systemd as PID 1. A test
NOTIFY_SOCKET sees READY/STATUS/WATCHDOG/RELOADING/STOPPING in order;
systemd-socket-activate hands kanband its socket; the pidfile is locked and
drives kill -HUP/-TERM and packaging/kanband-ops; --detach returns once ready;
the units pass systemd-analyze verify; log events encode to journald's native
protocol."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import ROOT, RawConn, wait_for
from kanband import logs
from systemd_helpers import (OPS, PY, VENV_BIN, EnvKanband, NotifySocket, alive, dead_pid,
                             decode_journal, kill_and_wait, quiet_for, read_pid, run, state)

WATCHDOG_USEC = "400000"  # kanband pings every 0.2 s
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("KANBAN_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_",
                                  "JOURNAL_STREAM"))}


@pytest.fixture
def make(home: Path) -> Any:
    """Build EnvKanbands on the test's home; every process they started is killed after."""
    made: list[EnvKanband] = []

    def build(sub: str = "h", config: str | None = None,
              env: dict[str, str] | None = None) -> EnvKanband:
        k = EnvKanband(home / sub, config, env)
        made.append(k)
        return k

    yield build
    for k in made:
        k.cleanup()


@pytest.fixture
def pids() -> Any:
    """Pids of detached daemons and helper processes; SIGKILLed after the test."""
    started: list[int] = []
    yield started
    for pid in started:
        kill_and_wait(pid)


@pytest.fixture
def notify(home: Path) -> Any:
    ns = NotifySocket(home)
    yield ns
    ns.close()


def mono_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def config_reloads(k: EnvKanband) -> int:
    return sum(e.get("event") == "config_reloaded" for e in k.log_events())


# -- sd_notify -----------------------------------------------------------------------
def test_notify_lifecycle_in_order(make, notify, home):
    """READY=1 (with STATUS= and MAINPID=) only once kanbanctl is served, STATUS= follows the board's counts, WATCHDOG=1 every half period, RELOADING=1+MONOTONIC_USEC then READY=1 on `kanbanctl reload` and on SIGHUP, and STOPPING=1 last on SIGTERM."""
    k = make(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": WATCHDOG_USEC})
    k.start(wait=False)
    ready = notify.wait("READY", "1")
    st = k.ctl("status")  # no retry: READY promises that the socket answers
    assert st.returncode == 0, st.stderr
    msg = notify.snapshot()[ready]
    assert msg.fields.get("STATUS") == "running=0 ready=0 blocked=0", msg
    assert msg.fields.get("MAINPID") == str(k.proc.pid), msg
    assert notify.find("READY") == ready  # nothing claimed readiness earlier

    # STATUS= keeps the live counts (running, ready, blocked)
    a = k.ctl("create", "a", "-q").stdout.strip()
    k.ctl("create", "b", "-q")
    i = notify.wait("STATUS", "running=0 ready=2 blocked=0", after=ready)
    assert k.ctl("block", a, "stuck").returncode == 0
    i = notify.wait("STATUS", "running=0 ready=1 blocked=1", after=i)
    go = home / "go"
    k.ctl("create", "c", "--assignee", "shell", "--body",
          f"while [ ! -e {go} ]; do sleep 0.02; done; echo ok")
    i = notify.wait("STATUS", "running=1 ready=1 blocked=1", after=i)
    go.touch()
    i = notify.wait("STATUS", "running=0 ready=1 blocked=1", after=i)

    # WATCHDOG=1 from the event loop at half of WATCHDOG_USEC
    pings = [m.at for m in notify.snapshot()[ready:] if m.has("WATCHDOG", "1")]
    assert len(pings) >= 4, notify.snapshot()
    gaps = sorted(b - a for a, b in zip(pings, pings[1:]))
    assert 0.12 <= gaps[len(gaps) // 2] <= 0.32, gaps  # median ~0.2 s

    # reload through kanbanctl
    before = mono_usec()
    r = k.ctl("reload")
    after = mono_usec()
    assert r.returncode == 0, r.stderr
    rel = notify.wait("RELOADING", "1", after=i)
    usec = notify.snapshot()[rel].fields.get("MONOTONIC_USEC", "")
    assert usec.isdigit() and before <= int(usec) <= after, (before, usec, after)
    ready2 = notify.wait("READY", "1", after=rel + 1)

    # reload through SIGHUP
    before = mono_usec()
    os.kill(k.proc.pid, signal.SIGHUP)
    rel2 = notify.wait("RELOADING", "1", after=ready2 + 1)
    usec = notify.snapshot()[rel2].fields.get("MONOTONIC_USEC", "")
    assert usec.isdigit() and before <= int(usec) <= mono_usec(), (before, usec)
    ready3 = notify.wait("READY", "1", after=rel2 + 1)
    wait_for(lambda: config_reloads(k) == 2, 10, "two config_reloaded lines")

    # STOPPING=1 on SIGTERM, and nothing after it
    assert k.stop(signal.SIGTERM) == 0
    stop = notify.wait("STOPPING", "1", after=ready3 + 1)
    tail = notify.snapshot()[stop + 1:]
    assert not [m for m in tail if m.has("READY") or m.has("WATCHDOG") or m.has("RELOADING")], tail


@pytest.mark.stalls_expected  # stopped on purpose: its loop does stand still
def test_stopped_daemon_sends_no_watchdog(make, notify):
    """A SIGSTOPped kanband (a wedged event loop) sends no WATCHDOG=1 for several watchdog periods, and pings again once continued."""
    k = make(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": WATCHDOG_USEC})
    k.start(wait=False)
    ready = notify.wait("READY", "1")
    first = notify.wait("WATCHDOG", "1", after=ready)
    notify.wait("WATCHDOG", "1", after=first + 1)
    pid = k.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: state(pid) == psutil.STATUS_STOPPED, 5, "kanband to be stopped")
        stopped_at = time.monotonic()
        # A ping sent just before the stop may reach the reader thread a moment later.
        late = lambda: [m for m in notify.snapshot()  # noqa: E731
                        if m.has("WATCHDOG") and m.at > stopped_at + 0.05]
        assert quiet_for(late, 1.25), late()  # > 3 full WATCHDOG_USEC periods
    finally:
        os.kill(pid, signal.SIGCONT)
    mark = len(notify.snapshot())
    notify.wait("WATCHDOG", "1", after=mark, timeout=5)
    assert k.call("system.ping")["pong"] is True


def test_watchdog_pid_of_another_process_disables_pings(make, notify):
    """With WATCHDOG_PID naming another process, kanband sends READY=1 but no WATCHDOG=1 (the watchdog is not its)."""
    k = make(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": WATCHDOG_USEC,
                  "WATCHDOG_PID": str(os.getpid())})
    k.start(wait=False)
    notify.wait("READY", "1")
    assert quiet_for(lambda: notify.find("WATCHDOG") is not None, 0.7), notify.snapshot()
    assert k.stop() == 0


# -- socket activation --------------------------------------------------------------
def socket_activate(home: Path, sock: Path, pids: list[int], *env: str) -> subprocess.Popen:
    """systemd-socket-activate listening on `sock`, running kanband on KANBAN_HOME=home/h
    once the first client connects."""
    log = open(home / "activate.log", "ab")
    sets = [f"KANBAN_HOME={home / 'h'}", "PATH", "PYTHONUNBUFFERED=1", *env]
    p = subprocess.Popen(["systemd-socket-activate", "-l", str(sock),
                          *[a for e in sets for a in ("-E", e)],
                          PY, "-m", "kanband", "--log-format", "json"],
                         env=CLEAN_ENV, stdout=log, stderr=log, start_new_session=True)
    log.close()
    pids.append(p.pid)
    return p


def ctl_at(sock: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """kanbanctl --socket SOCK with no KANBAN_* in its environment."""
    return run([PY, "-m", "kanbanctl", "--socket", str(sock), *args], CLEAN_ENV, timeout)


def test_socket_activation_serves_clients_queued_before_start(home, notify, pids):
    """Under systemd-socket-activate, clients that connect before kanband even runs are served from the inherited socket, kanbanctl --socket works, and on SIGTERM kanband leaves the socket path (systemd's) in place."""
    sock = home / "act.sock"
    p = socket_activate(home, sock, pids, f"NOTIFY_SOCKET={notify.path}")
    wait_for(sock.exists, 10, "systemd-socket-activate to listen")
    early = [RawConn(sock, timeout=30) for _ in range(3)]  # queued in the kernel's backlog
    assert notify.find("READY") is None  # kanband starts on the first connection
    for n, c in enumerate(early):
        c.request(n + 1, "system.ping")
    for n, c in enumerate(early):
        kind, msgid, err, result = c.read()
        assert (kind, msgid, err, result["pong"]) == (1, n + 1, None, True)
        c.close()
    ready = notify.wait("READY", "1")
    assert notify.snapshot()[ready].fields.get("MAINPID") == str(p.pid)  # exec'd in place
    st = ctl_at(sock, "status", "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["pid"] == p.pid
    assert read_pid(home / "h" / "kanband.pid") == p.pid
    tid = ctl_at(sock, "create", "via activation", "-q").stdout.strip()
    assert json.loads(ctl_at(sock, "show", tid, "--json").stdout)["task"]["title"] == "via activation"
    assert not (home / "h" / "kanband.sock").exists()  # it bound nothing of its own
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    notify.wait("STOPPING", "1", after=ready)
    assert sock.exists()  # the listening socket belongs to systemd, not to kanband
    assert not (home / "h" / "kanband.pid").exists()


def test_socket_activated_workers_env(home, notify, pids):
    """A worker of a socket-activated kanband sees no LISTEN_*, NOTIFY_SOCKET or WATCHDOG_*, and its KANBAN_SOCKET (like `kanbanctl status`) names the socket kanband actually serves (else the worker's kanbanctl cannot report back)."""
    sock = home / "act.sock"
    socket_activate(home, sock, pids, f"NOTIFY_SOCKET={notify.path}",
                    f"WATCHDOG_USEC={WATCHDOG_USEC}")
    wait_for(sock.exists, 10, "systemd-socket-activate to listen")
    body = 'env; [ -S "$KANBAN_SOCKET" ] && echo SOCKET-OK; echo end'
    tid = ctl_at(sock, "create", "dump env", "--assignee", "shell", "--body", body,
                 "-q").stdout.strip()
    assert tid.startswith("t_"), tid
    w = ctl_at(sock, "wait", tid, "--timeout", "20")
    assert w.returncode == 0, (w.stdout, w.stderr)
    out = ctl_at(sock, "log", tid)
    assert out.returncode == 0, out.stderr
    env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert env.get("KANBAN_TASK_ID") == tid, out.stdout
    leaked = sorted(k for k in env if k.startswith(("LISTEN_", "WATCHDOG_")) or k == "NOTIFY_SOCKET")
    assert leaked == [], leaked
    status = json.loads(ctl_at(sock, "status", "--json").stdout)
    # A worker's kanbanctl reaches the daemon only through the socket it is handed.
    seen = (env.get("KANBAN_SOCKET"), status["paths"]["socket"], "SOCKET-OK" in out.stdout)
    assert seen == (str(sock), str(sock), True), \
        f"socket-activated kanband names {seen[:2]}, not the socket it serves ({sock})"


# -- pidfile ------------------------------------------------------------------------
def test_pidfile_holds_pid_and_is_locked(kd):
    """The pidfile holds the daemon's pid and stays flock-ed while it runs (a non-blocking lock from outside fails); a clean stop removes it."""
    assert read_pid(kd.pidfile) == kd.proc.pid
    with open(kd.pidfile) as f:
        for how in (fcntl.LOCK_EX, fcntl.LOCK_SH):
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, how | fcntl.LOCK_NB)
    assert kd.stop() == 0
    assert not kd.pidfile.exists() and not kd.socket.exists()


@pytest.mark.parametrize("holder", ["dead", "live-unlocked"])
def test_stale_pidfile_is_replaced(make, holder):
    """A pidfile nobody holds the lock on, naming a dead pid or an unrelated live process, is replaced by the new daemon's pid."""
    k = make()
    k.home.mkdir(parents=True, exist_ok=True)
    k.pidfile.write_text(f"{dead_pid() if holder == 'dead' else os.getpid()}\n")
    k.start()
    assert read_pid(k.pidfile) == k.proc.pid
    assert k.call("daemon.status")["pid"] == k.proc.pid
    assert k.stop() == 0 and not k.pidfile.exists()


def test_kill_hup_and_term_through_pidfile(make):
    """`kill -HUP $(cat pidfile)` reloads the config (a profile added since start becomes usable) and `kill -TERM $(cat pidfile)` stops kanband cleanly, removing pidfile and socket."""
    k = make()
    k.start()
    k.write_config('[profiles.echoer]\ncommand = ["sh", "-c", "echo via-echoer"]\n'
                   'complete_on_exit = true\n')
    hup = run(["sh", "-c", 'kill -HUP "$(cat "$1")"', "sh", str(k.pidfile)], k.env)
    assert hup.returncode == 0, hup.stderr
    wait_for(lambda: config_reloads(k) == 1, 10, "config_reloaded in the log")
    tid = k.create("uses the new profile", assignee="echoer")["id"]
    assert k.wait_status(tid, "done")["result"] == "via-echoer"
    term = run(["sh", "-c", 'kill -TERM "$(cat "$1")"', "sh", str(k.pidfile)], k.env)
    assert term.returncode == 0, term.stderr
    assert k.proc.wait(30) == 0
    assert not k.pidfile.exists() and not k.socket.exists()


# -- packaging/kanband-ops -------------------------------------------------------------
def ops(*args: str, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run([str(OPS), *args], env if env is not None else CLEAN_ENV, timeout)


def test_ops_script_status_pid_reload_stop(make):
    """kanband-ops -p PIDFILE: status 0 and pid while running, reload re-reads the config, stop returns only once kanband is gone, then status/pid 1; a bad verb is a usage error (2)."""
    k = make()
    k.start()
    pf, pid = str(k.pidfile), k.proc.pid
    r = ops("-p", pf, "status")
    assert (r.returncode, r.stdout.strip()) == (0, f"kanband is running, pid {pid}"), r
    r = ops("-p", pf, "pid")
    assert (r.returncode, r.stdout.strip()) == (0, str(pid)), r
    r = ops("status", env={**CLEAN_ENV, "KANBAN_HOME": str(k.home)})  # default pidfile
    assert r.returncode == 0, r
    r = ops("-p", pf, "reload")
    assert r.returncode == 0, r
    wait_for(lambda: config_reloads(k) == 1, 10, "config_reloaded in the log")
    assert k.call("system.ping")["pong"] is True
    reaper = threading.Thread(target=k.proc.wait, daemon=True)  # as its parent would
    reaper.start()
    r = ops("-p", pf, "stop")
    assert r.returncode == 0, r
    assert not k.pidfile.exists() and not alive(pid)  # stop waited for the exit
    assert k.proc.wait(10) == 0
    for verb in ("status", "pid", "reload"):
        assert ops("-p", pf, verb).returncode == 1, verb
    bad = ops("-p", pf, "restart-everything")
    assert bad.returncode == 2 and "usage" in bad.stderr, bad


def test_ops_stop_treats_an_unreaped_exited_daemon_as_gone(make):
    """kanband-ops stop returns 0 promptly when kanband has exited but its parent has not reaped it yet (a --detach daemon under a PID 1 that does not reap), as its own `status` already says "not running"."""
    k = make()
    k.start()
    pid = k.proc.pid
    # KANBAN_STOP_TIMEOUT=20 tenths: exit 0 means it did not wait out the zombie
    r = ops("-p", str(k.pidfile), "stop", env={**CLEAN_ENV, "KANBAN_STOP_TIMEOUT": "20"})
    assert state(pid) == psutil.STATUS_ZOMBIE and not k.pidfile.exists()  # it did exit
    assert ops("-p", str(k.pidfile), "status").returncode == 1
    assert r.returncode == 0, r


# -- --detach -------------------------------------------------------------------------
def detach(k: EnvKanband, *args: str, timeout: float = 30) -> tuple[subprocess.Popen, str, str]:
    p = subprocess.Popen([PY, "-m", "kanband", "--detach", "--log-format", "json", *args],
                         env=k.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout)
    return p, out, err


def test_detach_returns_once_ready(make, pids):
    """`kanband --detach` exits 0 only once the socket answers (kanbanctl works at once), the pidfile holds the detached daemon's pid in its own session, and a second --detach on that home fails with "already running"."""
    k = make()
    p, out, err = detach(k)
    daemon = read_pid(k.pidfile)
    if daemon:
        pids.append(daemon)
    assert p.returncode == 0, err
    st = k.ctl("status", "--json")  # no retry
    assert st.returncode == 0, st.stderr
    assert daemon and daemon != p.pid and json.loads(st.stdout)["pid"] == daemon
    assert alive(daemon) and os.getsid(daemon) == daemon
    assert any(e.get("event") == "ready" for e in
               map(json.loads, (k.home / "kanband.log").read_text().splitlines()))
    p2, _, err2 = detach(k)
    assert p2.returncode != 0 and "already running" in err2 and str(daemon) in err2, err2
    assert k.call("daemon.status")["pid"] == daemon
    os.kill(daemon, signal.SIGTERM)
    wait_for(lambda: not alive(daemon), 30, "the detached daemon to exit")
    assert not k.pidfile.exists() and not k.socket.exists()


def test_detach_reports_start_failures(make, home, pids):
    """--detach exits 2 at once on a broken config (checked before forking) and non-zero with the reason when the daemon fails after the fork; no daemon is left running."""
    k = make(config='[daemon]\nmax_workers = "lots"\n')
    p, _, err = detach(k, timeout=10)
    assert p.returncode == 2 and "max_workers" in err, err
    assert not k.pidfile.exists()

    k2 = make(sub="h2")
    blocker = home / "not-a-socket"
    blocker.write_text("x")
    p, _, err = detach(k2, "--socket", str(blocker), timeout=20)
    left = read_pid(k2.pidfile)
    if left:
        pids.append(left)
    assert p.returncode != 0 and "not a socket" in err, err
    assert not alive(left)


# -- unit files -----------------------------------------------------------------------
def verify(units: list[Path], *, user: bool, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = ["systemd-analyze", *(["--user"] if user else []), "verify", *map(str, units)]
    return run(argv, env, 60)


def test_system_units_verify_clean(home):
    """`systemd-analyze verify` passes kanband.service and kanband.socket (ExecStart pointed at the venv's kanband) with exit 0 and nothing on stderr."""
    d = home / "system"
    d.mkdir()
    for name in ("kanband.service", "kanband.socket"):
        shutil.copy(ROOT / "packaging" / "systemd" / name, d / name)
    svc = d / "kanband.service"
    assert "ExecStart=/usr/local/bin/kanband " in svc.read_text()
    svc.write_text(svc.read_text().replace("/usr/local/bin/kanband", str(VENV_BIN / "kanband")))
    r = verify([svc, d / "kanband.socket"], user=False, env=CLEAN_ENV)
    assert (r.returncode, r.stderr) == (0, ""), r


def test_user_units_verify_clean(home):
    """`systemd-analyze --user verify` passes the user kanband.service and kanband.socket (ExecStart pointed at the venv's kanband, a private XDG_RUNTIME_DIR) with exit 0 and nothing on stderr."""
    d = home / "user"
    d.mkdir()
    runtime = home / "xdg"
    runtime.mkdir(mode=0o700)
    os.chmod(runtime, 0o700)
    units = sorted((ROOT / "packaging" / "systemd" / "user").iterdir())
    assert {u.name for u in units} >= {"kanband.service", "kanband.socket"}
    for u in units:
        shutil.copy(u, d / u.name)
    svc = d / "kanband.service"
    assert "ExecStart=%h/.local/bin/kanband " in svc.read_text()
    svc.write_text(svc.read_text().replace("%h/.local/bin/kanband", str(VENV_BIN / "kanband")))
    r = verify([d / u.name for u in units], user=True,
               env={**CLEAN_ENV, "XDG_RUNTIME_DIR": str(runtime)})
    assert (r.returncode, r.stderr) == (0, ""), r


# -- journald ---------------------------------------------------------------------------
def test_journal_fields_priority_and_structured_fields():
    """journal_fields() maps info/warning/error to PRIORITY 6/4/3 and gives MESSAGE, SYSLOG_IDENTIFIER=kanband and TASK_ID/RUN_ID/PID/PROFILE from the event's keys."""
    for level, prio in (("info", "6"), ("warning", "4"), ("error", "3")):
        f = dict(logs.journal_fields({"event": "worker_exited", "level": level,
                                      "timestamp": "2030-01-01T00:00:00Z", "task_id": "t_1",
                                      "run_id": "r_2", "pid": 4242, "profile": "coder",
                                      "exit_code": 0}))
        assert f["PRIORITY"] == prio
        assert f["SYSLOG_IDENTIFIER"] == "kanband"
        assert f["MESSAGE"].startswith("worker_exited") and "task_id=t_1" in f["MESSAGE"]
        assert (f["TASK_ID"], f["RUN_ID"], f["PID"], f["PROFILE"]) == ("t_1", "r_2", "4242", "coder")
        assert "TIMESTAMP" not in f and "LEVEL" not in f


def test_encode_journal_round_trips_multiline_values():
    """encode_journal() writes KEY=value lines, and a value holding a newline in the length-prefixed binary form; decoding gives the fields back."""
    fields = [("MESSAGE", "gave_up task_id=t_1\nTraceback (most recent call last):\n  x"),
              ("PRIORITY", "4"), ("TASK_ID", "t_1"), ("NOTE", "ünïcode = fine")]
    data = logs.encode_journal(fields)
    assert data.startswith(b"MESSAGE\n" + struct.pack("<Q", len(fields[0][1].encode())))
    assert b"PRIORITY=4\n" in data and b"TASK_ID=t_1\n" in data
    assert decode_journal(data) == fields


def test_journal_logger_sends_native_datagrams(home, capfd):
    """JournalLogger sends one native-protocol datagram per event to the journal socket, and a JSON line on stderr when that socket is missing."""
    path = home / "journal.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    rx.settimeout(5)
    try:
        logs.JournalLogger(str(path)).msg(event="run_timed_out", level="warning", task_id="t_9",
                                          run_id="r_9", pid=7, profile="coder",
                                          exception="Traceback\n  boom")
        got = dict(decode_journal(rx.recv(65536)))
    finally:
        rx.close()
    assert got["PRIORITY"] == "4" and got["TASK_ID"] == "t_9" and got["PROFILE"] == "coder"
    assert got["MESSAGE"].startswith("run_timed_out") and got["MESSAGE"].endswith("Traceback\n  boom")
    logs.JournalLogger(str(home / "absent.sock")).msg(event="health", level="info", ready=1)
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line) == {"event": "health", "level": "info", "ready": 1}


def test_under_journal_follows_journal_stream(home, monkeypatch):
    """The automatic format is journal exactly when $JOURNAL_STREAM names stderr's device:inode."""
    with open(home / "stream", "w") as f, open(home / "other", "w") as g:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.under_journal(f) and logs.choose_format("auto", f) == "journal"
        assert not logs.under_journal(g) and logs.choose_format("auto", g) == "json"
        assert logs.choose_format("console", f) == "console"
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not logs.under_journal(f)


def test_journal_format_without_journald_falls_back_to_json(make):
    """With --log-format journal and no journald socket, kanband keeps working and logs its key events as JSON lines on stderr, with the task's fields."""
    if os.path.exists(logs.JOURNAL_SOCKET):
        pytest.skip(f"journald listens at {logs.JOURNAL_SOCKET}: the fallback cannot be observed")
    k = make()
    k.start("--log-format", "journal")  # the last --log-format wins
    tid = k.create("journal", assignee="shell", body="echo hi")["id"]
    assert k.wait_status(tid, "done")["result"] == "hi"
    assert k.stop() == 0
    events = k.log_events()
    lines = [l for l in k.log_text().splitlines() if l.strip()]
    assert len(events) == len(lines), "every log line is a JSON object"
    names = [e.get("event") for e in events]
    for want in ("started", "ready", "worker_spawned", "worker_exited", "stopped"):
        assert want in names, names
    spawned = next(e for e in events if e.get("event") == "worker_spawned")
    assert spawned["task_id"] == tid and spawned["profile"] == "shell" and spawned["level"] == "info"
