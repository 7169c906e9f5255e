"""kanbanctl as a real subprocess (SPEC §6): exit codes, the `--json` rules and
shapes, text output, multi-id verbs, context order, and staying light."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import events_of, snapshot

TASK_KEYS = {
    "id", "title", "body", "assignee", "status", "priority", "tenant", "workspace_kind",
    "workspace_path", "created_by", "created_at", "started_at", "completed_at", "result",
    "skills", "idempotency_key", "max_runtime_seconds", "consecutive_failures",
    "last_failure_error", "not_before", "current_run_id", "worker_pid", "lease_expires",
    "last_heartbeat_at", "waiting_reason"}
RUN_KEYS = {"id", "task_id", "profile", "claimer", "outcome", "started_at", "ended_at",
            "summary", "error", "metadata", "worker_pid", "exit_code", "signal"}
TASK_ID = re.compile(r"^t_[0-9a-f]{8,}$")


def one_json(r: subprocess.CompletedProcess) -> object:
    """stdout is exactly one JSON document (json.loads rejects trailing data)."""
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


# -- exit codes -------------------------------------------------------------------------
def test_version(shared_kd):
    """`kanbanctl --version` prints the version and exits 0."""
    kd = shared_kd
    from kanband import __version__
    r = kd.ctl("--version")
    assert r.returncode == 0 and __version__ in r.stdout


@pytest.mark.parametrize("verb", [["show"], ["complete"], ["block"], ["unblock"], ["archive"],
                                  ["promote"], ["runs"], ["context"], ["claim"],
                                  ["heartbeat"], ["comment", "{id}", "hi"], ["assign", "{id}", "x"]])
def test_unknown_task_exits_1(shared_kd, verb):
    """A verb on a task id that does not exist exits 1 with the id on stderr and nothing on stdout."""
    kd = shared_kd
    args = [a.format(id="t_deadbeef") for a in verb]
    if len(args) == 1:
        args.append("t_deadbeef")
    r = kd.ctl(*args)
    assert r.returncode == 1, r
    assert "t_deadbeef" in r.stderr and r.stdout == ""


USAGE_ERRORS = [
    [],
    ["frobnicate"],
    ["create"],
    ["list", "--bogus"],
    ["create", "x", "--max-runtime", "soon"],
    ["create", "x", "--max-runtime", "0"],
    ["create", "x", "--max-runtime=-5s"],
    ["create", "x", "--max-runtime", "5 minutes"],
    ["create", "x", "--priority", "high"],
    ["complete", "@a", "--metadata", "[1, 2]"],
    ["complete", "@a", "--metadata", '"text"'],
    ["complete", "@a", "--metadata", "{not json"],
    ["complete", "@a", "@b", "--summary", "s"],
    ["complete", "@a", "@b", "--metadata", "{}"],
    ["complete", "@a", "@b", "--result", "r"],
    ["claim", "@a", "--ttl", "soon"],
    ["claim", "@a", "--ttl=-1"],
    ["--timeout", "0", "list"],
    ["block"],
    ["list", "--status", "bogus"],
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=[" ".join(a) or "(nothing)" for a in USAGE_ERRORS])
def test_usage_errors_exit_2_and_change_nothing(shared_kd, argv):
    """Bad flags, malformed durations or JSON, and one-id-only options with several ids exit 2 and change nothing."""
    kd = shared_kd
    a, b = kd.create("A")["id"], kd.create("B")["id"]
    before = snapshot(kd)
    r = kd.ctl(*[{"@a": a, "@b": b}.get(x, x) for x in argv])
    assert r.returncode == 2, r
    assert r.stderr.strip() and r.stdout == ""
    assert snapshot(kd) == before


def test_unreachable_daemon_exits_3_with_how_to_start(kanband_factory, home):
    """With no daemon at the socket kanbanctl exits 3 and its message says how to start kanband."""
    k = kanband_factory(start=False)  # a home with no daemon
    r = k.ctl("list")
    assert r.returncode == 3, r
    assert r.stdout == ""
    assert str(k.socket) in r.stderr
    assert "kanband" in r.stderr and "start" in r.stderr.lower()
    # a stale socket file (nobody listening) is unreachable too, not a crash
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(k.socket))
    s.close()
    r = k.ctl("show", "t_00000000", "--json")
    assert r.returncode == 3 and r.stdout == "", r


def test_socket_path_too_long_is_a_usage_error(shared_kd):
    """kanbanctl refuses a socket path over 107 bytes, suggesting --socket/$KANBAN_SOCKET."""
    kd = shared_kd
    r = kd.ctl("--socket", "/tmp/" + "s" * 120, "list")
    assert r.returncode == 2, r
    assert "107" in r.stderr and "--socket" in r.stderr


def test_finds_the_daemon_by_home_socket_and_env(shared_kd):
    """--home, --socket, $KANBAN_HOME and $KANBAN_SOCKET all reach the same daemon."""
    kd = shared_kd
    tid = kd.create("x")["id"]
    env = {k: v for k, v in kd.env.items() if k != "KANBAN_HOME"}
    env["HOME"] = str(kd.home / "nohome")
    env.pop("XDG_RUNTIME_DIR", None)
    env.pop("XDG_STATE_HOME", None)
    for args, extra in ((["--home", str(kd.home)], {}), (["--socket", str(kd.socket)], {}),
                        ([], {"KANBAN_SOCKET": str(kd.socket)}),
                        ([], {"KANBAN_HOME": str(kd.home)})):
        r = subprocess.run([sys.executable, "-m", "kanbanctl", *args, "show", tid, "--json"],
                           env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (args, extra, r.stderr)
        assert json.loads(r.stdout)["task"]["id"] == tid


# -- --json: one document, the §6 shapes ---------------------------------------------------
def test_every_json_verb_prints_exactly_one_document(shared_kd):
    """Each verb with --json prints one JSON document on stdout and nothing else."""
    kd = shared_kd
    a = kd.create("A")["id"]
    b = kd.create("B")["id"]
    c = kd.create("C")["id"]
    calls = [
        ("init",), ("create", "new one"), ("list",), ("ls",), ("show", a),
        ("assign", a, "bob"), ("link", a, b), ("unlink", a, b), ("comment", a, "hello"),
        ("claim", a), ("heartbeat", a), ("runs", a), ("context", a), ("complete", a),
        ("block", b, "why"), ("unblock", b), ("archive", b), ("stats",), ("assignees",),
        ("status",), ("complete", c, kd.create("D")["id"]),
    ]
    for args in calls:
        r = kd.ctl(*args, "--json")
        try:
            one_json(r)
        except (AssertionError, ValueError) as e:
            raise AssertionError(f"kanbanctl {' '.join(args)} --json: {e}\n{r.stdout!r}") from e


def test_task_json_has_exactly_the_spec_fields(shared_kd):
    """create, show, list and the change verbs print tasks with exactly the §6 field list."""
    kd = shared_kd
    p = kd.create("parent")["id"]
    doc = kd.ctl_json("create", "the title", "--body", "text", "--assignee", "bob",
                      "--parent", p, "--tenant", "acme", "--priority", "5",
                      "--idempotency-key", "k1", "--max-runtime", "90s", "--created-by", "me",
                      "--skill", "py", "--skill", "sql", "--workspace", "dir:/tmp/kbws")
    assert set(doc) == TASK_KEYS | {"created"}
    assert doc["created"] is True
    assert TASK_ID.match(doc["id"])
    assert (doc["title"], doc["body"], doc["assignee"], doc["tenant"], doc["priority"]) == \
        ("the title", "text", "bob", "acme", 5)
    assert (doc["idempotency_key"], doc["max_runtime_seconds"], doc["created_by"]) == \
        ("k1", 90, "me")
    assert doc["skills"] == ["py", "sql"]
    assert (doc["workspace_kind"], doc["workspace_path"]) == ("dir", "/tmp/kbws")
    assert doc["status"] == "todo" and p in doc["waiting_reason"]
    assert isinstance(doc["created_at"], float) and abs(doc["created_at"] - time.time()) < 60
    for key in ("started_at", "completed_at", "result", "not_before", "current_run_id",
                "worker_pid", "lease_expires", "last_heartbeat_at", "last_failure_error"):
        assert doc[key] is None, key
    assert doc["consecutive_failures"] == 0
    tid = doc["id"]
    assert set(kd.ctl_json("show", tid)["task"]) == TASK_KEYS
    assert all(set(t) == TASK_KEYS for t in kd.ctl_json("list"))
    for args in (("assign", tid, "carol"), ("complete", p), ("block", tid),
                 ("unblock", tid), ("archive", tid)):
        assert set(kd.ctl_json(*args)) == TASK_KEYS, args


def test_created_false_only_for_an_idempotent_repeat(shared_kd):
    """`create --json` says created true for a new task and false when the key matched."""
    kd = shared_kd
    key = f"same-{time.time()}"
    assert kd.ctl_json("create", "x", "--idempotency-key", key)["created"] is True
    assert kd.ctl_json("create", "x", "--idempotency-key", key)["created"] is False


def test_show_json_shape(shared_kd):
    """`show --json` is {task, parents, children, comments, events, runs} with tasks and runs in §6 shape."""
    kd = shared_kd
    p = kd.create("P")["id"]
    t = kd.create("T", parents=[p])["id"]
    c = kd.create("C", parents=[t])["id"]
    kd.call("task.complete", id=p)
    kd.call("task.comment", id=t, body="note", author="me")
    kd.call("task.claim", id=t)
    doc = kd.ctl_json("show", t)
    assert set(doc) == {"task", "parents", "children", "comments", "events", "runs"}
    assert doc["task"]["id"] == t
    assert [x["id"] for x in doc["parents"]] == [p] and set(doc["parents"][0]) == TASK_KEYS
    assert [x["id"] for x in doc["children"]] == [c] and set(doc["children"][0]) == TASK_KEYS
    assert [(x["author"], x["body"]) for x in doc["comments"]] == [("me", "note")]
    assert len(doc["runs"]) == 1 and set(doc["runs"][0]) == RUN_KEYS
    kinds = [e["kind"] for e in doc["events"]]
    assert kinds[0] == "created" and "commented" in kinds and kinds[-1] == "claimed"
    ids = [e["id"] for e in doc["events"]]
    assert ids == sorted(ids)
    assert all({"id", "kind", "payload", "created_at"} <= set(e) for e in doc["events"])


def test_runs_json_shape(shared_kd):
    """`runs --json` lists each attempt with exactly the §6 run fields; outcome is null while active."""
    kd = shared_kd
    t = kd.create("T")["id"]
    kd.call("task.claim", id=t, claimer="ext")
    kd.call("task.reclaim", id=t)
    kd.call("task.claim", id=t)
    runs = kd.ctl_json("runs", t)
    assert len(runs) == 2 and all(set(r) == RUN_KEYS for r in runs)
    assert runs[0]["outcome"] == "reclaimed" and runs[0]["ended_at"] is not None
    assert runs[0]["claimer"] == "external:ext"
    assert runs[1]["outcome"] is None and runs[1]["ended_at"] is None
    assert all(r["task_id"] == t for r in runs)


def test_claim_json_shape_and_the_token_works(shared_kd):
    """`claim --json` gives run_id, token, workspace and lease_expires; the token then completes the task."""
    kd = shared_kd
    t = kd.create("T")["id"]
    before = time.time()
    doc = kd.ctl_json("claim", t, "--ttl", "120")
    assert {"run_id", "token", "workspace", "lease_expires"} <= set(doc)
    assert doc["run_id"] == kd.task(t)["current_run_id"]
    assert before + 120 <= doc["lease_expires"] <= time.time() + 120
    assert os.path.isdir(doc["workspace"])  # claim prepares the workspace
    r = kd.ctl("complete", t, "--summary", "ok", env={"KANBAN_RUN_TOKEN": doc["token"]})
    assert r.returncode == 0, r.stderr
    assert kd.task(t)["status"] == "done"


def test_claim_text_shows_the_token_once(shared_kd):
    """`claim` in text mode prints the run, the workspace and the token."""
    kd = shared_kd
    t = kd.create("T")["id"]
    r = kd.ctl("claim", t)
    assert r.returncode == 0, r.stderr
    run = kd.task(t)["current_run_id"]
    assert run in r.stdout and "token" in r.stdout
    assert re.search(r"kt_\S+", r.stdout)


def test_stats_json_shape(kd):
    """`stats --json` has by_status (every status), by_assignee, oldest_ready_age_seconds and running, matching the board."""
    kd.create("a", assignee="bob")
    kd.create("b", assignee="bob", triage=True)
    t = kd.create("c")["id"]
    kd.call("task.claim", id=t)
    doc = kd.ctl_json("stats")
    assert {"by_status", "by_assignee", "oldest_ready_age_seconds", "running"} <= set(doc)
    assert set(doc["by_status"]) == {"triage", "todo", "ready", "running", "blocked", "done",
                                     "archived"}
    assert doc["by_status"]["ready"] == 1 and doc["by_status"]["triage"] == 1
    assert doc["running"] == 1 and doc["by_status"]["running"] == 1
    assert doc["by_assignee"]["bob"] == {"ready": 1, "triage": 1}
    assert isinstance(doc["oldest_ready_age_seconds"], (int, float))
    assert doc["oldest_ready_age_seconds"] >= 0


def test_assignees_json_shape(kd):
    """`assignees --json` lists configured profiles and the board's assignees, with counts."""
    kd.create("a", assignee="bob")
    kd.create("b", assignee="bob")
    kd.create("c")
    doc = kd.ctl_json("assignees")
    by_name = {a["name"]: a for a in doc}
    assert "shell" in by_name and by_name["shell"]["profile"] is True  # built-in profile
    assert by_name["bob"]["profile"] is False
    assert by_name["bob"]["counts"] == {"ready": 2} and by_name["bob"]["total"] == 2
    r = kd.ctl("assignees")
    assert r.returncode == 0 and "bob" in r.stdout and "shell" in r.stdout


