"""The RPC server: a METHODS table and the connection loop (SPEC §5).

Each connection reads frames into a bounded msgpack Unpacker. Malformed or
oversized input is answered with an error where possible and the connection
is closed; nothing a client sends can stop the daemon serving others.
"""

from __future__ import annotations

import asyncio
import grp
import inspect
import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import msgpack
import structlog

from kanband import busypoll
from kanband.board import Board, Caller
from kanband.errors import (Forbidden, Internal, InvalidArgument, KanbanError,
                            MethodNotFound, TooLarge)
from kanband.params import Params
from kanband.protocol import MAX_BUFFER, NOTIFY, REQUEST, RESPONSE, pack, unpacker

log = structlog.get_logger("kanband.rpc")
WRITE_HIGH_WATER = 1024 * 1024  # unsent answer bytes per connection before we wait
PUMP_BUDGET = 512  # requests of one connection handled per event-loop step
HANGUP_CHECK = 1.0  # seconds between checks of a half-closed client (eof_received)


@dataclass(frozen=True)
class Method:
    name: str
    attr: str  # a Board method, or a method of an extra handler object
    doc: str
    target: str = "board"
    # True: the handler only reads or writes the board (no kill, no await), so
    # several such requests of one read may share one transaction.
    batch: bool = False


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("system.ping", "ping", "Liveness check: {pong, version, time}."),
    Method("system.methods", "", "List every method with a one-line description.", "rpc"),
    Method("daemon.status", "status", "Daemon pid, version, uptime, paths, counts, workers.",
           batch=True),
    Method("task.create", "create", "Create a task; {task, created, warning}.", batch=True),
    Method("task.list", "list", "List tasks by status/assignee/tenant; {tasks}.", batch=True),
    Method("task.show", "show", "One task with parents, children, comments, events, runs.",
           batch=True),
    Method("task.assign", "assign", "Set or clear the assignee; force reclaims a running task."),
    Method("task.link", "link", "Make parent a dependency of child (DAG; cycles refused).",
           batch=True),
    Method("task.unlink", "unlink", "Remove a dependency.", batch=True),
    Method("task.claim", "claim", "Claim a ready task as an external worker: run, token, lease."),
    Method("task.comment", "comment", "Add a comment.", batch=True),
    Method("task.complete", "complete", "Mark done, with result/summary/metadata."),
    Method("task.block", "block", "Mark blocked with a reason."),
    Method("task.unblock", "unblock", "blocked -> ready/todo; resets the failure counter."),
    Method("task.archive", "archive", "Archive (kills a running worker first)."),
    Method("task.promote", "promote", "triage -> todo/ready.", batch=True),
    Method("task.reclaim", "reclaim", "Stop the current run and requeue; no failure counted."),
    Method("task.heartbeat", "heartbeat", "Record liveness and renew the lease."),
    Method("task.runs", "runs", "Every run (attempt) of a task.", batch=True),
    Method("task.context", "context", "The worker context document of a task (markdown).",
           batch=True),
    # not batched: its first call after start-up or gc waits for a walk of the logs
    Method("board.stats", "stats", "Counts by status and assignee, ages, sizes."),
    Method("board.assignees", "assignees", "Configured profiles and assignees with counts.",
           batch=True),
    Method("board.dispatch", "dispatch", "Run one dispatch pass now (dry_run reports only)."),
    Method("daemon.pause", "pause", "Stop automatic dispatching (manual dispatch still works)."),
    Method("daemon.resume", "resume", "Restart automatic dispatching."),
    Method("daemon.reload", "reload", "Re-read the config file; a bad one is refused."),
    Method("task.log", "log", "Worker output of a task (tail bytes or from an offset)."),
    Method("task.wait", "wait", "Block until every task is done/blocked/archived or timeout."),
    Method("events.subscribe", "subscribe",
           "Replay events after `since`, then push new ones as `event` notifications.", "stream"),
    Method("events.unsubscribe", "unsubscribe", "End a subscription of this connection.",
           "stream"),
    Method("notify.subscribe", "subscribe",
           "Deliver a task's terminal events to a [notifiers.PLATFORM] command.", "notify"),
    Method("notify.list", "list", "List notify subscriptions (optionally of one task).", "notify"),
    Method("notify.unsubscribe", "unsubscribe", "Remove matching notify subscriptions.",
           "notify"),
    Method("board.gc", "gc", "Remove archived tasks' workspaces, old events and old logs."),
    Method("board.backup", "backup", "Consistent online copy of the database (SQLite backup API)."),
)}


