"""Hypothesis-driven fuzzing of the RPC socket (SPEC §5, §10; issue 7 item 2).

One daemon serves the whole module. Every example is sent on a fresh raw
connection; afterwards a well-behaved client must still get `system.ping`.
A frame with a valid request envelope [0, u32 msgid, method, params] must be
answered under its msgid with a result or a stable error code, never
`internal`; any other frame gets an `invalid_argument` error notification (or
nothing) and a close. Then load: 1,000 concurrent clients, 200 stalled
half-messages, and a client that never reads its answers.
"""

from __future__ import annotations

import math
import re
import resource
import selectors
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import ROOT, Kanband, wait_for
from hostile_helpers import (CAP, MIB, PLACEHOLDER, Conn, check_fatal, check_response,
                             classify, nested, num_fds, pack, ping, raw_str, rss, short,
                             splice)
from kanband.errors import KanbanError
from kanband.rpc import METHODS

FUZZ = dict(deadline=None, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large, HealthCheck.large_base_example])

METHOD_NAMES = sorted(METHODS)


def _param_names() -> list[str]:
    """Every parameter name a handler reads (scanned from the product), plus the implicit ones."""
    names = {"id", "metadata", "chat_id", "thread_id", "user_id", "run_token"}
    for f in (ROOT / "kanband").glob("*.py"):
        names.update(re.findall(
            r'p\.(?:str|text|int|number|duration|bool|str_list|metadata|task_id)\(\s*"([a-z_]+)"',
            f.read_text()))
    return sorted(names)


PARAM_NAMES = _param_names()


# -- the daemon and a small world for it ----------------------------------------------------
class World:
    """The module's daemon plus task ids in each status and a live run token."""

    def __init__(self, k: Kanband, tmp: Path) -> None:
        self.k = k
        self.backups = tmp / "bk"
        self.backups.mkdir()
        self.ids: list[str] = []
        self.token = ""

    def populate(self) -> None:
        k = self.k
        ready = k.create("ready one")["id"]
        triage = k.create("in triage", triage=True)["id"]
        blocked = k.create("blocked one")["id"]
        k.call("task.block", id=blocked, reason="fuzz")
        done = k.create("done one")["id"]
        k.call("task.complete", id=done, result="r")
        archived = k.create("archived one")["id"]
        k.call("task.archive", id=archived)
        running = k.create("claimed one")["id"]
        self.token = k.call("task.claim", id=running, ttl=3600)["token"]
        todo = k.create("child", parents=[ready])["id"]
        self.ids = [ready, triage, blocked, done, archived, running, todo]


@pytest.fixture(scope="module")
def fz() -> Any:
    """One kanband for the module whose only profile (`shell`) runs /bin/true, so fuzzed
    task bodies never execute; started with the common service soft fd limit (1024)."""
    tmp = Path(tempfile.mkdtemp(prefix="kbf", dir="/tmp"))
    k = Kanband(tmp / "h", '[daemon]\nkill_grace = "1s"\nexit_grace = "2s"\n'
                           'retry_backoff = "1s"\nretry_backoff_max = "2s"\n\n'
                           '[profiles.shell]\ncommand = ["/bin/true"]\n')
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        # systemd's default for services is LimitNOFILE=1024:524288; start the daemon
        # under the same soft limit (it inherits ours) so the fd tests mean something.
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        try:
            k.start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        w = World(k, tmp)
        w.populate()
        yield w
    finally:
        k.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def daemon_pid(w: World) -> int:
    assert w.k.proc is not None
    return w.k.proc.pid


# -- strategies ------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1),
                    st.floats(), st.text(max_size=20), st.binary(max_size=20))
exts = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))
keys = st.one_of(st.text(max_size=8), st.integers(-5, 5), st.binary(max_size=4), st.none(),
                 st.floats(allow_nan=False))