def test_status_json(kd):
    """`status --json` reports the daemon's pid, version, paths and counts."""
    from kanband import __version__
    kd.create("x")
    doc = kd.ctl_json("status")
    assert doc["pid"] == kd.proc.pid and doc["version"] == __version__
    assert doc["paths"]["socket"] == str(kd.socket)
    assert doc["counts"].get("ready") == 1
    assert doc["uptime_seconds"] >= 0
    r = kd.ctl("status")
    assert r.returncode == 0 and str(kd.proc.pid) in r.stdout


def test_init_prints_paths_profiles_and_next_steps(shared_kd):
    """`init` prints home, database, socket, configured profiles and next steps."""
    kd = shared_kd
    doc = kd.ctl_json("init")
    assert doc["home"] == str(kd.home) and doc["db"] == str(kd.home / "kanban.db")
    assert doc["socket"] == str(kd.socket) and "shell" in doc["profiles"]
    assert doc["daemon_pid"] == kd.proc.pid
    r = kd.ctl("init")
    assert r.returncode == 0
    for word in (str(kd.home), "kanban.db", str(kd.socket), "shell", "next steps"):
        assert word in r.stdout, word


# -- text output ------------------------------------------------------------------------
def test_list_prints_one_line_per_task(kd):
    """`list` prints one line per task with its id, status and title; archived tasks only with --archived."""
    ids = {s: kd.create(f"title {s}")["id"] for s in ("one", "two", "three", "gone")}
    kd.call("task.complete", id=ids["two"])
    kd.call("task.archive", id=ids["gone"])
    r = kd.ctl("list")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for name in ("one", "two", "three"):
        line = next(ln for ln in lines if ids[name] in ln)
        assert f"title {name}" in line
    assert "done" in next(ln for ln in lines if ids["two"] in ln)
    assert ids["gone"] not in r.stdout
    r = kd.ctl("ls", "--archived")
    assert len(r.stdout.splitlines()) == 4 and ids["gone"] in r.stdout


