"""Access control (SPEC §1, §2, §5; issue 7 item 3): peers of another uid are
refused and logged, `socket_group` admits exactly its members, files have the
modes the docs promise even under a careless umask, a worker's run token
changes nothing but its own task and none of the board-wide switches, tokens
never reach the disk, and processes the daemon starts see no systemd variables.

Complements test_daemon (refusal of uid 65534 with a forked client, default
modes), test_claims (claim-token scoping over RPC, hashed claim tokens) and
test_supervision (the worker environment of a configured profile)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import WORKER, Kanband, rpc_error, wait_for
from hostile_helpers import (NOBODY, Conn, CustomKanband, as_other_uid, full_snapshot,
                             needs_root, needs_setpriv, pack, public_dir, spare_groups)

PING = pack([0, 1, "system.ping", [{}]])
CREATE = pack([0, 2, "task.create", [{"title": "from another uid"}]])


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def refusals(k: Kanband) -> list[dict[str, Any]]:
    return [e for e in k.log_events() if e.get("event") == "rpc_client_refused"]


def answered(res: Any) -> bool:
    """The other-uid client got a pong."""
    return any(m[:3] == [1, 1, None] and m[3].get("pong") for m in res.messages)


def forbidden_then_closed(res: Any) -> bool:
    """The other-uid client got one `forbidden` error notification and nothing else."""
    return (res.connect_error is None and len(res.messages) == 1
            and res.messages[0][:2] == [2, "error"]
            and res.messages[0][2][0]["code"] == "forbidden")


@pytest.fixture
def pub(home: Path) -> Path:
    """A directory uid 65534 can traverse, for sockets it must be able to reach."""
    return public_dir(home)


def start_on(k: Kanband, sock: Path) -> Kanband:
    k.socket = sock
    k.start("--socket", str(sock))
    return k


# -- other uids ------------------------------------------------------------------------------
@needs_root
@needs_setpriv
def test_other_uid_is_refused_before_anything_is_done(kanband_factory, pub):
    """A peer of uid 65534 on a world-writable socket that sends task.create gets one `forbidden` notification and a close, nothing is created, and the refusal is logged with its uid and gid."""
    k = start_on(kanband_factory('[daemon]\nsocket_mode = "0666"\n', start=False), pub / "k.sock")
    before = full_snapshot(k)
    res = as_other_uid(k.socket, CREATE + PING)
    assert forbidden_then_closed(res), res
    assert "65534" in res.messages[0][2][0]["message"]
    assert full_snapshot(k) == before
    logged = wait_for(lambda: refusals(k), 10, "rpc_client_refused in the log")
    assert logged[-1]["peer_uid"] == NOBODY and logged[-1]["peer_gid"] == NOBODY
    assert logged[-1]["peer_pid"] > 0
    with Conn(k.socket) as c:  # the owner is still served
        c.send(PING)
        assert c.answer(1)[0][2] is None


@needs_root
@needs_setpriv
def test_a_refused_peer_flooding_input_is_not_read(kanband_factory, pub):
    """A refused peer that sends 20 MiB of input is closed without the daemon buffering it, and the daemon serves its owner on."""
    k = start_on(kanband_factory('[daemon]\nsocket_mode = "0666"\n', start=False), pub / "k.sock")
    import psutil
    before = psutil.Process(k.proc.pid).memory_info().rss
    res = as_other_uid(k.socket, b"\x00" * (20 * 1024 * 1024), mode="one")
    assert res.connect_error is None
    assert res.messages and res.messages[0][:2] == [2, "error"], res
    assert res.messages[0][2][0]["code"] == "forbidden"
    grown = psutil.Process(k.proc.pid).memory_info().rss - before
    assert grown < 16 * 1024 * 1024, f"daemon RSS grew by {grown >> 20} MiB"
    assert k.call("system.ping")["pong"] is True


@needs_root
@needs_setpriv
def test_socket_group_admits_members_and_the_kernel_stops_others(kanband_factory, pub):
    """With socket_group G and socket_mode 0660 the socket file is group G mode 0660; a uid-65534 member of G is served, a non-member cannot even connect."""
    (g,) = spare_groups(1)
    k = start_on(kanband_factory(f'[daemon]\nsocket_mode = "0660"\nsocket_group = "{g.gr_name}"\n',
                                 start=False), pub / "k.sock")
    st = os.stat(k.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == g.gr_gid
    member = as_other_uid(k.socket, PING, groups=[g.gr_gid])
    assert answered(member), member
    outsider = as_other_uid(k.socket, PING)
    assert outsider.connect_error and "Permission denied" in outsider.connect_error, outsider
    assert not refusals(k)  # the kernel stopped the outsider; the member passed the check


@needs_root
@needs_setpriv
def test_socket_group_check_of_the_daemon_itself(kanband_factory, pub):
    """With socket_group G on a world-writable socket, the daemon's own peer check serves a member of G (as a supplementary or as its primary group) and refuses and logs a non-member."""
    (g,) = spare_groups(1)
    k = start_on(kanband_factory(f'[daemon]\nsocket_mode = "0666"\nsocket_group = "{g.gr_name}"\n',
                                 start=False), pub / "k.sock")
    assert answered(as_other_uid(k.socket, PING, groups=[g.gr_gid]))
    assert answered(as_other_uid(k.socket, PING, gid=g.gr_gid))
    before = full_snapshot(k)
    outsider = as_other_uid(k.socket, CREATE)
    assert forbidden_then_closed(outsider), outsider
    assert full_snapshot(k) == before
    logged = wait_for(lambda: refusals(k), 10, "rpc_client_refused in the log")
    assert logged[-1]["peer_uid"] == NOBODY


