"""The reaper's /proc readers against real processes."""

from __future__ import annotations

import os
import subprocess

import psutil

from kanband.reaper import children_of, proc_start_time


def test_children_of_sees_every_child_of_a_long_list():
    """/proc/<pid>/task/*/children is a seq_file that comes a page (~680 pids) per
    read: all 1000 children must be seen, or leftovers escape the kill."""
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(1000)]
    try:
        seen = set(children_of())
        assert {p.pid for p in procs} <= seen, f"{len({p.pid for p in procs} - seen)} missed"
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def test_proc_start_time_matches_psutil():
    """Start times identify a process across a daemon restart; ours must equal
    psutil's create_time(), which re-adoption compares against."""
    for pid in (1, os.getpid()):
        assert proc_start_time(pid) == psutil.Process(pid).create_time()
    assert proc_start_time(2 ** 22 + 12345) is None
