"""Bad input for every kanbanctl verb and for config files (SPEC §6, §8, §10;
issue 7 item 5): a clear error on stderr, the right exit code (2 usage, 1
refused), nothing on stdout (in --json mode too), and nothing written; a bad
config is refused by `kanband --check-config` (exit 2, naming the key) and by
`kanbanctl reload` on a running daemon (exit 1), which keeps its old config.

Complements test_cli (usage errors of create/complete/claim/list, unknown ids in
text mode), test_limits (title and skill limits) and test_daemon (a first table
of bad configs for --check-config)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import Kanband, module_kanband, wait_for
from hostile_helpers import full_snapshot
from kanbanctl.cli import build_parser

MISSING = "t_deadbeef"


def verbs() -> dict[str, argparse.ArgumentParser]:
    """Every kanbanctl verb (aliases included), from the real parser."""
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


VERBS = verbs()


# -- a board to be refused on ----------------------------------------------------------------
def make_world(k: Kanband, tmp: Path) -> dict[str, str]:
    """Tasks in each status, a linked pair, and paths, by placeholder name."""
    w = {"@ready": k.create("ready")["id"], "@done": k.create("done")["id"],
         "@triage": k.create("triage", triage=True)["id"], "@blocked": k.create("blocked")["id"],
         "@running": k.create("running")["id"], "@archived": k.create("archived")["id"],
         "@parent": k.create("parent")["id"]}
    w["@child"] = k.create("child", parents=[w["@parent"]])["id"]
    k.call("task.complete", id=w["@done"])
    k.call("task.block", id=w["@blocked"])
    k.call("task.claim", id=w["@running"])
    k.call("task.archive", id=w["@archived"])
    existing = tmp / "existing.db"
    existing.write_text("keep me")
    w.update({"@missing": MISSING, "@existing": str(existing), "@tmp": str(tmp),
              "@newfile": str(tmp / "new.db"), "@livedb": str(k.home / "kanban.db")})
    return w


class Board:
    """The module's daemon, a scratch directory, and a world that is rebuilt only after a
    case changed something (so one unexpected success cannot spoil the cases after it)."""

    def __init__(self, k: Kanband, tmp: Path) -> None:
        self.k = k
        self.tmp = tmp
        self._world: dict[str, str] | None = None

    def world(self) -> dict[str, str]:
        if self._world is None:
            self._world = make_world(self.k, Path(tempfile.mkdtemp(prefix="w", dir=self.tmp)))
        return self._world

    def spoiled(self) -> None:
        self._world = None


@pytest.fixture(scope="module")
def bk(shared_kd: Kanband) -> Any:
    """One kanband for the CLI cases (conftest's shared_kd, whose scratch dir is home's parent)."""
    return Board(shared_kd, shared_kd.home.parent)


# -- the table ---------------------------------------------------------------------------------
# (argv, exit code, text stderr must contain, modes). Placeholders: see make_world.
BOTH = ("text", "json")
JSON = ("json",)  # the text mode of this case is already in test_cli
CASES: list[tuple[list[str], int, str | None, tuple[str, ...]]] = [
    # global options
    ([], 2, "VERB", ("text",)),
    (["frobnicate"], 2, "frobnicate", ("text",)),
    (["--timeout", "x", "list"], 2, "--timeout", BOTH),
    (["--timeout", "-1", "list"], 2, "--timeout", BOTH),
    (["--timeout", "inf", "list"], 2, "timeout", BOTH),
    (["--timeout", "1e400", "list"], 2, "timeout", BOTH),
    # create
    (["create"], 2, "title", BOTH),
    (["create", "x", "--priority", "high"], 2, "--priority", BOTH),
    (["create", "x", "--priority", "1.5"], 2, "--priority", BOTH),
    (["create", "x", "--priority", "99999999999"], 2, "priority", BOTH),
    (["create", "x", "--max-runtime", "1e3"], 2, "--max-runtime", BOTH),
    (["create", "x", "--max-runtime", "99999999999d"], 2, "max_runtime", BOTH),
    (["create", "x", "--workspace", "bogus"], 2, "workspace", BOTH),
    (["create", "x", "--workspace", "worktree:relative/repo"], 2, "workspace", BOTH),
    (["create", "x", "--workspace", "dir:"], 2, "workspace", BOTH),
    (["create", "x", "--assignee", "a\nb"], 2, "assignee", BOTH),
    (["create", "x", "--tenant", "t" * 201], 2, "tenant", BOTH),
    (["create", "x", "--parent", "@missing"], 1, MISSING, BOTH),
    (["create", "x", "--parent", "@ready", "--parent", "@missing"], 1, MISSING, BOTH),
    # list
    (["list", "--status", "ready,bogus"], 2, "bogus", BOTH),
    (["ls", "--assignee", "a\nb"], 2, "assignee", BOTH),
    # show / runs / context / log
    (["show"], 2, "id", BOTH),
    (["show", "@missing"], 1, MISSING, JSON),
    (["runs", "@missing"], 1, MISSING, JSON),
    (["context", "@missing"], 1, MISSING, JSON),
    (["log", "@missing"], 1, MISSING, BOTH),
    (["log", "@ready", "--tail", "x"], 2, "--tail", BOTH),
    (["log", "@ready", "--tail", "-1"], 2, "tail", BOTH),
    # assign
    (["assign", "@ready"], 2, "profile", BOTH),
    (["assign", "@missing", "x"], 1, MISSING, JSON),
    (["assign", "@running", "x"], 1, "@running", BOTH),
    (["assign", "@ready", "a\nb"], 2, "assignee", BOTH),
    (["assign", "@ready", "x" * 300], 2, "assignee", BOTH),
    # link / unlink
    (["link", "@ready"], 2, "child", BOTH),
    (["link", "@missing", "@ready"], 1, MISSING, BOTH),
    (["link", "@ready", "@missing"], 1, MISSING, BOTH),
    (["link", "@child", "@parent"], 1, "@parent", BOTH),
    (["link", "@parent", "@child"], 1, "@parent", BOTH),
    (["link", "@ready", "@ready"], 2, "itself", BOTH),
    (["unlink", "@ready"], 2, "child", BOTH),
    (["unlink", "@missing", "@ready"], 1, MISSING, BOTH),
    (["unlink", "@ready", "@done"], 1, "@ready", BOTH),
    # claim
    (["claim"], 2, "id", BOTH),
    (["claim", "@missing"], 1, MISSING, JSON),
    (["claim", "@done"], 1, "@done", BOTH),
    (["claim", "@triage"], 1, "@triage", BOTH),
    (["claim", "@running"], 1, "@running", BOTH),
    (["claim", "@ready", "--ttl", "0"], 2, "--ttl", BOTH),
    (["claim", "@ready", "--ttl", "nan"], 2, "--ttl", BOTH),
    (["claim", "@ready", "--ttl", "inf"], 2, "ttl", BOTH),
    # comment
    (["comment", "@ready"], 2, "text", BOTH),
    (["comment", "@missing", "hi"], 1, MISSING, JSON),
    (["comment", "@ready", ""], 2, "empty", BOTH),
    (["comment", "@ready", "   "], 2, "empty", BOTH),
    # complete
    (["complete"], 2, "ID", BOTH),
    (["complete", "@missing"], 1, MISSING, JSON),
    (["complete", "@archived"], 1, "@archived", BOTH),
    (["complete", "@ready", "--metadata", "{bad"], 2, "--metadata", BOTH),
    (["complete", "@ready", "--metadata", '{"a": NaN}'], 2, "--metadata", BOTH),
    (["complete", "@ready", "--metadata", '{"a": 1e999}'], 2, "--metadata", BOTH),
    (["complete", "@ready", "--metadata", '{"blob": "' + "m" * 70000 + '"}'], 2, "metadata",
     BOTH),
    # block / unblock / archive / promote / reclaim / heartbeat
    (["block"], 2, "id", BOTH),
    (["block", "--ids"], 2, "--ids", BOTH),
    (["block", "@missing"], 1, MISSING, JSON),
    (["block", "@done", "why"], 1, "@done", BOTH),
    (["unblock"], 2, "ID", BOTH),
    (["unblock", "@missing"], 1, MISSING, JSON),
    (["unblock", "@ready"], 1, "@ready", BOTH),
    (["archive"], 2, "ID", BOTH),
    (["archive", "@missing"], 1, MISSING, JSON),
    (["archive", "@archived"], 1, "@archived", BOTH),
    (["promote"], 2, "ID", BOTH),
    (["promote", "@missing"], 1, MISSING, JSON),
    (["promote", "@ready"], 1, "@ready", BOTH),
    (["reclaim"], 2, "id", BOTH),
    (["reclaim", "@missing"], 1, MISSING, BOTH),
    (["reclaim", "@ready"], 1, "@ready", BOTH),
    (["heartbeat"], 2, "id", BOTH),
    (["heartbeat", "@missing"], 1, MISSING, JSON),
    (["heartbeat", "@ready"], 1, "@ready", BOTH),
    (["heartbeat", "@running", "--note"], 2, "--note", BOTH),
    # wait / tail / watch
    (["wait"], 2, "ID", BOTH),
    (["wait", "@missing"], 1, MISSING, BOTH),
    (["wait", "@ready", "@missing"], 1, MISSING, BOTH),
    (["wait", "@ready", "--timeout", "0"], 2, "--timeout", BOTH),
    (["wait", "@ready", "--timeout", "x"], 2, "--timeout", BOTH),
    (["wait", "@ready", "--timeout", "inf"], 2, "timeout", BOTH),
    (["wait", "@ready", "--timeout", "1e12"], 2, "timeout", BOTH),
    (["tail"], 2, "id", BOTH),
    (["tail", "@missing"], 1, MISSING, BOTH),
    (["tail", "@ready", "--interval", "x"], 2, "--interval", BOTH),
    (["watch", "--since", "x"], 2, "--since", BOTH),
    (["watch", "--since", "-5"], 2, "since", BOTH),
    (["watch", "--kinds", "complted"], 2, "complted", BOTH),
    # dispatch / gc / backup
    (["dispatch", "--max", "x"], 2, "--max", BOTH),
    (["dispatch", "--max", "-1"], 2, "max", BOTH),
    (["dispatch", "--failure-limit", "0"], 2, "failure_limit", BOTH),
    (["gc", "--event-retention-days", "x"], 2, "--event-retention-days", BOTH),
    (["gc", "--event-retention-days", "-1"], 2, "event_retention_days", BOTH),
    (["gc", "--log-retention-days", "nan"], 2, "log_retention_days", BOTH),
    (["gc", "--event-retention-days", "inf"], 2, "event_retention_days", BOTH),
    (["backup"], 2, "path", BOTH),
    (["backup", ""], 2, "path", BOTH),
    (["backup", "/nonexistent-dir-kb/x.db"], 2, "/nonexistent-dir-kb", BOTH),
    (["backup", "@livedb"], 2, "live database", BOTH),
    (["backup", "@existing"], 1, "exists", BOTH),
    # notify
    (["notify-subscribe", "@ready"], 2, "--platform", BOTH),
    (["notify-subscribe", "@ready", "--platform", ""], 2, "platform", BOTH),
    (["notify-subscribe", "@missing", "--platform", "slack"], 1, MISSING, BOTH),
    (["notify-unsubscribe"], 2, "id", BOTH),
    (["notify-unsubscribe", "@missing"], 1, MISSING, BOTH),
    (["notify-unsubscribe", "@ready"], 1, "@ready", BOTH),
    (["notify-list", "@missing"], 1, MISSING, BOTH),
]

# Verbs without positional arguments refuse one; every verb refuses an unknown flag.
MINIMAL = {"archive": ["@ready"], "assign": ["@ready", "x"], "backup": ["@newfile"],
           "block": ["@ready"], "claim": ["@ready"], "comment": ["@ready", "hi"],
           "complete": ["@ready"], "context": ["@ready"], "create": ["x"], "heartbeat": ["@ready"],
           "link": ["@parent", "@ready"], "log": ["@ready"], "notify-subscribe": ["@ready", "--platform", "p"],
           "notify-unsubscribe": ["@ready"], "promote": ["@ready"], "reclaim": ["@ready"],
           "runs": ["@ready"], "show": ["@ready"], "tail": ["@ready"], "unblock": ["@ready"],
           "unlink": ["@parent", "@child"], "wait": ["@ready"]}
for _verb in sorted(VERBS):
    CASES.append(([_verb, *MINIMAL.get(_verb, []), "--no-such-flag"], 2, "--no-such-flag",
                  ("text",) if _verb == "daemon" else BOTH))
    if _verb not in MINIMAL and _verb != "daemon" and _verb != "notify-list":
        CASES.append(([_verb, "extra-arg"], 2, "extra-arg", BOTH))


def _verb_of(argv: list[str]) -> str | None:
    return next((a for a in argv if a in VERBS), None)


def test_every_verb_has_bad_input_cases():
    """The table covers every verb of kanbanctl's parser (and what `kanbanctl --help` lists)."""
    covered = {_verb_of(argv) for argv, *_ in CASES}
    assert set(VERBS) <= covered, sorted(set(VERBS) - covered)
    r = subprocess.run([sys.executable, "-m", "kanbanctl", "--help"], capture_output=True,
                       text=True, timeout=60)
    listed = {v for v in VERBS if f" {v} " in r.stdout or f"{{{v}," in r.stdout
              or f",{v}," in r.stdout or f",{v}}}" in r.stdout}
    assert listed and listed <= covered


