"""kanbanctl: the light client for the kanband board.

Exit codes: 0 ok, 1 refused or failed, 2 usage error, 3 daemon unreachable,
4 timed out. Errors go to stderr; `--json` prints one JSON document on stdout.
Imports only the protocol, locate and errors modules of kanband: no asyncio,
structlog or psutil here (a test enforces it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
TYPE_CHECKING = False  # typing itself is not imported at run time: kanbanctl stays light
if TYPE_CHECKING:
    from typing import Any, Callable, NoReturn

from kanband import __version__
from kanband.errors import KanbanError
from kanband.locate import client_socket
from kanband.protocol import Client, TimedOut, Unreachable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
WORKER_RETRY_SECONDS = 60.0  # a worker's kanbanctl waits out a daemon restart

ICONS = {"triage": "?", "todo": "○", "ready": "◎", "running": "▶", "blocked": "■",
         "done": "✔", "archived": "▫"}


class UsageError(Exception):
    pass


# -- plumbing -------------------------------------------------------------------
class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json = bool(getattr(args, "json", False))
        self.token = os.environ.get("KANBAN_RUN_TOKEN") or None
        try:
            self.socket = client_socket(args.socket, args.home)
        except KanbanError as e:
            raise UsageError(e.message) from None
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> Client:
        deadline = time.monotonic() + (WORKER_RETRY_SECONDS if self.token else 0)
        while True:
            try:
                return Client(self.socket, timeout=self.args.timeout, token=self.token).connect()
            except Unreachable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def call(self, method: str, **params: Any) -> Any:
        params = {k: v for k, v in params.items() if v is not None}
        return self.client.call(method, params)

    def out(self, doc: Any) -> None:
        import json  # only for output and --metadata: kanbanctl stays light
        json.dump(doc, sys.stdout, indent=2, sort_keys=False, default=str)
        sys.stdout.write("\n")


def _ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    d = (now or time.time()) - ts
    future = d < 0
    d = abs(d)
    if d < 60:
        s = f"{d:.0f}s"
    elif d < 3600:
        s = f"{d / 60:.0f}m"
    elif d < 86400:
        s = f"{d / 3600:.1f}h"
    else:
        s = f"{d / 86400:.1f}d"
    return f"in {s}" if future else f"{s} ago"


def _stamp(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def task_line(t: dict[str, Any]) -> str:
    icon = ICONS.get(t["status"], " ")
    who = t["assignee"] or "-"
    pri = f"p{t['priority']}" if t["priority"] else "  "
    line = f"{icon} {t['id']}  {t['status']:<8} {pri:>3}  {who:<12} {t['title']}"
    if t.get("tenant"):
        line += f"  [{t['tenant']}]"
    return line


def _duration_arg(text: str) -> float:
    from kanband.config import parse_duration
    try:
        seconds = parse_duration(text, "duration")
    except KanbanError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be greater than zero")
    return seconds


MAX_SECONDS = 10 * 365 * 86400.0


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < v <= MAX_SECONDS:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_SECONDS:.0f}, got {text!r}")
    return v


def _metadata(text: str) -> dict[str, Any]:
    import json  # only for output and --metadata: kanbanctl stays light

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    try:
        v = json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise argparse.ArgumentTypeError("nested too deeply") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"tests\": 12}'")
    try:
        json.dumps(v, allow_nan=False)
    except ValueError:
        raise argparse.ArgumentTypeError("numbers must be finite (no NaN or Infinity)") from None
    return v


# -- verbs ------------------------------------------------------------------------
def cmd_init(ctx: Ctx) -> int:
    from kanband.config import load
    from kanband.paths import resolve_daemon_paths
    a = ctx.args
    try:
        paths = resolve_daemon_paths(a.home, a.socket)
        config = load(paths.config)
    except KanbanError as e:
        print(f"kanbanctl: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    paths.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    running = None
    try:
        running = Client(str(paths.socket), timeout=2).connect().call("daemon.status", {})
    except (Unreachable, TimedOut, KanbanError):
        pass
    doc = {"home": str(paths.home), "db": str(paths.db), "socket": str(paths.socket),
           "pidfile": str(paths.pidfile), "config": str(paths.config) if paths.config else None,
           "profiles": {n: list(p.command) for n, p in sorted(config.profiles.items())},
           "daemon_pid": running["pid"] if running else None}
    if ctx.json:
        ctx.out(doc)
        return EXIT_OK
    print(f"home:     {doc['home']}")
    print(f"database: {doc['db']}")
    print(f"socket:   {doc['socket']}")
    print(f"pidfile:  {doc['pidfile']}")
    print(f"config:   {doc['config'] or '(none: defaults; create ' + str(paths.home / 'kanband.toml') + ')'}")
    print("profiles:")
    for name, cmd in doc["profiles"].items():
        print(f"  {name:<12} {' '.join(cmd)}")
    print(f"daemon:   {'running, pid ' + str(running['pid']) if running else 'not running'}")
    print("\nnext steps:")
    if not running:
        print(f"  kanband --home {doc['home']} &        # start the daemon")
    print("  kanbanctl create 'hello' --assignee shell --body 'echo hello'")
    print("  kanbanctl list")
    return EXIT_OK


def cmd_create(ctx: Ctx) -> int:
    a = ctx.args
    workspace = a.workspace
    if workspace == "worktree":
        workspace = "worktree:" + os.getcwd()
    elif workspace and workspace.startswith("dir:") and not os.path.isabs(workspace[4:]):
        if not workspace[4:]:
            raise UsageError("--workspace dir:PATH needs a path")
        workspace = "dir:" + os.path.abspath(workspace[4:])
    created_by = a.created_by or os.environ.get("KANBAN_PROFILE") or _user()
    r = ctx.call("task.create", title=a.title, body=a.body, assignee=a.assignee,
                 parents=a.parent or None, workspace=workspace, tenant=a.tenant,
                 priority=a.priority, triage=a.triage or None,
                 idempotency_key=a.idempotency_key, max_runtime=a.max_runtime,
                 created_by=created_by, skills=a.skill or None)
    t = r["task"]
    if ctx.json:
        ctx.out({**t, "created": r["created"]})
        return EXIT_OK
    if r.get("warning"):
        print(f"kanbanctl: warning: {r['warning']}", file=sys.stderr)
    if a.quiet:
        print(t["id"])
    elif r["created"]:
        print(f"created {t['id']} [{t['status']}] {t['title']}")
    else:
        print(f"exists  {t['id']} [{t['status']}] {t['title']} (idempotency key matched)")
    return EXIT_OK


def _user() -> str:
    import getpass
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def cmd_list(ctx: Ctx) -> int:
    a = ctx.args
    statuses = [s for part in (a.status or []) for s in part.split(",") if s]
    assignee, created_by = a.assignee, None
    if a.mine:
        if os.environ.get("KANBAN_PROFILE"):
            assignee = os.environ["KANBAN_PROFILE"]
        else:
            created_by = _user()
    if a.archived and not statuses:
        statuses = ["archived"] if a.archived == "only" else []
    r = ctx.call("task.list", status=statuses or None, assignee=assignee, tenant=a.tenant,
                 created_by=created_by, archived=bool(a.archived) or None)
    tasks = r["tasks"]
    if ctx.json:
        ctx.out(tasks)
        return EXIT_OK
    if not tasks:
        print("(no tasks)")
    for t in tasks:
        print(task_line(t))
    return EXIT_OK


def cmd_show(ctx: Ctx) -> int:
    r = ctx.call("task.show", id=ctx.args.id)
    if ctx.json:
        ctx.out(r)
        return EXIT_OK
    t = r["task"]
    print(f"{ICONS.get(t['status'], ' ')} {t['id']}  {t['title']}")
    print(f"  status:    {t['status']}" + (f"  ({t['waiting_reason']})" if t["waiting_reason"] else ""))
    print(f"  assignee:  {t['assignee'] or '-'}   priority: {t['priority']}   tenant: {t['tenant'] or '-'}")
    print(f"  workspace: {t['workspace_kind']} {t['workspace_path'] or ''}")
    print(f"  created:   {_stamp(t['created_at'])} by {t['created_by'] or '-'}")
    if t["started_at"]:
        print(f"  started:   {_stamp(t['started_at'])}")
    if t["completed_at"]:
        print(f"  completed: {_stamp(t['completed_at'])}")
    if t["max_runtime_seconds"]:
        print(f"  max runtime: {t['max_runtime_seconds']:g}s")
    if t["skills"]:
        print(f"  skills:    {', '.join(t['skills'])}")
    if t["current_run_id"]:
        print(f"  run:       {t['current_run_id']} pid={t['worker_pid'] or '-'} "
              f"lease={_ago(t['lease_expires'])} heartbeat={_ago(t['last_heartbeat_at'])}")
    if t["consecutive_failures"]:
        print(f"  failures:  {t['consecutive_failures']} (last: {t['last_failure_error']})")
    if t["result"]:
        print(f"  result:    {t['result']}")
    if t["body"]:
        print("\n" + "\n".join("  " + ln for ln in t["body"].splitlines()))
    for label, key in (("parents", "parents"), ("children", "children")):
        if r[key]:
            print(f"\n{label}:")
            for x in r[key]:
                print("  " + task_line(x))
    if r["runs"]:
        print("\nruns:")
        for run in r["runs"]:
            print("  " + _run_line(run))
    if r["comments"]:
        print("\ncomments:")
        for c in r["comments"]:
            print(f"  [{_stamp(c['created_at'])}] {c['author'] or '-'}: {c['body']}")
    if r["events"]:
        print("\nevents:")
        for e in r["events"][-20:]:
            print("  " + _event_line(e))
    return EXIT_OK


def _run_line(run: dict[str, Any]) -> str:
    end = run["outcome"] or "active"
    line = f"{run['id']} {end:<12} {run['claimer']}  {_stamp(run['started_at'])}"
    if run["exit_code"] is not None:
        line += f" exit={run['exit_code']}"
    if run["signal"] is not None:
        line += f" signal={run['signal']}"
    if run["summary"]:
        line += f"  — {run['summary'].splitlines()[0][:100] if run['summary'].strip() else ''}"
    if run["error"]:
        line += f"  ! {run['error'].splitlines()[0][:160] if run['error'].strip() else ''}"
    return line


def _event_line(e: dict[str, Any]) -> str:
    payload = " ".join(f"{k}={v}" for k, v in (e.get("payload") or {}).items() if v is not None)
    return f"#{e['id']:<6} {_stamp(e['created_at'])} {e['task_id'] or '-'} {e['kind']:<10} {payload}"


def cmd_assign(ctx: Ctx) -> int:
    r = ctx.call("task.assign", id=ctx.args.id, assignee=ctx.args.profile,
                 force=ctx.args.force or None)
    return _task_done(ctx, r["task"], f"assigned to {r['task']['assignee'] or '(nobody)'}")


def _task_done(ctx: Ctx, task: dict[str, Any], what: str) -> int:
    if ctx.json:
        ctx.out(task)
    else:
        print(f"{task['id']}: {what} [{task['status']}]")
    return EXIT_OK


def cmd_link(ctx: Ctx) -> int:
    verb = "task.link" if ctx.args.verb == "link" else "task.unlink"
    r = ctx.call(verb, parent=ctx.args.parent, child=ctx.args.child)
    return _task_done(ctx, r["task"], f"{ctx.args.verb}ed parent {ctx.args.parent}")


def cmd_claim(ctx: Ctx) -> int:
    r = ctx.call("task.claim", id=ctx.args.id, ttl=ctx.args.ttl,
                 claimer=os.environ.get("KANBAN_PROFILE") or _user())
    if ctx.json:
        ctx.out({"run_id": r["run_id"], "token": r["token"], "workspace": r["workspace"],
                 "lease_expires": r["lease_expires"], "task_id": ctx.args.id})
        return EXIT_OK
    print(f"claimed {ctx.args.id}: run {r['run_id']}, lease {_ago(r['lease_expires'])}")
    print(f"workspace: {r['workspace']}")
    print(f"token (shown once): {r['token']}")
    print(f"report back with: KANBAN_RUN_TOKEN={r['token']} kanbanctl complete {ctx.args.id}")
    return EXIT_OK


def cmd_comment(ctx: Ctx) -> int:
    r = ctx.call("task.comment", id=ctx.args.id, body=" ".join(ctx.args.text),
                 author=ctx.args.author or os.environ.get("KANBAN_PROFILE") or _user())
    if ctx.json:
        ctx.out(r["comment"])
    else:
        print(f"{ctx.args.id}: comment #{r['comment']['id']} added")
    return EXIT_OK


def _many(ctx: Ctx, method: str, ids: list[str], what: str, **params: Any) -> int:
    """Run one method over several ids (pipelined); exit 1 if any was refused."""
    params = {k: v for k, v in params.items() if v is not None}
    results = ctx.client.call_many([(method, {"id": i, **params}) for i in ids])
    failed = 0
    docs = []
    for i, r in zip(ids, results):
        if isinstance(r, KanbanError):
            failed += 1
            print(f"kanbanctl: {r.message}", file=sys.stderr)
            docs.append({"id": i, "error": {"code": r.code, "message": r.message}})
        else:
            docs.append(r["task"])
            if not ctx.json:
                print(f"{i}: {what} [{r['task']['status']}]")
    if ctx.json and failed < len(ids):  # nothing on stdout when every id was refused
        ctx.out(docs[0] if len(ids) == 1 and not failed else docs)
    bad_input = [r for r in results if isinstance(r, KanbanError)
                 and r.code in ("invalid_argument", "too_large")]
    if failed and len(bad_input) == failed:
        return EXIT_USAGE
    return EXIT_FAILED if failed else EXIT_OK


def cmd_complete(ctx: Ctx) -> int:
    a = ctx.args
    if len(a.ids) > 1 and (a.summary is not None or a.metadata is not None or a.result is not None):
        raise UsageError("--result, --summary and --metadata go with exactly one task id")
    return _many(ctx, "task.complete", a.ids, "completed", result=a.result,
                 summary=a.summary, metadata=a.metadata)


def cmd_block(ctx: Ctx) -> int:
    a = ctx.args
    if a.ids:
        ids, reason = a.ids, " ".join(a.args) or None
    else:
        if not a.args:
            raise UsageError("block needs a task id (or --ids ID...)")
        ids, reason = [a.args[0]], " ".join(a.args[1:]) or None
    return _many(ctx, "task.block", ids, "blocked", reason=reason)


def cmd_simple_many(method: str, what: str) -> Callable[[Ctx], int]:
    return lambda ctx: _many(ctx, method, ctx.args.ids, what)


def cmd_heartbeat(ctx: Ctx) -> int:
    r = ctx.call("task.heartbeat", id=ctx.args.id, note=ctx.args.note)
    return _task_done(ctx, r["task"], f"heartbeat; lease until {_stamp(r['task']['lease_expires'])}"
                      if r["task"]["lease_expires"] else "heartbeat")


def cmd_runs(ctx: Ctx) -> int:
    r = ctx.call("task.runs", id=ctx.args.id)
    if ctx.json:
        ctx.out(r["runs"])
        return EXIT_OK
    if not r["runs"]:
        print("(no runs)")
    for run in r["runs"]:
        print(_run_line(run))
    return EXIT_OK


def cmd_context(ctx: Ctx) -> int:
    r = ctx.call("task.context", id=ctx.args.id)
    if ctx.json:
        ctx.out(r)
    else:
        sys.stdout.write(r["text"] + ("\n" if not r["text"].endswith("\n") else ""))
    return EXIT_OK


def cmd_stats(ctx: Ctx) -> int:
    r = ctx.call("board.stats")
    if ctx.json:
        ctx.out(r)
        return EXIT_OK
    print("  ".join(f"{ICONS[s]} {s} {n}" for s, n in r["by_status"].items()))
    oldest = r["oldest_ready_age_seconds"]
    print(f"total {r['total']}, running workers {r['running_workers']}, "
          f"oldest ready {'-' if oldest is None else f'{oldest:.0f}s'}")
    print(f"disk: db {r['db_bytes'] / 1024:.0f} KiB, {r['events']} events "
          f"(~{r['event_bytes'] / 1024:.0f} KiB), worker logs {r['log_bytes'] / 1024:.0f} KiB")
    for name, counts in sorted(r["by_assignee"].items()):
        print(f"  {name or '(unassigned)':<14} " + " ".join(f"{s}={n}" for s, n in sorted(counts.items())))
    return EXIT_OK


def cmd_assignees(ctx: Ctx) -> int:
    r = ctx.call("board.assignees")
    if ctx.json:
        ctx.out(r["assignees"])
        return EXIT_OK
    for a in r["assignees"]:
        kind = "profile" if a["profile"] else "external"
        counts = " ".join(f"{s}={n}" for s, n in sorted(a["counts"].items())) or "no tasks"
        print(f"{a['name']:<14} {kind:<9} {counts}")
    return EXIT_OK


def cmd_status(ctx: Ctx) -> int:
    r = ctx.call("daemon.status")
    if ctx.json:
        ctx.out(r)
        return EXIT_OK
    print(f"kanband {r['version']} pid {r['pid']}, up {r['uptime_seconds']:.0f}s"
          + (", dispatch PAUSED" if r["paused"] else ""))
    for k in ("home", "db", "socket", "pidfile", "logs"):
        print(f"  {k:<8} {r['paths'][k]}")
    print(f"  config   {r['config'] or '(defaults)'}")
    print("  tasks    " + (" ".join(f"{s}={n}" for s, n in sorted(r["counts"].items())) or "none"))
    print(f"  workers  {r['running_workers']}/{r['max_workers']}")
    for w in r["workers"]:
        print(f"    {w['task_id']} run {w['run_id']} pid {w['pid']} {w['profile']} "
              f"up {w.get('elapsed_seconds', 0):.0f}s")
    return EXIT_OK


def cmd_reclaim(ctx: Ctx) -> int:
    r = ctx.call("task.reclaim", id=ctx.args.id)
    return _task_done(ctx, r["task"], "reclaimed: worker stopped, task requeued")


def cmd_dispatch(ctx: Ctx) -> int:
    a = ctx.args
    r = ctx.call("board.dispatch", dry_run=a.dry_run or None, max=a.max,
                 failure_limit=a.failure_limit)
    if ctx.json:
        ctx.out(r)
        return EXIT_OK
    if r["dry_run"]:
        for e in r["would_spawn"]:
            print(f"would spawn {e['task_id']} ({e['profile']}) {e['title']}")
        for w in r["waiting"]:
            print(f"waiting     {w['task_id']} [{w['status']}] {w['reason']}")
        if not r["would_spawn"] and not r["waiting"]:
            print("nothing ready")
        return EXIT_OK
    for e in r["spawned"]:
        if e.get("error"):
            print(f"spawn failed {e['task_id']} ({e['profile']}): {e['error']}")
        else:
            print(f"spawned {e['task_id']} ({e['profile']}) run {e['run_id']} pid {e['pid']}")
    if not r["spawned"]:
        print("nothing to spawn" + (" (dispatch is paused; this pass ran by hand)" if r["paused"] else ""))
    return EXIT_OK


def cmd_pause(ctx: Ctx) -> int:
    r = ctx.call("daemon.pause" if ctx.args.verb == "pause" else "daemon.resume")
    if ctx.json:
        ctx.out(r)
    else:
        print("dispatch paused" if r["paused"] else "dispatch resumed")
    return EXIT_OK


def cmd_reload(ctx: Ctx) -> int:
    try:
        r = ctx.call("daemon.reload")
    except KanbanError as e:  # the daemon refused the file: not a usage error
        print(f"kanbanctl: config refused, the old one stays: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    if ctx.json:
        ctx.out(r)
    else:
        print(f"config reloaded from {r['config'] or '(defaults)'}")
    return EXIT_OK


def cmd_log(ctx: Ctx) -> int:
    a = ctx.args
    r = ctx.call("task.log", id=a.id, tail=a.tail)
    if ctx.json and not a.follow:
        ctx.out(r)
        return EXIT_OK
    sys.stdout.write(r["text"])
    sys.stdout.flush()
    # --follow: read on from where we are until the task ends and its output
    # is drained. (Polls by offset; a push stream comes with events.subscribe.)
    while a.follow:
        time.sleep(0.2)
        r = ctx.call("task.log", id=a.id, offset=r["next_offset"])
        sys.stdout.write(r["text"])
        sys.stdout.flush()
        if not r["text"] and ctx.call("task.show", id=a.id)["task"]["status"] in (
                "done", "blocked", "archived"):
            r = ctx.call("task.log", id=a.id, offset=r["next_offset"])
            sys.stdout.write(r["text"])
            break
    return EXIT_OK


def cmd_wait(ctx: Ctx) -> int:
    a = ctx.args
    ctx.client.timeout = None if a.timeout is None else a.timeout + 30
    if ctx.client._sock is not None:
        ctx.client._sock.settimeout(ctx.client.timeout)
    r = ctx.call("task.wait", ids=a.ids, timeout=a.timeout)
    if ctx.json:
        ctx.out(r)
    else:
        for t in r["tasks"]:
            print(f"{ICONS.get(t['status'], ' ')} {t['id']} {t['status']}")
    if r["timed_out"]:
        if not ctx.json:
            print(f"kanbanctl: timed out after {a.timeout:g}s", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_OK if all(t["status"] == "done" for t in r["tasks"]) else EXIT_FAILED


def _stream(ctx: Ctx, params: dict[str, Any], follow: bool = True) -> int:
    """Print events from events.subscribe until Ctrl-C (exit 0) or the daemon goes
    away (exit 3). Without follow, stop once the history is printed."""
    client = ctx.client
    client.timeout = None
    if client._sock is not None:
        client._sock.settimeout(None)
    import json  # only for output and --metadata: kanbanctl stays light
    sub = ctx.call("events.subscribe", **params)
    last = sub["since"]
    try:
        while True:
            method, p = client.next_notification()
            if method == "event":
                last = p["id"]
                if ctx.json:
                    p.pop("subscription", None)
                    print(json.dumps(p, default=str), flush=True)
                else:
                    print(_event_line(p), flush=True)
            elif method == "live" and not follow:
                return EXIT_OK
            elif method == "lagged":
                print(f"kanbanctl: {p.get('message', 'fell behind')}", file=sys.stderr)
                return EXIT_FAILED
    except Unreachable:
        print(f"kanbanctl: the daemon closed the stream (it stopped or restarted); "
              f"resume with: kanbanctl watch --since {last}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_tail(ctx: Ctx) -> int:
    return _stream(ctx, {"since": 0, "task_id": ctx.args.id}, follow=not ctx.args.no_follow)


def cmd_watch(ctx: Ctx) -> int:
    a = ctx.args
    kinds = [k for part in (a.kinds or []) for k in part.split(",") if k]
    return _stream(ctx, {"since": a.since if a.since is not None else -1, "assignee": a.assignee,
                         "tenant": a.tenant, "kinds": kinds or None})


def cmd_backup(ctx: Ctx) -> int:
    if not ctx.args.path.strip():
        raise UsageError("backup needs a file path")
    r = ctx.call("board.backup", path=os.path.abspath(ctx.args.path),
                 overwrite=ctx.args.overwrite or None)
    if ctx.json:
        ctx.out(r)
    else:
        print(f"backed up {r['tasks']} tasks (event {r['event_head']}) to {r['path']} "
              f"({r['bytes'] / 1024:.0f} KiB); start a kanband on it with --home")
    return EXIT_OK


def cmd_gc(ctx: Ctx) -> int:
    a = ctx.args
    r = ctx.call("board.gc", event_retention_days=a.event_retention_days,
                 log_retention_days=a.log_retention_days)
    if ctx.json:
        ctx.out(r)
        return EXIT_OK
    print(f"removed: {r['workspaces']} workspaces, {r['worktrees']} worktrees, "
          f"{r['events']} events, {r['logs']} log files, {r['run_dirs']} run dirs")
    for path in r["refused"]:
        print(f"refused (outside its root or a symlink): {path}", file=sys.stderr)
    for err in r["errors"]:
        print(f"error: {err}", file=sys.stderr)
    return EXIT_OK


def _notify_fields(a: argparse.Namespace) -> dict[str, Any]:
    return {"chat_id": a.chat_id, "thread_id": a.thread_id, "user_id": a.user_id}


def cmd_notify_subscribe(ctx: Ctx) -> int:
    a = ctx.args
    r = ctx.call("notify.subscribe", task_id=a.id, platform=a.platform, **_notify_fields(a))
    if r.get("warning") and not ctx.json:
        print(f"kanbanctl: warning: {r['warning']}", file=sys.stderr)
    if ctx.json:
        ctx.out(r["subscription"])
    else:
        s = r["subscription"]
        print(f"subscribed #{s['id']}: {s['task_id']} -> {s['platform']} "
              f"chat={s['chat_id'] or '-'} thread={s['thread_id'] or '-'} user={s['user_id'] or '-'}")
    return EXIT_OK


def cmd_notify_list(ctx: Ctx) -> int:
    r = ctx.call("notify.list", task_id=ctx.args.id)
    if ctx.json:
        ctx.out(r["subscriptions"])
        return EXIT_OK
    if not r["subscriptions"]:
        print("(no subscriptions)")
    for s in r["subscriptions"]:
        print(f"#{s['id']:<4} {s['task_id']} {s['platform']:<10} chat={s['chat_id'] or '-'} "
              f"thread={s['thread_id'] or '-'} user={s['user_id'] or '-'} cursor={s['last_event_id']}")
    return EXIT_OK


def cmd_notify_unsubscribe(ctx: Ctx) -> int:
    a = ctx.args
    r = ctx.call("notify.unsubscribe", task_id=a.id, platform=a.platform, **_notify_fields(a))
    if ctx.json:
        ctx.out(r)
    else:
        print(f"removed {r['removed']} subscription(s) of {a.id}")
    return EXIT_OK


def cmd_daemon(ctx: Ctx) -> int:
    argv = [sys.executable, "-m", "kanband"]
    if ctx.args.home:
        argv += ["--home", ctx.args.home]
    if ctx.args.socket:
        argv += ["--socket", ctx.args.socket]
    os.execv(sys.executable, argv + ctx.args.rest)


# -- parser -----------------------------------------------------------------------
def _terminal_columns() -> int:
    """What shutil.get_terminal_size() gives for the width ($COLUMNS, else
    stdout's terminal, else 80), without importing shutil."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, sized as argparse sizes it. argparse builds one
    for every add_argument, and its own imports shutil (and with it bz2 and
    lzma) for the width: 3 ms of every kanbanctl call."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None, **kwargs: Any) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width, **kwargs)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class _Skipped:
    """Stands in for the sub-parser of a verb that is not being run: building all
    33 sub-parsers costs more than the rest of a typical kanbanctl call."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_defaults(self, **kwargs: Any) -> None:
        pass


_GLOBAL_WITH_VALUE = ("--socket", "--home", "--timeout")


def verb_in(argv: list[str]) -> str | None:
    """The verb named on the command line, or None (help, version, a typo, ...)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _GLOBAL_WITH_VALUE:
            i += 2
        elif a.startswith(tuple(f"{g}=" for g in _GLOBAL_WITH_VALUE)):
            i += 1
        elif a.startswith("-"):
            return None
        else:
            return a
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (with `only`) one that knows just that verb."""
    built: list[str] = []
    p = Parser(prog="kanbanctl", description="Drive the kanband task board.",
               epilog="exit codes: 0 ok, 1 refused/failed, 2 usage error, "
                      "3 daemon unreachable, 4 timed out")
    p.add_argument("--version", action="version", version=f"kanbanctl {__version__}")
    p.add_argument("--socket", metavar="PATH", help="daemon socket (default: $KANBAN_SOCKET, "
                   "$KANBAN_HOME/kanband.sock, then the user, hand-started and system paths)")
    p.add_argument("--home", metavar="DIR", help="kanband home; its socket is DIR/kanband.sock")
    p.add_argument("--timeout", metavar="SECONDS", type=_positive, default=30.0,
                   help="how long to wait for the daemon to answer (default 30)")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    sub.required = True
    js = Parser(add_help=False)
    js.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    def verb(name: str, fn: Callable[[Ctx], int], help: str, aliases: tuple[str, ...] = ()) -> Any:
        if only is not None and only != name and only not in aliases:
            return _Skipped()
        built.append(name)
        sp = sub.add_parser(name, help=help, description=help, parents=[js], aliases=list(aliases))
        sp.set_defaults(fn=fn)
        return sp

    verb("init", cmd_init, "print home, database, socket, profiles and next steps")

    s = verb("create", cmd_create, "create a task")
    s.add_argument("title", help="one-line title (1..500 characters)")
    s.add_argument("--body", help="the task text; for the shell profile, the script to run")
    s.add_argument("--assignee", help="profile (or external worker name) to run it")
    s.add_argument("--parent", action="append", metavar="ID",
                   help="a task that must be done first (repeat for several)")
    s.add_argument("--workspace", metavar="SPEC",
                   help="scratch (default), dir:PATH, worktree (this repo) or worktree:REPO")
    s.add_argument("--tenant", help="free-form owner/namespace label")
    s.add_argument("--priority", type=int, default=None, help="higher runs first (default 0)")
    s.add_argument("--triage", action="store_true", help="park in triage; never dispatched until promoted")
    s.add_argument("--idempotency-key", metavar="K",
                   help="return the existing live task with this key instead of a new one")
    s.add_argument("--max-runtime", metavar="DUR", type=_duration_arg,
                   help="runtime cap per attempt: 300, 90s, 30m, 2h, 1d")
    s.add_argument("--created-by", metavar="WHO", help="who created it (default: $KANBAN_PROFILE or $USER)")
    s.add_argument("--skill", action="append", metavar="S", help="a skill tag (repeat)")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the new task's id")

    s = verb("list", cmd_list, "list tasks, one line each", aliases=("ls",))
    s.add_argument("--mine", action="store_true",
                   help="tasks assigned to $KANBAN_PROFILE (inside a worker), else created by you")
    s.add_argument("--assignee", help="only this assignee ('none' = unassigned)")
    s.add_argument("--status", action="append", metavar="S",
                   help="only these statuses (repeat or comma-separate)")
    s.add_argument("--tenant", help="only this tenant")
    s.add_argument("--archived", action="store_const", const="include",
                   help="include archived tasks (hidden by default)")

    s = verb("show", cmd_show, "show one task with parents, children, runs, comments, events")
    s.add_argument("id")

    s = verb("assign", cmd_assign, "set the assignee ('none' unassigns)")
    s.add_argument("id")
    s.add_argument("profile")
    s.add_argument("--force", action="store_true", help="reclaim a running task first")

    for name, help in (("link", "add a dependency: PARENT must be done before CHILD runs"),
                       ("unlink", "remove a dependency: CHILD no longer waits for PARENT")):
        s = verb(name, cmd_link, help)
        s.add_argument("parent")
        s.add_argument("child")

    s = verb("claim", cmd_claim, "claim a ready task as an external worker (prints a run token once)")
    s.add_argument("id")
    s.add_argument("--ttl", type=_positive, metavar="SECONDS",
                   help="lease length; heartbeat renews it (default daemon.claim_ttl)")

    s = verb("comment", cmd_comment, "add a comment")
    s.add_argument("id")
    s.add_argument("text", nargs="+")
    s.add_argument("--author", help="default: $KANBAN_PROFILE or $USER")

    s = verb("complete", cmd_complete, "mark tasks done")
    s.add_argument("ids", nargs="+", metavar="ID")
    s.add_argument("--result", help="the result (default: the summary)")
    s.add_argument("--summary", help="what was done (recorded on the run; one id only)")
    s.add_argument("--metadata", type=_metadata, metavar="JSON",
                   help="a JSON object recorded on the run (one id only)")

    s = verb("block", cmd_block, "mark blocked: block ID [REASON...] or block --ids ID... [REASON]")
    s.add_argument("args", nargs="*", metavar="ID/REASON")
    s.add_argument("--ids", nargs="+", metavar="ID", help="block several tasks")

    for name, method, what, help in (
            ("unblock", "task.unblock", "unblocked", "blocked -> ready/todo; resets the failure counter"),
            ("archive", "task.archive", "archived", "archive tasks (a running worker is killed first)"),
            ("promote", "task.promote", "promoted", "triage -> todo/ready")):
        s = verb(name, cmd_simple_many(method, what), help)
        s.add_argument("ids", nargs="+", metavar="ID")

    s = verb("heartbeat", cmd_heartbeat, "record liveness and renew the lease")
    s.add_argument("id")
    s.add_argument("--note", help="what the worker is doing")

    s = verb("runs", cmd_runs, "list a task's runs (attempts)")
    s.add_argument("id")

    s = verb("context", cmd_context, "print the worker context document of a task")
    s.add_argument("id")

    verb("stats", cmd_stats, "counts by status and assignee")
    verb("assignees", cmd_assignees, "configured profiles and assignees on the board, with counts")
    verb("status", cmd_status, "daemon pid, version, uptime, paths, counts, workers")

    s = verb("reclaim", cmd_reclaim, "stop a running task's worker and requeue it (no failure counted)")
    s.add_argument("id")

    s = verb("dispatch", cmd_dispatch, "run one dispatch pass now (works while paused)")
    s.add_argument("--dry-run", action="store_true",
                   help="change nothing: report what would spawn and why the rest wait")
    s.add_argument("--max", type=int, metavar="N", help="spawn at most N workers in this pass")
    s.add_argument("--failure-limit", type=int, metavar="N",
                   help="failure limit for the runs this pass starts (default daemon.failure_limit)")

    verb("pause", cmd_pause, "stop automatic dispatching (running workers continue)")
    verb("resume", cmd_pause, "restart automatic dispatching")
    verb("reload", cmd_reload, "re-read the config file (a bad config is refused, the old one stays)")

    s = verb("log", cmd_log, "print a task's worker output")
    s.add_argument("id")
    s.add_argument("--tail", type=int, metavar="BYTES", help="only the last BYTES bytes")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing new output until the task is done, blocked or archived "
                        "(Ctrl-C to stop)")

    s = verb("wait", cmd_wait, "wait until tasks are done, blocked or archived "
             "(exit 0 only if all are done, 4 on timeout)")
    s.add_argument("ids", nargs="+", metavar="ID")
    s.add_argument("--timeout", type=_positive, metavar="SECONDS", help="give up after this long")

    s = verb("tail", cmd_tail, "print a task's events, then follow new ones (Ctrl-C to stop)")
    s.add_argument("id")
    s.add_argument("--interval", type=float, help="accepted for compatibility; events are pushed")
    s.add_argument("--no-follow", action="store_true", help="print the history and exit")

    s = verb("watch", cmd_watch, "print board events as they happen (Ctrl-C to stop)")
    s.add_argument("--assignee", help="only tasks of this assignee")
    s.add_argument("--tenant", help="only tasks of this tenant")
    s.add_argument("--kinds", action="append", metavar="A,B", help="only these event kinds")
    s.add_argument("--since", type=int, metavar="N",
                   help="replay events after id N first (default: from now)")

    s = verb("backup", cmd_backup, "write a consistent copy of the live database to PATH")
    s.add_argument("path", help="the file to write (written by the daemon; must not exist)")
    s.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")

    s = verb("gc", cmd_gc, "remove archived tasks' workspaces, old events and old log files")
    s.add_argument("--event-retention-days", type=float, default=30.0, metavar="N",
                   help="delete events of done/archived tasks older than N days (default 30)")
    s.add_argument("--log-retention-days", type=float, default=30.0, metavar="N",
                   help="delete worker logs and run directories older than N days (default 30)")

    for name, fn, help in (
            ("notify-subscribe", cmd_notify_subscribe,
             "send a task's terminal events to a [notifiers.PLATFORM] command"),
            ("notify-unsubscribe", cmd_notify_unsubscribe, "remove notify subscriptions of a task"),
            ("notify-list", cmd_notify_list, "list notify subscriptions")):
        s = verb(name, fn, help)
        if name == "notify-list":
            s.add_argument("id", nargs="?", help="only this task's subscriptions")
            continue
        s.add_argument("id")
        s.add_argument("--platform", required=name == "notify-subscribe",
                       help="notifier platform name (a [notifiers.NAME] in the config)")
        s.add_argument("--chat-id", help="chat/channel id passed to the notifier")
        s.add_argument("--thread-id", help="thread id passed to the notifier")
        s.add_argument("--user-id", help="user id passed to the notifier")

    if only is not None and only != "daemon" and not built:
        return build_parser()  # not a verb we know: the full parser names the choices
    s = (sub.add_parser("daemon", help="run kanband in the foreground (same as `kanband`)")
         if only in (None, "daemon") else _Skipped())
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to kanband")
    s.set_defaults(fn=cmd_daemon)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(verb_in(argv))
    args = parser.parse_args(argv)
    try:
        ctx = Ctx(args)
        return args.fn(ctx)
    except UsageError as e:
        print(f"kanbanctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Unreachable as e:
        print(f"kanbanctl: {e}\n  kanband is not running (or not at this socket). Start it with "
              "`kanband` (foreground), `kanband &`, or `systemctl start kanband`; "
              "point kanbanctl at it with --socket, --home or $KANBAN_HOME.", file=sys.stderr)
        return EXIT_UNREACHABLE
    except TimedOut as e:
        print(f"kanbanctl: {e}", file=sys.stderr)
        return EXIT_TIMEOUT
    except KanbanError as e:
        print(f"kanbanctl: {e.message}", file=sys.stderr)
        return EXIT_USAGE if e.code in ("invalid_argument", "too_large") else EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