def register(method: Method) -> None:
    """Later subsystems (supervision, streams) add their methods here."""
    METHODS[method.name] = method


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)  # pid, uid, gid


def _peer_groups(pid: int, gid: int) -> set[int]:
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return groups


class RpcServer:
    def __init__(self, board: Board, max_buffer: int = MAX_BUFFER) -> None:
        self.board = board
        self.max_buffer = max_buffer
        self.targets: dict[str, Any] = {"board": board, "rpc": self}
        self.connections: set[Connection] = set()
        self._server: asyncio.base_events.Server | None = None

    # -- access ----------------------------------------------------------------
    def allowed_gids(self) -> set[int]:
        """socket_group, plus the socket file's own group when its mode lets that
        group connect (e.g. kanband.socket: SocketGroup=kanband, SocketMode=0660)."""
        gids = set()
        name = self.board.config.socket_group
        if name:
            try:
                gids.add(grp.getgrnam(name).gr_gid)
            except KeyError:
                pass
        try:
            st = os.stat(self.board.paths.socket)
            if st.st_mode & 0o060 == 0o060:
                gids.add(st.st_gid)
        except OSError:
            pass
        return gids

    def admit(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, os.getuid()):
            return True
        allowed = self.allowed_gids()
        return bool(allowed and allowed & _peer_groups(pid, gid))

    # -- serving ---------------------------------------------------------------
    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: Connection(self), sock=sock,
                                                     backlog=socket.SOMAXCONN)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.close()
        if self._server is not None:
            await self._server.wait_closed()

    def methods(self, p: Params, caller: Caller) -> dict[str, Any]:
        p.done()
        return {"methods": [{"name": m.name, "doc": m.doc} for m in sorted(
            METHODS.values(), key=lambda m: m.name)]}


