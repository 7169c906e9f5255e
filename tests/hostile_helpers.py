"""Helpers for the hostile-input suites (test_fuzz, test_access, test_bad_input):
hand-built msgpack frames, a raw exchange on a fresh connection that classifies
what the daemon owes us, clients run as another uid, and a board snapshot that
also covers the daemon's switches."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conftest import ROOT, Kanband, snapshot
from kanband.errors import CODES

MIB = 1024 * 1024
CAP = 8 * MIB  # the daemon's per-message buffer cap (kanband.protocol.MAX_BUFFER)
STABLE_CODES = frozenset(CODES)
# Codes a client may get for input it got wrong: never `internal`.
BAD_INPUT_CODES = STABLE_CODES - {"internal"}
NOBODY = 65534


# -- frames ----------------------------------------------------------------------------
def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def raw_str(data: bytes) -> bytes:
    """A msgpack *str* holding exactly `data` (which need not be valid UTF-8)."""
    n = len(data)
    if n < 32:
        head = bytes([0xA0 | n])
    elif n < 2 ** 8:
        head = b"\xd9" + n.to_bytes(1, "big")
    elif n < 2 ** 16:
        head = b"\xda" + n.to_bytes(2, "big")
    else:
        head = b"\xdb" + n.to_bytes(4, "big")
    return head + data


PLACEHOLDER = "\x01@@kb-placeholder@@\x01"


def splice(obj: Any, raw: bytes) -> bytes:
    """Pack `obj` with the one PLACEHOLDER string in it replaced by the bytes `raw`
    (an already-encoded msgpack value)."""
    frame = pack(obj)
    ph = pack(PLACEHOLDER)
    assert frame.count(ph) == 1, "exactly one placeholder expected"
    return frame.replace(ph, raw)


def nested(depth: int, kind: str = "list") -> bytes:
    """`depth` nested one-element arrays (or {"k": ...} maps) around a nil, as raw bytes."""
    unit = b"\x91" if kind == "list" else b"\x81\xa1k"
    return unit * depth + b"\xc0"


def daemon_unpacker() -> msgpack.Unpacker:
    """An unpacker with the daemon's settings (kanband.protocol.unpacker)."""
    return msgpack.Unpacker(raw=False, max_buffer_size=CAP, strict_map_key=True, use_list=True)


def classify(frame: bytes) -> tuple[str, Any]:
    """What SPEC §5 says the daemon owes for one complete frame:
    ("request", msgid) for a well-formed request [0, u32, method, params];
    ("notification", None) for a client notification [2, x, y] (no answer);
    ("fatal", None) for anything else (an `error` notification, then close)."""
    u = daemon_unpacker()
    u.feed(frame)
    try:
        msgs = list(u)
    except Exception:
        return "fatal", None
    if len(msgs) != 1:
        return "fatal", None
    m = msgs[0]
    if isinstance(m, list) and len(m) == 3 and m[0] == 2 and not isinstance(m[0], bool):
        return "notification", None
    if isinstance(m, list) and len(m) == 4 and m[0] == 0 and not isinstance(m[0], bool):
        msgid = m[1]
        if isinstance(msgid, int) and not isinstance(msgid, bool) and 0 <= msgid < 2 ** 32:
            return "request", msgid
    return "fatal", None


