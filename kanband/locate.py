"""How a client finds the daemon's socket (SPEC §1). Import-light on purpose:
kanbanctl starts with this, so it uses os.path only (no pathlib, no dataclasses)."""

from __future__ import annotations

import os

from kanband.errors import InvalidArgument

SOCKET_NAME = "kanband.sock"
# The path packaging/systemd/kanband.socket listens on.
SYSTEM_SOCKET = "/run/kanband/kanband.sock"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def env_value(name: str, env: dict[str, str] | None = None) -> str | None:
    value = (os.environ if env is None else env).get(name)
    return value or None


def state_home(env: dict[str, str] | None = None) -> str:
    """$XDG_STATE_HOME/kanband, else ~/.local/state/kanband."""
    xdg = env_value("XDG_STATE_HOME", env)
    if xdg:
        return os.path.join(xdg, "kanband")
    return os.path.join(os.path.expanduser("~"), ".local", "state", "kanband")


def check_socket_path(path: str) -> str:
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise InvalidArgument(
            f"socket path is {size} bytes, longer than the {MAX_SOCKET_PATH} the kernel "
            f"allows: {path}; choose a shorter one with --socket or $KANBAN_SOCKET")
    return path


def hand_started_socket(env: dict[str, str] | None = None) -> str:
    return os.path.join(state_home(env), SOCKET_NAME)


def client_socket_candidates(env: dict[str, str] | None = None) -> list[str]:
    """User unit, then hand-started daemon, then the system service."""
    out = []
    xdg_run = env_value("XDG_RUNTIME_DIR", env)
    if xdg_run:
        out.append(os.path.join(xdg_run, "kanband", SOCKET_NAME))
    out.append(hand_started_socket(env))
    out.append(SYSTEM_SOCKET)
    return out


def client_socket(socket: str | None = None, home: str | None = None,
                  env: dict[str, str] | None = None) -> str:
    """--socket, --home, $KANBAN_SOCKET, $KANBAN_HOME, then the first existing of
    the user-unit, hand-started and system sockets."""
    if socket:
        return check_socket_path(os.path.expanduser(socket))
    if home:  # an explicit flag beats the environment
        return check_socket_path(os.path.join(os.path.expanduser(home), SOCKET_NAME))
    named = env_value("KANBAN_SOCKET", env)
    if named:
        return check_socket_path(os.path.expanduser(named))
    kh = env_value("KANBAN_HOME", env)
    if kh:
        return check_socket_path(os.path.join(os.path.expanduser(kh), SOCKET_NAME))
    for c in client_socket_candidates(env):
        if os.path.exists(c):
            return c
    return hand_started_socket(env)  # named in the "not running" message
