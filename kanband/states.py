"""Task statuses and the one transition table (SPEC §3).

Every operation that changes a task's status asks this module first; nothing
else in the code base decides which status may follow which. A leaf module.
"""

from __future__ import annotations

from kanband.errors import Conflict

TRIAGE = "triage"
TODO = "todo"
READY = "ready"
RUNNING = "running"
BLOCKED = "blocked"
DONE = "done"
ARCHIVED = "archived"
NEW = "new"  # pseudo-status: a task that does not exist yet

STATUSES = (TRIAGE, TODO, READY, RUNNING, BLOCKED, DONE, ARCHIVED)
TERMINAL = frozenset({DONE, BLOCKED, ARCHIVED})  # what `wait` waits for
PARENT_SATISFIED = frozenset({DONE, ARCHIVED})  # a child may run after these
LIVE = frozenset({TRIAGE, TODO, READY, RUNNING, BLOCKED, DONE})

# (from, to) -> the actions that may cause it. The table is the rule.
TRANSITIONS: dict[tuple[str, str], frozenset[str]] = {
    (NEW, TRIAGE): frozenset({"create"}),
    (NEW, TODO): frozenset({"create"}),
    (NEW, READY): frozenset({"create"}),
    (TRIAGE, TODO): frozenset({"promote"}),
    (TRIAGE, READY): frozenset({"promote"}),
    (READY, TODO): frozenset({"demote"}),
    (TODO, READY): frozenset({"promote_deps"}),
    (READY, RUNNING): frozenset({"claim"}),
    (RUNNING, READY): frozenset({"requeue"}),
    (RUNNING, BLOCKED): frozenset({"block", "give_up"}),
    (READY, BLOCKED): frozenset({"block", "give_up"}),
    (BLOCKED, READY): frozenset({"unblock"}),
    (BLOCKED, TODO): frozenset({"unblock"}),
    (RUNNING, DONE): frozenset({"complete"}),
    (READY, DONE): frozenset({"complete"}),
    (BLOCKED, DONE): frozenset({"complete"}),
    **{(s, ARCHIVED): frozenset({"archive"}) for s in STATUSES if s != ARCHIVED},
}

ACTIONS = frozenset(a for acts in TRANSITIONS.values() for a in acts)

# Words used in refusals ("cannot <verb> t_…: status is …").
VERBS = {"give_up": "give up", "promote_deps": "promote", "requeue": "requeue"}


def allowed(action: str, src: str, dst: str) -> bool:
    return action in TRANSITIONS.get((src, dst), ())


def sources(action: str) -> frozenset[str]:
    """Every status a task may be in for `action` to apply."""
    return frozenset(src for (src, _), acts in TRANSITIONS.items() if action in acts)


def targets(action: str, src: str) -> frozenset[str]:
    return frozenset(dst for (s, dst), acts in TRANSITIONS.items() if s == src and action in acts)


def refusal(action: str, task_id: str, status: str) -> str:
    return f"cannot {VERBS.get(action, action)} {task_id}: status is {status}"


def refused(action: str, task_id: str, status: str) -> Conflict:
    """The `conflict` error for an action the task's status does not allow."""
    return Conflict(refusal(action, task_id, status), {"task_id": task_id, "status": status})


# How each way a run can end affects its task (SPEC §4). One table, used by
# every path that closes a run: (counts as failure, status the task goes to).
# "completed" and "blocked" runs are closed by complete/block themselves.
OUTCOMES: dict[str, tuple[bool, str]] = {
    "completed": (False, DONE),
    "blocked": (False, BLOCKED),
    "crashed": (True, READY),
    "no_result": (True, READY),
    "timed_out": (True, READY),
    "stale": (True, READY),
    "spawn_failed": (True, READY),
    "rate_limited": (False, READY),
    "reclaimed": (False, READY),
    "interrupted": (False, READY),
    "lost": (False, READY),
}


# Every event kind (SPEC §7), for validating subscription filters.
EVENT_KINDS = frozenset({
    "created", "promoted", "demoted", "assigned", "linked", "unlinked", "commented",
    "claimed", "spawned", "heartbeat", "completed", "blocked", "unblocked", "archived",
    "reclaimed", "crashed", "no_result", "timed_out", "stale", "spawn_failed",
    "rate_limited", "gave_up", "interrupted", "lost", "adopted",
    "schema_upgraded"})  # board-level (no task): keeps event ids unique across schema 3
