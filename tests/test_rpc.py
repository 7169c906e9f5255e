"""The msgpack-rpc surface (SPEC §5), spoken byte by byte on a raw socket:
message shapes, pipelining, stable error codes, and hostile input that is
answered and closed while the daemon keeps serving everyone else."""

from __future__ import annotations

import socket as _socket

import msgpack
import pytest

from conftest import RawConn
from kanband.errors import CODES

MIB = 1024 * 1024


def ping_ok(kd) -> None:
    """A brand-new connection still gets system.ping answered."""
    with RawConn(kd.socket) as c:
        c.request(7, "system.ping")
        msg = c.read()
        assert msg[:3] == [1, 7, None] and msg[3]["pong"] is True


def assert_error_notification_then_closed(conn: RawConn, code: str) -> dict:
    msgs = conn.read_until_eof()
    assert msgs, "the daemon closed the connection without saying why"
    assert len(msgs) == 1, msgs
    kind, method, params = msgs[0]
    assert (kind, method) == (2, "error"), msgs
    err = params[0]
    assert err["code"] == code and err["message"], err
    return err


def test_response_shape(shared_kd):
    """A request [0, msgid, method, [params]] gets [1, msgid, nil, result]; an error gets [1, msgid, {code, message}, nil]."""
    with RawConn(shared_kd.socket) as c:
        c.request(41, "system.ping")
        msg = c.read()
        assert isinstance(msg, list) and len(msg) == 4
        assert msg[0] == 1 and msg[1] == 41 and msg[2] is None
        assert msg[3]["pong"] is True and msg[3]["version"]
        c.request(42, "task.show", {"id": "t_00000000"})
        msg = c.read()
        assert msg[0] == 1 and msg[1] == 42 and msg[3] is None
        assert msg[2]["code"] == "not_found" and "t_00000000" in msg[2]["message"]
        assert set(msg[2]) <= {"code", "message", "data"}


def test_many_requests_in_flight_on_one_connection(shared_kd):
    """A hundred pipelined requests in one write are each answered once, under their own msgid."""
    frames = b""
    expected = {}
    for i in range(100):
        msgid = 1000 + i
        if i % 3 == 0:
            frames += msgpack.packb([0, msgid, "task.create", [{"title": f"pipelined {msgid}"}]])
            expected[msgid] = ("create", f"pipelined {msgid}")
        elif i % 3 == 1:
            frames += msgpack.packb([0, msgid, "task.show", [{"id": f"t_{msgid:08x}"}]])
            expected[msgid] = ("error", "not_found")
        else:
            frames += msgpack.packb([0, msgid, "system.ping", [{}]])
            expected[msgid] = ("ping", None)
    with RawConn(shared_kd.socket) as c:
        c.send_bytes(frames)
        got = {}
        for _ in range(100):
            kind, msgid, error, result = c.read()
            assert kind == 1 and msgid not in got
            got[msgid] = (error, result)
    assert set(got) == set(expected)
    for msgid, (what, value) in expected.items():
        error, result = got[msgid]
        if what == "create":
            assert error is None and result["task"]["title"] == value
        elif what == "error":
            assert result is None and error["code"] == value
        else:
            assert error is None and result["pong"] is True


def test_msgid_range_edges(shared_kd):
    """msgid 0 and 2**32-1 are echoed back unchanged."""
    with RawConn(shared_kd.socket) as c:
        for msgid in (0, 2 ** 32 - 1):
            c.request(msgid, "system.ping")
            assert c.read()[:3] == [1, msgid, None]


@pytest.mark.parametrize("msgid", [-1, 2 ** 32, "one", 1.5, None])
def test_bad_msgid_is_refused_and_closed(shared_kd, msgid):
    """A request whose msgid is not an unsigned 32-bit integer gets an error notification and the connection is closed."""
    with RawConn(shared_kd.socket) as c:
        c.send([0, msgid, "system.ping", [{}]])
        assert_error_notification_then_closed(c, "invalid_argument")
    ping_ok(shared_kd)


def test_unknown_method(shared_kd):
    """An unknown method is `method_not_found` and the connection stays usable."""
    with RawConn(shared_kd.socket) as c:
        c.request(1, "task.frobnicate")
        msg = c.read()
        assert msg[:2] == [1, 1] and msg[2]["code"] == "method_not_found" and msg[3] is None
        assert "task.frobnicate" in msg[2]["message"]
        c.request(2, "system.ping")
        assert c.read()[:3] == [1, 2, None]


