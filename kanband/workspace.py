"""Workspace specs (`scratch`, `dir:PATH`, `worktree[:REPO]`) and their paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kanband.errors import InvalidArgument


def parse_spec(spec: str | None) -> tuple[str, str | None]:
    """Validate a workspace spec as created; returns (kind, path)."""
    if spec in (None, "", "scratch"):
        return "scratch", None
    assert spec is not None
    kind, _, path = spec.partition(":")
    if kind == "dir":
        if not path or not os.path.isabs(path):
            raise InvalidArgument(f"workspace: dir:PATH needs an absolute path, got {spec!r}")
        return "dir", os.path.normpath(path)
    if kind == "worktree":
        if path and not os.path.isabs(path):
            raise InvalidArgument(f"workspace: worktree:REPO needs an absolute path, got {spec!r}")
        if not path:
            raise InvalidArgument("workspace: worktree needs a repository: worktree:/path/to/repo")
        return "worktree", os.path.normpath(path)
    raise InvalidArgument(f"workspace: expected scratch, dir:PATH or worktree[:REPO], got {spec!r}")


def path_for(task: dict[str, Any], workspaces_root: Path | str) -> Path:
    """Where a task's worker runs."""
    return Path(path_str(task, str(workspaces_root)))


def path_str(task: dict[str, Any], workspaces_root: str) -> str:
    """path_for as a string, without building Path objects (task_out calls it per row)."""
    kind, path = task["workspace_kind"], task["workspace_path"]
    if kind == "dir":
        return path
    if kind == "worktree":
        return f"{path}/.worktrees/{task['id']}"
    return f"{workspaces_root}/{task['id']}"


def worktree_plan(task: dict[str, Any], workspaces_root: Path) -> tuple[Path, Path, str]:
    """(target directory, repository, branch) of a worktree workspace."""
    return (path_for(task, workspaces_root), Path(task["workspace_path"]),
            f"kanban/{task['id']}")


def prepare(task: dict[str, Any], workspaces_root: Path) -> Path:
    """Create a scratch or dir: workspace if needed. A worktree is added by git,
    which only the supervisor runs (Supervisor.prepare_workspace)."""
    target = path_for(task, workspaces_root)
    if task["workspace_kind"] == "worktree":
        if target.is_dir():
            return target
        raise OSError(f"cannot prepare workspace {target}: a worktree is added by the "
                      "daemon's supervisor")
    try:
        target.mkdir(parents=True, exist_ok=True)
        return target
    except OSError as e:
        raise OSError(f"cannot prepare workspace {target}: {e}") from None