class Connection(asyncio.Protocol):
    """One client connection, served straight from `data_received`.

    Every whole request of one read is handled in that callback. When a read
    holds several requests that only touch the board (`Method.batch`), their
    writes share one transaction -- a group commit -- and their answers are
    sent once it is durable. A client that sends faster than it reads stops
    being read while its unsent answers exceed WRITE_HIGH_WATER."""

    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.pid, self.uid = 0, -1
        self.tasks: set[asyncio.Task[Any]] = set()
        self._eof = False  # the client shut down its sending side
        self.closed = False
        self.on_close: list[Callable[[], None]] = []
        self._unpacker = unpacker(server.max_buffer)
        self._fed = 0  # bytes fed so far
        self._boundary = 0  # where the last whole message ended (the Unpacker parses
        # partial messages as bytes arrive, so count what is owed since then)
        self._discarding = 0  # > 0 after a fatal error: input swallowed, then close
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._batch_out: list[tuple[int, bytes]] | None = None  # (msgid, answer) held
        # until the group commit
        self._fatal_pending: KanbanError | None = None
        self._backlog: list[Any] = []  # whole requests not handled yet
        self._pump_scheduled = False

    # -- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        try:
            self.pid, self.uid, gid = peer_credentials(sock)
        except OSError:
            gid = -1
        self.server.connections.add(self)
        if not self.server.admit(self.pid, self.uid, gid):
            log.warning("rpc_client_refused", peer_pid=self.pid, peer_uid=self.uid,
                        peer_gid=gid)
            self.fatal(Forbidden(f"uid {self.uid} may not use this socket"))

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._discarding -= min(self._discarding, len(data))
            if not self._discarding:
                self.close()
            return
        if self.closed:
            return
        cap = self.server.max_buffer
        self._fed += len(data)
        try:
            if self._fed - self._boundary > cap:  # one message may not exceed the cap
                raise msgpack.BufferFull
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            log.warning("rpc_input_too_large", peer_pid=self.pid, limit=cap)
            self.fatal(TooLarge(f"input exceeds the per-connection buffer of {cap} bytes"))
            return
        msgs: list[Any] = []
        while True:
            try:
                msgs.append(next(self._unpacker))
            except StopIteration:
                break
            except Exception as e:  # garbage: FormatError, StackError, bad UTF-8, ...
                self._handle_all(msgs)
                log.warning("rpc_bad_frame", peer_pid=self.pid, error=str(e)[:200])
                self.fatal(InvalidArgument(
                    f"malformed msgpack input: {type(e).__name__}: {str(e)[:200]}"))
                return
            self._boundary = self._unpacker.tell()
        self._handle_all(msgs)

    def eof_received(self) -> bool:
        # The client is done sending: answer what it sent, then close. The
        # connection stays half-open while requests are queued or still running
        # (task.wait, a kill); subscriptions alone do not hold it open.
        self._eof = True
        if not (self._backlog or self.tasks):
            return False
        self._watch_hangup()
        return True

    def _watch_hangup(self) -> None:
        """While half-open: a client that closed outright (not just its sending
        side) looks the same on a read. Linux reports POLLHUP only for the full
        close: check every HANGUP_CHECK seconds, and end the connection then."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        try:
            p = select.poll()
            p.register(sock.fileno(), select.POLLHUP)
            hung_up = bool(p.poll(0))
        except (OSError, ValueError):
            hung_up = True
        if hung_up:
            self.transport.abort()  # connection_lost cancels what is still running
            return
        asyncio.get_running_loop().call_later(HANGUP_CHECK, self._watch_hangup)

    def _close_if_answered(self) -> None:
        """After the client's EOF: close once nothing it sent is left to answer."""
        if self._eof and not self._backlog and not self.tasks and \
                self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _request_done(self, task: "asyncio.Task[Any]") -> None:
        self.tasks.discard(task)
        self._close_if_answered()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for fn in self.on_close:
            fn()
        for t in list(self.tasks):
            t.cancel()
        self._wake_drainers()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()  # a client that does not read stops being read

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers()
        if self.transport is not None and not self.transport.is_closing():
            self._pump()  # handles the backlog, then reads again

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def drain(self) -> None:
        """Wait until the unsent output is below the high-water mark."""
        if self.closed:
            raise ConnectionResetError("connection closed")
        if not self._write_paused:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        await fut
        if self.closed:
            raise ConnectionResetError("connection closed")

    def close(self) -> None:
        """Close from our side: requests not yet handled are dropped (they would
        run with nobody to answer), then the transport flushes and closes."""
        self.closed = True
        self._backlog.clear()
        if self.transport is not None:
            self.transport.close()  # flushes what is buffered, then closes
        self._wake_drainers()

    def fatal(self, err: KanbanError) -> None:
        """Tell the client what was wrong (as an `error` notification), then close.
        Input still arriving is swallowed first (bounded: 64 MiB or 1 s): closing a
        Unix socket with unread input resets the peer, which would then lose the
        error we just sent."""
        assert self.transport is not None
        if self._batch_out is not None:  # inside a batch: answer the frames before it first
            self._fatal_pending = err
            return
        self.closed = True
        self._discarding = 64 * 1024 * 1024
        try:
            self.transport.write(pack([NOTIFY, "error", [err.to_wire()]]))
            if self.transport.can_write_eof():
                self.transport.write_eof()
        except (OSError, RuntimeError):
            pass
        self.transport.resume_reading()
        asyncio.get_running_loop().call_later(1.0, self.close)

    # -- requests ------------------------------------------------------------------
    def _handle_all(self, msgs: list[Any]) -> None:
        self._backlog.extend(msgs)
        self._pump()

    def _pump(self) -> None:
        """Handle queued requests: at most PUMP_BUDGET per loop step (others get
        their turn), and none while the client is not reading its answers."""
        self._pump_scheduled = False
        q = self._backlog
        budget = PUMP_BUDGET
        while q and budget > 0 and not self.closed and not self._write_paused \
                and self.transport is not None and not self.transport.is_closing():
            # A run of batchable requests shares one transaction (group commit).
            n = 0
            while n < min(len(q), budget) and _batchable(q[n]):
                n += 1
            if n:
                budget -= self._run_batch(q, n)
                continue
            budget -= 1
            if not self.accept(q.pop(0)):
                q.clear()
                return
        if self.closed or self.transport is None or self.transport.is_closing():
            q.clear()
            return
        if q:
            self.transport.pause_reading()
            if not self._write_paused and not self._pump_scheduled:
                self._pump_scheduled = True
                asyncio.get_running_loop().call_soon(self._pump)
        elif not self._write_paused:
            self.transport.resume_reading()
            self._close_if_answered()

    def _run_batch(self, q: list[Any], n: int) -> int:
        """Handle up to `n` batchable requests from the front of `q` in one
        transaction; stops early once the answers reach WRITE_HIGH_WATER bytes,
        or at a frame that ends the connection. Returns how many it took."""
        store = self.server.board.store
        out: list[tuple[int, bytes]] = []
        self._batch_out = out
        taken = size = 0
        try:
            with store.batch(single=n == 1):
                while taken < n and size < WRITE_HIGH_WATER and self._fatal_pending is None:
                    taken += 1
                    k = len(out)
                    self.accept(q.pop(0))
                    size += sum(len(a) for _, a in out[k:])
        except Exception as e:
            if not taken:  # the batch could not even begin: handle one request alone
                self._batch_out = None
                self.accept(q.pop(0))
                return 1
            # The group commit failed: nothing of it is durable, and reads may have
            # seen its writes. Every request of the batch gets the error.
            if isinstance(e, KanbanError):
                log.error("rpc_group_commit_failed", peer_pid=self.pid, error=e.message)
                err = e.to_wire()
            else:
                log.exception("rpc_group_commit_failed", peer_pid=self.pid)
                err = Internal("internal error committing a group of requests; "
                               "see the daemon log").to_wire()
            out = [(msgid, pack([RESPONSE, msgid, err, None])) for msgid, _ in out]
        finally:
            self._batch_out = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(a for _, a in out))
            busypoll.arm()
        if self._fatal_pending is not None:  # after the answers of the frames before it
            err, self._fatal_pending = self._fatal_pending, None
            self.fatal(err)
        return taken

    def accept(self, msg: Any) -> bool:
        """Handle one frame; False closes the connection."""
        if isinstance(msg, list) and len(msg) == 3 and _is_type(msg[0], NOTIFY):
            return True  # client notifications carry nothing we act on
        if not (isinstance(msg, list) and len(msg) == 4 and _is_type(msg[0], REQUEST)):
            self.fatal(InvalidArgument("expected a request [0, msgid, method, [params]]"))
            return False
        _, msgid, method, params = msg
        if isinstance(msgid, bool) or not isinstance(msgid, int) or not 0 <= msgid < 2 ** 32:
            self.fatal(InvalidArgument("msgid must be an unsigned 32-bit integer"))
            return False
        try:
            result = self.call(method, params)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(self._finish(msgid, method, result))
                self.tasks.add(task)
                task.add_done_callback(self._request_done)
                return True
            self.respond(msgid, None, result)
        except KanbanError as e:
            self.respond(msgid, e.to_wire(), None)
        except RecursionError:
            self.respond(msgid, InvalidArgument("params are nested too deeply").to_wire(), None)
        except Exception:
            log.exception("rpc_internal_error", method=str(method)[:100], msgid=msgid)
            self.respond(msgid, Internal(f"internal error in {str(method)[:100]} "
                                         f"(request {msgid}); see the daemon log").to_wire(), None)
        return True

    def call(self, method: Any, params: Any) -> Any:
        if not isinstance(method, str):
            raise InvalidArgument("method must be a string")
        m = METHODS.get(method)
        if m is None:
            raise MethodNotFound(f"no method {method[:100]!r} (system.methods lists them)")
        if not isinstance(params, list) or len(params) > 1:
            raise InvalidArgument("params must be an array holding one map")
        p = Params(params[0] if params else {})
        board = self.server.board
        caller = board.caller_for(p.raw.get("run_token"), self.uid, self.pid)
        handler: Callable[..., Any] = getattr(self.server.targets[m.target], m.attr or "methods")
        if m.target == "stream":
            return handler(p, caller, self)
        return handler(p, caller)

    async def _finish(self, msgid: int, method: str, aw: Awaitable[Any]) -> None:
        try:
            result = await aw
            self.respond(msgid, None, result)
        except KanbanError as e:
            self.respond(msgid, e.to_wire(), None)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("rpc_internal_error", method=method, msgid=msgid)
            self.respond(msgid, Internal(f"internal error in {method} (request {msgid})").to_wire(),
                         None)

    def respond(self, msgid: int, error: Any, result: Any) -> None:
        if self._batch_out is not None:
            self._batch_out.append((msgid, pack([RESPONSE, msgid, error, result])))
            return
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        self.transport.write(pack([RESPONSE, msgid, error, result]))
        busypoll.arm()

    def notify(self, method: str, params: Any) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(pack([NOTIFY, method, [params]]))


def _is_type(value: Any, kind: int) -> bool:
    """The envelope's type field is that integer (not a bool: False == 0 in Python)."""
    return type(value) is int and value == kind


def _batchable(msg: Any) -> bool:
    if not (isinstance(msg, list) and len(msg) == 4 and _is_type(msg[0], REQUEST)
            and isinstance(msg[2], str)):
        return False
    m = METHODS.get(msg[2])
    return m is not None and m.batch
