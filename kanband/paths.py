"""Where the daemon's things live (SPEC §1). The client side is kanband.locate."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kanband.errors import InvalidArgument
from kanband.locate import SOCKET_NAME, env_value, state_home
from kanband.locate import check_socket_path as _check

PIDFILE_NAME = "kanband.pid"
DB_NAME = "kanban.db"
CONFIG_NAME = "kanband.toml"
SYSTEM_CONFIG = Path("/etc/kanband/kanband.toml")
_env = env_value


def default_home(env: dict[str, str] | None = None) -> Path:
    for var in ("KANBAN_HOME", "STATE_DIRECTORY"):
        value = _env(var, env)
        if value:
            # systemd may pass several colon-separated state directories.
            return Path(value.split(":")[0]).expanduser()
    return Path(state_home(env))


def check_socket_path(path: Path) -> Path:
    return Path(_check(str(path)))


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
        if p.exists():
            raise InvalidArgument(f"config path {p} exists but is not a file")
    return None