def _case_id(case: tuple[list[str], int, str | None, tuple[str, ...]], mode: str) -> str:
    argv = " ".join(a if len(a) < 24 else a[:20] + "..." for a in case[0]) or "(nothing)"
    return f"{mode}: {argv}"


PARAMS = [(case, mode) for case in CASES for mode in case[3]]


@pytest.mark.parametrize("case,mode", PARAMS, ids=[_case_id(c, m) for c, m in PARAMS])
def test_bad_cli_input(bk, case, mode):
    """A bad kanbanctl invocation exits 2 (usage) or 1 (refused) with a message on stderr naming the problem, prints nothing on stdout (in --json mode too), and changes nothing."""
    k = bk.k
    argv, code, needle, _ = case
    w = bk.world()
    args = [w.get(a, a) for a in argv] + (["--json"] if mode == "json" else [])
    needle = w.get(needle, needle) if needle else None
    before = full_snapshot(k)
    files_before = sorted(p.name for p in Path(w["@tmp"]).iterdir())
    try:
        try:
            r = k.ctl(*args, timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"kanbanctl {' '.join(args)} did not exit within 10 s "
                        f"(expected exit {code})")
        assert r.returncode == code, f"exit {r.returncode}, expected {code}\n" \
            f"stdout: {r.stdout[:500]}\nstderr: {r.stderr[-800:]}"
        assert r.stdout == "", f"stdout is not empty on failure: {r.stdout[:500]}"
        err = r.stderr.strip()
        assert err, "no message on stderr"
        assert "Traceback" not in err, err[-800:]
        if needle:
            assert needle in err, f"stderr does not name {needle!r}: {err[-500:]}"
    finally:
        changed = full_snapshot(k) != before
        files = sorted(p.name for p in Path(w["@tmp"]).iterdir())
        if changed or files != files_before:
            bk.spoiled()
    assert not changed, "the board changed"
    assert files == files_before, "a file was written"


