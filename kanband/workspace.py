"""Workspace specs (`scratch`, `dir:PATH`, `worktree[:REPO]`) and their paths."""

from __future__ import annotations

import os
import subprocess
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
    """Create the workspace if needed (for worktrees: `git worktree add`, once)."""
    target = path_for(task, workspaces_root)
    kind = task["workspace_kind"]
    try:
        if kind in ("scratch", "dir"):
            target.mkdir(parents=True, exist_ok=True)
            return target
        if target.is_dir():
            return target
        repo = Path(task["workspace_path"])
        branch = f"kanban/{task['id']}"
        have_branch = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
            capture_output=True, text=True, timeout=60).returncode == 0
        cmd = ["git", "-C", str(repo), "worktree", "add", str(target)]
        cmd += [branch] if have_branch else ["-b", branch]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise OSError(f"git worktree add failed: {(proc.stderr or proc.stdout).strip()}")
        return target
    except (OSError, subprocess.SubprocessError) as e:
        raise OSError(f"cannot prepare workspace {target}: {e}") from None
