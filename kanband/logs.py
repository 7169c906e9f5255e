"""structlog set-up: console on a TTY, JSON lines otherwise (SPEC §8)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def choose_format(configured: str, stream: Any = None) -> str:
    stream = stream or sys.stderr
    if configured != "auto":
        return configured
    return "console" if getattr(stream, "isatty", lambda: False)() else "json"


def setup(fmt: str = "auto", level: int = logging.INFO) -> str:
    fmt = choose_format(fmt)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    else:
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    return fmt