# -- config files ------------------------------------------------------------------------------
GOOD = """[daemon]
max_workers = 3
claim_ttl = "20m"

[profiles.good]
command = ["/bin/sh", "-c", "echo good ran"]
complete_on_exit = true
"""

# (file contents, what stderr must name)
BAD_CONFIGS: list[tuple[str | bytes, str]] = [
    # wrong types
    ("[daemon]\nmax_workers = 2.5\n", "daemon.max_workers"),
    ("[daemon]\nmax_workers = true\n", "daemon.max_workers"),
    ("[daemon]\nkill_grace = true\n", "daemon.kill_grace"),
    ("[daemon]\nsocket_group = 5\n", "daemon.socket_group"),
    ("[daemon]\ndurability = \"fast\"\n", "daemon.durability"),
    ("[daemon]\nlog_format = \"xml\"\n", "daemon.log_format"),
    ("daemon = \"x\"\n", "daemon"),
    ("profiles = 5\n", "profiles"),
    ("[profiles]\nx = 5\n", "profiles.x"),
    ("[profiles.x]\ncommand = \"echo hi\"\n", "profiles.x.command"),
    ("[profiles.x]\ncommand = [\"a\", 5]\n", "profiles.x.command"),
    ("[profiles.x]\ncommand = [\"a\", \"\"]\n", "profiles.x.command"),
    ("[profiles.x]\ncommand = [\"a\"]\nenv = { A = 1 }\n", "profiles.x.env"),
    ("[profiles.x]\ncommand = [\"a\"]\ncomplete_on_exit = \"yes\"\n", "profiles.x.complete_on_exit"),
    ("[profiles.x]\ncommand = [\"a\"]\nmax_concurrency = \"2\"\n", "profiles.x.max_concurrency"),
    ("[notifiers.slack]\ncommand = \"notify-send\"\n", "notifiers.slack.command"),
    ("notifiers = 1\n", "notifiers"),
    # unknown keys and sections
    ("[profiles.x]\ncommand = [\"a\"]\ncomand = [\"b\"]\n", "profiles.x.comand"),
    ("[notifiers.slack]\ncommand = [\"a\"]\nurl = \"x\"\n", "notifiers.slack.url"),
    ("[deamon]\nmax_workers = 3\n", "deamon"),
    ("[profile.x]\ncommand = [\"a\"]\n", "profile"),
    # profile names
    ("[profiles.none]\ncommand = [\"a\"]\n", "profiles.none"),
    ("[profiles.\"a,b\"]\ncommand = [\"a\"]\n", "profiles.a,b"),
    # durations
    ("[daemon]\nclaim_ttl = \"15 minutes\"\n", "daemon.claim_ttl"),
    ("[daemon]\nclaim_ttl = 0\n", "daemon.claim_ttl"),
    ("[daemon]\nclaim_ttl = nan\n", "daemon.claim_ttl"),
    ("[daemon]\nkill_grace = inf\n", "daemon.kill_grace"),
    ("[daemon]\nretry_backoff = nan\n", "daemon.retry_backoff"),
    ("[daemon]\nretry_backoff = \"-5s\"\n", "daemon.retry_backoff"),
    ("[daemon]\nexit_grace = \"1w\"\n", "daemon.exit_grace"),
    ("[daemon]\ndefault_max_runtime = \"2x\"\n", "daemon.default_max_runtime"),
    ("[profiles.x]\ncommand = [\"a\"]\nmax_runtime = \"forever\"\n", "profiles.x.max_runtime"),
    ("[profiles.x]\ncommand = [\"a\"]\nheartbeat_timeout = []\n", "profiles.x.heartbeat_timeout"),
    ("[profiles.x]\ncommand = [\"a\"]\nrate_limit_cooldown = \"soon\"\n",
     "profiles.x.rate_limit_cooldown"),
    ("[daemon]\nretry_backoff = \"10m\"\nretry_backoff_max = \"1m\"\n", "daemon.retry_backoff_max"),
    ("[daemon]\nbusy_poll = \"1s\"\n", "daemon.busy_poll"),  # past the 10ms cap
    ("[daemon]\nbusy_poll = \"100 ns\"\n", "daemon.busy_poll"),
    # placeholders
    ("[profiles.x]\ncommand = [\"a\", \"{task_id\"]\n", "profiles.x.command"),
    ("[profiles.x]\ncommand = [\"a\", \"task_id}\"]\n", "profiles.x.command"),
    ("[profiles.x]\ncommand = [\"a\", \"{}\"]\n", "profiles.x.command"),
    ("[profiles.x]\ncommand = [\"a\", \"{0}\"]\n", "profiles.x.command"),
    ("[profiles.x]\ncommand = [\"a\", \"{TASK_ID}\"]\n", "profiles.x.command"),
    ("[profiles.x]\ncommand = [\"a\", \"{task_id.__class__}\"]\n", "profiles.x.command"),
    ("[profiles.x]\ncommand = [\"a\", \"{task_id:>99999999}\"]\n", "profiles.x.command"),
    # socket_mode
    ("[daemon]\nsocket_mode = 384\n", "daemon.socket_mode"),
    ("[daemon]\nsocket_mode = \"0200\"\n", "daemon.socket_mode"),
    ("[daemon]\nsocket_mode = \"rw-------\"\n", "daemon.socket_mode"),
    ("[daemon]\nsocket_mode = \"01777\"\n", "daemon.socket_mode"),
    # negative numbers
    ("[daemon]\nmax_workers = -1\n", "daemon.max_workers"),
    ("[daemon]\nfailure_limit = -3\n", "daemon.failure_limit"),
    ("[daemon]\nkill_grace = -1\n", "daemon.kill_grace"),
    ("[profiles.x]\ncommand = [\"a\"]\nmax_concurrency = -1\n", "profiles.x.max_concurrency"),
    ("[profiles.x]\ncommand = [\"a\"]\nrate_limit_cooldown = -1\n", "profiles.x.rate_limit_cooldown"),
    # empty command list, and a bad profile next to valid settings (nothing half-applied)
    ("[profiles.x]\ncommand = []\n", "profiles.x.command"),
    ("[daemon]\nmax_workers = 1\n\n[profiles.good]\ncommand = []\n", "profiles.good.command"),
    # not TOML, not UTF-8
    ("[daemon\nmax_workers = 2\n", "TOML"),
    ("[daemon]\nmax_workers = 1\nmax_workers = 2\n", "TOML"),
    ("= 1\n", "TOML"),
    (b"[daemon]\nsocket_group = \"\xff\xfe\"\n", "UTF-8"),
    (b"\xef\xbb\xbf[daemon]\nmax_workers = 2\n\x00", "kanband.toml"),
]