def test_list_filters(kd):
    """list --status (repeat or comma), --assignee (none = unassigned) and --tenant filter the tasks."""
    a = kd.create("a", assignee="bob", tenant="x")["id"]
    b = kd.create("b", tenant="y")["id"]
    c = kd.create("c", assignee="bob")["id"]
    kd.call("task.block", id=c)

    def ids(*args):
        return sorted(t["id"] for t in kd.ctl_json("list", *args))
    assert ids("--assignee", "bob") == sorted([a, c])
    assert ids("--assignee", "none") == [b]
    assert ids("--tenant", "x") == [a]
    assert ids("--status", "blocked") == [c]
    assert ids("--status", "ready,blocked") == sorted([a, b, c])
    assert ids("--status", "ready", "--status", "blocked") == sorted([a, b, c])
    r = kd.ctl("list", "--tenant", "nobody")
    assert r.returncode == 0 and not any(x in r.stdout for x in (a, b, c))


def test_list_mine(kd):
    """`list --mine` shows tasks I created; inside a worker ($KANBAN_PROFILE) it shows the tasks assigned to that profile."""
    mine = kd.ctl_json("create", "mine")["id"]
    kd.create("someone else's", created_by="other")
    bobs = kd.create("for bob", assignee="bob", created_by="other")["id"]
    assert [t["id"] for t in kd.ctl_json("list", "--mine")] == [mine]
    assert [t["id"] for t in kd.ctl_json("list", "--mine", env={"KANBAN_PROFILE": "bob"})] == [bobs]


