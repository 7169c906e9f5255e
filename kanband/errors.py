"""Errors with stable codes (SPEC §5). A leaf module: the client imports it."""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time: kanbanctl stays light
if TYPE_CHECKING:
    from typing import Any


def show(value: Any, limit: int = 80) -> str:
    """A short, safe repr of a bad value for an error message: bounded in length
    and in nesting, so a huge or deeply nested input cannot blow up the reply."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict = 3, limit, limit, 8, 8
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class KanbanError(Exception):
    """Base class: every error that crosses the RPC boundary has a code."""

    code = "internal"

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out


class InvalidArgument(KanbanError):
    code = "invalid_argument"


class NotFound(KanbanError):
    code = "not_found"


class Conflict(KanbanError):
    """The object is in the wrong state for the operation."""

    code = "conflict"


class Forbidden(KanbanError):
    code = "forbidden"


class TooLarge(KanbanError):
    code = "too_large"


class MethodNotFound(KanbanError):
    code = "method_not_found"


class Unavailable(KanbanError):
    code = "unavailable"


class Internal(KanbanError):
    code = "internal"


BY_CODE: dict[str, type[KanbanError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, Conflict, Forbidden, TooLarge,
                MethodNotFound, Unavailable, Internal)
}
CODES = tuple(BY_CODE)


def from_wire(err: Any) -> KanbanError:
    """Rebuild an error received in a response frame."""
    if isinstance(err, dict):
        cls = BY_CODE.get(str(err.get("code")), Internal)
        return cls(str(err.get("message", "")), err.get("data"))
    return Internal(f"malformed error from daemon: {err!r}")
