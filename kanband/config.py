"""Configuration (SPEC §1): a frozen dataclass; load() validates, no side effects."""

from __future__ import annotations

import math
import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kanband.errors import InvalidArgument, show

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|[smhd]?)\s*$")
_UNITS = {"": 1, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any, what: str = "duration") -> float:
    """Seconds from `300`, `"90s"`, `"30m"`, `"2h"`, `"1d"` (and `"500ms"`, `"100us"`)."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{what}: expected a duration like 300, 500ms, 90s, 30m, 2h or 1d, got {show(value)}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise InvalidArgument(f"{what}: must be a finite number of seconds, got {show(value)}")
        if value < 0:
            raise InvalidArgument(f"{what}: must not be negative, got {show(value)}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise InvalidArgument(f"{what}: expected a duration like 300, 500ms, 90s, 30m, 2h or 1d, got {show(value)}")


def parse_optional_duration(value: Any, what: str) -> float | None:
    """Empty string (or 0) means: off."""
    if value in ("", None):
        return None
    seconds = parse_duration(value, what)
    return seconds or None


@dataclass(frozen=True)
class Profile:
    name: str
    command: tuple[str, ...]
    max_concurrency: int | None = None
    max_runtime: float | None = None
    heartbeat_timeout: float | None = None
    complete_on_exit: bool = False
    rate_limit_cooldown: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    builtin: bool = False

    @property
    def uses_script(self) -> bool:
        """Does the command name {script} (the task body in a file)?"""
        return any(name == "script" for part in self.command
                   for _text, name, _spec, _conv in string.Formatter().parse(part))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "command": list(self.command),
                "max_concurrency": self.max_concurrency, "max_runtime": self.max_runtime,
                "heartbeat_timeout": self.heartbeat_timeout,
                "complete_on_exit": self.complete_on_exit,
                "rate_limit_cooldown": self.rate_limit_cooldown, "env": dict(self.env),
                "builtin": self.builtin}


# The built-in `shell` profile runs the task body as a POSIX shell script. Its
# command is what it amounts to; the supervisor runs the body in a subshell of
# the exit-status shim (reaper.SHELL_SHIM), writing {script} only for long bodies.
SHELL_PROFILE = Profile(name="shell", command=("/bin/sh", "{script}"),
                        complete_on_exit=True, builtin=True)


@dataclass(frozen=True)
class Notifier:
    platform: str
    command: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    max_workers: int = 8
    claim_ttl: float = 900.0
    failure_limit: int = 3
    retry_backoff: float = 10.0
    retry_backoff_max: float = 600.0
    kill_grace: float = 10.0
    exit_grace: float = 60.0
    default_max_runtime: float | None = None
    on_stop: str = "terminate"
    durability: str = "normal"
    socket_mode: int = 0o600
    socket_group: str = ""
    log_format: str = "auto"
    busy_poll: float = 100e-6  # kanband.busypoll: poll this long after answering a request
    profiles: dict[str, Profile] = field(default_factory=lambda: {"shell": SHELL_PROFILE})
    notifiers: dict[str, Notifier] = field(default_factory=dict)
    source: str | None = None  # the file it came from, None for defaults

    def backoff(self, failures: int) -> float:
        """Delay before retry number `failures` (1-based): doubles, capped."""
        return min(self.retry_backoff * (2 ** max(failures - 1, 0)), self.retry_backoff_max)


def _int(v: Any, key: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InvalidArgument(f"{key}: expected an integer >= {minimum}, got {show(v)}")
    return v


def _choice(v: Any, key: str, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise InvalidArgument(f"{key}: expected one of {', '.join(choices)}, got {show(v)}")
    return v


def _str(v: Any, key: str) -> str:
    if not isinstance(v, str):
        raise InvalidArgument(f"{key}: expected a string, got {show(v)}")
    return v


def _mode(v: Any, key: str) -> int:
    if isinstance(v, str) and re.fullmatch(r"0?[0-7]{3}", v):
        mode = int(v, 8)
        if mode & 0o600 != 0o600:
            raise InvalidArgument(f"{key}: the owner needs read and write (0600 at least), got {show(v)}")
        return mode
    raise InvalidArgument(f"{key}: expected an octal mode like \"0600\" or \"0660\", got {show(v)}")


BUSY_POLL_MAX = 0.01  # past this, polling costs more CPU than any wake-up it saves

_DAEMON_KEYS = {
    "max_workers": lambda v, k: _int(v, k, 1),
    "claim_ttl": lambda v, k: parse_duration(v, k) or _zero(k),
    "failure_limit": lambda v, k: _int(v, k, 1),
    "retry_backoff": parse_duration,
    "retry_backoff_max": parse_duration,
    "kill_grace": parse_duration,
    "exit_grace": parse_duration,
    "default_max_runtime": parse_optional_duration,
    "on_stop": lambda v, k: _choice(v, k, ("terminate", "keep")),
    "durability": lambda v, k: _choice(v, k, ("normal", "full")),
    "socket_mode": _mode,
    "socket_group": _str,
    "log_format": lambda v, k: _choice(v, k, ("auto", "json", "console", "journal")),
    "busy_poll": lambda v, k: _at_most(parse_duration(v, k), k, BUSY_POLL_MAX, "10ms"),
}


def _at_most(seconds: float, key: str, limit: float, shown: str) -> float:
    if seconds > limit:
        raise InvalidArgument(f"{key}: must be at most {shown} (a longer poll costs more CPU "
                              f"than the wake-up it saves), got {seconds:g}s")
    return seconds


def _zero(key: str) -> float:
    raise InvalidArgument(f"{key}: must be greater than zero")


def _profile(name: str, raw: Any) -> Profile:
    where = f"profiles.{name}"
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: expected a table")
    known = {"command", "max_concurrency", "max_runtime", "heartbeat_timeout",
             "complete_on_exit", "rate_limit_cooldown", "env"}
    for k in raw:
        if k not in known:
            raise InvalidArgument(f"{where}.{k}: unknown key (known: {', '.join(sorted(known))})")
    cmd = raw.get("command")
    if (not isinstance(cmd, list) or not cmd
            or not all(isinstance(c, str) and c for c in cmd)):
        raise InvalidArgument(f"{where}.command: expected a non-empty list of non-empty strings")
    for part in cmd:
        problem = _placeholder_problem(part)
        if problem:
            raise InvalidArgument(f"{where}.command: bad placeholder in {show(part)}: {problem}")
    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise InvalidArgument(f"{where}.env: expected a table of strings")
    coe = raw.get("complete_on_exit", False)
    if not isinstance(coe, bool):
        raise InvalidArgument(f"{where}.complete_on_exit: expected true or false, got {coe!r}")
    mc = raw.get("max_concurrency")
    return Profile(
        name=name, command=tuple(cmd),
        max_concurrency=None if mc is None else _int(mc, f"{where}.max_concurrency", 1),
        max_runtime=parse_optional_duration(raw.get("max_runtime"), f"{where}.max_runtime"),
        heartbeat_timeout=parse_optional_duration(raw.get("heartbeat_timeout"),
                                                  f"{where}.heartbeat_timeout"),
        complete_on_exit=coe,
        rate_limit_cooldown=parse_duration(raw.get("rate_limit_cooldown", 60),
                                           f"{where}.rate_limit_cooldown"),
        env=dict(env))


PLACEHOLDERS = ("task_id", "run_id", "profile", "workspace", "context_file", "script")


def _placeholder_problem(part: str) -> str | None:
    """Only plain {name} fields from PLACEHOLDERS: no attributes, indexes,
    conversions or format specs (which could also allocate without bound)."""
    try:
        fields = list(string.Formatter().parse(part))
    except ValueError as e:
        return str(e)
    for _text, name, spec, conv in fields:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conv:
            return (f"unknown placeholder {{{name}}} (known: "
                    + ", ".join("{%s}" % p for p in PLACEHOLDERS) + "; write { as {{)")
    return None


def from_dict(data: dict[str, Any], source: str | None = None) -> Config:
    for k in data:
        if k not in ("daemon", "profiles", "notifiers"):
            raise InvalidArgument(f"{k}: unknown section (known: daemon, profiles, notifiers)")
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise InvalidArgument("daemon: expected a table")
    values: dict[str, Any] = {}
    for k, v in daemon.items():
        if k not in _DAEMON_KEYS:
            raise InvalidArgument(f"daemon.{k}: unknown key (known: {', '.join(sorted(_DAEMON_KEYS))})")
        values[k] = _DAEMON_KEYS[k](v, f"daemon.{k}")
    profiles = {"shell": SHELL_PROFILE}
    raw_profiles = data.get("profiles", {})
    if not isinstance(raw_profiles, dict):
        raise InvalidArgument("profiles: expected a table of [profiles.NAME] tables")
    for name, raw in raw_profiles.items():
        if name in ("none", "") or "," in name:
            raise InvalidArgument(f"profiles.{name}: reserved or invalid profile name")
        profiles[name] = _profile(name, raw)
    notifiers = {}
    raw_notifiers = data.get("notifiers", {})
    if not isinstance(raw_notifiers, dict):
        raise InvalidArgument("notifiers: expected a table of [notifiers.PLATFORM] tables")
    for platform, raw in raw_notifiers.items():
        cmd = raw.get("command") if isinstance(raw, dict) else None
        if (not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) and c for c in cmd)):
            raise InvalidArgument(f"notifiers.{platform}.command: expected a non-empty list of strings")
        extra = set(raw) - {"command"}
        if extra:
            raise InvalidArgument(f"notifiers.{platform}.{sorted(extra)[0]}: unknown key (known: command)")
        notifiers[platform] = Notifier(platform=platform, command=tuple(cmd))
    if values.get("retry_backoff_max", 600.0) < values.get("retry_backoff", 10.0):
        raise InvalidArgument("daemon.retry_backoff_max: must be >= daemon.retry_backoff")
    return Config(**values, profiles=profiles, notifiers=notifiers, source=source)


def load(path: Path | None) -> Config:
    """Read and validate; errors name the file and the key."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read config: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return from_dict(data, str(path))
    except InvalidArgument as e:
        raise InvalidArgument(f"{path}: {e.message}") from None
