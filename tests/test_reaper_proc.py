"""The reaper's /proc readers against real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import psutil
import pytest

from kanband.reaper import Reaper, children_of, proc_start_time


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


def test_spawn_start_time_is_the_one_proc_gives(tmp_path):
    """Reaper.spawn takes a worker's start time from the clock around the fork
    (reading /proc/<pid>/stat would wait for the exec); it must be exactly what
    /proc gives, or a restarted daemon would not re-adopt the worker."""
    reaper = Reaper(on_exit=lambda w: None)
    log_fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for _ in range(50):
            popen, started = reaper.spawn(["sleep", "5"], cwd=tmp_path, env=dict(os.environ),
                                          log_fd=log_fd, run_dir=tmp_path)
            try:
                assert started == proc_start_time(popen.pid) == \
                    psutil.Process(popen.pid).create_time()
            finally:
                os.killpg(popen.pid, 9)
                popen.wait()
    finally:
        os.close(log_fd)


def test_a_kill_needing_a_newer_scan_does_not_spin_on_a_finished_one():
    """A scan finishes on its thread; its done-callback waits in the loop's queue.
    A kill that runs first and needs a scan started after its signal must start
    a new one: awaiting the finished future does not yield to the loop, so the
    old code spun there forever (the loop stalled for good: kill_burst in a full
    bench run, two unexplained full-suite timeouts). Run in a child so that a
    spinning loop fails the test by timeout instead of hanging it."""
    script = textwrap.dedent("""
        import asyncio, time
        from kanband.reaper import Reaper, _Scan

        async def main():
            loop = asyncio.get_running_loop()
            reaper = Reaper(on_exit=lambda w: None)
            reaper.loop = loop
            old = loop.create_future()
            reaper._scanning = old
            old.add_done_callback(reaper._scanned)
            old.set_result(_Scan(at=time.monotonic() - 10, by_run={}, live_groups=set()))
            since = time.monotonic()  # the kill's signal went out after that scan began
            got = await reaper.scan(since)  # before the done-callback has run
            assert got.at >= since, (got.at, since)
            assert reaper._scan is got and reaper._scanning is None
            print("ok")

        asyncio.run(main())
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_helper_argv_restores_the_limit_and_fails_like_popen(monkeypatch):
    """With kanband's open-files limit raised, helpers run under a small sh that
    gives the original soft limit back; a command that cannot be found still
    raises FileNotFoundError before anything starts, as Popen would."""
    from kanband import reaper
    env = {"PATH": os.environ["PATH"]}
    monkeypatch.setattr(reaper, "worker_nofile", None)
    assert reaper.helper_argv(["true", "x"], env) == ["true", "x"]
    import resource
    low = min(200, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1)
    monkeypatch.setattr(reaper, "worker_nofile", low)
    argv = reaper.helper_argv(["sh", "-c", "ulimit -S -n"], env)
    assert subprocess.run(argv, capture_output=True, text=True).stdout.strip() == str(low)
    with pytest.raises(FileNotFoundError):
        reaper.helper_argv(["no-such-command-kb"], env)


def test_frozen_environment_is_the_base_of_every_child(monkeypatch):
    """freeze_env (called by kanband at start-up) fixes the base environment of
    children: later changes to os.environ do not reach them, systemd's and
    kanband's own variables stay out, `extra` is merged, and every call returns
    a new dict. Unfrozen, child_env reads os.environ as it is."""
    from kanband import reaper
    monkeypatch.setattr(reaper, "_frozen_env", None)
    monkeypatch.setenv("KB_FROZEN_TEST", "before")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/x.sock")
    monkeypatch.setenv("KANBAN_READY_FD", "9")
    assert reaper.child_env()["KB_FROZEN_TEST"] == "before"
    reaper.freeze_env()
    monkeypatch.setenv("KB_FROZEN_TEST", "after")
    monkeypatch.setenv("KB_FROZEN_LATE", "late")
    env = reaper.child_env({"KANBAN_TASK_ID": "t_1"})
    assert env["KB_FROZEN_TEST"] == "before" and "KB_FROZEN_LATE" not in env
    assert "NOTIFY_SOCKET" not in env and "KANBAN_READY_FD" not in env
    assert env["KANBAN_TASK_ID"] == "t_1"
    env["KB_MUTATED"] = "x"
    assert "KB_MUTATED" not in reaper.child_env() and "KANBAN_TASK_ID" not in reaper.child_env()
    monkeypatch.setattr(reaper, "_frozen_env", None)
    assert reaper.child_env()["KB_FROZEN_TEST"] == "after"


def test_kill_turns_spread_a_burst_over_loop_steps():
    """Kills started together take at most KILL_TURNS turns per loop step (so the
    loop answers requests between them), in the order they asked, none lost; a
    cancelled waiter gives its place up; an uncontended turn does not yield."""
    import asyncio

    from kanband import reaper as reaper_mod

    async def main() -> None:
        loop = asyncio.get_running_loop()
        r = Reaper(on_exit=lambda w: None)
        r.loop = loop
        step = 0
        ticking = True

        def tick() -> None:  # runs once per loop step
            nonlocal step
            step += 1
            if ticking:
                loop.call_soon(tick)
        loop.call_soon(tick)
        await asyncio.sleep(0)

        before = step
        await r._turn()
        assert step == before, "an uncontended turn yielded to the loop"
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the turns of that step are over

        passed: list[tuple[int, int]] = []

        async def kill(i: int) -> None:
            await r._turn()
            passed.append((i, step))
        n = 5 * reaper_mod.KILL_TURNS
        tasks = [asyncio.ensure_future(kill(i)) for i in range(n)]
        tasks[3].cancel()  # early in line; the others must not wait for it
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        order = [i for i, _ in passed]
        assert order == [i for i in range(n) if i != 3]
        per_step: dict[int, int] = {}
        for _, s in passed:
            per_step[s] = per_step.get(s, 0) + 1
        assert max(per_step.values()) <= reaper_mod.KILL_TURNS, per_step
        assert len(per_step) >= 5, per_step
        ticking = False
    asyncio.run(main())