# -- talking -------------------------------------------------------------------------
class Conn:
    """A raw connection that keeps every message it reads, with a deadline per read."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                         max_buffer_size=256 * MIB)
        self.eof = False

    def send(self, data: bytes) -> bool:
        """Send everything; False if the daemon closed the connection first."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def shut_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def next(self) -> Any:
        """The next message, or None at EOF."""
        while True:
            for m in self.unpacker:
                return m
            if self.eof:
                return None
            try:
                data = self.sock.recv(1024 * 1024)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            else:
                self.unpacker.feed(data)

    def until_eof(self) -> list[Any]:
        out = []
        while (m := self.next()) is not None:
            out.append(m)
        return out

    def answer(self, msgid: int) -> tuple[Any, list[Any]]:
        """Read until the response to `msgid`, skipping pushed notifications other than
        `error`; returns (response or None if it never came, everything read)."""
        seen = []
        while True:
            m = self.next()
            if m is None:
                return None, seen
            seen.append(m)
            if isinstance(m, list) and len(m) == 4 and m[0] == 1 and m[1] == msgid:
                return m, seen
            if isinstance(m, list) and len(m) == 3 and m[0] == 2 and m[1] == "error":
                return None, seen

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ping(path: str | os.PathLike[str], timeout: float = 10.0) -> None:
    """A brand-new well-behaved client gets system.ping answered."""
    with Conn(path, timeout) as c:
        c.send(pack([0, 4242, "system.ping", [{}]]))
        m, seen = c.answer(4242)
        assert m is not None and m[2] is None and m[3]["pong"] is True, \
            f"system.ping was not answered after the last input; got {seen!r}"


def check_response(msg: Any, msgid: int, what: Any) -> None:
    """`msg` answers `msgid` with a result or a stable, non-internal error."""
    assert msg is not None, f"no response to {what!r}"
    assert isinstance(msg, list) and len(msg) == 4 and msg[:2] == [1, msgid], (msg, what)
    err, result = msg[2], msg[3]
    if err is None:
        return
    assert result is None, (msg, what)
    assert isinstance(err, dict) and isinstance(err.get("message"), str), (err, what)
    assert err.get("code") in STABLE_CODES, (err, what)
    assert err["code"] != "internal", f"`internal` for bad input {short(what)}: {err}"


def check_fatal(msgs: list[Any], what: Any, code: str = "invalid_argument") -> None:
    """The daemon said why in one `error` notification (or said nothing), then closed."""
    assert len(msgs) <= 1, (msgs, what)
    if msgs:
        kind, method, params = msgs[0]
        assert (kind, method) == (2, "error"), (msgs, short(what))
        assert params[0]["code"] == code and params[0]["message"], (params, short(what))


def short(obj: Any, limit: int = 300) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# -- board state -------------------------------------------------------------------------
def full_snapshot(k: Kanband) -> dict[str, Any]:
    """snapshot() with runs, plus the daemon's switches (paused, profiles, config) and
    the notify subscriptions: equal = nothing was written anywhere."""
    snap = snapshot(k, runs=True)
    st = k.call("daemon.status")
    snap["daemon"] = {key: st[key] for key in ("paused", "profiles", "config", "max_workers")}
    snap["notify"] = k.call("notify.list")["subscriptions"]
    return snap


class CustomKanband(Kanband):
    """A Kanband started with extra environment variables and/or a given umask."""

    def __init__(self, home: Path, config: str | None = None,
                 extra_env: dict[str, str] | None = None, umask: int | None = None) -> None:
        super().__init__(home, config)
        self.extra_env = dict(extra_env or {})
        self.umask = umask

    @property
    def env(self) -> dict[str, str]:
        e = super().env
        e.update(self.extra_env)
        return e

    def start(self, *args: str, wait: bool = True) -> "CustomKanband":
        old = os.umask(self.umask) if self.umask is not None else None
        try:
            super().start(*args, wait=False)
        finally:
            if old is not None:
                os.umask(old)
        if wait:
            self.wait_ready()
        return self


# -- processes ------------------------------------------------------------------------
def rss(pid: int) -> int:
    import psutil
    return psutil.Process(pid).memory_info().rss


def num_fds(pid: int) -> int:
    import psutil
    return psutil.Process(pid).num_fds()


# -- other uids ---------------------------------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as "
                                "another uid (setpriv) and to chown the socket")
needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None,
                                   reason="setpriv (util-linux) is not installed")

# Runs as the other uid: connect, send a ping, print what came back as hex (or the error).
_CLIENT = r"""
import os, socket, sys
print("IDS", os.getuid(), os.getgid(), *os.getgroups(), flush=True)
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT-ERROR", e.errno, e.strerror)
    sys.exit(0)
try:
    s.sendall(sys.stdin.buffer.read())
    s.shutdown(socket.SHUT_WR)
except OSError as e:
    pass
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
        if sys.argv[2] == "one" and len(data) > 0:
            break
except OSError:
    pass
print("GOT", data.hex())
"""