def _write(path: Path, text: str | bytes) -> None:
    if path.is_dir():
        path.rmdir()
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


@pytest.fixture(scope="module")
def cfg() -> Any:
    """One kanband started with GOOD, whose config file the reload cases overwrite."""
    yield from module_kanband(GOOD, prefix="kbc")


def _ids(cases: list[tuple[str | bytes, str]]) -> list[str]:
    out = []
    for text, key in cases:
        t = text if isinstance(text, str) else text.decode("latin-1")
        out.append(f"{key}: {t.strip().splitlines()[-1][:40] if t.strip() else '(empty)'}")
    return out


@pytest.mark.parametrize("text,key", BAD_CONFIGS, ids=_ids(BAD_CONFIGS))
def test_check_config_refuses_naming_the_key(cfg, tmp_path_factory, text, key):
    """`kanband --check-config --config FILE` on a bad config exits 2 and names the key and the file, with no traceback."""
    path = tmp_path_factory.mktemp("cfg") / "kanband.toml"
    _write(path, text)
    r = subprocess.run([sys.executable, "-m", "kanband", "--config", str(path), "--check-config"],
                       env=cfg.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-800:]}"
    assert "Traceback" not in r.stderr, r.stderr[-800:]
    assert key in r.stderr and str(path) in r.stderr, r.stderr
    assert r.stdout == "" or "config OK" not in r.stdout


