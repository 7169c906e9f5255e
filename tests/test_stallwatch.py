"""The stall watch (kanband/stallwatch.py) against a real event loop in a child
Python: a loop blocked with the GIL held still gets its stack dumped."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_loop_stuck_holding_the_gil_gets_every_stack_dumped():
    """ctypes.PyDLL calls C without releasing the GIL: libc sleep(3) on the loop
    thread then stops every Python thread, the watch's own included. The
    faulthandler watchdog the watch keeps armed dumps the stacks all the same."""
    script = textwrap.dedent("""
        import asyncio, ctypes
        from kanband.stallwatch import StallWatch

        def wedged_with_the_gil():
            ctypes.PyDLL(None).sleep(3)

        async def main():
            watch = StallWatch(asyncio.get_running_loop(), stall=0.3, beat=0.1, dump=1.0)
            watch.start()
            armed = await asyncio.to_thread(watch.armed.wait, 20)  # the loop is healthy
            assert armed, "the watch never armed the dump"
            wedged_with_the_gil()
            watch.stop()

        asyncio.run(main())
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Timeout (0:00:01)!" in r.stderr, r.stderr
    dump = r.stderr[r.stderr.index("Timeout (0:00:01)!"):]
    assert "wedged_with_the_gil" in dump, dump

