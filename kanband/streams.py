"""Event subscriptions (SPEC §5): replay from the event table, then live push.

Gap-free by construction: a subscriber is registered (so live events start
queueing) and the head read in the same loop step, with no await between, so
every event is either at or below that head (replayed from the table) or
above it (queued live). Each subscriber has a bounded queue; one that falls
behind gets a `lagged` notification and is dropped, never stalling the daemon
or other subscribers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import structlog

from kanband import states
from kanband.board import Caller
from kanband.errors import InvalidArgument
from kanband.params import Params
from kanband.store import Store

log = structlog.get_logger("kanband.streams")

QUEUE_LIMIT = 10_000  # live events buffered per subscriber before it is dropped ...
BYTE_LIMIT = 8 * 1024 * 1024  # ... or this many bytes of them (like the input cap)
REPLAY_BATCH = 500


@dataclass
class Filter:
    task_id: str | None = None
    kinds: frozenset[str] = frozenset()
    assignee: str | None = None
    tenant: str | None = None

    @property
    def needs_task(self) -> bool:
        return self.assignee is not None or self.tenant is not None

    def match(self, e: dict[str, Any]) -> bool:
        if self.task_id is not None and e["task_id"] != self.task_id:
            return False
        if self.kinds and e["kind"] not in self.kinds:
            return False
        if self.assignee is not None and e.get("_assignee") != self.assignee:
            return False
        if self.tenant is not None and e.get("_tenant") != self.tenant:
            return False
        return True


@dataclass
class Subscriber:
    id: int
    conn: Any  # rpc.Connection
    filter: Filter
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    queued_bytes: int = 0
    live: bool = False
    cursor: int = 0  # last event id delivered (or replayed)
    task: asyncio.Task[Any] | None = None
    dropped: bool = False


class EventBus:
    def __init__(self, store: Store, queue_limit: int = QUEUE_LIMIT,
                 byte_limit: int = BYTE_LIMIT) -> None:
        self.store = store
        self.queue_limit = queue_limit
        self.byte_limit = byte_limit
        self.subs: dict[int, Subscriber] = {}
        self._ids = itertools.count(1)
        store.on_commit(self.publish)

    # -- publishing (store listener, runs right after each commit) -------------
    def publish(self, events: list[dict[str, Any]]) -> None:
        if not self.subs:
            return
        if any(s.filter.needs_task for s in self.subs.values()):
            self._annotate(events)
        for sub in list(self.subs.values()):
            for e in events:
                if sub.filter.match(e):
                    self._offer(sub, e)

    def _annotate(self, events: list[dict[str, Any]]) -> None:
        cache: dict[str, tuple[str | None, str | None]] = {}
        for e in events:
            tid = e["task_id"]
            if tid is None:
                continue
            if tid not in cache:
                try:
                    t = self.store.get_task(tid)
                    cache[tid] = (t["assignee"], t["tenant"])
                except Exception:
                    cache[tid] = (None, None)
            e["_assignee"], e["_tenant"] = cache[tid]

    def _offer(self, sub: Subscriber, e: dict[str, Any]) -> None:
        if sub.dropped:
            return
        size = _size(e)
        if (sub.queue.qsize() >= self.queue_limit
                or sub.queued_bytes + size > self.byte_limit):
            self.drop(sub, "lagged")
            return
        sub.queued_bytes += size
        sub.queue.put_nowait(e)

    def drop(self, sub: Subscriber, why: str) -> None:
        """Tell a slow subscriber it lagged and let it go; its connection closes."""
        if sub.dropped:
            return
        sub.dropped = True
        self.subs.pop(sub.id, None)
        log.warning("subscriber_dropped", subscription=sub.id, reason=why, cursor=sub.cursor,
                    queued=sub.queue.qsize())
        sub.conn.notify("lagged", {"subscription": sub.id, "cursor": sub.cursor,
                                   "message": "subscriber fell behind and was dropped; "
                                              f"resubscribe with since={sub.cursor}"})
        if sub.task is not None:
            sub.task.cancel()
        sub.conn.close()  # flushes the notice if the socket takes it

    # -- RPC -----------------------------------------------------------------------
    def subscribe(self, p: Params, caller: Caller, conn: Any) -> dict[str, Any]:
        since = p.int("since", minimum=-1, maximum=2 ** 62)
        kinds = p.str_list("kinds")
        unknown = sorted(set(kinds) - states.EVENT_KINDS)
        if unknown:
            raise InvalidArgument(f"kinds: unknown event kind {unknown[0]!r} (known: "
                                  + ", ".join(sorted(states.EVENT_KINDS)) + ")")
        f = Filter(task_id=p.str("task_id"), kinds=frozenset(kinds),
                   assignee=p.str("assignee"), tenant=p.str("tenant"))
        p.done()
        if f.task_id is not None:
            self.store.get_task(f.task_id)
        head = self.store.event_head()
        start = head if since is None or since < 0 else min(since, head)
        sub = Subscriber(id=next(self._ids), conn=conn, filter=f, cursor=start)
        # Registered in the same loop step as the head was read: no gap, no overlap.
        self.subs[sub.id] = sub
        sub.task = asyncio.ensure_future(self._pump(sub, head))
        conn.on_close.append(lambda: self.unsubscribe_sub(sub))
        return {"subscription": sub.id, "head": head, "since": start}

    def unsubscribe(self, p: Params, caller: Caller, conn: Any) -> dict[str, Any]:
        sid = p.int("subscription", required=True, minimum=1)
        p.done()
        sub = self.subs.get(sid or 0)
        if sub is None or sub.conn is not conn:
            raise InvalidArgument(f"no subscription {sid} on this connection")
        self.unsubscribe_sub(sub)
        return {"subscription": sid, "ended": True}

    def unsubscribe_sub(self, sub: Subscriber) -> None:
        self.subs.pop(sub.id, None)
        sub.dropped = True
        if sub.task is not None:
            sub.task.cancel()

    async def _pump(self, sub: Subscriber, head: int) -> None:
        """Replay (cursor, head] from the table, then forward the live queue."""
        try:
            while sub.cursor < head:
                batch = self.store.events(since=sub.cursor, upto=head, task_id=sub.filter.task_id,
                                          kinds=sorted(sub.filter.kinds) or None,
                                          assignee=sub.filter.assignee,
                                          tenant=sub.filter.tenant, limit=REPLAY_BATCH)
                if not batch:
                    sub.cursor = head
                    break
                for e in batch:
                    self._send(sub, e)
                await sub.conn.drain()
            sub.cursor = max(sub.cursor, head)
            sub.live = True
            sub.conn.notify("live", {"subscription": sub.id, "cursor": sub.cursor})
            while True:
                e = await sub.queue.get()
                sub.queued_bytes -= _size(e)
                if e["id"] <= sub.cursor:
                    continue  # already replayed
                self._send(sub, e)
                if sub.queue.empty():
                    await sub.conn.drain()
        except (ConnectionError, OSError):
            self.unsubscribe_sub(sub)

    def _send(self, sub: Subscriber, e: dict[str, Any]) -> None:
        sub.cursor = e["id"]
        out = {k: v for k, v in e.items() if not k.startswith("_")}
        out["subscription"] = sub.id
        sub.conn.notify("event", out)


def _size(e: dict[str, Any]) -> int:
    """Approximate bytes an event holds while queued (computed once per event)."""
    size = e.get("_size")
    if size is None:
        size = e["_size"] = len(json.dumps(e["payload"], default=str)) + 160
    return size
