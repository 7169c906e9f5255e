"""Dispatch decisions (SPEC §4): who may start now, and why the others wait.

Pure: takes counts, caps and `now`; makes no syscalls and touches no database.
The supervisor feeds it candidates in dispatch order and acts on its answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Callable

from kanband.config import Config


@dataclass
class Slots:
    """Live-worker counts against the global and per-profile caps."""

    config: Config
    running: int = 0
    by_profile: dict[str, int] = field(default_factory=dict)

    def full_reason(self, profile: str) -> str | None:
        if self.running >= self.config.max_workers:
            return f"all {self.config.max_workers} worker slots are busy (daemon.max_workers)"
        cap = self.config.profiles[profile].max_concurrency
        if cap is not None and self.by_profile.get(profile, 0) >= cap:
            return f"profile {profile!r} is at its max_concurrency of {cap}"
        return None

    def free_global(self) -> int:
        return max(0, self.config.max_workers - self.running)

    def open_profiles(self) -> list[str]:
        """Profiles that could take one more worker right now."""
        if self.free_global() == 0:
            return []
        return sorted(p for p in self.config.profiles if self.full_reason(p) is None)

    def take(self, profile: str) -> None:
        self.running += 1
        self.by_profile[profile] = self.by_profile.get(profile, 0) + 1



def waiting_reason(task: dict[str, Any], *, now: float, slots: Slots, paused: bool,
                   unfinished_parents: Callable[[str], list[str]],
                   busy: AbstractSet[str] = frozenset()) -> str | None:
    """Why a ready/todo task is not running, in words an operator can act on."""
    status = task["status"]
    if status == "todo":
        parents = unfinished_parents(task["id"])
        if parents:
            return "waiting for parent(s) to finish: " + ", ".join(parents)
        return "waiting to be promoted"
    if status != "ready":
        return None
    if task["id"] in busy:
        return "the previous worker of this task is still exiting (exit_grace / kill_grace)"
    if task["not_before"] is not None and task["not_before"] > now:
        left = task["not_before"] - now
        when = time.strftime("%H:%M:%S", time.localtime(task["not_before"]))
        why = "retry backoff" if task["consecutive_failures"] else "rate-limit cooldown"
        return f"{why} until {when}, {left:.0f}s left"
    assignee = task["assignee"]
    if not assignee:
        return "no assignee: assign a profile (kanbanctl assign) or claim it (kanbanctl claim)"
    if assignee not in slots.config.profiles:
        return (f"no profile named {assignee!r} is configured: waits for an external "
                f"claimer (kanbanctl claim {task['id']})")
    if paused:
        return "dispatch is paused (kanbanctl resume)"
    return slots.full_reason(assignee) or "waiting for the dispatcher"