def test_show_text(shared_kd):
    """`show` prints the task's id, title, status and its comments and runs."""
    kd = shared_kd
    t = kd.create("readable title", body="the body")["id"]
    kd.call("task.comment", id=t, body="a remark")
    run = kd.call("task.claim", id=t)["run_id"]
    r = kd.ctl("show", t)
    assert r.returncode == 0
    for word in (t, "readable title", "running", "the body", "a remark", run):
        assert word in r.stdout, word


def test_create_text_and_quiet(kd):
    """`create` prints the new id; `-q` prints only the id."""
    r = kd.ctl("create", "hello")
    assert r.returncode == 0
    tid = kd.call("task.list")["tasks"][0]["id"]
    assert tid in r.stdout
    r = kd.ctl("create", "hello2", "-q")
    assert r.returncode == 0 and TASK_ID.match(r.stdout.strip())


def test_create_warns_when_the_assignee_has_no_profile(shared_kd):
    """A ready task assigned to an unknown profile gets a warning on stderr in text mode, and none with --json."""
    kd = shared_kd
    r = kd.ctl("create", "x", "--assignee", "ghost")
    assert r.returncode == 0 and "ghost" in r.stderr and "warning" in r.stderr.lower()
    r = kd.ctl("create", "y", "--assignee", "ghost", "--json")
    assert r.returncode == 0 and r.stderr == "" and json.loads(r.stdout)["assignee"] == "ghost"
    r = kd.ctl("create", "z", "--assignee", "ghost", "--triage")
    assert r.returncode == 0 and "warning" not in r.stderr.lower()  # not ready: no warning