@pytest.mark.parametrize("params", [
    {"title": "x"},                    # a bare map, not [map]
    [{"title": "x"}, {"title": "y"}],  # two elements
    ["x"],                             # not a map
    [{"title": 5}],                    # wrong type
    [{"title": "x", "priority": "high"}],
    [{"title": "x", "no_such_param": 1}],
    [{}],                              # missing the title
    [{"title": "x", "parents": "t_1"}],
    [{"title": "x", "triage": "yes"}],
], ids=["bare-map", "two-maps", "not-a-map", "title-int", "priority-str", "unknown-param",
        "missing", "parents-str", "triage-str"])
def test_bad_params_are_invalid_argument(shared_kd, params):
    """Params that are not [map], or a map with wrong, unknown or missing keys, get `invalid_argument`; nothing is created."""
    before = shared_kd.call("board.stats")["total"]
    with RawConn(shared_kd.socket) as c:
        c.send([0, 9, "task.create", params])
        msg = c.read()
        assert msg[:2] == [1, 9] and msg[3] is None
        assert msg[2]["code"] == "invalid_argument", msg
        c.request(10, "system.ping")  # still open
        assert c.read()[:3] == [1, 10, None]
    assert shared_kd.call("board.stats")["total"] == before


def test_unknown_param_is_named(shared_kd):
    """A misspelt parameter is reported by name."""
    with RawConn(shared_kd.socket) as c:
        c.request(1, "task.list", {"stauts": "ready"})
        err = c.read()[2]
        assert err["code"] == "invalid_argument" and "stauts" in err["message"]


def test_empty_params_array_is_accepted(shared_kd):
    """`params` may be an empty array for methods without parameters."""
    with RawConn(shared_kd.socket) as c:
        c.send([0, 3, "system.ping", []])
        assert c.read()[:3] == [1, 3, None]


def test_client_notification_is_ignored(shared_kd):
    """A notification from the client gets no answer and does not close the connection."""
    with RawConn(shared_kd.socket) as c:
        c.send([2, "whatever", [{}]])
        c.request(5, "system.ping")
        assert c.read()[:3] == [1, 5, None]


def test_error_codes_are_the_stable_set():
    """The error codes are exactly the eight of SPEC §5."""
    assert set(CODES) == {"invalid_argument", "not_found", "conflict", "forbidden", "too_large",
                          "method_not_found", "unavailable", "internal"}


def test_system_methods_lists_every_method(shared_kd):
    """system.methods lists each method once with a description, including system.ping and the board verbs."""
    methods = shared_kd.call("system.methods")["methods"]
    names = [m["name"] for m in methods]
    assert len(names) == len(set(names))
    assert all(m["doc"] for m in methods)
    for name in ("system.ping", "system.methods", "daemon.status", "task.create", "task.list",
                 "task.show", "task.assign", "task.link", "task.unlink", "task.claim",
                 "task.comment", "task.complete", "task.block", "task.unblock", "task.archive",
                 "task.promote", "task.heartbeat", "task.runs", "task.context", "board.stats",
                 "board.assignees"):
        assert name in names, name
    # every listed method exists: none of them is method_not_found
    with RawConn(shared_kd.socket) as c:
        for i, name in enumerate(names):
            c.send([0, i, name, [{"no_such_param_xyz": 1}]])
        for _ in names:
            _, msgid, error, _ = c.read()
            assert error is None or error["code"] != "method_not_found", (names[msgid], error)


# -- hostile input ---------------------------------------------------------------------
@pytest.mark.parametrize("data", [
    b"\xc1",                                    # a byte msgpack never uses
    b"\x91" * 5000 + b"\xc0",                   # nested deeper than the unpacker allows
    b"\x94\x00\x01\xa3\xff\xfe\xfd\x91\x80",        # method name that is not UTF-8
    msgpack.packb([0, 1, "system.ping", [{1: 2}]]),  # a map key that is not a string
], ids=["never-used-byte", "too-deep", "bad-utf8", "int-map-key"])
def test_malformed_msgpack_is_answered_and_closed(shared_kd, data):
    """Malformed msgpack gets an `invalid_argument` error notification, the connection is closed, and the daemon serves on."""
    with RawConn(shared_kd.socket) as c:
        c.send_bytes(data)
        assert_error_notification_then_closed(c, "invalid_argument")
    ping_ok(shared_kd)


