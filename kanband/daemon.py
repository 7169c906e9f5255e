"""kanband: wiring, signals, ordered start-up and shutdown.

Start-up: config -> pidfile lock -> database -> socket -> pidfile written ->
serve. Shutdown (SIGTERM/SIGINT): stop accepting, close clients, close the
database, remove socket and pidfile, exit 0. Signal handlers only record.
"""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from kanband import __version__, busypoll, logs, reaper
from kanband import config as config_mod
from kanband.board import Board
from kanband.errors import InvalidArgument, KanbanError
from kanband.paths import DaemonPaths, find_config, resolve_daemon_paths
from kanband.pidfile import AlreadyRunning, PidFile
from kanband.rpc import RpcServer
from kanband.store import Store
from kanband.notify import Notifier
from kanband.stallwatch import StallWatch
from kanband.streams import EventBus
from kanband.supervisor import Supervisor
from kanband.systemd import Notify, listen_socket

log = structlog.get_logger("kanband")

SWEEP_SECONDS = 2.0  # safety sweep: leases, timers, dispatch
HEALTH_SECONDS = 60.0  # a periodic `health` log line with counts
KNOWN_REFRESH_SECONDS = 10.0  # how often a worker's descendants are re-listed


class StartupError(Exception):
    """Start-up failed for a reason the operator can fix; exit non-zero."""