class OtherUidResult:
    def __init__(self, out: str) -> None:
        self.connect_error: str | None = None
        self.messages: list[Any] = []
        self.ids: list[int] = []
        for line in out.splitlines():
            if line.startswith("CONNECT-ERROR"):
                self.connect_error = line
            elif line.startswith("GOT "):
                self.messages = list(msgpack.Unpacker(
                    __import__("io").BytesIO(bytes.fromhex(line[4:])), raw=False))
            elif line.startswith("IDS"):
                self.ids = [int(x) for x in line.split()[1:]]

    def __repr__(self) -> str:
        return f"OtherUidResult(connect_error={self.connect_error}, ids={self.ids}, " \
               f"messages={short(self.messages)})"


_PYTHONS: list[str] = []


def other_python() -> str:
    """An interpreter uid 65534 can run (ours may live under a private home)."""
    if not _PYTHONS:
        for exe in (sys.executable, "/usr/bin/python3"):
            r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                "--clear-groups", exe, "-I", "-c", "print('ok')"],
                               capture_output=True, text=True, timeout=30, cwd="/")
            if r.returncode == 0 and r.stdout.strip() == "ok":
                _PYTHONS.append(exe)
                break
        else:
            _PYTHONS.append("")
    if not _PYTHONS[0]:
        pytest.skip("no Python interpreter that uid 65534 may run")
    return _PYTHONS[0]


def as_other_uid(sock: Path, data: bytes, uid: int = NOBODY, gid: int = NOBODY,
                 groups: list[int] | None = None, mode: str = "all") -> OtherUidResult:
    """Run a tiny client under setpriv as uid/gid (with exactly `groups` as supplementary
    groups): it connects to `sock`, sends `data`, half-closes and reads until EOF (or
    until the first bytes with mode="one")."""
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
    argv += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    argv += [other_python(), "-I", "-c", _CLIENT, str(sock), mode]
    r = subprocess.run(argv, input=data, capture_output=True, timeout=60, cwd="/")
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    assert r.returncode == 0, f"client as uid {uid} failed: {err}"
    res = OtherUidResult(out)
    assert res.ids and res.ids[0] == uid, f"setpriv did not switch uid: {out} {err}"
    return res


def spare_groups(n: int = 1) -> list[grp.struct_group]:
    """`n` existing groups that are not root's or nogroup, and that nobody is not in."""
    nobody = pwd.getpwuid(NOBODY).pw_name if _has_uid(NOBODY) else "nobody"
    out = []
    for g in sorted(grp.getgrall(), key=lambda g: g.gr_gid):
        if g.gr_gid in (0, NOBODY) or g.gr_gid >= 60000 or nobody in g.gr_mem:
            continue
        if re.fullmatch(r"[a-z_][a-z0-9_-]*", g.gr_name):
            out.append(g)
        if len(out) == n:
            return out
    pytest.skip(f"fewer than {n} spare groups in /etc/group to test socket_group with")


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def public_dir(base: Path, name: str = "pub") -> Path:
    """A directory another uid can traverse (mkdtemp homes are 0700)."""
    p = base / name
    p.mkdir(mode=0o755, exist_ok=True)
    os.chmod(p, 0o755)
    cur = p.parent
    while str(cur) not in ("/", "/tmp"):
        os.chmod(cur, os.stat(cur).st_mode | 0o005)
        cur = cur.parent
    return p


__all__ = ["MIB", "CAP", "STABLE_CODES", "BAD_INPUT_CODES", "NOBODY", "pack", "raw_str",
           "PLACEHOLDER", "splice", "nested", "daemon_unpacker", "classify", "Conn", "ping",
           "check_response", "check_fatal", "short", "full_snapshot", "CustomKanband", "rss",
           "num_fds", "needs_root", "needs_setpriv", "other_python", "as_other_uid",
           "spare_groups", "public_dir", "ROOT"]