@pytest.mark.parametrize("params", [
    [{"title": msgpack.ExtType(5, b"xx")}],
    [{"title": b"raw bytes"}],
    [{"title": "x", "priority": 1.5}],
    [{"title": "x", "priority": 2 ** 63}],
], ids=["ext-type", "bin", "float-int", "huge-int"])
def test_wrongly_typed_values_are_invalid_argument(shared_kd, params):
    """Values of the wrong msgpack type are answered `invalid_argument` on an open connection."""
    with RawConn(shared_kd.socket) as c:
        c.send([0, 4, "task.create", params])
        msg = c.read()
        assert msg[:2] == [1, 4] and msg[2]["code"] == "invalid_argument", msg
        c.request(5, "system.ping")
        assert c.read()[:3] == [1, 5, None]


def test_garbage_gets_an_error_and_close_while_others_are_served(shared_kd):
    """Garbage bytes get an `invalid_argument` error notification and a close; another open client and new clients are served."""
    kd = shared_kd
    with RawConn(kd.socket) as other:
        other.request(1, "system.ping")
        assert other.read()[:3] == [1, 1, None]
        with RawConn(kd.socket) as bad:
            bad.send_bytes(b"\xc1\xc1 this is not msgpack \x00\xff")
            assert_error_notification_then_closed(bad, "invalid_argument")
        other.request(2, "system.ping")
        assert other.read()[:3] == [1, 2, None]
    ping_ok(kd)
    assert any(e.get("event") == "rpc_bad_frame" for e in kd.log_events())