def test_create_triage_and_parents(shared_kd):
    """--triage parks the task and repeated --parent sets several parents."""
    kd = shared_kd
    a, b = kd.create("a")["id"], kd.create("b")["id"]
    assert kd.ctl_json("create", "t", "--triage")["status"] == "triage"
    doc = kd.ctl_json("create", "c", "--parent", a, "--parent", b)
    assert doc["status"] == "todo"
    assert sorted(p["id"] for p in kd.call("task.show", id=doc["id"])["parents"]) == sorted([a, b])


@pytest.mark.parametrize("text,seconds", [("300", 300), ("90s", 90), ("30m", 1800),
                                          ("2h", 7200), ("1d", 86400)])
def test_max_runtime_durations(shared_kd, text, seconds):
    """--max-runtime accepts seconds and the s/m/h/d suffixes."""
    kd = shared_kd
    assert kd.ctl_json("create", "x", "--max-runtime", text)["max_runtime_seconds"] == seconds


def test_assign_and_unassign(shared_kd):
    """`assign ID PROFILE` sets the assignee (event `assigned`); `assign ID none` clears it."""
    kd = shared_kd
    t = kd.create("x")["id"]
    assert kd.ctl_json("assign", t, "bob")["assignee"] == "bob"
    assert events_of(kd, t)[-1]["payload"] == {"assignee": "bob"}
    assert kd.ctl_json("assign", t, "none")["assignee"] is None
    r = kd.ctl("assign", t, "carol")
    assert r.returncode == 0 and "carol" in r.stdout


def test_assign_running_needs_force(shared_kd):
    """`assign` of a running task exits 1 without --force; with --force it reclaims and reassigns."""
    kd = shared_kd
    t = kd.create("x")["id"]
    kd.call("task.claim", id=t)
    r = kd.ctl("assign", t, "bob")
    assert r.returncode == 1 and t in r.stderr and "running" in r.stderr
    assert kd.task(t)["status"] == "running"
    doc = kd.ctl_json("assign", t, "bob", "--force")
    assert doc["assignee"] == "bob" and doc["status"] == "ready"