# Any msgpack value, map keys of any type (the daemon only accepts str/bin keys).
anything = st.recursive(scalars | exts, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(keys, c, max_size=4), max_leaves=12)
# Values with string keys only: these always get past the unpacker.
values = st.recursive(scalars | exts, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


def plausible(w: World) -> st.SearchStrategy[Any]:
    """Values a real client might send: ids (real and not), names, statuses, numbers,
    durations, lists of ids, metadata, the live run token."""
    ids = st.sampled_from(w.ids + ["t_deadbeef", "", "t_", "../../etc/passwd"])
    return st.one_of(
        ids, st.lists(ids, max_size=3),
        st.sampled_from(["shell", "none", "nobody-here", "ready", "done", "triage", "running",
                         "blocked,done", "1s", "2h", "0", "-1s", "soon", "scratch", "dir:/tmp",
                         "worktree", "worktree:/nonexistent", "dir:relative", "slack", w.token,
                         "kt_forged", "\x00", "a\nb"]),
        st.integers(-3, 5), st.sampled_from([0.0, 0.5, 2 ** 31, -(2 ** 31) - 1, 1e308, math.inf,
                                             math.nan, True, False, None]),
        st.dictionaries(st.text(max_size=5), values, max_size=3),
        st.text(max_size=40))


def params_for(w: World) -> st.SearchStrategy[dict[str, Any]]:
    """A map of random parameter names (known ones and junk) to random values."""
    return st.dictionaries(st.one_of(st.sampled_from(PARAM_NAMES), st.text(max_size=10)),
                           st.one_of(plausible(w), values), max_size=5)


# What each method reads, by kind of value (from kanband/board.py, streams.py, notify.py;
# test_schema_matches_the_daemon keeps this honest).
SCHEMA: dict[str, dict[str, str]] = {
    "system.ping": {}, "system.methods": {}, "daemon.status": {}, "board.stats": {},
    "board.assignees": {}, "daemon.pause": {}, "daemon.resume": {}, "daemon.reload": {},
    "task.create": {"title": "title", "body": "text", "assignee": "name", "parents": "ids",
                    "workspace": "workspace", "tenant": "name", "priority": "int",
                    "created_by": "name", "skills": "names", "idempotency_key": "name",
                    "max_runtime": "duration", "triage": "bool"},
    "task.list": {"status": "statuses", "assignee": "name", "tenant": "name",
                  "created_by": "name", "archived": "bool", "limit": "int"},
    "task.show": {"id": "id"}, "task.unblock": {"id": "id"}, "task.archive": {"id": "id"},
    "task.promote": {"id": "id"}, "task.reclaim": {"id": "id"}, "task.runs": {"id": "id"},
    "task.context": {"id": "id"},
    "task.assign": {"id": "id", "assignee": "name", "force": "bool"},
    "task.link": {"parent": "id", "child": "id"}, "task.unlink": {"parent": "id", "child": "id"},
    "task.claim": {"id": "id", "ttl": "number", "claimer": "name"},
    "task.comment": {"id": "id", "body": "text", "author": "name"},
    "task.complete": {"id": "id", "result": "text", "summary": "text", "metadata": "map"},
    "task.block": {"id": "id", "reason": "text"},
    "task.heartbeat": {"id": "id", "note": "text"},
    "board.dispatch": {"dry_run": "bool", "max": "int", "failure_limit": "int"},
    "task.log": {"id": "id", "tail": "int", "offset": "int"},
    "task.wait": {"ids": "ids", "timeout": "number"},
    "events.subscribe": {"since": "int", "kinds": "names", "task_id": "id",
                         "assignee": "name", "tenant": "name"},
    "events.unsubscribe": {"subscription": "int"},
    "notify.subscribe": {"task_id": "id", "platform": "name", "chat_id": "name",
                         "thread_id": "name", "user_id": "name"},
    "notify.list": {"task_id": "id"},
    "notify.unsubscribe": {"task_id": "id", "platform": "name", "chat_id": "name",
                           "thread_id": "name", "user_id": "name"},
    "board.gc": {"event_retention_days": "number", "log_retention_days": "number"},
    "board.backup": {"path": "name", "overwrite": "bool"},
}


def typed(w: World, kind: str) -> st.SearchStrategy[Any]:
    """Plausible values of one kind, edge cases included."""
    ids = st.sampled_from(w.ids + ["t_deadbeef", "", "t_", "T_" + w.ids[0][2:], w.ids[0] + " "])
    short_text = st.text(max_size=24)
    return {
        "id": ids,
        "ids": st.lists(ids, max_size=4),
        "title": st.one_of(short_text, st.sampled_from(["", "  ", "x" * 500, "x" * 501,
                                                        "a\nb", "\x00"])),
        "text": st.one_of(st.text(max_size=200), st.sampled_from(["", "x" * (256 * 1024 + 1)])),
        "name": st.one_of(st.sampled_from(["shell", "none", "nobody-here", "slack", "",
                                           "a,b", "x" * 201, "\x00", "a\nb"]), short_text),
        "names": st.lists(st.one_of(st.sampled_from(["created", "completed", "py", "a,b", ""]),
                                    short_text), max_size=4),
        "statuses": st.lists(st.sampled_from(["triage", "todo", "ready", "running", "blocked",
                                              "done", "archived", "bogus", ""]), max_size=3),
        "workspace": st.sampled_from(["scratch", "dir:/tmp", "dir:relative", "worktree",
                                      "worktree:/nonexistent", "bogus", "dir:", ""]),
        "int": st.one_of(st.integers(-3, 10), st.sampled_from([2 ** 31 - 1, 2 ** 31,
                                                               -(2 ** 31) - 1, 2 ** 62])),
        "number": st.one_of(st.integers(-2, 10), st.floats(allow_nan=True, allow_infinity=True)),
        "bool": st.booleans(),
        "duration": st.sampled_from(["1s", "90s", "30m", "2h", "1d", 300, 0, -5, "0", "soon",
                                     "5 minutes", 1e12, ""]),
        "map": st.dictionaries(st.text(max_size=6), values, max_size=4),
    }[kind]


REQUIRED = {"id", "title", "parent", "child", "ids", "task_id", "platform", "path",
            "subscription"}


def required(method: str) -> set[str]:
    """The parameters `method` cannot do without."""
    return (REQUIRED | ({"body"} if method == "task.comment" else set())) & set(SCHEMA[method])


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` seven times in eight, else `bad`."""
    return st.integers(0, 7).flatmap(lambda i: bad if i == 0 else good)


def schema_params(w: World, method: str) -> st.SearchStrategy[dict[str, Any]]:
    """Known parameters of `method` (required ones always, others present or not), mostly
    well typed, sometimes not; now and then the live run token (or a forged one) or one
    junk parameter."""
    fields = {name: mostly(typed(w, kind), values) for name, kind in SCHEMA[method].items()}
    must = required(method)
    required_fields = {k: v for k, v in fields.items() if k in must}
    optional = {k: v for k, v in fields.items() if k not in must}
    token = st.sampled_from([None] * 6 + [w.token, "kt_forged", "", 5])
    extra = mostly(st.just({}), st.dictionaries(st.text(max_size=8), values, min_size=1,
                                                max_size=1))

    def merge(t: tuple[dict[str, Any], Any, dict[str, Any]]) -> dict[str, Any]:
        out = {**t[2], **t[0]}
        if t[1] is not None:
            out["run_token"] = t[1]
        return out
    return st.tuples(st.fixed_dictionaries(required_fields, optional=optional), token,
                     extra).map(merge)


def tame(w: World, method: str, params: dict[str, Any], data: st.DataObject) -> None:
    """Keep fuzzed calls inside the test's sandbox: backups only go to the module's
    directory (or to paths that must be refused), and task.wait never waits unbounded."""
    if method == "board.backup" and isinstance(params.get("path"), str):
        params["path"] = data.draw(st.sampled_from([
            str(w.backups / "b.db"), str(w.backups), "/", "relative.db", "",
            str(w.backups / "missing" / "b.db"), str(w.k.home / "kanban.db"),
            str(w.k.home / "kanban.db-wal"), str(w.backups / "b.db") + "\x00x"]), "path")
    if method == "task.wait" and not isinstance(params.get("timeout"), (str, list, dict, bool)):
        params["timeout"] = data.draw(st.sampled_from([0, 0.05, -1, 1e308, math.nan]), "timeout")


def exchange(w: World, frame: bytes, what: Any) -> None:
    """Send one frame on a fresh connection and check what SPEC §5 says it is owed."""
    kind, msgid = classify(frame)
    with Conn(w.k.socket) as c:
        sent = c.send(frame)
        if kind == "request":
            assert sent, f"the daemon closed before reading a valid request {short(what)}"
            msg, seen = c.answer(msgid)
            assert msg is not None, f"no answer to {short(what)}; got {short(seen)}"
            check_response(msg, msgid, what)
            event(f"answered: {msg[2]['code'] if msg[2] else 'result'}")
        elif kind == "notification":
            c.send(pack([0, 99, "system.ping", [{}]]))
            msg, seen = c.answer(99)
            assert msg is not None and msg[2] is None, \
                f"a client notification {short(what)} closed the connection: {short(seen)}"
        else:
            c.shut_write()
            check_fatal(c.until_eof(), what)
        event(f"frame: {kind}")
    ping(w.k.socket)


def request_frame(method: Any, params: Any, msgid: int = 1) -> bytes:
    return pack([0, msgid, method, params])


# -- envelopes ---------------------------------------------------------------------------------
msgids = st.one_of(st.integers(0, 2 ** 32 - 1), st.integers(-(2 ** 63), 2 ** 64 - 1), values)
methods = st.one_of(st.sampled_from(METHOD_NAMES), st.text(max_size=30), values)
param_shapes = st.one_of(st.lists(st.dictionaries(st.text(max_size=12), values, max_size=4),
                                  max_size=2), st.just([]), values)


@settings(max_examples=250, **FUZZ)
@given(obj=st.one_of(
    st.tuples(st.just(0), msgids, methods, param_shapes).map(list),
    st.tuples(st.integers(-2, 3), msgids, methods, param_shapes).map(list),
    st.lists(anything, max_size=6),
    anything))
@example(obj=[0, 1, "system.ping", [{1: 2}]])
@example(obj=[0, True, "system.ping", [{}]])
@example(obj=[0, 1, True, [{}]])
@example(obj=[0, 1, "system.ping", [None]])
@example(obj=[0, 1, "system.ping", {"a": 1}])
@example(obj=[0, 1, "task.create", [{"title": msgpack.ExtType(5, b"\x00" * 3)}]])
@example(obj=[2, "x", "not a list"])
@example(obj=[1, 1, None, None])
def test_wrong_typed_envelopes(fz, obj):
    """Any msgpack value as a frame (msgid, method and params of every type, nested garbage): a valid request envelope is answered under its msgid with a stable non-internal code, anything else is refused and closed, and ping still works."""
    try:
        frame = pack(obj)
    except (ValueError, TypeError, OverflowError):
        return  # not representable in msgpack at all
    exchange(fz, frame, obj)


@pytest.mark.parametrize("method", METHOD_NAMES)
@settings(max_examples=25, **FUZZ)
@given(data=st.data())
def test_random_requests_to_every_method(fz, method, data):
    """Valid-looking requests with random params to each method are answered under their msgid with a result or a stable non-internal error, and the daemon keeps serving."""
    params = data.draw(st.one_of(schema_params(fz, method), schema_params(fz, method),
                                 schema_params(fz, method), params_for(fz)), "params")
    tame(fz, method, params, data)
    exchange(fz, request_frame(method, [params], msgid=data.draw(st.integers(0, 2 ** 32 - 1))),
             (method, params))


def test_schema_matches_the_daemon(fz):
    """Every method has a fuzzing schema, and the daemon knows every parameter in it."""
    assert sorted(SCHEMA) == METHOD_NAMES
    sample = {"id": "t_00000000", "ids": ["t_00000000"], "title": "schema check", "text": "x",
              "name": "x", "names": ["created"], "statuses": ["ready"], "workspace": "scratch",
              "int": 1, "number": 1, "bool": False, "duration": "1s", "map": {}}
    for method, fields in SCHEMA.items():
        must = {n: sample[kind] for n, kind in fields.items() if n in required(method)}
        for name, kind in fields.items():
            try:  # with the required ones present the handler reaches its unknown-name check
                fz.k.call(method, **{**must, name: sample[kind], "no_such_param_zz": 1})
            except KanbanError as e:
                assert f"unknown parameter {name!r}" not in e.message, (method, e.message)
                assert "no_such_param_zz" in e.message or e.code != "invalid_argument", \
                    (method, name, e.message)


@settings(max_examples=100, **FUZZ)
@given(name=st.text(min_size=0, max_size=200).filter(lambda s: s not in METHODS))
@example(name="")
@example(name="system.ping\x00")
@example(name="SYSTEM.PING")
@example(name="system.ping ")
@example(name="__init__")
@example(name="board._reclaim")
@example(name="rpc.methods")
def test_unknown_methods(fz, name):
    """An unknown method name is `method_not_found` and the same connection keeps working."""
    with Conn(fz.k.socket) as c:
        c.send(request_frame(name, [{}], msgid=5))
        msg, seen = c.answer(5)
        assert msg is not None and msg[2] is not None, (name, seen)
        assert msg[2]["code"] == "method_not_found", (name, msg)
        c.send(request_frame("system.ping", [{}], msgid=6))
        msg, seen = c.answer(6)
        assert msg is not None and msg[2] is None, (name, seen)


# -- byte level --------------------------------------------------------------------------------
@settings(max_examples=150, **FUZZ)
@given(data=st.data(), complete=st.integers(0, 3))
def test_truncated_frames(fz, data, complete):
    """Whole pings followed by a valid request cut at a random point, then a half-close: the pings are answered, the cut request is not, the connection is closed, and others are served."""
    method = data.draw(st.sampled_from(METHOD_NAMES), "method")
    params = data.draw(params_for(fz), "params")
    tame(fz, method, params, data)
    frame = request_frame(method, [params], msgid=77)
    cut = data.draw(st.integers(1, len(frame) - 1), "cut")
    pings = b"".join(request_frame("system.ping", [{}], msgid=i) for i in range(complete))
    with Conn(fz.k.socket) as c:
        c.send(pings + frame[:cut])
        c.shut_write()
        msgs = c.until_eof()
    answers = [m for m in msgs if m[0] == 1]
    assert [m[1] for m in answers] == list(range(complete)), short(msgs)
    assert all(m[2] is None for m in answers), short(msgs)
    rest = [m for m in msgs if m[0] != 1]
    check_fatal(rest, (method, params, cut))
    ping(fz.k.socket)


@settings(max_examples=100, **FUZZ)
@given(data=st.data())
def test_truncated_frame_then_hard_close(fz, data):
    """A client that sends part of a frame and closes without reading leaves the daemon serving."""
    params = data.draw(params_for(fz), "params")
    frame = request_frame(data.draw(st.sampled_from(METHOD_NAMES)), [params])
    cut = data.draw(st.integers(1, len(frame) - 1), "cut")
    c = Conn(fz.k.socket)
    c.send(frame[:cut])
    c.close()
    ping(fz.k.socket)


@settings(max_examples=200, **FUZZ)
@given(blob=st.binary(min_size=1, max_size=4096))
@example(blob=b"\xc1")
@example(blob=b"\xdb\xff\xff\xff\xff")  # a str claiming 4 GiB
@example(blob=b"\xdd\xff\xff\xff\xff")  # an array claiming 4 billion items
@example(blob=b"\xdf\xff\xff\xff\xff")  # a map claiming 4 billion pairs
@example(blob=b"\xc6\x7f\xff\xff\xff")  # a bin claiming 2 GiB
@example(blob=b"\xd7\xff" + b"\x00" * 8)  # a timestamp ext
@example(blob=b"\xc7\x03\xff\x00\x00\x00")  # a timestamp ext of a bad length
@example(blob=b"\x00" * 4096)
@example(blob=b"\x94\x00\x01\xabsystem.ping\x91\x80" * 3)
def test_random_bytes(fz, blob):
    """Random bytes followed by a half-close get only well-formed answers with stable non-internal codes (or an error notification), then a close; the daemon keeps serving."""
    with Conn(fz.k.socket) as c:
        c.send(blob)
        c.shut_write()
        msgs = c.until_eof()
    for m in msgs:
        assert isinstance(m, list) and m and m[0] in (1, 2), short(m)
        if m[0] == 1:
            check_response(m, m[1], blob)
        else:
            assert m[1] in ("error", "event", "live"), short(m)
            if m[1] == "error":
                assert m[2][0]["code"] in ("invalid_argument", "too_large"), short(m)
    ping(fz.k.socket)


# -- deep nesting --------------------------------------------------------------------------------
POSITIONS = [
    ("frame", None, None), ("params", None, None), ("task.create", "title", None),
    ("task.create", "triage", None), ("task.create", "parents", "item"),
    ("task.create", "skills", None), ("task.claim", "ttl", None),
    ("task.list", "archived", None), ("task.list", "limit", None),
    ("task.wait", "timeout", None), ("task.list", "no_such_param", None),
    ("system.ping", "run_token", None), ("events.subscribe", "kinds", "item"),
    ("task.complete", "metadata", "value"),
]


@settings(max_examples=120, **FUZZ)
@given(depth=st.integers(1, 12_000), kind=st.sampled_from(["list", "map"]),
       pos=st.sampled_from(POSITIONS))
@example(depth=10_000, kind="list", pos=("frame", None, None))
@example(depth=10_000, kind="map", pos=("params", None, None))
@example(depth=1020, kind="list", pos=("task.claim", "ttl", None))
@example(depth=1000, kind="list", pos=("task.create", "triage", None))
@example(depth=1000, kind="list", pos=("task.complete", "metadata", "value"))
@example(depth=1000, kind="list", pos=("task.create", "parents", "item"))
def test_deeply_nested_messages(fz, depth, kind, pos):
    """Values nested up to 12,000 deep, as the whole frame or inside params: past msgpack's stack limit the frame is refused and closed; below it the request is answered without `internal`."""
    method, key, where = pos
    deep = nested(depth, kind)
    if method == "frame":
        frame = deep
    elif method == "params":
        frame = splice([0, 3, "task.list", PLACEHOLDER], deep)
    else:
        params: dict[str, Any] = {}
        if method == "task.create":
            params["title"] = "deep"
        elif method == "task.claim":
            params["id"] = "t_deadbeef"
        elif method == "task.wait":
            params["ids"] = [fz.ids[3]]
        elif method == "task.complete":
            tid = fz.k.create("deep metadata")["id"]
            params["id"] = tid
            params["run_token"] = fz.k.call("task.claim", id=tid)["token"]
        value: Any = PLACEHOLDER
        if where == "item":
            value = [PLACEHOLDER]
        elif where == "value":
            value = {"deep": PLACEHOLDER}
        params[key] = value
        frame = splice([0, 3, method, [params]], deep)
    exchange(fz, frame, (pos, kind, depth))


# -- huge strings ----------------------------------------------------------------------------------
HUGE_TARGETS = [("task.create", "title"), ("task.create", "body"), ("task.create", "assignee"),
                ("task.comment", "body"), ("task.list", "tenant"), ("task.list", "pad"),
                ("task.create", "triage"), ("system.ping", "run_token"), ("method", None),
                ("board.backup", "path"), ("task.show", "id"), ("task.create", "skills")]


@settings(max_examples=14, **FUZZ)
@given(size=st.integers(MIB, 7 * MIB + 900 * 1024), target=st.sampled_from(HUGE_TARGETS),
       fill=st.sampled_from(["x", "é", "\x00", "\U0001F600"]))
@example(size=CAP - 200, target=("task.create", "body"), fill="x")
@example(size=7 * MIB, target=("method", None), fill="x")
def test_huge_strings(fz, size, target, fill):
    """1-7.9 MiB strings (ASCII, multi-byte, NUL, emoji) in params or as the method name are answered under their msgid without `internal`, inside the 8 MiB cap."""
    text = fill * (size // len(fill.encode()))
    method, key = target
    if method == "method":
        frame = request_frame(text, [{}], msgid=11)
    else:
        params: dict[str, Any] = {"title": "huge"} if method == "task.create" else {}
        if method == "task.comment":
            params["id"] = fz.ids[0]
        params[key] = [text] if key == "skills" else text
        frame = request_frame(method, [params], msgid=11)
    assert len(frame) <= CAP
    exchange(fz, frame, (target, fill, size))


@pytest.mark.parametrize("value,what", [
    ("x" * (7 * MIB), "a 7 MiB string"),
    ([None] * (7 * MIB), "7 Mi nils"),
    ([{}] * (7 * MIB), "7 Mi empty maps"),
], ids=["string", "nils", "maps"])
def test_error_for_a_huge_wrong_value_is_short(fz, value, what):
    """A 7 MiB value of the wrong type gets a short error (under 64 KiB), not the value echoed back or blown up by repr."""
    frame = request_frame("task.create", [{"title": "x", "triage": value}], msgid=12)
    assert len(frame) < CAP
    before = rss(daemon_pid(fz))
    with Conn(fz.k.socket, timeout=60) as c:
        c.send(frame)
        msg, seen = c.answer(12)
    assert msg is not None and msg[2] is not None, short(seen)
    assert msg[2]["code"] == "invalid_argument", short(msg)
    size = len(pack(msg))
    growth = rss(daemon_pid(fz)) - before
    assert size < 64 * 1024, \
        f"{what} in `triage` got a {size}-byte error (daemon RSS +{growth >> 20} MiB): " \
        f"{msg[2]['message'][:120]}..."
    ping(fz.k.socket)


# -- text encodings --------------------------------------------------------------------------------
def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


bad_utf8 = st.one_of(
    st.sampled_from([b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                     b"\xf4\x90\x80\x80", b"abc\x80", b"\xe2\x82", b"ok\x00\xff",
                     b"\xf8\x88\x80\x80\x80"]),
    st.binary(min_size=1, max_size=64).filter(_invalid_utf8))


@settings(max_examples=120, **FUZZ)
@given(raw=bad_utf8, where=st.sampled_from(["method", "key", "value", "nested", "msgid",
                                            "notification", "token"]))
def test_invalid_utf8_in_str(fz, raw, where):
    """A msgpack str holding invalid UTF-8 (overlong, surrogates, truncated, stray bytes) anywhere in a frame gets an `invalid_argument` error notification and a close; the daemon keeps serving."""
    shapes = {
        "method": [0, 1, PLACEHOLDER, [{}]],
        "key": [0, 1, "task.create", [{"title": "x", PLACEHOLDER: 1}]],
        "value": [0, 1, "task.create", [{"title": PLACEHOLDER}]],
        "nested": [0, 1, "task.complete", [{"id": fz.ids[0], "metadata": {"a": [PLACEHOLDER]}}]],
        "msgid": [0, PLACEHOLDER, "system.ping", [{}]],
        "notification": [2, PLACEHOLDER, [{}]],
        "token": [0, 1, "task.heartbeat", [{"id": fz.ids[5], "run_token": PLACEHOLDER}]],
    }
    frame = splice(shapes[where], raw_str(raw))
    assert classify(frame)[0] == "fatal"
    exchange(fz, frame, (where, raw))


text_with_nul = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60) \
    .map(lambda s: s + "\x00" if "\x00" not in s else s)


@settings(max_examples=120, **FUZZ)
@given(data=st.data(), text=text_with_nul)
def test_nul_bytes_in_every_string_param(fz, data, text):
    """Strings holding NUL in any parameter of any method are answered without `internal`."""
    method = data.draw(st.sampled_from(METHOD_NAMES), "method")
    params = data.draw(params_for(fz), "params")
    params[data.draw(st.sampled_from(PARAM_NAMES), "key")] = text
    tame(fz, method, params, data)
    exchange(fz, request_frame(method, [params], msgid=21), (method, params))


@settings(max_examples=80, **FUZZ)
@given(field=st.sampled_from(["body", "comment", "result", "summary"]),
       text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1,
                    max_size=200))
def test_text_is_stored_exactly_or_refused(fz, field, text):
    """Any Unicode text (NUL, control characters, emoji, RTL marks) in a body, comment, result or summary is either refused as `invalid_argument` or returned byte for byte."""
    k = fz.k
    try:
        if field == "body":
            tid = k.create("text", body=text)["id"]
            got = k.task(tid)["body"]
        elif field == "comment":
            tid = k.create("text")["id"]
            k.call("task.comment", id=tid, body=text)
            got = k.call("task.show", id=tid)["comments"][-1]["body"]
        else:
            tid = k.create("text")["id"]
            tok = k.call("task.claim", id=tid)["token"]
            k.call("task.complete", id=tid, token=tok, **{field: text})
            got = k.task(tid)["result"] if field == "result" else \
                k.call("task.runs", id=tid)["runs"][-1]["summary"]
    except KanbanError as e:
        assert e.code == "invalid_argument", (field, text, e.code, e.message)
        return
    assert got == text, (field, text, got)


# -- load ---------------------------------------------------------------------------------------------
@pytest.fixture
def many_fds() -> Any:
    """Raise this process's soft RLIMIT_NOFILE so it can hold a few thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4096))
    if want < 2200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _connect(path: Path, deadline: float) -> socket.socket:
    """Connect, retrying while the listen backlog is full (EAGAIN) until the deadline."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _connect_many(path: Path, n: int, deadline_s: float = 60.0) -> list[socket.socket]:
    """n connections open at once (fails if the daemon stops accepting for a minute)."""
    socks: list[socket.socket] = []
    end = time.monotonic() + deadline_s
    try:
        for _ in range(n):
            socks.append(_connect(path, end))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _answers(socks: list[socket.socket], msgid_of: dict[int, int], deadline_s: float) -> dict[int, Any]:
    """Read from every socket until each has its response, or the deadline passes."""
    sel = selectors.DefaultSelector()
    unp = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        unp[s.fileno()] = msgpack.Unpacker(raw=False)
    got: dict[int, Any] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(got) < len(socks) and time.monotonic() < end:
            for key, _ in sel.select(timeout=0.5):
                s = key.fileobj
                fd = s.fileno()
                try:
                    data = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    got[fd] = e
                    sel.unregister(s)
                    continue
                if not data:
                    got.setdefault(fd, "closed")
                    sel.unregister(s)
                    continue
                unp[fd].feed(data)
                for m in unp[fd]:
                    if isinstance(m, list) and m[:2] == [1, msgid_of[fd]]:
                        got[fd] = m
    finally:
        sel.close()
    return got


def test_thousand_concurrent_connections(fz, many_fds):
    """1,000 clients connecting at once, the way kanband.protocol.Client does (a connect with a timeout), are all accepted and each gets its ping answered, from a daemon started with the usual 1024 soft fd limit."""
    pid = daemon_pid(fz)
    limit = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)
    socks: list[socket.socket] = []
    refused: list[str] = []
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            try:
                s.connect(str(fz.k.socket))
                socks.append(s)
            except OSError as e:
                s.close()
                refused.append(e.strerror or str(e))
        msgid_of = {}
        for i, s in enumerate(socks):
            msgid_of[s.fileno()] = i
            s.sendall(request_frame("system.ping", [{}], msgid=i))
        got = _answers(socks, msgid_of, 60)
        ok = [m for m in got.values() if isinstance(m, list) and m[2] is None]
        held = num_fds(pid)
    finally:
        for s in socks:
            s.close()
    log = [e for e in fz.k.log_text().splitlines() if "out of system resource" in e][:1]
    assert not refused, \
        f"{len(refused)} of 1000 connects failed ({sorted(set(refused))}): the listen backlog " \
        f"overflowed while the daemon was accepting; kanbanctl reports this as 'daemon unreachable'"
    assert len(ok) == 1000, \
        f"only {len(ok)} of 1000 concurrent pings answered; daemon RLIMIT_NOFILE {limit}, " \
        f"daemon fds {held}; daemon log: {log}"
    ping(fz.k.socket)


def test_fd_exhaustion_is_survived(fz, many_fds):
    """When the daemon runs out of file descriptors, clients over the limit wait or are turned away, and once they go the daemon serves new clients again."""
    proc = psutil.Process(daemon_pid(fz))
    old = proc.rlimit(psutil.RLIMIT_NOFILE)
    base = proc.num_fds()
    proc.rlimit(psutil.RLIMIT_NOFILE, (base + 40, old[1]))
    socks: list[socket.socket] = []
    try:
        for i in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            try:
                s.connect(str(fz.k.socket))
            except BlockingIOError:  # the backlog is full: the daemon cannot accept
                s.close()
                break
            socks.append(s)
            try:
                s.sendall(request_frame("system.ping", [{}], msgid=i))
            except OSError:
                pass
        assert len(socks) > 40  # more clients than the daemon had descriptors for
    finally:
        for s in socks:
            s.close()
        proc.rlimit(psutil.RLIMIT_NOFILE, old)
    wait_for(lambda: ping(fz.k.socket) is None, 20, "the daemon to serve again after fd exhaustion")
    assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    wait_for(lambda: num_fds(proc.pid) <= base + 5, 20,
             f"the daemon's fds to fall back near {base} after the clients left")


def test_stalled_half_messages(fz, many_fds):
    """200 clients that each send half of a request and stall do not stop a good client's pings, the daemon's RSS grows by less than 200 MiB, and their fds are released when they go."""
    pid = daemon_pid(fz)
    base_fds = num_fds(pid)
    before = rss(pid)
    frames = [request_frame("task.create", [{"title": f"stalled {i}", "body": "b" * 64 * 1024}],
                            msgid=i) for i in range(200)]
    socks = _connect_many(fz.k.socket, 200)
    try:
        for s, f in zip(socks, frames):
            s.sendall(f[:len(f) // 2])
        for _ in range(50):
            ping(fz.k.socket)
        growth = rss(pid) - before
        assert growth < 200 * MIB, f"daemon RSS grew by {growth >> 20} MiB"
        assert num_fds(pid) >= base_fds + 190  # the 200 really are held open
    finally:
        for s in socks:
            s.close()
    ping(fz.k.socket)
    wait_for(lambda: num_fds(pid) <= base_fds + 5, 20, "the stalled clients' fds to be released")
    titles = {t["title"] for t in fz.k.call("task.list", archived=True)["tasks"]}
    assert not any(t.startswith("stalled ") for t in titles), "a half request was executed"


def test_client_that_never_reads_does_not_stall_others(fz):
    """A client that pipelines thousands of requests with large answers and never reads them does not stop a good client's pings, and the daemon's RSS grows by less than 200 MiB."""
    k = fz.k
    pid = daemon_pid(fz)
    for i in range(300):  # give task.list a big answer (~300 tasks)
        k.create(f"filler {i}", body="f" * 400)
    before = rss(pid)
    batch = b"".join(request_frame("task.list", [{"archived": True}], msgid=i)
                     for i in range(2000))
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(str(k.socket))
    hog.settimeout(2)
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        while not stop.is_set():
            try:
                hog.sendall(batch)
                sent[0] += 2000
            except (socket.timeout, OSError):
                if stop.is_set():
                    return
    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        wait_for(lambda: sent[0] >= 2000, 30, "the hog to get its first batch in")
        peak = 0
        for _ in range(30):
            try:
                ping(k.socket, timeout=10)
            except TimeoutError:
                pytest.fail(f"a good client's ping got no answer within its 10 s deadline while "
                            f"another client pipelined {sent[0]} task.list requests without "
                            f"reading (daemon RSS +{(rss(pid) - before) >> 20} MiB)")
            peak = max(peak, rss(pid) - before)
        assert peak < 200 * MIB, f"daemon RSS grew by {peak >> 20} MiB for a client that " \
                                 f"sent {sent[0]} task.list requests and read nothing"
    finally:
        stop.set()
        hog.close()
        t.join(10)
    ping(k.socket)