def test_half_a_frame_does_not_block_other_clients(shared_kd):
    """A client that sends half a request stalls only itself; when it finishes the frame it is answered."""
    kd = shared_kd
    frame = msgpack.packb([0, 77, "task.create", [{"title": "slow writer"}]])
    with RawConn(kd.socket) as slow:
        slow.send_bytes(frame[:len(frame) // 2])
        ping_ok(kd)
        kd.create("meanwhile")
        slow.send_bytes(frame[len(frame) // 2:])
        msg = slow.read()
        assert msg[:3] == [1, 77, None] and msg[3]["task"]["title"] == "slow writer"


@pytest.mark.parametrize("obj", [{"a": 1}, 42, "hello", [1, 2, None, None], [0, 1, "system.ping"],
                                 [3, 1, "system.ping", [{}]]],
                         ids=["map", "int", "str", "response", "short", "bad-kind"])
def test_non_request_object_is_closed(shared_kd, obj):
    """Well-formed msgpack that is not a request gets an error notification and the connection is closed."""
    with RawConn(shared_kd.socket) as c:
        c.send(obj)
        assert_error_notification_then_closed(c, "invalid_argument")
    ping_ok(shared_kd)


def test_oversized_frame_is_too_large_then_closed(shared_kd):
    """A single 9 MiB string frame gets a `too_large` error notification and a close; the daemon keeps serving."""
    kd = shared_kd
    with RawConn(kd.socket, timeout=30) as other:
        frame = msgpack.packb([0, 1, "task.create", [{"title": "x", "body": "b" * (9 * MIB)}]])
        with RawConn(kd.socket, timeout=30) as big:
            t = big.send_in_background(frame)
            assert_error_notification_then_closed(big, "too_large")
            t.join(30)
        other.request(3, "system.ping")
        assert other.read()[:3] == [1, 3, None]
    ping_ok(kd)
    assert not [x for x in kd.call("task.list")["tasks"] if x["title"] == "x"
                and len(x["body"]) > MIB]


def test_many_frames_over_the_cap_in_total_are_fine(shared_kd):
    """The cap bounds buffered input, not a connection's total: 12 MiB of 64 KiB requests on one connection are all answered."""
    batch = b"".join(msgpack.packb([0, i, "task.list", [{"pad": "x" * 65536}]])
                     for i in range(16))
    answered = 0
    with RawConn(shared_kd.socket, timeout=30) as c:
        for _ in range(12):
            c.send_bytes(batch)
            for i in range(16):
                msg = c.read()
                assert msg[:2] == [1, i] and msg[2]["code"] == "invalid_argument", msg
                answered += 1
    assert answered == 12 * 16
    ping_ok(shared_kd)


# -- documentation ----------------------------------------------------------------------
def test_every_method_is_documented(shared_kd):
    """docs/rpc.md documents every method that system.methods lists."""
    from conftest import ROOT
    doc = (ROOT / "docs" / "rpc.md").read_text()
    missing = [m["name"] for m in shared_kd.call("system.methods")["methods"]
               if f"`{m['name']}`" not in doc]
    assert not missing, f"not in docs/rpc.md: {missing}"


def test_method_table_names_are_dotted(shared_kd):
    """Every method name is `<area>.<verb>`."""
    for m in shared_kd.call("system.methods")["methods"]:
        area, _, verb = m["name"].partition(".")
        assert area and verb, m["name"]


def test_half_closed_client_still_gets_its_running_answers(shared_kd):
    """A client that sends its requests and shuts down its sending side (as
    `nc -N` or a shell pipe does) gets every answer, including those of requests
    still running when its EOF arrived (task.wait), and then the connection ends."""
    kd = shared_kd
    tid = kd.create("waited on")["id"]
    with RawConn(kd.socket) as c:
        c.request(1, "system.ping")
        c.request(2, "task.wait", {"ids": [tid], "timeout": 30})
        c.sock.shutdown(_socket.SHUT_WR)
        assert c.read()[:3] == [1, 1, None]
        kd.call("task.complete", id=tid, result="finished")  # task.wait answers now
        msgs = c.read_until_eof()
    assert len(msgs) == 1 and msgs[0][:3] == [1, 2, None], msgs
    assert msgs[0][3]["tasks"][0]["status"] == "done", msgs[0][3]


def test_client_that_closes_outright_is_let_go_with_requests_running(kd):
    """A client that closes its socket outright while its requests are still
    running (task.wait with no timeout) looks like a half-close at first; kanband
    notices the hang-up, cancels those requests and frees the connection."""
    import os

    from conftest import wait_for
    tid = kd.create("never finishes", triage=True)["id"]
    fds = f"/proc/{kd.proc.pid}/fd"

    def sockets() -> int:
        n = 0
        for f in os.listdir(fds):
            try:
                n += os.readlink(f"{fds}/{f}").startswith("socket:")
            except OSError:
                pass
        return n
    conns = [RawConn(kd.socket) for _ in range(5)]
    for i, c in enumerate(conns):
        c.request(i, "task.wait", {"ids": [tid]})  # runs until the task ends: never
        c.request(100 + i, "system.ping")  # answered while the wait runs: both are in
        assert c.read()[:3] == [1, 100 + i, None]
    held = sockets()
    for c in conns:
        c.sock.close()
    wait_for(lambda: sockets() <= held - 5, 15, "the daemon to let the closed connections go")
    ping_ok(kd)


def test_client_drops_a_connection_a_send_failed_on(tmp_path):
    """A request that could not be sent whole (the peer stopped reading, or went
    away) leaves part of a frame on the connection: the client raises TimedOut or
    Unreachable, drops that connection and its half-read state, and its next call
    connects afresh."""
    import threading

    from kanband.protocol import Client, TimedOut, Unreachable
    path = str(tmp_path / "s.sock")
    srv = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    held: list[_socket.socket] = []
    accepted = threading.Event()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)  # accept, never read
            accepted.set()
    threading.Thread(target=serve, daemon=True).start()
    c = Client(path, timeout=0.5).connect()
    try:
        big = [("task.create", {"title": "x", "body": "y" * 100_000})] * 40  # 4 MB
        with pytest.raises(TimedOut):
            c.call_many(big)
        assert c._sock is None and not c._answers
        accepted.clear()
        with pytest.raises(TimedOut):  # sent whole; its answer never comes
            c.call("system.ping")
        assert accepted.wait(5), "the next call did not connect afresh"
        assert len(held) == 2
        held[-1].close()  # the peer goes away
        with pytest.raises((Unreachable, TimedOut)):
            c.call_many(big)
        assert c._sock is None
    finally:
        c.close()
        srv.close()
        for conn in held:
            conn.close()
