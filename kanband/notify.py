"""Notification delivery (SPEC §9).

A subscription follows one task from the event head at the time it was made.
Terminal events of that task (completed, blocked, gave_up, crashed, timed_out)
go, one at a time and in order, as JSON on stdin to the command configured in
`[notifiers.<platform>]`. Exit 0 advances the subscription's cursor; anything
else is retried with backoff. Each subscription has its own delivery loop, so
one failing platform never holds up another. A subscription ends once its
task is done or archived and everything before that has been delivered.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import structlog

from kanband import states
from kanband.board import Caller
from kanband.errors import NotFound
from kanband.params import Params
from kanband.paths import DaemonPaths
from kanband.reaper import Reaper
from kanband.store import Store

log = structlog.get_logger("kanband.notify")

NOTIFY_KINDS = ("completed", "blocked", "gave_up", "crashed", "timed_out")
ENDING = frozenset({states.DONE, states.ARCHIVED})
RETRY_FIRST = 1.0
RETRY_MAX = 300.0
COMMAND_TIMEOUT = 60.0


class Notifier:
    def __init__(self, store: Store, reaper: Reaper, paths: DaemonPaths, config: Any) -> None:
        self.store = store
        self.reaper = reaper
        self.paths = paths
        self.config = config
        self.loops: dict[int, asyncio.Task[Any]] = {}
        self.kicks: dict[int, asyncio.Event] = {}
        self.closing = False
        store.on_commit(self._committed)

    def start(self) -> None:
        """Resume every subscription (deliveries missed while kanband was down)."""
        for sub in self.store.notify_list():
            self._kick(sub["id"])

    def _committed(self, events: list[dict[str, Any]]) -> None:
        tasks = {e["task_id"] for e in events
                 if e["kind"] in NOTIFY_KINDS or e["kind"] == "archived"}
        if not tasks:
            return
        for tid in tasks:
            for sub in self.store.notify_list(tid):
                self._kick(sub["id"])

    def _kick(self, sub_id: int) -> None:
        if self.closing:
            return
        self.kicks.setdefault(sub_id, asyncio.Event()).set()
        if sub_id not in self.loops or self.loops[sub_id].done():
            self.loops[sub_id] = asyncio.ensure_future(self._deliver_loop(sub_id))

    async def _deliver_loop(self, sub_id: int) -> None:
        delay = RETRY_FIRST
        kick = self.kicks.setdefault(sub_id, asyncio.Event())
        while not self.closing:
            kick.clear()
            try:
                sub = self.store.notify_get(sub_id)
            except Exception:
                return  # unsubscribed
            pending = self.store.events(since=sub["last_event_id"], task_id=sub["task_id"],
                                        kinds=list(NOTIFY_KINDS))
            ok = True
            for e in pending:
                if not await self._send(sub, e):
                    ok = False
                    break
                self.store.notify_advance(sub_id, e["id"])
                delay = RETRY_FIRST
            if ok:
                if pending:
                    continue  # more may have been committed while we delivered
                task = self.store.get_task(sub["task_id"])
                if task["status"] in ENDING:
                    self.store.notify_end(sub_id)
                    log.info("notify_subscription_ended", subscription=sub_id,
                             task_id=sub["task_id"], status=task["status"])
                    return
                await kick.wait()
                continue
            try:  # retry with backoff (a reload or a new event retries at once)
                await asyncio.wait_for(kick.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, RETRY_MAX)

    async def _send(self, sub: dict[str, Any], event: dict[str, Any]) -> bool:
        notifier = self.config.notifiers.get(sub["platform"])
        if notifier is None:
            log.warning("notify_no_notifier", subscription=sub["id"], platform=sub["platform"],
                        hint=f"add [notifiers.{sub['platform']}] command = [...] to the config")
            return False
        task = self.store.get_task(sub["task_id"])
        doc = {"event": event,
               "task": {k: task[k] for k in ("id", "title", "status", "assignee", "tenant",
                                             "result")},
               "subscription": {k: sub[k] for k in ("id", "platform", "chat_id", "thread_id",
                                                    "user_id")}}
        try:
            code = await self.reaper.run_command(
                list(notifier.command), stdin=json.dumps(doc).encode(),
                log_path=self.paths.logs / f"notify-{sub['platform']}.log",
                timeout=COMMAND_TIMEOUT)
        except OSError as e:
            log.warning("notify_failed", subscription=sub["id"], platform=sub["platform"],
                        event_id=event["id"], error=str(e))
            return False
        if code != 0:
            log.warning("notify_failed", subscription=sub["id"], platform=sub["platform"],
                        event_id=event["id"], exit_code=code)
            return False
        log.info("notify_delivered", subscription=sub["id"], platform=sub["platform"],
                 event_id=event["id"], kind=event["kind"], task_id=sub["task_id"])
        return True

    async def close(self) -> None:
        self.closing = True
        for t in self.loops.values():
            t.cancel()
        await asyncio.gather(*self.loops.values(), return_exceptions=True)

    # -- RPC -----------------------------------------------------------------------
    def subscribe(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id("task_id")
        platform = p.str("platform", required=True, allow_empty=False)
        fields = {k: p.str(k) for k in ("chat_id", "thread_id", "user_id")}
        p.done()
        assert platform is not None
        sub = self.store.notify_subscribe(tid, platform, now=time.time(), **fields)
        warning = None
        if platform not in self.config.notifiers:
            warning = (f"no [notifiers.{platform}] command is configured: events wait until "
                       "one is added and the config reloaded")
        self._kick(sub["id"])
        return {"subscription": sub, "warning": warning}

    def list(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.str("task_id")
        p.done()
        if tid is not None:
            self.store.get_task(tid)  # an unknown task is not_found, not an empty list
        return {"subscriptions": self.store.notify_list(tid)}

    def unsubscribe(self, p: Params, caller: Caller) -> dict[str, Any]:
        tid = p.task_id("task_id")
        fields = {k: p.str(k) for k in ("platform", "chat_id", "thread_id", "user_id")}
        p.done()
        n = self.store.notify_unsubscribe(tid, **fields)
        if n == 0:
            raise NotFound(f"no notify subscription of {tid} matches")
        return {"removed": n}
