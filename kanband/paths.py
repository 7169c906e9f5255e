"""Where things live (SPEC §1). Shared by kanband and kanbanctl: stays light."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kanband.errors import InvalidArgument

SOCKET_NAME = "kanband.sock"
PIDFILE_NAME = "kanband.pid"
DB_NAME = "kanban.db"
CONFIG_NAME = "kanband.toml"
SYSTEM_CONFIG = Path("/etc/kanband/kanband.toml")
# The path packaging/systemd/kanband.service and kanband.socket use.
SYSTEM_SOCKET = Path("/run/kanband/kanband.sock")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def _env(name: str, env: dict[str, str] | None) -> str | None:
    value = (env if env is not None else os.environ).get(name)
    return value or None


def default_home(env: dict[str, str] | None = None) -> Path:
    for var in ("KANBAN_HOME", "STATE_DIRECTORY"):
        value = _env(var, env)
        if value:
            # systemd may pass several colon-separated state directories.
            return Path(value.split(":")[0]).expanduser()
    xdg = _env("XDG_STATE_HOME", env)
    if xdg:
        return Path(xdg) / "kanband"
    return Path.home() / ".local" / "state" / "kanband"


def check_socket_path(path: Path) -> Path:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise InvalidArgument(
            f"socket path is {len(os.fsencode(str(path)))} bytes, longer than the "
            f"{MAX_SOCKET_PATH} the kernel allows: {path}; choose a shorter one "
            "with --socket or $KANBAN_SOCKET")
    return path


@dataclass(frozen=True)
class DaemonPaths:
    home: Path
    db: Path
    socket: Path
    pidfile: Path
    logs: Path
    workspaces: Path
    runs: Path
    config: Path | None  # None: no file found, defaults apply

    def as_dict(self) -> dict[str, str | None]:
        return {k: (str(v) if v is not None else None) for k, v in self.__dict__.items()}


def resolve_daemon_paths(home: str | None = None, socket: str | None = None,
                         pidfile: str | None = None, config: str | None = None,
                         env: dict[str, str] | None = None) -> DaemonPaths:
    h = Path(home).expanduser() if home else default_home(env)
    h = h.absolute()
    runtime = _env("RUNTIME_DIRECTORY", env)
    runtime_dir = Path(runtime.split(":")[0]) if runtime else None
    if socket:
        sock = Path(socket).expanduser()
    elif _env("KANBAN_SOCKET", env):
        sock = Path(_env("KANBAN_SOCKET", env)).expanduser()  # type: ignore[arg-type]
    elif runtime_dir:
        sock = runtime_dir / SOCKET_NAME
    else:
        sock = h / SOCKET_NAME
    if pidfile:
        pid = Path(pidfile).expanduser()
    elif runtime_dir:
        pid = runtime_dir / PIDFILE_NAME
    else:
        pid = h / PIDFILE_NAME
    logs_env = _env("LOGS_DIRECTORY", env)
    logs = Path(logs_env.split(":")[0]) if logs_env else h / "logs"
    return DaemonPaths(home=h, db=h / DB_NAME, socket=check_socket_path(sock.absolute()),
                       pidfile=pid.absolute(), logs=logs, workspaces=h / "workspaces",
                       runs=h / "runs", config=find_config(config, h, env))


def find_config(explicit: str | None, home: Path,
                env: dict[str, str] | None = None) -> Path | None:
    """--config and $KANBAN_CONFIG must exist; the fallbacks may be absent."""
    named = explicit or _env("KANBAN_CONFIG", env)
    if named:
        p = Path(named).expanduser()
        if not p.is_file():
            raise InvalidArgument(f"config file not found: {p}")
        return p.absolute()
    for p in (home / CONFIG_NAME, SYSTEM_CONFIG):
        if p.is_file():
            return p
    return None


def client_socket(socket: str | None = None, home: str | None = None,
                  env: dict[str, str] | None = None) -> Path:
    """How kanbanctl finds the daemon (SPEC §1)."""
    if socket:
        return check_socket_path(Path(socket).expanduser())
    if home:  # an explicit flag beats the environment
        return check_socket_path(Path(home).expanduser() / SOCKET_NAME)
    if _env("KANBAN_SOCKET", env):
        return check_socket_path(Path(_env("KANBAN_SOCKET", env)).expanduser())  # type: ignore[arg-type]
    if _env("KANBAN_HOME", env):
        return check_socket_path(Path(_env("KANBAN_HOME", env)).expanduser() / SOCKET_NAME)  # type: ignore[arg-type]
    candidates = client_socket_candidates(env)
    for c in candidates:
        if c.exists():
            return c
    return hand_started_socket(env)  # named in the "not running" message


def hand_started_socket(env: dict[str, str] | None = None) -> Path:
    xdg_state = _env("XDG_STATE_HOME", env)
    state = Path(xdg_state) / "kanband" if xdg_state else Path.home() / ".local" / "state" / "kanband"
    return state / SOCKET_NAME


def client_socket_candidates(env: dict[str, str] | None = None) -> list[Path]:
    """User unit, then hand-started daemon, then the system service."""
    out = []
    xdg_run = _env("XDG_RUNTIME_DIR", env)
    if xdg_run:
        out.append(Path(xdg_run) / "kanband" / SOCKET_NAME)
    out.append(hand_started_socket(env))
    out.append(SYSTEM_SOCKET)
    return out
