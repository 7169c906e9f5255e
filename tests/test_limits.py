"""The limits of SPEC §2: title 1..500 chars after stripping; body, summary,
comment and result <= 256 KiB; metadata a map <= 64 KiB encoded; skill names
non-empty without commas. A violation is refused and nothing is stored."""

from __future__ import annotations

import json

import pytest

from conftest import rpc_error, snapshot

KIB = 1024
MAX_TEXT = 256 * KIB
REFUSED = ("invalid_argument", "too_large")  # the exact code is pinned in test_bugs.py


def refused(kd, method, **params):
    """`method` is refused and the board (tasks, events) is exactly as before."""
    before = snapshot(kd)
    err = rpc_error(kd, method, **params)
    assert err.code in REFUSED, (err.code, err.message)
    assert snapshot(kd) == before
    return err


# -- titles -------------------------------------------------------------------------
@pytest.mark.parametrize("title", ["", "   ", "\t\n ", "x" * 501, " " + "é" * 501 + " "],
                         ids=["empty", "spaces", "whitespace", "501", "501-unicode"])
def test_bad_titles_are_refused(shared_kd, title):
    """An empty, all-whitespace or over-500-character title is refused and nothing is created."""
    err = refused(shared_kd, "task.create", title=title)
    assert "title" in err.message


def test_title_limit_counts_characters_after_stripping(shared_kd):
    """500 characters (even multi-byte, even with surrounding spaces) are accepted and stored stripped."""
    kd = shared_kd
    assert kd.create("x" * 500)["title"] == "x" * 500
    assert kd.create("  " + "é" * 500 + "  ")["title"] == "é" * 500
    assert kd.create("\U0001F600" * 500)["title"] == "\U0001F600" * 500
    assert kd.create("  padded  ")["title"] == "padded"


def test_missing_title_is_refused(shared_kd):
    """task.create without a title is refused."""
    refused(shared_kd, "task.create")


# -- text fields --------------------------------------------------------------------
def test_body_limit(shared_kd):
    """A body of exactly 256 KiB is accepted; one byte more is refused."""
    kd = shared_kd
    t = kd.create("big body", body="b" * MAX_TEXT)
    assert len(kd.task(t["id"])["body"]) == MAX_TEXT
    refused(kd, "task.create", title="too big", body="b" * (MAX_TEXT + 1))
    # the limit is in bytes of UTF-8: 2-byte characters reach it at half the count
    refused(kd, "task.create", title="too big", body="é" * (MAX_TEXT // 2 + 1))


def test_comment_limit(shared_kd):
    """A comment over 256 KiB (or empty) is refused and not stored; 256 KiB is accepted."""
    kd = shared_kd
    tid = kd.create("c")["id"]
    refused(kd, "task.comment", id=tid, body="c" * (MAX_TEXT + 1))
    refused(kd, "task.comment", id=tid, body="   ")
    assert kd.call("task.show", id=tid)["comments"] == []
    kd.call("task.comment", id=tid, body="c" * MAX_TEXT)
    assert len(kd.call("task.show", id=tid)["comments"]) == 1


@pytest.mark.parametrize("field", ["summary", "result"])
def test_complete_text_limits(shared_kd, field):
    """complete with a summary or result over 256 KiB is refused: the task stays as it was, the run stays open."""
    kd = shared_kd
    tid = kd.create("c")["id"]
    tok = kd.call("task.claim", id=tid)["token"]
    refused(kd, "task.complete", id=tid, token=tok, **{field: "s" * (MAX_TEXT + 1)})
    t = kd.task(tid)
    assert t["status"] == "running" and t["current_run_id"] is not None
    assert kd.call("task.runs", id=tid)["runs"][-1]["outcome"] is None
    kd.call("task.complete", id=tid, token=tok, **{field: "s" * MAX_TEXT})
    assert kd.task(tid)["status"] == "done"


def test_block_reason_limit(shared_kd):
    """A block reason over 256 KiB is refused and the task is not blocked."""
    kd = shared_kd
    tid = kd.create("c")["id"]
    refused(kd, "task.block", id=tid, reason="r" * (MAX_TEXT + 1))
    assert kd.task(tid)["status"] == "ready"


# -- metadata ---------------------------------------------------------------------------
def test_metadata_limit(shared_kd):
    """Metadata over 64 KiB encoded is refused; a map just under it is stored on the run."""
    kd = shared_kd
    tid = kd.create("m")["id"]
    tok = kd.call("task.claim", id=tid)["token"]
    refused(kd, "task.complete", id=tid, token=tok, metadata={"blob": "x" * (64 * KIB)})
    assert kd.task(tid)["status"] == "running"
    ok = {"blob": "x" * (60 * KIB)}
    assert len(json.dumps(ok)) < 64 * KIB
    kd.call("task.complete", id=tid, token=tok, metadata=ok)
    assert kd.call("task.runs", id=tid)["runs"][-1]["metadata"] == ok


@pytest.mark.parametrize("metadata", [[1, 2], "text", 5], ids=["list", "string", "number"])
def test_metadata_must_be_a_map(shared_kd, metadata):
    """Metadata that is not a map is `invalid_argument` and the task is not completed."""
    kd = shared_kd
    tid = kd.create("m")["id"]
    err = refused(kd, "task.complete", id=tid, metadata=metadata)
    assert err.code == "invalid_argument"
    assert kd.task(tid)["status"] == "ready"


# -- skills ------------------------------------------------------------------------
@pytest.mark.parametrize("skills", [["a,b"], [""], ["  "], ["ok", "bad,one"]],
                         ids=["comma", "empty", "blank", "second-bad"])
def test_bad_skill_names_are_refused(shared_kd, skills):
    """A skill name that is empty or holds a comma is refused and nothing is created."""
    err = refused(shared_kd, "task.create", title="skilled", skills=skills)
    assert "skill" in err.message


def test_good_skills_are_kept_in_order(shared_kd):
    """Valid skill names are stored as a list, in order."""
    assert shared_kd.create("s", skills=["python", "sql", "c++"])["skills"] == \
        ["python", "sql", "c++"]


# -- the same limits through kanbanctl ---------------------------------------------------------
@pytest.mark.parametrize("argv", [["create", ""], ["create", "   "], ["create", "x" * 501],
                                  ["create", "x", "--skill", "a,b"],
                                  ["create", "x", "--skill", ""]],
                         ids=["empty", "blank", "long", "comma-skill", "empty-skill"])
def test_kanbanctl_limit_violations_exit_2(shared_kd, argv):
    """kanbanctl reports a limit violation on stderr with exit 2 and creates nothing."""
    kd = shared_kd
    before = snapshot(kd)
    r = kd.ctl(*argv)
    assert r.returncode == 2, r
    assert r.stderr.strip() and r.stdout == ""
    assert snapshot(kd) == before