def _restore(k: Kanband, force: bool = False) -> None:
    """Make sure the daemon runs GOOD (after a case that it wrongly accepted)."""
    if force or "good" not in k.call("daemon.status")["profiles"]:
        _write(k.home / "kanband.toml", GOOD)
        r = k.ctl("reload")
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("text,key", BAD_CONFIGS, ids=_ids(BAD_CONFIGS))
def test_reload_refuses_and_keeps_the_old_config(cfg, text, key):
    """`kanbanctl reload` of a bad config exits 1 naming the key, logs config_reload_failed, and the daemon keeps its old config: same settings, and the old profile still runs a task."""
    k = cfg
    path = k.home / "kanband.toml"
    _restore(k)
    before = k.call("daemon.status")
    failures = sum(e.get("event") == "config_reload_failed" for e in k.log_events())
    try:
        _write(path, text)
        r = k.ctl("reload")
        json_r = k.ctl("reload", "--json")
    finally:
        _write(path, GOOD)
        if r.returncode == 0 or json_r.returncode == 0:
            _restore(k, force=True)  # it took the bad file: put GOOD back for the next case
    assert r.returncode == 1, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert r.stdout == "" and json_r.stdout == "" and json_r.returncode == 1, (r, json_r)
    assert key in r.stderr, f"the refusal does not name {key!r}: {r.stderr.strip()}"
    wait_for(lambda: sum(e.get("event") == "config_reload_failed" for e in k.log_events())
             >= failures + 2, 10, "config_reload_failed in the daemon log")
    after = k.call("daemon.status")
    for field in ("config", "profiles", "max_workers", "paused"):
        assert after[field] == before[field], field
    tid = k.create("still good", assignee="good")["id"]
    assert k.wait_status(tid, "done")["result"] == "good ran"


