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
import socket
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import msgpack
import structlog

from kanband.board import Board, Caller
from kanband.errors import (Forbidden, Internal, InvalidArgument, KanbanError,
                            MethodNotFound, TooLarge)
from kanband.params import Params
from kanband.protocol import MAX_BUFFER, NOTIFY, REQUEST, RESPONSE, pack, unpacker

log = structlog.get_logger("kanband.rpc")
WRITE_HIGH_WATER = 1024 * 1024  # unsent answer bytes per connection before we wait


@dataclass(frozen=True)
class Method:
    name: str
    attr: str  # a Board method, or a method of an extra handler object
    doc: str
    target: str = "board"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("system.ping", "ping", "Liveness check: {pong, version, time}."),
    Method("system.methods", "", "List every method with a one-line description.", "rpc"),
    Method("daemon.status", "status", "Daemon pid, version, uptime, paths, counts, workers."),
    Method("task.create", "create", "Create a task; {task, created, warning}."),
    Method("task.list", "list", "List tasks by status/assignee/tenant; {tasks}."),
    Method("task.show", "show", "One task with parents, children, comments, events, runs."),
    Method("task.assign", "assign", "Set or clear the assignee; force reclaims a running task."),
    Method("task.link", "link", "Make parent a dependency of child (DAG; cycles refused)."),
    Method("task.unlink", "unlink", "Remove a dependency."),
    Method("task.claim", "claim", "Claim a ready task as an external worker: run, token, lease."),
    Method("task.comment", "comment", "Add a comment."),
    Method("task.complete", "complete", "Mark done, with result/summary/metadata."),
    Method("task.block", "block", "Mark blocked with a reason."),
    Method("task.unblock", "unblock", "blocked -> ready/todo; resets the failure counter."),
    Method("task.archive", "archive", "Archive (kills a running worker first)."),
    Method("task.promote", "promote", "triage -> todo/ready."),
    Method("task.reclaim", "reclaim", "Stop the current run and requeue; no failure counted."),
    Method("task.heartbeat", "heartbeat", "Record liveness and renew the lease."),
    Method("task.runs", "runs", "Every run (attempt) of a task."),
    Method("task.context", "context", "The worker context document of a task (markdown)."),
    Method("board.stats", "stats", "Counts by status and assignee, ages, sizes."),
    Method("board.assignees", "assignees", "Configured profiles and assignees with counts."),
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
        self.connections: set[asyncio.StreamWriter] = set()
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
        self._server = await asyncio.start_unix_server(self._handle, sock=sock,
                                                       limit=256 * 1024,
                                                       backlog=socket.SOMAXCONN)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self.connections):
            w.close()
        if self._server is not None:
            await self._server.wait_closed()

    def methods(self, p: Params, caller: Caller) -> dict[str, Any]:
        p.done()
        return {"methods": [{"name": m.name, "doc": m.doc} for m in sorted(
            METHODS.values(), key=lambda m: m.name)]}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            pid, uid, gid = 0, -1, -1
        if not self.admit(pid, uid, gid):
            log.warning("rpc_client_refused", peer_pid=pid, peer_uid=uid, peer_gid=gid)
            await self._fatal(writer, Forbidden(f"uid {uid} may not use this socket"), reader)
            return
        conn = Connection(self, reader, writer, pid, uid)
        self.connections.add(writer)
        try:
            await conn.run()
        finally:
            self.connections.discard(writer)
            await conn.shutdown()

    async def _fatal(self, writer: asyncio.StreamWriter, err: KanbanError,
                     reader: asyncio.StreamReader | None = None) -> None:
        """Tell the client what was wrong (as an `error` notification), then close.
        With `reader`, swallow what the client is still sending (bounded, 1 s):
        closing a Unix socket with unread input resets the peer, which would
        then lose the error we just sent."""
        try:
            writer.write(pack([NOTIFY, "error", [err.to_wire()]]))
            await asyncio.wait_for(writer.drain(), 1.0)
            if reader is not None:
                writer.write_eof()
                await asyncio.wait_for(_discard(reader, 64 * 1024 * 1024), 1.0)
        except (OSError, asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass
        writer.close()


class Connection:
    def __init__(self, server: RpcServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, pid: int, uid: int) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.pid = pid
        self.uid = uid
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        self.on_close: list[Callable[[], None]] = []

    async def run(self) -> None:
        cap = self.server.max_buffer
        unp = unpacker(cap)
        fed = 0  # bytes fed so far
        boundary = 0  # where the last whole message ended (the Unpacker parses
        # partial messages as bytes arrive, so count what is owed since then)
        while not self.closed:
            try:
                data = await self.reader.read(256 * 1024)
            except (ConnectionError, OSError):
                return
            if not data:
                return
            fed += len(data)
            try:
                if fed - boundary > cap:  # one message may not exceed the cap
                    raise msgpack.BufferFull
                unp.feed(data)
            except msgpack.BufferFull:
                log.warning("rpc_input_too_large", peer_pid=self.pid, limit=cap)
                await self.server._fatal(self.writer, TooLarge(
                    f"input exceeds the per-connection buffer of {cap} bytes"), self.reader)
                return
            handled = 0
            while True:
                try:
                    msg = next(unp)
                except StopIteration:
                    break
                except Exception as e:  # garbage: FormatError, StackError, bad UTF-8, ...
                    log.warning("rpc_bad_frame", peer_pid=self.pid, error=str(e)[:200])
                    await self.server._fatal(self.writer, InvalidArgument(
                        f"malformed msgpack input: {type(e).__name__}: {str(e)[:200]}"),
                        self.reader)
                    return
                boundary = unp.tell()
                if not await self.accept(msg):
                    return
                handled += 1
                # A client that pipelines and never reads must not fill our memory
                # or hold the loop: wait for its answers to drain, let others in.
                if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    try:
                        await self.writer.drain()
                    except (ConnectionError, OSError):
                        return
                elif handled % 64 == 0:
                    await asyncio.sleep(0)
            try:
                await self.writer.drain()  # a client that does not read stops being read
            except (ConnectionError, OSError):
                return

    async def accept(self, msg: Any) -> bool:
        """Handle one frame; False closes the connection."""
        if isinstance(msg, list) and len(msg) == 3 and msg[0] == NOTIFY:
            return True  # client notifications carry nothing we act on
        if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == REQUEST):
            await self.server._fatal(self.writer, InvalidArgument(
                "expected a request [0, msgid, method, [params]]"), self.reader)
            return False
        _, msgid, method, params = msg
        if isinstance(msgid, bool) or not isinstance(msgid, int) or not 0 <= msgid < 2 ** 32:
            await self.server._fatal(self.writer, InvalidArgument(
                "msgid must be an unsigned 32-bit integer"), self.reader)
            return False
        try:
            result = self.call(method, params)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(self._finish(msgid, method, result))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
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
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(pack([RESPONSE, msgid, error, result]))

    def notify(self, method: str, params: Any) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(pack([NOTIFY, method, [params]]))

    async def shutdown(self) -> None:
        self.closed = True
        for fn in self.on_close:
            fn()
        for t in list(self.tasks):
            t.cancel()
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (OSError, ConnectionError, asyncio.TimeoutError):
            pass



async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
    seen = 0
    while seen < limit:
        chunk = await reader.read(256 * 1024)
        if not chunk:
            return
        seen += len(chunk)
