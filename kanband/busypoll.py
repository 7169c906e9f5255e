"""The daemon's event loop, with a short busy-poll after it answers a request.

A client that makes calls one after another (a script on the Python client,
`kanbanctl watch`, a bench) sends its next request a few microseconds after
it reads an answer. If the loop has gone to sleep in epoll_wait by then, that
request pays a full wake-up of the loop's thread -- on an idle CPU of a
virtual machine, tens of microseconds, often more than the call itself
(docs/performance.md, "Fifth round"). So after answering a request, the loop
polls its file descriptors without sleeping for up to `window` seconds
(`[daemon] busy_poll`, default 100 us), yielding the CPU between polls, and
only then blocks. The same idea as the kernel's SO_BUSY_POLL.

The cost is bounded: at most one window of polling per batch of answers, and
none while nobody calls -- a daemon watching 1,000 sleeping workers never
spins. Events other than answered requests (worker exits, timers) do not arm
it. `busy_poll = 0` turns it off.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from typing import Any

_selector: "BusyPollSelector | None" = None


class BusyPollSelector(selectors.EpollSelector):
    """An epoll selector whose next blocking select() first polls for up to
    `window` seconds, once `arm()`ed."""

    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = window
        self.armed = False
        self.polls = 0  # zero-timeout polls made while busy-polling (for tests)

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if self.armed and self.window > 0 and (timeout is None or timeout > 0):
            self.armed = False
            start = time.monotonic()
            end = start + (self.window if timeout is None else min(self.window, timeout))
            poll = super().select
            while True:
                self.polls += 1
                ready = poll(0)
                if ready:
                    return ready
                if time.monotonic() >= end:
                    break
                os.sched_yield()  # a client on this same CPU gets to send
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - start))
        return super().select(timeout)


def new_loop(window: float) -> asyncio.AbstractEventLoop:
    """The daemon's event loop; `arm()` then busy-polls it for `window` seconds
    (`[daemon] busy_poll`, whose default is Config.busy_poll)."""
    global _selector
    _selector = BusyPollSelector(window)
    return asyncio.SelectorEventLoop(_selector)


def set_window(window: float) -> None:
    """A reloaded `busy_poll`."""
    if _selector is not None:
        _selector.window = window


def window() -> float | None:
    """The window the loop polls for now; None without a busy-poll loop."""
    return None if _selector is None else _selector.window


def arm() -> None:
    """An answer was just written: the client may send its next request at once."""
    sel = _selector
    if sel is not None:
        sel.armed = True