@needs_root
@needs_setpriv
def test_socket_files_own_group_is_admitted_at_0660(kanband_factory, pub):
    """Without socket_group, a 0660 socket whose file group is G (as kanband.socket's SocketGroup= makes it) admits members of G and nobody else."""
    g, other = spare_groups(2)
    k = start_on(kanband_factory('[daemon]\nsocket_mode = "0660"\n', start=False), pub / "k.sock")
    os.chown(k.socket, -1, g.gr_gid)
    assert answered(as_other_uid(k.socket, PING, groups=[g.gr_gid]))
    stranger = as_other_uid(k.socket, PING, groups=[other.gr_gid])
    assert stranger.connect_error and "Permission denied" in stranger.connect_error, stranger


@needs_root
@needs_setpriv
def test_reload_moves_socket_group_for_new_connections(kanband_factory, pub):
    """After socket_group changes from G1 to G2 and `kanbanctl reload`, members of G2 are admitted (docs/rpc.md, daemon.reload)."""
    g1, g2 = spare_groups(2)
    k = start_on(kanband_factory(f'[daemon]\nsocket_mode = "0666"\nsocket_group = "{g1.gr_name}"\n',
                                 start=False), pub / "k.sock")
    assert forbidden_then_closed(as_other_uid(k.socket, PING, groups=[g2.gr_gid]))
    k.write_config(f'[daemon]\nsocket_mode = "0666"\nsocket_group = "{g2.gr_name}"\n')
    r = k.ctl("--socket", str(k.socket), "reload")
    assert r.returncode == 0, r.stderr
    assert answered(as_other_uid(k.socket, PING, groups=[g2.gr_gid]))


# -- file modes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fresh", [True, False], ids=["home-it-creates", "existing-0755-home"])
def test_modes_under_a_permissive_umask(home, fresh):
    """Started with umask 000, kanband makes home (when it creates it), logs, runs and workspaces 0700 and the socket, database, -wal, -shm, worker logs and backups 0600: nothing it writes is group- or world-accessible outside a private directory."""
    if fresh:
        h = home / "fresh" / "h"  # the daemon creates it
        k = CustomKanband(home / "holder", umask=0o000)
        k.home, k.socket, k.log = h, h / "kanband.sock", home / "daemon.log"
        args: tuple[str, ...] = ("--home", str(h))
    else:
        k = CustomKanband(home / "h", umask=0o000)
        h = k.home
        os.chmod(h, 0o755)
        args = ()
    try:
        k.start(*args)
        tid = k.create("shell task", assignee="shell", body="echo hello")["id"]
        k.wait_status(tid, "done")
        claimed = k.create("claimed")["id"]
        k.call("task.claim", id=claimed)  # an external claim prepares a workspace too
        backup = home / "backup.db"
        k.call("board.backup", path=str(backup))
        if fresh:
            assert mode(h) == 0o700
        for d in ("logs", "runs", "workspaces"):
            assert mode(h / d) == 0o700, d
        for f in ("kanband.sock", "kanban.db", "kanban.db-wal", "kanban.db-shm"):
            assert (h / f).exists(), f
            assert mode(h / f) == 0o600, (f, oct(mode(h / f)))
        assert mode(h / "logs" / f"{tid}.log") == 0o600
        assert mode(backup) == 0o600
        ours = {h / "kanband.pid", h / "daemon.log", h / "kanband.toml"}  # pid is public
        exposed = [f"{p.relative_to(h)} {oct(mode(p))}" for p in h.rglob("*")
                   if not p.is_symlink() and p not in ours and mode(p) & 0o077
                   and _outside_private_dir(p, h)]
        assert not exposed, f"group/world-accessible and not under a 0700 directory: {exposed}"
    finally:
        k.cleanup()