def bind_socket(path: Path, mode: int, group: str) -> socket.socket:
    """Bind the listening socket, replacing a stale one; refuse a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.stat().st_mode)):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody answers: a dead daemon's socket
        else:
            raise StartupError(f"another kanband is serving at {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot bind {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, mode)
    if group:
        import grp
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except (KeyError, PermissionError) as e:
            sock.close()
            raise StartupError(f"socket_group {group!r}: cannot give the socket to it: {e}") from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


class Daemon:
    def __init__(self, paths: DaemonPaths, config: config_mod.Config) -> None:
        self.paths = paths
        self.config = config
        self.pidfile = PidFile(paths.pidfile)
        self.store: Store | None = None
        self.supervisor: Supervisor | None = None
        self.notifier: Notifier | None = None
        self.board: Board | None = None
        self.rpc: RpcServer | None = None
        self.sock: socket.socket | None = None
        self.stop_event: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lease_timer: asyncio.TimerHandle | None = None
        self._owns_socket = False
        self.config_arg: str | None = None
        self.notify = Notify()  # before anything touches the environment
        self.ready_pipe: int | None = None  # --detach: tell the parent we are ready
        self._status_pending = False

    # -- start-up ------------------------------------------------------------
    def prepare(self) -> None:
        """Everything before the event loop; raises StartupError/AlreadyRunning."""
        for d in (self.paths.home,):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in (self.paths.logs, self.paths.runs, self.paths.workspaces):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pidfile.acquire()
        # SQLite gives -wal and -shm the database file's mode: make it private first.
        os.close(os.open(self.paths.db, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        try:
            self.store = Store(self.paths.db, self.config.durability)
            self.store.start_checkpointer()
        except KanbanError as e:
            raise StartupError(e.message) from None
        self.board = Board(self.store, self.config, self.paths)
        self.board.on_lease_change = self.arm_lease_timer  # type: ignore[method-assign]
        self.supervisor = Supervisor(self.store, self.config, self.paths)
        self.board.supervisor = self.supervisor
        self.board.wake = self.supervisor.wake  # type: ignore[method-assign]
        self.board.dispatch_info = self.supervisor.info  # type: ignore[method-assign]
        self.board.reload_hook = self.reload  # type: ignore[method-assign]
        inherited = listen_socket()
        if inherited is not None:  # socket activation: systemd owns the path
            self.sock = inherited
            name = inherited.getsockname()
            if isinstance(name, str) and name:  # workers and status name the real path
                self.paths = dataclasses.replace(self.paths, socket=Path(name))
                self.board.paths = self.supervisor.paths = self.paths
            log.info("socket_inherited", fd=inherited.fileno(), socket=str(self.paths.socket))
        else:
            self.sock = bind_socket(self.paths.socket, self.config.socket_mode,
                                    self.config.socket_group)
            self._owns_socket = True
        self.pidfile.write()

    async def serve(self) -> None:
        assert self.board is not None and self.sock is not None
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop, sig)
        self.loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        stallwatch = StallWatch(self.loop)
        stallwatch.start()
        try:
            await self._serve()
        finally:
            stallwatch.stop()

    async def _serve(self) -> None:
        assert self.board is not None and self.sock is not None and self.loop is not None
        self.supervisor.start(self.loop)
        adoption = await self.supervisor.readopt()
        self.rpc = RpcServer(self.board)
        self.rpc.targets["stream"] = EventBus(self.store)
        self.notifier = Notifier(self.store, self.supervisor.reaper, self.paths, self.config)
        self.rpc.targets["notify"] = self.notifier
        self.notifier.start()
        await self.rpc.start(self.sock)
        self.expire_leases()
        background = [asyncio.ensure_future(self._sweep()), asyncio.ensure_future(self._health())]
        if self.notify.watchdog_interval:
            background.append(asyncio.ensure_future(self._watchdog(self.notify.watchdog_interval)))
        self.store.on_commit(lambda _events: self.schedule_status())
        log.info("ready", pid=os.getpid(), socket=str(self.paths.socket),
                 db=str(self.paths.db), version=__version__, subreaper=self.supervisor.reaper.subreaper,
                 **adoption)
        self.notify.ready(self.status_line())
        self._tell_parent("ready")
        self.supervisor.wake()
        await self.stop_event.wait()
        self.notify.stopping()
        log.info("stopping", on_stop=self.config.on_stop, workers=len(self.supervisor.workers))
        for t in background:
            t.cancel()
        if self._lease_timer:
            self._lease_timer.cancel()
        await self.rpc.close()
        await self.notifier.close()
        await self.supervisor.shutdown()

    def request_stop(self, sig: int = signal.SIGTERM) -> None:
        log.info("signal_received", signal=signal.Signals(sig).name)
        if self.stop_event is not None:
            self.stop_event.set()

    def request_reload(self) -> None:
        try:
            self.reload()
        except KanbanError:
            pass  # logged; the old config stays

    # -- systemd: status, watchdog, health -------------------------------------
    def status_line(self) -> str:
        assert self.store is not None and self.supervisor is not None
        c = self.store.counts_by_status()
        return (f"running={len(self.supervisor.workers)} ready={c.get('ready', 0)} "
                f"blocked={c.get('blocked', 0)}" + (" (paused)" if self.supervisor.paused else ""))

    def schedule_status(self) -> None:
        """Keep STATUS= current, at most one update per half second."""
        if not self.notify.enabled or self._status_pending or self.loop is None:
            return
        self._status_pending = True

        def send() -> None:
            self._status_pending = False
            if self.store is not None:
                self.notify.status(self.status_line())
        self.loop.call_later(0.5, send)

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: a wedged loop stops the pings
        and systemd restarts us."""
        while True:
            self.notify.watchdog()
            await asyncio.sleep(interval)

    async def _health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_SECONDS)
            assert self.store is not None and self.supervisor is not None
            c = self.store.counts_by_status()
            log.info("health", workers=len(self.supervisor.workers), paused=self.supervisor.paused,
                     subscribers=len(self.rpc.targets["stream"].subs) if self.rpc else 0,
                     connections=len(self.rpc.connections) if self.rpc else 0,
                     **{s: c.get(s, 0) for s in ("ready", "running", "blocked", "todo")})

    def _tell_parent(self, word: str) -> None:
        if self.ready_pipe is not None:
            try:
                os.write(self.ready_pipe, word.encode() + b"\n")
                os.close(self.ready_pipe)
            except OSError:
                pass
            self.ready_pipe = None

    def reload(self) -> dict[str, Any]:
        self.notify.reloading()
        try:
            # Look again: a config file created since start-up is picked up.
            path = find_config(self.config_arg, self.paths.home)
            if path is None and self.config.source is not None:
                raise InvalidArgument(f"{self.config.source} is gone; refusing to fall back "
                                      "to defaults (restore it, or restart kanband)")
            new = config_mod.load(path)
        except KanbanError as e:
            log.error("config_reload_failed", error=e.message)
            self.notify.ready(self.status_line())
            raise
        except Exception as e:  # never leave systemd in "reloading"
            log.exception("config_reload_failed", error=str(e))
            self.notify.ready(self.status_line())
            raise
        self.config = new
        busypoll.set_window(new.busy_poll)
        if self.board is not None:
            self.board.config = new
        if self.supervisor is not None:
            self.supervisor.config = new
            self.supervisor.wake()
        if self.notifier is not None:
            self.notifier.config = new
            self.notifier.start()  # a newly configured platform gets its backlog
        log.info("config_reloaded", source=new.source, profiles=sorted(new.profiles))
        self.notify.ready(self.status_line())
        return {"config": new.source}

    # -- leases ----------------------------------------------------------------
    def expire_leases(self) -> None:
        assert self.store is not None
        expired = self.store.expire_leases(time.time(), self.config.failure_limit,
                                           self.config.backoff)
        for run_id in expired:
            log.warning("lease_expired", run_id=run_id)
        if expired and self.board is not None:
            self.board.wake()
        self.arm_lease_timer()

    def arm_lease_timer(self) -> None:
        """One timer at the earliest lease expiry; re-armed on claim/heartbeat."""
        if self.loop is None or self.store is None:
            return
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        nxt = self.store.next_lease_expiry()
        if nxt is not None:
            delay = max(0.0, nxt - time.time()) + 0.001
            self._lease_timer = self.loop.call_later(delay, self.expire_leases)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                self.supervisor.retry_unrecorded()
                self.expire_leases()
                now = time.monotonic()
                for w in list(self.supervisor.workers.values()):
                    if now - w.known_at >= KNOWN_REFRESH_SECONDS:  # spread the /proc walks
                        w.known_at = now
                        self.supervisor.reaper.refresh_known(w)
                self.supervisor.wake()
            except Exception:
                log.exception("sweep_failed")

    # -- shutdown --------------------------------------------------------------
    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.sock is not None:
            self.sock.close()
        if self._owns_socket:
            try:
                self.paths.socket.unlink()
            except FileNotFoundError:
                pass
            self._owns_socket = False
        self.pidfile.release()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kanband",
        description="kanband: the supervisor daemon that owns the task board and its workers. "
                    "Runs in the foreground; stop it with SIGTERM or Ctrl-C.")
    p.add_argument("--version", action="version", version=f"kanband {__version__}")
    p.add_argument("--home", metavar="DIR",
                   help="state directory holding kanban.db, logs and workspaces "
                        "(default: $KANBAN_HOME, $STATE_DIRECTORY, $XDG_STATE_HOME/kanband, "
                        "~/.local/state/kanband)")
    p.add_argument("--socket", metavar="PATH",
                   help="Unix socket to serve (default: $KANBAN_SOCKET, "
                        "$RUNTIME_DIRECTORY/kanband.sock, <home>/kanband.sock)")
    p.add_argument("--pidfile", metavar="PATH",
                   help="pidfile to write and lock (default: $RUNTIME_DIRECTORY/kanband.pid, "
                        "<home>/kanband.pid)")
    p.add_argument("--config", metavar="FILE",
                   help="TOML config (default: $KANBAN_CONFIG, <home>/kanband.toml, "
                        "/etc/kanband/kanband.toml; none found = defaults)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the config file, print what it configures, and exit "
                        "(0 = valid, 2 = invalid)")
    p.add_argument("--log-format", choices=("auto", "json", "console", "journal"),
                   help="override daemon.log_format from the config")
    p.add_argument("--detach", action="store_true",
                   help="run in the background (for hosts without an init system): return 0 "
                        "once the daemon is ready, non-zero with the reason if it fails")
    p.add_argument("--log-file", metavar="FILE",
                   help="with --detach, where the log goes (default <home>/kanband.log)")
    return p