def test_reload_of_a_directory_instead_of_a_file(cfg):
    """A config path that has become a directory is refused by reload (exit 1) and by --check-config (exit 2), and the old profile still runs."""
    k = cfg
    path = k.home / "kanband.toml"
    _restore(k)
    path.unlink()
    path.mkdir()
    try:
        r = k.ctl("reload")
        chk = subprocess.run([sys.executable, "-m", "kanband", "--config", str(path),
                              "--check-config"], env=k.env, capture_output=True, text=True,
                             timeout=60)
    finally:
        _write(path, GOOD)
        if r.returncode == 0:
            _restore(k, force=True)
    assert r.returncode == 1 and "kanband.toml" in r.stderr, r
    assert chk.returncode == 2 and "kanband.toml" in chk.stderr and "Traceback" not in chk.stderr
    tid = k.create("still good", assignee="good")["id"]
    assert k.wait_status(tid, "done")["result"] == "good ran"


def test_sighup_with_a_bad_config_keeps_serving(cfg):
    """SIGHUP with a non-UTF-8 or invalid config file is logged as config_reload_failed and the daemon keeps serving with its old profiles."""
    import signal
    k = cfg
    path = k.home / "kanband.toml"
    assert k.proc is not None
    _restore(k)
    for text in (b"[daemon]\nsocket_group = \"\xff\"\n", "[daemon\n"):
        failures = sum(e.get("event") == "config_reload_failed" for e in k.log_events())
        try:
            _write(path, text)
            os.kill(k.proc.pid, signal.SIGHUP)
            wait_for(lambda: sum(e.get("event") == "config_reload_failed"
                                 for e in k.log_events()) > failures, 10,
                     f"config_reload_failed after SIGHUP with {text!r}")
        finally:
            _write(path, GOOD)
    assert k.proc.poll() is None
    tid = k.create("still good", assignee="good")["id"]
    assert k.wait_status(tid, "done")["result"] == "good ran"
