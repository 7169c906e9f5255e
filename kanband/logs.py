"""structlog set-up (SPEC §8): console on a TTY, JSON lines otherwise, and
native journald entries (syslog priority + structured fields such as TASK_ID,
RUN_ID, PID, PROFILE) when running under systemd's journal."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
from typing import Any

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
            "critical": 2}
_FIELD_OK = re.compile(r"[^A-Z0-9_]")


def under_journal(stream: Any = None) -> bool:
    """True if stderr is connected to the journal ($JOURNAL_STREAM names it)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    dev, _, ino = value.partition(":")
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def choose_format(configured: str, stream: Any = None) -> str:
    stream = stream or sys.stderr
    if configured != "auto":
        return configured
    if under_journal(stream):
        return "journal"
    return "console" if getattr(stream, "isatty", lambda: False)() else "json"


def journal_fields(event: dict[str, Any]) -> list[tuple[str, str]]:
    """MESSAGE, PRIORITY and one upper-case field per key of the log event."""
    level = str(event.pop("level", "info"))
    name = str(event.pop("event", ""))
    exc = event.pop("exception", None)
    event.pop("timestamp", None)
    text = " ".join(f"{k}={v}" for k, v in event.items())
    message = f"{name} {text}".strip() + (f"\n{exc}" if exc else "")
    fields = [("MESSAGE", message), ("PRIORITY", str(PRIORITY.get(level, 6))),
              ("SYSLOG_IDENTIFIER", "kanband"), ("EVENT", name)]
    for k, v in event.items():
        key = _FIELD_OK.sub("_", str(k).upper()).lstrip("_")[:64]
        if key and key not in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT"):
            fields.append((key, v if isinstance(v, str) else json.dumps(v, default=str)))
    return fields


def encode_journal(fields: list[tuple[str, str]]) -> bytes:
    """journald's native protocol: KEY=value lines, or a length-prefixed value
    when it holds a newline."""
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalLogger:
    """A structlog logger that sends each event to journald as a datagram, and
    falls back to a JSON line on stderr if the journal cannot take it."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def msg(self, **event: Any) -> None:
        fallback = json.dumps(event, default=str)
        try:
            self.sock.sendto(encode_journal(journal_fields(event)), self.path)
        except OSError:
            print(fallback, file=sys.stderr, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def setup(fmt: str = "auto", level: int = logging.INFO) -> str:
    fmt = choose_format(fmt)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if fmt == "journal":
        shared = JournalLogger()
        factory: Any = lambda *a: shared  # noqa: E731
        processors.append(lambda _l, _m, ev: ev)  # hand the dict to JournalLogger.msg
    else:
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
        processors.append(structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
                          else structlog.processors.JSONRenderer())
    structlog.configure(processors=processors,
                        wrapper_class=structlog.make_filtering_bound_logger(level),
                        logger_factory=factory, cache_logger_on_first_use=False)
    return fmt
