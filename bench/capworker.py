"""A worker that ignores SIGTERM (for cap_accuracy).

Writes, in its working directory (the task workspace): `pid`, `start` (epoch
seconds when it began), and `term` (epoch seconds when the first SIGTERM
arrived). Then idles until SIGKILL ends it. kanband signals both the process
group and each process, so SIGTERM arrives more than once, possibly while the
handler is still running: only the first is recorded, and nothing the handler
does may raise (an exception there would end the worker early).
"""

import os
import signal
import time

_got = False


def on_term(signum, frame):  # noqa: ARG001
    global _got
    if _got:
        return
    _got = True
    t = time.time()
    try:
        with open("term.tmp", "w") as f:
            f.write(repr(t))
        os.replace("term.tmp", "term")
    except OSError:
        pass


signal.signal(signal.SIGTERM, on_term)
with open("start", "w") as f:
    f.write(repr(time.time()))
with open("pid.tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace("pid.tmp", "pid")
while True:
    time.sleep(0.5)