def _raise_nofile() -> None:
    """Clients and workers' log files all take descriptors: use the hard limit.
    Workers get the soft limit kanband started with back (reaper.worker_nofile):
    a program that uses select() breaks on descriptors over 1023."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
            reaper.worker_nofile = soft
        except (ValueError, OSError):
            pass


def detach() -> int | None:
    """Fork: the parent waits for the child's word and returns an exit code;
    the child (in a new session, stdin on /dev/null) returns None and runs on."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            word = r.read().decode(errors="replace").strip()
        if word.startswith("ready"):
            return 0
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(f"kanband: failed to start ({word or f'exit status {code}'})", file=sys.stderr)
        return code or 1
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ["KANBAN_READY_FD"] = str(wfd)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = resolve_daemon_paths(args.home, args.socket, args.pidfile, args.config)
        config = config_mod.load(paths.config)
    except KanbanError as e:
        print(f"kanband: {e.message}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"config OK: {paths.config or '(no file: defaults)'}")
        print(f"profiles: {', '.join(sorted(config.profiles))}")
        print(f"max_workers={config.max_workers} failure_limit={config.failure_limit} "
              f"on_stop={config.on_stop}")
        return 0
    if args.detach:
        code = detach()
        if code is not None:
            return code
        target = args.log_file or str(paths.home / "kanband.log")
        paths.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    logs.setup(args.log_format or config.log_format)
    _raise_nofile()
    daemon = Daemon(paths, config)
    daemon.config_arg = args.config
    ready_fd = os.environ.pop("KANBAN_READY_FD", None)
    daemon.ready_pipe = int(ready_fd) if ready_fd and ready_fd.isdigit() else None
    reaper.freeze_env()  # the environment is final: children get this one
    try:
        daemon.prepare()
    except AlreadyRunning as e:
        print(f"kanband: {e}", file=sys.stderr)
        daemon._tell_parent(str(e))
        return 1
    except (StartupError, OSError) as e:
        print(f"kanband: cannot start: {e}", file=sys.stderr)
        daemon._tell_parent(f"cannot start: {e}")
        daemon.close()
        return 1
    log.info("started", pid=os.getpid(), version=__version__, home=str(paths.home),
             config=str(paths.config) if paths.config else None)
    try:
        with asyncio.Runner(loop_factory=lambda: busypoll.new_loop(config.busy_poll)) as runner:
            runner.run(daemon.serve())
    finally:
        daemon.close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