def _outside_private_dir(p: Path, home: Path) -> bool:
    """No directory between home and p (home included) is private to the owner."""
    cur = p.parent
    while True:
        if mode(cur) & 0o077 == 0:
            return False
        if cur == home:
            return True
        cur = cur.parent


def test_logs_directory_from_the_environment_is_private(home):
    """A fresh $LOGS_DIRECTORY is created 0700 and worker logs in it are 0600, even under umask 000."""
    logs = home / "var-log-kanband"
    k = CustomKanband(home / "h", extra_env={"LOGS_DIRECTORY": str(logs)}, umask=0o000)
    try:
        k.start()
        tid = k.create("log me", assignee="shell", body="echo to the log")["id"]
        k.wait_status(tid, "done")
        assert mode(logs) == 0o700
        assert mode(logs / f"{tid}.log") == 0o600
        assert "to the log" in (logs / f"{tid}.log").read_text()
    finally:
        k.cleanup()


# -- a spawned worker's token ------------------------------------------------------------------
HOLDER = '''[daemon]
kill_grace = "2s"

[profiles.holder]
command = [{py}, {worker}, "--env-dump", {dump}, "--wait-file", {release}]
'''


@pytest.fixture
def held_worker(kanband_factory, home: Path) -> Any:
    """A daemon with one live worker (profile `holder`) that waits for a release file;
    yields (daemon, task id, the worker's env dump). The worker is released and, if need
    be, killed by process group at teardown."""
    scratch = home / "scratch"
    scratch.mkdir()
    dump, release = scratch / "env.json", scratch / "release"
    k = kanband_factory(HOLDER.format(py=json.dumps(sys.executable), worker=json.dumps(str(WORKER)),
                                      dump=json.dumps(str(dump)), release=json.dumps(str(release))))
    tid = k.create("held", assignee="holder")["id"]
    k.wait_status(tid, "running")
    d = wait_for(lambda: dump.exists() and json.loads(dump.read_text()), 15, "the worker's env dump")
    try:
        yield k, tid, d
    finally:
        release.touch()
        try:
            wait_for(lambda: k.task(tid)["worker_pid"] is None, 15, "the worker to exit")
        finally:
            try:
                os.killpg(d["pgid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_worker_token_changes_no_other_task_and_no_switch(held_worker, home):
    """`kanbanctl` run with a live worker's $KANBAN_RUN_TOKEN is refused (exit 1, nothing on stdout, nothing changed) for every status verb on another task and for dispatch, pause, resume, reload, gc and backup; the token still completes its own task."""
    k, tid, d = held_worker
    token = d["env"]["KANBAN_RUN_TOKEN"]
    assert d["env"]["KANBAN_TASK_ID"] == tid and token
    other = k.create("someone else's")["id"]
    running = k.create("running elsewhere")["id"]
    k.call("task.claim", id=running)
    blocked = k.create("blocked elsewhere")["id"]
    k.call("task.block", id=blocked)
    parked = k.create("parked", triage=True)["id"]
    parent = k.create("parent")["id"]
    linked = k.create("linked", parents=[parent])["id"]
    backup = home / "stolen.db"
    cases = [
        ["complete", other], ["block", other, "no"], ["heartbeat", running],
        ["unblock", blocked], ["archive", other], ["assign", other, "holder"],
        ["claim", other], ["reclaim", running], ["promote", parked], ["link", parent, other],
        ["unlink", parent, linked], ["dispatch"], ["pause"], ["resume"], ["reload"],
        ["gc"], ["backup", str(backup)],
    ]
    before = full_snapshot(k)
    for argv in cases:
        r = k.ctl(*argv, env={"KANBAN_RUN_TOKEN": token})
        assert r.returncode == 1, (argv, r.returncode, r.stdout, r.stderr)
        assert r.stdout == "" and r.stderr.strip(), (argv, r.stdout, r.stderr)
    assert full_snapshot(k) == before
    assert not backup.exists()
    for method, params in (
            ("task.complete", {"id": other}), ("task.block", {"id": other}),
            ("task.heartbeat", {"id": running}), ("task.reclaim", {"id": running}),
            ("task.promote", {"id": parked}), ("task.link", {"parent": parent, "child": other}),
            ("task.unlink", {"parent": parent, "child": linked}), ("board.dispatch", {}),
            ("daemon.pause", {}), ("daemon.resume", {}), ("daemon.reload", {}), ("board.gc", {})):
        assert rpc_error(k, method, token=token, **params).code == "forbidden", method
    assert rpc_error(k, "board.backup", path=str(backup), token=token).code == "forbidden"
    assert full_snapshot(k) == before
    r = k.ctl("complete", tid, "--summary", "own task", env={"KANBAN_RUN_TOKEN": token})
    assert r.returncode == 0, r.stderr
    assert k.task(tid)["status"] == "done"


def test_worker_token_is_never_written_anywhere(held_worker):
    """A spawned worker's token is in no file under the daemon's home (database, -wal, -shm, daemon log, worker log, run files) and in no answer about the task or the daemon."""
    k, tid, d = held_worker
    token = d["env"]["KANBAN_RUN_TOKEN"]
    claimed = k.create("claimed")["id"]
    claim_token = k.call("task.claim", id=claimed)["token"]
    k.call("task.heartbeat", id=tid, note="still here", token=token)
    k.call("task.comment", id=tid, body="a comment by the worker", token=token)
    assert (k.home / "kanban.db-wal").exists()
    leaks = []
    for f in k.home.rglob("*"):
        if f.is_file() and not f.is_symlink() and not f.is_socket():
            raw = f.read_bytes()
            for tok in (token, claim_token):
                if tok.encode() in raw:
                    leaks.append(str(f.relative_to(k.home)))
    assert not leaks, f"a run token was written to {leaks}"
    answers = json.dumps([k.call("task.show", id=tid), k.call("task.runs", id=tid),
                          k.call("daemon.status"), k.call("task.context", id=tid),
                          k.call("board.dispatch", dry_run=True),
                          k.call("task.list", archived=True)])
    assert token not in answers and claim_token not in answers


# -- the environment of what the daemon starts ----------------------------------------------
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES")


def systemd_env(home: Path) -> dict[str, str]:
    """What systemd puts in a service's environment (LISTEN_PID/WATCHDOG_PID for another pid, so
    the daemon neither adopts fd 3 nor pings), plus other WATCHDOG_*/LISTEN_* names."""
    return {"NOTIFY_SOCKET": str(home / "notify.sock"), "WATCHDOG_USEC": "30000000",
            "WATCHDOG_PID": "1", "LISTEN_FDS": "1", "LISTEN_PID": "1",
            "LISTEN_FDNAMES": "kanband.socket", "WATCHDOG_FUTURE": "x", "LISTEN_FUTURE": "y",
            "KB_KEEP_ME": "kept"}


@pytest.fixture
def notify_sink(home: Path) -> Any:
    """A datagram socket at $NOTIFY_SOCKET, so sd_notify messages have somewhere to go."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(home / "notify.sock"))
    yield s
    s.close()


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition("=")
        out[name] = value
    return out


def test_shell_worker_sees_no_systemd_variables(home, notify_sink):
    """A task of the built-in shell profile, run by a daemon that has NOTIFY_SOCKET, WATCHDOG_* and LISTEN_* in its environment, sees none of them (other variables pass through)."""
    out = home / "shell-env.txt"
    k = CustomKanband(home / "h", extra_env=systemd_env(home))
    try:
        k.start()
        tid = k.create("env", assignee="shell", body=f"env > {out}")["id"]
        k.wait_status(tid, "done")
        env = _env_file(out)
    finally:
        k.cleanup()
    assert env.get("KB_KEEP_ME") == "kept" and env.get("KANBAN_TASK_ID") == tid
    leaked = sorted(v for v in env if v in SYSTEMD_VARS or v.startswith(("WATCHDOG_", "LISTEN_")))
    assert not leaked, f"the shell worker saw {leaked} (SPEC §1: minus NOTIFY_SOCKET, " \
                       f"WATCHDOG_*, LISTEN_*)"


def test_notifier_command_sees_no_systemd_variables(home, notify_sink):
    """A [notifiers.X] command started by a daemon under systemd sees no NOTIFY_SOCKET, WATCHDOG_* or LISTEN_*, like a worker."""
    out = home / "notifier-env.txt"
    config = f'[notifiers.dump]\ncommand = ["/bin/sh", "-c", "env > {out}"]\n'
    k = CustomKanband(home / "h", config, extra_env=systemd_env(home))
    try:
        k.start()
        tid = k.create("notify me")["id"]
        k.call("notify.subscribe", task_id=tid, platform="dump")
        k.call("task.complete", id=tid, result="done")
        wait_for(lambda: out.exists() and out.stat().st_size > 0, 20, "the notifier to run")
        env = _env_file(out)
    finally:
        k.cleanup()
    assert env.get("KB_KEEP_ME") == "kept"
    leaked = sorted(v for v in env if v in SYSTEMD_VARS or v.startswith(("WATCHDOG_", "LISTEN_")))
    assert not leaked, f"the notifier command saw {leaked}"
