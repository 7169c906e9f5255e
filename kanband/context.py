"""The worker context document (SPEC §4.1), built from store reads."""

from __future__ import annotations

import json
import time
from typing import Any

BODY_CAP = 8 * 1024
COMMENT_CAP = 2 * 1024
PRIOR_RUNS = 10
RECENT_WORK = 5
COMMENTS = 30


def _cap(text: str | None, limit: int) -> str:
    text = text or ""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore") + f"\n[… truncated: {len(raw)} bytes, showing {limit}]"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def render(store: Any, task: dict[str, Any], workspace: str) -> str:
    tid = task["id"]
    out = [f"# {tid}: {task['title']}", "",
           f"- id: {tid}", f"- title: {task['title']}",
           f"- assignee: {task['assignee'] or '-'}", f"- status: {task['status']}",
           f"- tenant: {task['tenant'] or '-'}", f"- workspace: {workspace}", "",
           "## Body", "", _cap(task["body"], BODY_CAP) or "(empty)", ""]

    runs = store.runs(tid, last=PRIOR_RUNS, check=False)
    total = store.count_runs(tid) if len(runs) == PRIOR_RUNS else len(runs)
    out += ["## Prior attempts", ""]
    if total > len(runs):
        out.append(f"({total - len(runs)} older attempts not shown)")
    if not runs:
        out.append("(none)")
    for r in runs:
        line = f"- {r['id']} {r['outcome'] or 'active'} profile={r['profile'] or '-'} at {_when(r['started_at'])}"
        if r["summary"]:
            line += f"\n  summary: {_cap(r['summary'], COMMENT_CAP)}"
        if r["error"]:
            line += f"\n  error: {_cap(r['error'], COMMENT_CAP)}"
        if r["metadata"]:
            line += f"\n  metadata: {json.dumps(r['metadata'], sort_keys=True)}"
        out.append(line)
    out.append("")

    out += ["## Parent results", ""]
    parents = store.parents(tid)
    if not parents:
        out.append("(no parents)")
    for p in parents:
        if p["status"] not in ("done", "archived"):
            out.append(f"- {p['id']} {p['title']}: not done ({p['status']})")
            continue
        run = store.latest_completed_run(p["id"])
        if run and (run["summary"] or run["metadata"]):
            text = _cap(run["summary"], COMMENT_CAP)
            if run["metadata"]:
                text += f"\n  metadata: {json.dumps(run['metadata'], sort_keys=True)}"
        else:
            text = _cap(p["result"], COMMENT_CAP) or "(no result)"
        out.append(f"- {p['id']} {p['title']}: {text}")
    out.append("")

    out += ["## Recent work by the same assignee", ""]
    recent = store.recent_completed(task["assignee"], tid, RECENT_WORK) if task["assignee"] else []
    if not recent:
        out.append("(none)")
    for t in recent:
        result = (t["result"] or "").strip().splitlines()
        out.append(f"- {t['id']} {t['title']} ({_when(t['completed_at'])}): "
                   f"{result[0][:200] if result else '-'}")
    out.append("")

    out += ["## Comments", ""]
    comments = store.comments(tid, last=COMMENTS)
    total = store.count_comments(tid) if len(comments) == COMMENTS else len(comments)
    if total > len(comments):
        out.append(f"({total - len(comments)} older comments not shown)")
    if not comments:
        out.append("(none)")
    for c in comments:
        out.append(f"- {c['author'] or '-'} at {_when(c['created_at'])}: {_cap(c['body'], COMMENT_CAP)}")
    out.append("")
    return "\n".join(out)