def test_comment(shared_kd):
    """`comment ID TEXT...` joins the words, records the author and emits `commented`."""
    kd = shared_kd
    t = kd.create("x")["id"]
    r = kd.ctl("comment", t, "hello", "there", "--author", "me")
    assert r.returncode == 0, r.stderr
    comments = kd.call("task.show", id=t)["comments"]
    assert [(c["author"], c["body"]) for c in comments] == [("me", "hello there")]
    ev = events_of(kd, t)[-1]
    assert ev["kind"] == "commented" and ev["payload"] == {"author": "me", "len": 11}


def test_complete_several_ids(shared_kd):
    """`complete A B C` completes all three; --json prints a list of the tasks."""
    kd = shared_kd
    ids = [kd.create(f"t{i}")["id"] for i in range(3)]
    r = kd.ctl("complete", *ids)
    assert r.returncode == 0, r.stderr
    assert all(i in r.stdout for i in ids)
    assert [kd.task(i)["status"] for i in ids] == ["done"] * 3
    more = [kd.create(f"u{i}")["id"] for i in range(2)]
    docs = kd.ctl_json("complete", *more)
    assert [d["id"] for d in docs] == more and all(d["status"] == "done" for d in docs)


def test_complete_with_summary_and_metadata(shared_kd):
    """`complete ID --summary S --metadata JSON` records them on the run; --result sets the task's result."""
    kd = shared_kd
    t = kd.create("x")["id"]
    tok = kd.call("task.claim", id=t)["token"]
    doc = kd.ctl_json("complete", t, "--summary", "all good", "--metadata", '{"tests": 12}',
                      "--result", "the answer", env={"KANBAN_RUN_TOKEN": tok})
    assert doc["status"] == "done" and doc["result"] == "the answer"
    run = kd.call("task.runs", id=t)["runs"][-1]
    assert run["summary"] == "all good" and run["metadata"] == {"tests": 12}


def test_several_ids_with_one_refused_exits_1_and_does_the_rest(shared_kd):
    """When one id of several is refused the others still happen, the refusal goes to stderr, and the exit is 1."""
    kd = shared_kd
    a, b = kd.create("a")["id"], kd.create("b")["id"]
    done = kd.create("c")["id"]
    kd.call("task.complete", id=done)
    r = kd.ctl("complete", a, "t_00000000", b)
    assert r.returncode == 1
    assert "t_00000000" in r.stderr
    assert kd.task(a)["status"] == kd.task(b)["status"] == "done"
    r = kd.ctl("block", "--ids", a, done)
    assert r.returncode == 1 and f"cannot block {a}" in r.stderr


def test_block_forms(shared_kd):
    """`block ID REASON...` and `block --ids A B` block tasks; the reason lands in the `blocked` event."""
    kd = shared_kd
    a, b, c = (kd.create(x)["id"] for x in "abc")
    r = kd.ctl("block", a, "needs", "review")
    assert r.returncode == 0, r.stderr
    assert events_of(kd, a)[-1]["payload"] == {"reason": "needs review"}
    r = kd.ctl("block", "--ids", b, c)
    assert r.returncode == 0, r.stderr
    assert kd.task(b)["status"] == kd.task(c)["status"] == "blocked"


@pytest.mark.parametrize("verb,start,end", [("unblock", "blocked", "ready"),
                                            ("archive", "ready", "archived"),
                                            ("promote", "triage", "ready")])
def test_multi_id_verbs(shared_kd, verb, start, end):
    """unblock, archive and promote accept several ids and change each of them."""
    kd = shared_kd
    ids = [kd.create(f"t{i}", triage=start == "triage")["id"] for i in range(3)]
    if start == "blocked":
        for i in ids:
            kd.call("task.block", id=i)
    r = kd.ctl(verb, *ids)
    assert r.returncode == 0, r.stderr
    assert [kd.task(i)["status"] for i in ids] == [end] * 3


def test_runs_text(shared_kd):
    """`runs` prints one line per run with its outcome."""
    kd = shared_kd
    t = kd.create("x")["id"]
    r = kd.ctl("runs", t)
    assert r.returncode == 0 and "no runs" in r.stdout
    kd.call("task.claim", id=t)
    kd.call("task.reclaim", id=t)
    kd.call("task.claim", id=t)
    lines = kd.ctl("runs", t).stdout.splitlines()
    assert len(lines) == 2 and "reclaimed" in lines[0] and "active" in lines[1]


