"""Validation of RPC parameters and the limits of SPEC §2.

Each handler declares what it reads through a `Params` object; anything it
did not read is reported as an unknown parameter, so typos fail loudly.
"""

from __future__ import annotations

import json
from typing import Any

from kanband.config import parse_duration
from kanband.errors import InvalidArgument, show

MAX_TITLE = 500
MAX_TEXT = 256 * 1024  # body, summary, comment, result (UTF-8 bytes)
MAX_METADATA = 64 * 1024  # encoded
MAX_NAME = 200  # assignee, tenant, author, idempotency key, ...
MAX_LIST = 1000
INT_RANGE = (-(2 ** 31), 2 ** 31 - 1)
_ALWAYS = frozenset({"run_token"})


class Params:
    def __init__(self, raw: Any) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise InvalidArgument("params must be a map")
        for k in raw:
            if not isinstance(k, str):
                raise InvalidArgument(f"parameter names must be strings, got {k!r}")
        self.raw = raw
        self._read: set[str] = set(_ALWAYS)

    def done(self) -> None:
        extra = sorted(set(self.raw) - self._read)
        if extra:
            raise InvalidArgument(f"unknown parameter {extra[0]!r}")

    def _get(self, name: str, required: bool) -> Any:
        self._read.add(name)
        value = self.raw.get(name)
        if value is None and required:
            raise InvalidArgument(f"missing parameter {name!r}")
        return value

    def str(self, name: str, required: bool = False, max_bytes: int = MAX_NAME,
            allow_empty: bool = True, single_line: bool = False) -> str | None:
        v = self._get(name, required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise InvalidArgument(f"{name}: expected a string, got {type(v).__name__}")
        size = len(v.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise InvalidArgument(f"{name}: {size} bytes is over the limit of {max_bytes}")
        if (max_bytes <= MAX_NAME or single_line) and any(c in v for c in "\x00\n\r"):
            raise InvalidArgument(f"{name}: must not contain NUL or line breaks")
        if not allow_empty and not v.strip():
            raise InvalidArgument(f"{name}: must not be empty")
        return v

    def text(self, name: str, required: bool = False) -> str | None:
        return self.str(name, required, MAX_TEXT)

    def task_id(self, name: str = "id") -> str:
        v = self.str(name, required=True)
        assert v is not None
        return v

    def int(self, name: str, required: bool = False, minimum: int = INT_RANGE[0],
            maximum: int = INT_RANGE[1]) -> int | None:
        v = self._get(name, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidArgument(f"{name}: expected an integer, got {type(v).__name__}")
        if not minimum <= v <= maximum:
            raise InvalidArgument(f"{name}: must be between {minimum} and {maximum}, got {v}")
        return v

    def number(self, name: str, required: bool = False, minimum: float = 0.0,
               maximum: float = 10 * 365 * 86400.0) -> float | None:
        v = self._get(name, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise InvalidArgument(f"{name}: expected a number, got {show(v)}")
        if not minimum <= v <= maximum:
            raise InvalidArgument(f"{name}: must be between {minimum} and {maximum}, got {v}")
        return float(v)

    def duration(self, name: str) -> float | None:
        v = self._get(name, False)
        if v is None or v == "":
            return None
        seconds = parse_duration(v, name)
        if seconds <= 0 or seconds > 10 * 365 * 86400:
            raise InvalidArgument(f"{name}: must be a positive duration, got {show(v)}")
        return seconds

    def bool(self, name: str, default: bool = False) -> bool:
        v = self._get(name, False)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise InvalidArgument(f"{name}: expected true or false, got {show(v)}")
        return v

    def str_list(self, name: str, max_items: int = MAX_LIST) -> list[str]:
        v = self._get(name, False)
        if v is None:
            return []
        if not isinstance(v, (list, tuple)):
            raise InvalidArgument(f"{name}: expected a list of strings")
        if len(v) > max_items:
            raise InvalidArgument(f"{name}: {len(v)} items is over the limit of {max_items}")
        for item in v:
            if not isinstance(item, str):
                raise InvalidArgument(f"{name}: expected a list of strings, found {show(item)}")
            if len(item.encode("utf-8", "surrogatepass")) > MAX_NAME or "\x00" in item:
                raise InvalidArgument(f"{name}: item too long or holds NUL: {show(item, 40)}")
        return list(v)

    def metadata(self, name: str = "metadata") -> dict[str, Any] | None:
        v = self._get(name, False)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise InvalidArgument(f"{name}: must be a map (a JSON object)")
        try:
            size = len(json.dumps(v, separators=(",", ":"), allow_nan=False).encode())
        except RecursionError:
            raise InvalidArgument(f"{name}: nested too deeply") from None
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"{name}: cannot be stored as JSON: {str(e)[:200]}") from None
        if size > MAX_METADATA:
            raise InvalidArgument(f"{name}: {size} bytes encoded is over the limit of {MAX_METADATA}")
        return v


def check_title(title: str | None) -> str:
    t = (title or "").strip()
    if not t:
        raise InvalidArgument("title: must not be empty")
    if len(t) > MAX_TITLE:
        raise InvalidArgument(f"title: {len(t)} characters is over the limit of {MAX_TITLE}")
    return t


def check_skills(skills: list[str]) -> list[str]:
    for s in skills:
        if not s.strip():
            raise InvalidArgument("skills: skill names must not be empty")
        if "," in s:
            raise InvalidArgument(f"skills: skill names must not contain commas: {s!r}")
    return [s.strip() for s in skills]
