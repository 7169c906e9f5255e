"""kanbanctl stays light: no asyncio, structlog or psutil on its import path."""

import subprocess
import sys


def test_kanbanctl_imports_no_heavy_modules():
    """Importing and building the whole CLI parser pulls in none of the daemon's heavy modules."""
    code = ("import sys, kanbanctl.cli as c; c.build_parser(); "
            "print(','.join(m for m in ('asyncio', 'structlog', 'psutil') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_kanbanctl_help_runs_without_daemon():
    """`kanbanctl --help` works with no daemon and lists the board verbs."""
    out = subprocess.run([sys.executable, "-m", "kanbanctl", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0
    for verb in ("create", "list", "claim", "complete", "dispatch", "wait", "reclaim"):
        assert verb in out.stdout