# -- context (§4.1) -------------------------------------------------------------------
def test_context_sections_in_spec_order(shared_kd):
    """`context` holds header, body, prior attempts, parent results, recent work, comments, in that order."""
    kd = shared_kd
    p1 = kd.create("parent one")["id"]
    tok = kd.call("task.claim", id=p1)["token"]
    kd.call("task.complete", id=p1, summary="parent summary", metadata={"k": 1}, token=tok)
    p2 = kd.create("parent two")["id"]
    kd.call("task.complete", id=p2, result="parent result")
    other = kd.create("earlier work", assignee="ctx-bob")["id"]
    kd.call("task.complete", id=other, result="shipped it")
    t = kd.create("the task", body="do the thing", assignee="ctx-bob", tenant="acme",
                  parents=[p1, p2])["id"]
    kd.call("task.claim", id=t)
    kd.call("task.reclaim", id=t)
    kd.call("task.comment", id=t, body="remember the milk", author="ann")
    r = kd.ctl("context", t)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    markers = [t, "the task", "ctx-bob", "acme", "do the thing", "reclaimed",
               "parent summary", "parent result", "shipped it", "remember the milk"]
    positions = [text.find(m) for m in markers]
    assert all(p >= 0 for p in positions), dict(zip(markers, positions))
    assert positions == sorted(positions), dict(zip(markers, positions))
    assert '"k": 1' in text  # parent run metadata
    doc = kd.ctl_json("context", t)
    assert doc["text"] == text.rstrip("\n") or doc["text"] == text


def test_context_marks_truncation(shared_kd):
    """A body over 8 KiB and a comment over 2 KiB are cut, and the cut is marked."""
    kd = shared_kd
    t = kd.create("big", body="B" * 10000)["id"]
    kd.call("task.comment", id=t, body="C" * 5000)
    text = kd.call("task.context", id=t)["text"]
    assert "B" * 8192 in text and "B" * 8193 not in text
    assert "C" * 2048 in text and "C" * 2049 not in text
    assert text.count("truncated") >= 2


def test_context_counts_older_attempts_and_comments(shared_kd):
    """Only the last 10 attempts and 30 comments are shown; the older ones are counted."""
    kd = shared_kd

    def context_after(title: str, attempts: int, comments: int) -> str:
        t = kd.create(title)["id"]
        for _ in range(attempts):
            kd.call("task.claim", id=t)
            kd.call("task.reclaim", id=t)
        for i in range(comments):
            kd.call("task.comment", id=t, body=f"comment number {i:02d}")
        return kd.call("task.context", id=t)["text"]
    text = context_after("busy", 12, 32)
    assert text.count("reclaimed") == 10 and "(2 older attempts not shown)" in text
    assert "comment number 01" not in text and "comment number 02" in text
    assert "comment number 31" in text and "(2 older comments not shown)" in text
    # exactly at the caps: nothing is counted as older
    text = context_after("at the caps", 10, 30)
    assert text.count("reclaimed") == 10 and "older" not in text


def test_context_recent_work_is_the_last_five(shared_kd):
    """Recent work lists the assignee's last five completed tasks on other tasks, one line each."""
    kd = shared_kd
    done = []
    for i in range(7):
        x = kd.create(f"old job {i}", assignee="recent-bob")["id"]
        kd.call("task.complete", id=x, result=f"result {i}")
        done.append(x)
    t = kd.create("now", assignee="recent-bob")["id"]
    text = kd.call("task.context", id=t)["text"]
    assert sum(x in text for x in done) == 5
    assert done[-1] in text and done[0] not in text


# -- lightness -------------------------------------------------------------------------
def test_kanbanctl_stays_light(shared_kd):
    """Running kanbanctl verbs never imports asyncio, structlog or psutil."""
    kd = shared_kd
    t = kd.create("x")["id"]
    code = (
        "import runpy, sys\n"
        "sys.argv = ['kanbanctl'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('kanbanctl', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "bad = [m for m in ('asyncio', 'structlog', 'psutil') if m in sys.modules]\n"
        "sys.stderr.write('HEAVY=' + ','.join(bad) + '\\n')\n")
    for args in (["list"], ["show", t], ["create", "y", "--max-runtime", "5m"],
                 ["complete", t, "--metadata", "{}"], ["context", t], ["stats"]):
        r = subprocess.run([sys.executable, "-c", code, *args], env=kd.env,
                           capture_output=True, text=True, timeout=60)
        assert "HEAVY=\n" in r.stderr, (args, r.stderr)
