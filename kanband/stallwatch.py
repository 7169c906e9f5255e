"""A watch on the event loop: when it stops turning, say where it is stuck.

Everything kanband does runs on one event loop, so a loop that stops (a slow
system call, a lock, a bug) stops the whole daemon: no answers, no reaping.
systemd's watchdog restarts a daemon whose loop stops for WatchdogSec, but
says nothing about why. This thread does: the loop stamps a beat every
BEAT seconds; when the beat is older than STALL seconds the thread logs
`loop_stalled` with the loop thread's stack (again every REPEAT seconds while
it stays stuck, as the stack may move on), and `loop_resumed` with how long
the loop stood still once it turns again.

That thread needs the GIL to log. Should something hold the GIL itself (a C
call that never lets go), nothing Python can run; for that case the thread
keeps faulthandler's C watchdog armed while the loop is healthy, so a loop
that stays stuck DUMP seconds gets every thread's stack written to stderr
(plain text, starting "Timeout (0:00:20)!"). A process stopped as a whole
(SIGSTOP, a cgroup freezer) for that long gets the dump too when it resumes:
that timer counts the time it was stopped.
"""

from __future__ import annotations

import asyncio
import faulthandler
import sys
import threading
import time
import traceback

import structlog

log = structlog.get_logger("kanband")

BEAT = 0.5  # seconds between the loop's beats
STALL = 2.0  # a beat older than this: the loop is stuck
REPEAT = 5.0  # log the stack again this often while it stays stuck
DUMP = 20.0  # faulthandler dumps every thread's stack after this long stuck


def thread_stack(ident: int, limit: int = 30) -> str:
    """The current stack of thread `ident`, innermost call last."""
    frame = sys._current_frames().get(ident)
    if frame is None:
        return "(thread gone)"
    return "".join(traceback.format_stack(frame, limit=limit)).rstrip()


class StallWatch(threading.Thread):
    def __init__(self, loop: asyncio.AbstractEventLoop, stall: float = STALL,
                 beat: float = BEAT, repeat: float = REPEAT, dump: float = DUMP) -> None:
        super().__init__(name="kanband-stallwatch", daemon=True)
        self.loop, self.stall, self.beat_every, self.repeat = loop, stall, beat, repeat
        self.dump = dump
        self.loop_thread = threading.get_ident()  # made on the loop's thread
        self.last_beat = time.monotonic()
        self._stop_event = threading.Event()
        self.armed = threading.Event()  # the faulthandler dump is armed (once, at least)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._beat()
        super().start()

    def _beat(self) -> None:  # on the loop
        self.last_beat = time.monotonic()
        self._handle = self.loop.call_later(self.beat_every, self._beat)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._stop_event.set()
        if self.is_alive():
            self.join(2.0)
        faulthandler.cancel_dump_traceback_later()

    def run(self) -> None:
        try:
            self._watch()
        except Exception:  # never die in silence: say so once, and stop watching
            log.exception("stallwatch_failed")
        finally:
            faulthandler.cancel_dump_traceback_later()

    def _arm(self) -> bool:
        """Re-arm faulthandler's timer; False if it cannot be (no stderr)."""
        if self._stop_event.is_set():
            return True
        try:
            faulthandler.dump_traceback_later(self.dump, exit=False)
            self.armed.set()
            return True
        except (RuntimeError, ValueError, OSError) as e:
            log.warning("stallwatch_no_dump", error=str(e))
            return False

    def _watch(self) -> None:
        stuck_since: float | None = None  # the beat the stall began after
        logged_at = armed_at = 0.0
        dumping = True
        woke = time.monotonic()
        while not self._stop_event.wait(self.beat_every):
            beat, now = self.last_beat, time.monotonic()
            overslept = now - woke > self.stall
            woke = now
            if overslept:
                # This thread did not run for a while either: the whole process
                # was stopped (SIGSTOP, a freezer) or the machine slept. The loop
                # gets its turn to beat before anyone judges it.
                continue
            if now - beat < self.stall:
                if dumping and now - armed_at >= self.dump / 4:  # now and then
                    dumping = self._arm()
                    armed_at = now
                if stuck_since is not None:
                    log.warning("loop_resumed", stalled_seconds=round(beat - stuck_since, 2))
                    stuck_since = None
                continue
            if stuck_since is None or now - logged_at >= self.repeat:
                stuck_since = beat
                logged_at = now
                log.error("loop_stalled", seconds=round(now - beat, 2),
                          stack=thread_stack(self.loop_thread))
