"""The metrics of issue 6. Each function takes `quick` and returns result rows.

A row: {metric, kanband, baseline, unit, ratio, target, pass, detail}. `ratio`
is kanband / baseline for both times and rates; the target says which way is
good. Rows whose target is None are information only (pass is None).
"""

from __future__ import annotations

import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import psutil

from bench import harness as h
from bench.harness import PY, Daemon, kill_strays, median, summary, toml
from kanband.protocol import Client

CTL = str(Path(sys.executable).parent / "kanbanctl")
if not os.path.exists(CTL):  # fall back to the module when the script is not installed
    CTL = ""
CAPWORKER = str(Path(__file__).resolve().parent / "capworker.py")

Row = dict[str, Any]
Target = tuple[str, str, float]  # ("ratio" | "value", "<=" | ">=", bound)


def row(metric: str, kanband: float | None, unit: str, baseline: float | None = None,
        target: Target | None = None, detail: dict[str, Any] | None = None,
        note: str = "") -> Row:
    ratio = None
    if kanband is not None and baseline:
        ratio = kanband / baseline
    passed = None
    tdesc = "-"
    if target is not None:
        kind, op, bound = target
        x = ratio if kind == "ratio" else kanband
        tdesc = (f"{op} {bound:g}x" if kind == "ratio" else f"{op} {bound:g} {unit}")
        if x is not None:
            passed = x <= bound if op == "<=" else x >= bound
        else:
            passed = False
    return {"metric": metric, "kanband": _r(kanband), "baseline": _r(baseline), "unit": unit,
            "ratio": _r(ratio, 3), "target": tdesc, "pass": passed, "detail": detail or {},
            "note": note}


def _r(x: float | None, nd: int = 4) -> float | None:
    if x is None:
        return None
    return round(x, nd) if abs(x) < 1000 else round(x, 1)


def ctl_argv(*args: str) -> list[str]:
    return [CTL, *args] if CTL else [PY, "-m", "kanbanctl", *args]


def fill(c: Client, n: int, batch: int = 500, complete: bool = False, **params: Any) -> list[str]:
    """Create n tasks pipelined in batches; with complete=True mark each done."""
    ids: list[str] = []
    left = n
    while left > 0:
        k = min(batch, left)
        res = c.call_many([("task.create", {"title": f"bench task {len(ids) + i}", **params})
                           for i in range(k)])
        got = [r["task"]["id"] for r in res if isinstance(r, dict)]
        if len(got) != k:
            raise RuntimeError(f"fill: {k - len(got)} creates failed: "
                               f"{[r for r in res if not isinstance(r, dict)][:1]}")
        if complete:
            done = c.call_many([("task.complete", {"id": t}) for t in got])
            bad = [r for r in done if not isinstance(r, dict)]
            if bad:
                raise RuntimeError(f"fill: complete failed: {bad[0]}")
        ids += got
        left -= k
    return ids


def start_echo() -> tuple[subprocess.Popen[bytes], str]:
    root = h.new_root("kbecho")
    path = str(root / "echo.sock")
    p = h.track(subprocess.Popen([PY, "-m", "bench.echo", path], stdout=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                 cwd=str(h.ROOT), env={**os.environ, "BENCH_ROOT": str(root)}))
    assert p.stdout is not None
    if p.stdout.readline().strip() != b"ready":
        raise RuntimeError("echo server did not start")
    return p, path


def timed_calls(c: Client, method: str, params: dict[str, Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c.call(method, params)
        out.append(time.perf_counter() - t)
    return out


def interleaved(rounds: int, a: Callable[[], list[float]], b: Callable[[], list[float]]
                ) -> tuple[list[float], list[float]]:
    """Run a and b alternately (order swapped every round): shared noise."""
    xa: list[float] = []
    xb: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            xa += a()
            xb += b()
        else:
            xb += b()
            xa += a()
    return xa, xb


def _latency_rows(name: str, k: list[float], b: list[float], ratio_bound: float,
                  note: str = "") -> list[Row]:
    ks, bs = summary(k, 1e6, 1), summary(b, 1e6, 1)
    return [
        row(name, ks["median"], "us", bs["median"], ("ratio", "<=", ratio_bound),
            {"kanband": ks, "baseline": bs}, note),
        row(name + ".p99", ks["p99"], "us", bs["p99"], None, {}, "p99, information"),
    ]


# -- rpc ----------------------------------------------------------------------------------
def rpc_ping(quick: bool) -> list[Row]:
    d = Daemon(toml()).start()
    echo, path = start_echo()
    try:
        kc, ec = d.client(), Client(path, timeout=30).connect()
        timed_calls(kc, "system.ping", {}, 200)  # warm up both
        timed_calls(ec, "system.ping", {}, 200)
        n, rounds = 100, (10 if quick else 40)
        k, b = interleaved(rounds, lambda: timed_calls(kc, "system.ping", {}, n),
                           lambda: timed_calls(ec, "system.ping", {}, n))
        kc.close()
        ec.close()
        return _latency_rows("rpc_ping", k, b, 3,
                             "kanband.protocol.Client on both sides; baseline = bench/echo.py")
    finally:
        d.stop()


def rpc_show(quick: bool) -> list[Row]:
    d = Daemon(toml()).start()
    echo, path = start_echo()
    try:
        kc = d.client()
        # triage tasks: show's cost does not depend on status, and a board of ready
        # tasks fills slowly (every create runs a dispatch pass over all ready tasks)
        ids = fill(kc, 10_000, batch=1000, triage=True)
        tid = ids[len(ids) // 2]
        for i in range(3):
            kc.call("task.comment", {"id": tid, "body": f"comment {i}"})
        ec = Client(path, timeout=30).connect()
        params = {"id": tid}
        timed_calls(kc, "task.show", params, 100)
        timed_calls(ec, "task.show", params, 100)
        n, rounds = 50, (8 if quick else 30)
        k, b = interleaved(rounds, lambda: timed_calls(kc, "task.show", params, n),
                           lambda: timed_calls(ec, "task.show", params, n))
        return _latency_rows("rpc_show", k, b, 6,
                             "task.show of a task with 3 comments on a 10k-task board (triage tasks); "
                             "baseline = echo of the same request")
    finally:
        d.stop()


def cli_show(quick: bool) -> list[Row]:
    d = Daemon(toml()).start()
    try:
        tid = d.call("task.create", {"title": "cli show", "body": "x"})["task"]["id"]
        env = d.env

        def run(argv: list[str]) -> float:
            t = time.perf_counter()
            r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, timeout=60)
            dt = time.perf_counter() - t
            if r.returncode != 0:
                raise RuntimeError(f"{argv} failed: {r.stderr.decode()[-500:]}")
            return dt
        show = ctl_argv("show", tid)
        base = [PY, "-c", "import socket, msgpack"]
        run(show), run(base)  # warm the page cache
        n = 10 if quick else 40
        k, b = interleaved(n, lambda: [run(show)], lambda: [run(base)])
        ks, bs = summary(k, 1e3, 2), summary(b, 1e3, 2)
        return [row("cli_show", ks["median"], "ms", bs["median"], ("ratio", "<=", 1.5),
                    {"kanband": ks, "baseline": bs, "argv": show[:2]},
                    "whole `kanbanctl show ID` process vs `python -c 'import socket, msgpack'`")]
    finally:
        d.stop()


# -- creates ----------------------------------------------------------------------------
class RawSqlite:
    """The create baseline: insert one task-shaped row and commit, same pragmas
    as kanband's store (WAL, synchronous=NORMAL), same schema and indexes (all
    of kanband's migrations applied)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:  # every migration in order: the same tables and indexes kanband writes
            from kanband.store import _MIGRATIONS
            for v in sorted(_MIGRATIONS):
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
        except Exception:  # schema moved: a plain table with the main indexes
            self.db.execute("CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, title TEXT,"
                            " body TEXT, assignee TEXT, status TEXT, priority INTEGER,"
                            " created_at REAL, skills TEXT)")
            self.db.execute("CREATE INDEX IF NOT EXISTS tasks_status_order ON tasks(status,"
                            " priority DESC, created_at)")
        self.i = 0

    def inserts(self, n: int) -> float:
        """Seconds for n insert+commit transactions."""
        t = time.perf_counter()
        for _ in range(n):
            self.i += 1
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT INTO tasks(id, title, body, status, priority, created_at, skills)"
                            " VALUES (?,?,?,?,?,?,?)",
                            (f"t_{self.i:08x}", f"bench task {self.i}", "", "ready", 0,
                             time.time(), "[]"))
            self.db.execute("COMMIT")
        return time.perf_counter() - t


def seq_creates(c: Client, n: int, **params: Any) -> float:
    t = time.perf_counter()
    for i in range(n):
        c.call("task.create", {"title": f"seq {i}", **params})
    return time.perf_counter() - t


def pipelined_creates(c: Client, n: int, window: int) -> float:
    t = time.perf_counter()
    left = n
    while left:
        k = min(window, left)
        res = c.call_many([("task.create", {"title": f"pipe {i}"}) for i in range(k)])
        if not all(isinstance(r, dict) for r in res):
            raise RuntimeError("pipelined create failed")
        left -= k
    return time.perf_counter() - t


def _rate_rows(name: str, k_rates: list[float], b_rates: list[float], bound: float,
               note: str) -> list[Row]:
    km, bm = median(k_rates), median(b_rates)
    return [row(name, km, "tasks/s", bm, ("ratio", ">=", bound),
                {"kanband_chunks": summary(k_rates, 1, 1), "baseline_chunks": summary(b_rates, 1, 1)},
                note)]


def create_seq(quick: bool) -> list[Row]:
    d = Daemon(toml()).start()
    try:
        c = d.client()
        raw = RawSqlite(d.root / "raw.db")
        seq_creates(c, 100)
        raw.inserts(100)
        n, rounds = 200, (4 if quick else 20)
        k, b = interleaved(rounds, lambda: [n / seq_creates(c, n)], lambda: [n / raw.inserts(n)])
        return _rate_rows("create_seq", k, b, 0.25,
                          f"{n}-create chunks, one connection, each create waits for its answer; "
                          "baseline = python sqlite3 insert+commit of one task row")
    finally:
        d.stop()


def create_pipelined(quick: bool) -> list[Row]:
    d = Daemon(toml()).start()
    try:
        c = d.client()
        raw = RawSqlite(d.root / "raw.db")
        pipelined_creates(c, 200, 200)
        raw.inserts(100)
        n, window, rounds = 1000, 250, (3 if quick else 16)
        k, b = interleaved(rounds, lambda: [n / pipelined_creates(c, n, window)],
                           lambda: [n / raw.inserts(n)])
        return _rate_rows("create_pipelined", k, b, 0.6,
                          f"{n}-create chunks, {window} requests in flight (Client.call_many); "
                          "baseline = python sqlite3 insert+commit of one task row")
    finally:
        d.stop()


# -- supervision ------------------------------------------------------------------------------
def _events(c: Client, tid: str) -> dict[str, dict[str, Any]]:
    """kind -> first event of that kind."""
    out: dict[str, dict[str, Any]] = {}
    for e in c.call("task.show", {"id": tid})["events"]:
        out.setdefault(e["kind"], e)
    return out


def dispatch_latency(quick: bool) -> list[Row]:
    d = Daemon(toml({"max_workers": 16, "kill_grace": "1s"})).start()
    try:
        c = d.client()
        script = d.root / "true.sh"
        script.write_text("true\n")
        devlog = os.open(d.root / "base.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

        def kanband_one() -> list[float]:
            t0 = time.time()
            tid = c.call("task.create", {"title": "dispatch", "assignee": "shell",
                                         "body": "true"})["task"]["id"]
            c.call("task.wait", {"ids": [tid], "timeout": 30})
            ev = _events(c, tid)
            if "spawned" not in ev:
                raise RuntimeError(f"no spawned event for {tid}: {sorted(ev)}")
            return [ev["spawned"]["created_at"] - t0]

        def popen_one() -> list[float]:
            t0 = time.perf_counter()
            p = subprocess.Popen(["/bin/sh", str(script)], cwd=str(d.root),
                                 stdin=subprocess.DEVNULL, stdout=devlog, stderr=subprocess.STDOUT,
                                 start_new_session=True, close_fds=True)
            dt = time.perf_counter() - t0
            p.wait()
            return [dt]
        fs: list[float] = []
        probe = d.root / "fsprobe"
        probe.mkdir()

        def fs_one() -> None:
            """Context for the ratio: what creating one directory and one small file
            costs on this disk (the spawn path creates several)."""
            sub = probe / str(len(fs))
            t = time.perf_counter()
            sub.mkdir()
            (sub / "f").write_text("x")
            fs.append(time.perf_counter() - t)

        def popen_and_fs() -> list[float]:
            fs_one()
            return popen_one()
        for _ in range(5):
            kanband_one(), popen_one()
        n = 40 if quick else 200
        k, b = interleaved(n, kanband_one, popen_and_fs)
        os.close(devlog)
        ks, bs = summary(k, 1e3, 2), summary(b, 1e3, 2)
        return [row("dispatch_latency", ks["median"], "ms", bs["median"], ("ratio", "<=", 8),
                    {"kanband": ks, "baseline": bs,
                     "mkdir_plus_file_create_ms": summary(fs, 1e3, 3)},
                    "client time before task.create -> `spawned` event created_at; "
                    "baseline = subprocess.Popen(['/bin/sh', script]) call duration"),
                row("dispatch_latency.p99", ks["p99"], "ms", bs["p99"], ("value", "<=", 20),
                    {}, "p99 of the same samples")]
    finally:
        d.stop()


def exit_detect(quick: bool) -> list[Row]:
    d = Daemon(toml({"max_workers": 16, "kill_grace": "1s"})).start()
    try:
        c = d.client()
        body = 'sleep 0.2; date +%s.%N > exit_ts\n'
        ws = d.home / "workspaces"
        script = d.root / "exit.sh"
        script.write_text(body)
        bdir = d.root / "base"
        bdir.mkdir()

        def kanband_one() -> list[float]:
            tid = c.call("task.create", {"title": "exit", "assignee": "shell",
                                         "body": body})["task"]["id"]
            r = c.call("task.wait", {"ids": [tid], "timeout": 30})
            ev = _events(c, tid)
            out = ev.get("completed") or ev.get("crashed")
            if out is None or r.get("timed_out"):
                raise RuntimeError(f"no outcome for {tid}: {sorted(ev)}")
            t_exit = float((ws / tid / "exit_ts").read_text())
            return [out["created_at"] - t_exit]

        def raw_one() -> list[float]:
            p = subprocess.Popen(["/bin/sh", str(script)], cwd=str(bdir),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 start_new_session=True)
            os.waitpid(p.pid, 0)
            t = time.time()
            p.returncode = 0
            return [t - float((bdir / "exit_ts").read_text())]
        kanband_one(), raw_one()
        n = 8 if quick else 50
        k, b = interleaved(n, kanband_one, raw_one)
        ks, bs = summary(k, 1e3, 2), summary(b, 1e3, 2)
        return [row("exit_detect", ks["median"], "ms", bs["median"], ("value", "<=", 5),
                    {"kanband": ks, "baseline": bs},
                    "worker's own `date +%s.%N` just before exit -> outcome event created_at; "
                    "baseline (info) = a parent blocked in waitpid() on the same script"),
                row("exit_detect.p99", ks["p99"], "ms", bs["p99"], None, {}, "information")]
    finally:
        d.stop()


def throughput(quick: bool) -> list[Row]:
    n = 200 if quick else 2000
    rounds = 1 if quick else 2
    workers = 16
    k_rates, b_rates = [], []
    details: list[dict[str, Any]] = []
    root = h.new_root("kbthru")
    script = root / "true.sh"
    script.write_text("true\n")

    def baseline() -> float:
        def one(_: int) -> int:
            return subprocess.run(["/bin/sh", str(script)], cwd=str(root),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT).returncode
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            codes = list(pool.map(one, range(n)))
        dt = time.perf_counter() - t
        assert all(x == 0 for x in codes)
        return n / dt

    def floor(files: bool) -> float:
        """The same pool running kanband's worker command for each task -- the
        built-in shell profile's shim, exit file and all -- and, with `files`,
        first making the files a start makes (run directory, context file,
        scratch workspace, task log with its header line, which becomes the
        worker's output). What any daemon keeping kanband's worker and file
        layout must pay per task before any bookkeeping of its own."""
        from kanband.logfiles import open_append
        from kanband.reaper import EXIT_FILE, SHELL_SHIM, SHELL_TEXT
        base = h.new_root("kbfloor")
        for sub in ("runs", "workspaces", "logs"):
            (base / sub).mkdir()
        if not files:  # only the worker's own work is timed
            for i in range(n):
                (base / "runs" / f"r_{i}").mkdir(mode=0o700)
        env = {**os.environ, SHELL_TEXT: "true"}
        context = "# task t_0\n" + "x" * 400 + "\n"

        def one(i: int) -> int:
            run = base / "runs" / f"r_{i}"
            out: Any = subprocess.DEVNULL
            cwd = base
            if files:
                run.mkdir(mode=0o700)
                (run / "context.md").write_text(context)
                cwd = base / "workspaces" / f"t_{i}"
                cwd.mkdir(mode=0o700)
                out = open_append(base / "logs" / f"t_{i}.log")  # as a start opens it
                os.write(out, b"=== kanband: run r_0 (shell) started at 2026-01-01 00:00:00: true\n")
            try:
                return subprocess.run(["/bin/sh", "-c", SHELL_SHIM, "kanband-worker",
                                       str(run / EXIT_FILE), ""], cwd=str(cwd), env=env,
                                      stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True).returncode
            finally:
                if files:
                    os.close(out)
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            codes = list(pool.map(one, range(n)))
        dt = time.perf_counter() - t
        assert all(x == 0 for x in codes), codes[:5]
        assert (base / "runs" / "r_0" / EXIT_FILE).read_text().strip() == "0"
        return n / dt

    def kanband() -> float:
        d = Daemon(toml({"max_workers": workers, "kill_grace": "1s"})).start()
        try:
            c = d.client()
            limit = 600.0
            t = time.perf_counter()
            fill(c, n, batch=250, assignee="shell", body="true")
            created = time.perf_counter() - t
            deadline = time.monotonic() + limit
            while True:
                st = d.counts(c)["by_status"]
                if st.get("done", 0) + st.get("blocked", 0) >= n:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"throughput: not finished after {limit}s: {st}")
                time.sleep(0.05)
            dt = time.perf_counter() - t
            details.append({"created_s": round(created, 3), "total_s": round(dt, 3),
                            "done": st.get("done", 0), "blocked": st.get("blocked", 0)})
            return n / dt
        finally:
            d.stop()
    w_rates: list[float] = []  # floor(files=False)
    f_rates: list[float] = []  # floor(files=True)
    for i in range(rounds):
        if i % 2 == 0:
            b_rates.append(baseline())
            k_rates.append(kanband())
            w_rates.append(floor(False))
            f_rates.append(floor(True))
        else:
            f_rates.append(floor(True))
            w_rates.append(floor(False))
            k_rates.append(kanband())
            b_rates.append(baseline())
    rounds_of = {"kanband_rounds": k_rates, "baseline_rounds": b_rates,
                 "worker_floor_rounds": w_rates, "files_floor_rounds": f_rates}
    return [row("throughput", median(k_rates), "tasks/s", median(b_rates), ("ratio", ">=", 0.5),
                {**{k: [round(x, 1) for x in v] for k, v in rounds_of.items()},
                 "kanband_runs": details, "tasks": n, "max_workers": workers},
                f"{n} `true` shell tasks, max_workers={workers}, create of the first -> all done; "
                "baseline = ThreadPoolExecutor(16) of subprocess.run(['/bin/sh', script])"),
            row("throughput.worker_floor", median(w_rates), "tasks/s", median(b_rates), None, {},
                "information: the same pool running kanband's worker command (the shell "
                "profile's exit-status shim) instead of `sh script`; no daemon"),
            row("throughput.files_floor", median(f_rates), "tasks/s", median(b_rates), None, {},
                "information: as worker_floor, each task first making the files a start "
                "makes (run dir, context file, workspace, log); no daemon, no board")]


def idle_1000(quick: bool) -> list[Row]:
    n = 200 if quick else 1000
    window = 4.0 if quick else 10.0
    d = Daemon(toml({"max_workers": n, "kill_grace": "1s"},
                    sleeper={"command": ["sleep", "600"]})).start()
    try:
        c = d.client()
        proc = psutil.Process(d.pid)
        rss0 = proc.memory_info().rss
        t = time.perf_counter()
        fill(c, n, batch=250, assignee="sleeper")
        got = d.wait_running(n, 400.0)
        spawn_s = time.perf_counter() - t
        if got < n:
            raise RuntimeError(f"only {got}/{n} workers running after 400 s")
        time.sleep(1.5 if quick else 2.5)  # let the spawn burst settle (a sweep passes)
        ct0, w0 = proc.cpu_times(), time.monotonic()
        time.sleep(window)
        ct1, w1 = proc.cpu_times(), time.monotonic()
        cpu = ((ct1.user - ct0.user) + (ct1.system - ct0.system)) / (w1 - w0) * 100
        rss = proc.memory_info().rss
        still = d.counts(c)["running_workers"]
        det = {"workers": n, "running_after": still, "idle_window_s": window,
               "rss_before_spawn_mib": round(rss0 / 2**20, 1), "spawn_all_s": round(spawn_s, 2),
               "cpu_user_s": round(ct1.user - ct0.user, 3),
               "cpu_sys_s": round(ct1.system - ct0.system, 3)}
        note = f"{n} `sleep 600` workers" + (" (quick mode: 200, not 1000)" if quick else "")
        return [row("idle_1000.rss", rss / 2**20, "MiB", None, ("value", "<=", 150), det, note),
                row("idle_1000.cpu", cpu, "% core", None, ("value", "<=", 2), det,
                    f"daemon user+sys CPU over {window:g} s idle, {note}"),
                row("idle_1000.spawn_rate", n / spawn_s, "workers/s", None, None, {},
                    "information: create -> all running")]
    finally:
        d.stop(graceful=False)


def kill_burst(quick: bool) -> list[Row]:
    """Many kills at once: archive 40 % of N running `sleep` workers in one go
    (each archive kills its worker first), pinging the daemon meanwhile; then
    stop the daemon (SIGTERM: it kills the rest) and count what is left."""
    n = 200 if quick else 500
    k = n * 2 // 5
    d = Daemon(toml({"max_workers": n, "kill_grace": "1s"},
                    sleeper={"command": ["sleep", "600"]})).start()
    try:
        c = d.client()
        fill(c, n, batch=250, assignee="sleeper")
        if d.wait_running(n, 400.0) < n:
            raise RuntimeError(f"kill_burst: not all {n} workers running")
        time.sleep(1.0)
        ids = [t["id"] for t in c.call("task.list", {"status": ["running"]})["tasks"]][:k]
        pinger = d.client()
        pings: list[float] = []
        done: list[float] = []

        def archive_all() -> None:
            t = time.perf_counter()
            for res in c.call_many([("task.archive", {"id": i}) for i in ids]):
                if not isinstance(res, dict):
                    raise RuntimeError(f"kill_burst: archive failed: {res!r}")
            done.append(time.perf_counter() - t)
        th = threading.Thread(target=archive_all, daemon=True)
        th.start()
        while th.is_alive() or not pings:
            t = time.perf_counter()
            pinger.call("system.ping", {})
            pings.append(time.perf_counter() - t)
            time.sleep(0.005)
        th.join()
        if not done:
            raise RuntimeError("kill_burst: the archives did not all answer")
        assert d.proc is not None
        t = time.perf_counter()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(120)
        stop_s = time.perf_counter() - t
        left = kill_strays([d.root])  # anything of the daemon's still alive
        det = {"workers": n, "archived": k, "pings": summary(pings, 1e3, 2)}
        note = f"{n} `sleep 600` workers; {k} archived at once"
        return [row("kill_burst.archive", done[0], "s", None, None, det,
                    f"information: {note}, until every archive answered"),
                row("kill_burst.ping_max", max(pings) * 1e3, "ms", None, None, det,
                    "information: the slowest system.ping during those kills"),
                row("kill_burst.stop", stop_s, "s", None, None, det,
                    f"information: SIGTERM -> daemon gone, killing the other {n - k}"),
                row("kill_burst.left", left, "processes", None, ("value", "<=", 0), det,
                    "processes of the daemon's runs alive after it stopped")]
    finally:
        d.stop(graceful=False)


# -- board size ------------------------------------------------------------------------------
def _ctl_time(d: Daemon, args: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = subprocess.run(ctl_argv(*args), env=d.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
        out.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise RuntimeError(f"kanbanctl {args} failed: {r.stderr.decode()[-300:]}")
    return out


def board_100k(quick: bool) -> list[Row]:
    """A board of N tasks: READY ready ones (unassigned: never dispatched) and
    N - READY done ones. Measured at 1k, 10k, 100k (quick: 1k, 10k)."""
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    ready = 1_000
    big = Daemon(toml()).start()
    small = Daemon(toml(), name="s").start()  # stays ~empty: the create-rate reference
    try:
        bc, sc = big.client(), small.client()
        create_n = 150 if quick else 500

        def creates(c: Client, n: int = create_n) -> list[float]:
            """Rate of n sequential creates; then mark them done (untimed) so
            the number of ready tasks stays put on both boards."""
            ids = []
            t = time.perf_counter()
            for i in range(n):
                ids.append(c.call("task.create", {"title": f"seq {i}"})["task"]["id"])
            dt = time.perf_counter() - t
            fill_complete(c, ids)
            return [n / dt]
        creates(sc), creates(sc)  # warm up the reference; the big board stays small
        rate0 = median(interleaved(2, lambda: creates(bc, 100), lambda: creates(sc, 100))[0])
        scale: list[dict[str, Any]] = []
        fill(bc, ready)
        have = bc.call("board.stats")["total"]
        for size in sizes:
            if size > have:
                fill(bc, size - have, batch=1000, complete=True)
            st = bc.call("board.stats")
            some = bc.call("task.list", {"status": ["done"], "limit": 1})["tasks"][0]["id"]
            reps = 5 if size >= 100_000 else 10
            m: dict[str, Any] = {"tasks": st["total"], "ready": st["by_status"]["ready"],
                                 "events": st["events"], "db_mib": round(st["db_bytes"] / 2**20, 1)}
            m["list_ready_rpc_ms"] = summary(timed_calls(bc, "task.list", {"status": ["ready"]},
                                                         reps), 1e3, 2)
            m["list_done_rpc_ms"] = summary(timed_calls(bc, "task.list", {"status": ["done"]},
                                                        2 if size >= 100_000 else 3), 1e3, 1)
            m["stats_rpc_ms"] = summary(timed_calls(bc, "board.stats", {}, 20), 1e3, 2)
            m["status_rpc_ms"] = summary(timed_calls(bc, "daemon.status", {}, 20), 1e3, 2)
            m["show_rpc_ms"] = summary(timed_calls(bc, "task.show", {"id": some}, 50), 1e3, 3)
            m["list_ready_cli_ms"] = summary(_ctl_time(big, ["list", "--status", "ready",
                                                             "--json"], 3 if quick else 5), 1e3, 1)
            m["stats_cli_ms"] = summary(_ctl_time(big, ["stats", "--json"], 3 if quick else 5),
                                        1e3, 1)
            # create rate here vs on the (almost) empty reference daemon, interleaved
            kr, br = interleaved(2 if quick else 4, lambda: creates(bc), lambda: creates(sc))
            m["create_rate"] = round(median(kr), 1)
            m["create_rate_empty_ref"] = round(median(br), 1)
            have = bc.call("board.stats")["total"]
            scale.append(m)
        top = scale[-1]
        label = f"{top['tasks'] // 1000}k board"
        note = f"{label}, {ready} ready + rest done" + (" (quick mode: 10k, not 100k)" if quick else "")
        drop = top["create_rate_empty_ref"] / top["create_rate"]
        return [
            row("board_100k.list_ready", top["list_ready_rpc_ms"]["median"], "ms", None,
                ("value", "<=", 300), {"scale": scale}, "task.list status=ready RPC, " + note),
            row("board_100k.list_ready_cli", top["list_ready_cli_ms"]["median"], "ms", None,
                ("value", "<=", 300), {}, "whole `kanbanctl list --status ready --json`, " + note),
            row("board_100k.stats", top["stats_rpc_ms"]["median"], "ms", None,
                ("value", "<=", 50), {}, "board.stats RPC, " + note),
            row("board_100k.stats_cli", top["stats_cli_ms"]["median"], "ms", None,
                ("value", "<=", 50), {}, "whole `kanbanctl stats --json`, " + note),
            row("board_100k.create_drop", drop, "x", None, ("value", "<=", 2),
                {"rate_big": top["create_rate"], "rate_empty_ref": top["create_rate_empty_ref"],
                 "rate_at_0_same_daemon": round(rate0, 1),
                 "drop_vs_same_daemon_at_0": round(rate0 / top["create_rate"], 2)},
                "sequential create rate on an almost empty board / on the big one "
                "(interleaved, two daemons)"),
        ]
    finally:
        big.stop()
        small.stop()


def fill_complete(c: Client, ids: list[str]) -> None:
    for i in range(0, len(ids), 1000):
        res = c.call_many([("task.complete", {"id": t}) for t in ids[i:i + 1000]])
        bad = [r for r in res if not isinstance(r, dict)]
        if bad:
            raise RuntimeError(f"complete failed: {bad[0]}")


# -- runtime caps -------------------------------------------------------------------------------
def cap_accuracy(quick: bool) -> list[Row]:
    cap, grace = 1.0, 0.5
    conc = 4
    n = 4 if quick else 20
    d = Daemon(toml({"max_workers": conc, "kill_grace": f"{grace}s"},
                    capper={"command": [PY, CAPWORKER], "max_runtime": f"{cap}s"})).start()
    try:
        c = d.client()
        ws = d.home / "workspaces"
        term_d, kill_ev_d, kill_real_d, rows_detail = [], [], [], []
        done = 0
        while done < n:
            k = min(conc, n - done)
            ids = []
            for _ in range(k):
                ids.append(c.call("task.create", {"title": "cap", "assignee": "capper"})["task"]["id"])
                time.sleep(0.1)  # stagger: caps should not fire in the same instant
            pidfds: dict[str, int] = {}
            died: dict[str, float] = {}
            deadline = time.monotonic() + cap + grace + 30
            while len(died) < k and time.monotonic() < deadline:
                for tid in ids:
                    if tid in pidfds or tid in died:
                        continue
                    try:
                        pid = int((ws / tid / "pid").read_text())
                    except (OSError, ValueError):
                        continue
                    try:
                        pidfds[tid] = os.pidfd_open(pid)
                    except ProcessLookupError:
                        died[tid] = time.time()
                fds = {fd: tid for tid, fd in pidfds.items() if tid not in died}
                r, _, _ = select.select(list(fds), [], [], 0.002) if fds else ([], [], [])
                if not fds:
                    time.sleep(0.002)
                now = time.time()
                for fd in r:
                    died[fds[fd]] = now
                    os.close(fd)
            for tid, fd in pidfds.items():
                if tid not in died:
                    os.close(fd)
            c.call("task.wait", {"ids": ids, "timeout": 0})
            for tid in ids:
                # the outcome is recorded once the kill is confirmed: wait for it
                ev = h.wait_until(lambda: (e := _events(c, tid)).get("timed_out") and e, 20, 0.02)
                if not ev:
                    raise RuntimeError(f"{tid}: no timed_out event")
                run = c.call("task.runs", {"id": tid})["runs"][0]
                start = run["started_at"]
                to = ev["timed_out"]
                term = float((ws / tid / "term").read_text())
                term_d.append(term - (start + cap))
                kill_ev_d.append(to["created_at"] - (start + cap + grace))
                if tid in died:
                    kill_real_d.append(died[tid] - (start + cap + grace))
                rows_detail.append({"task": tid, "sigkill": to["payload"].get("sigkill"),
                                    "term_ms": round((term - start - cap) * 1e3, 2),
                                    "event_ms": round((to["created_at"] - start - cap - grace) * 1e3, 2)})
            done += k
        ts, ks, rs = summary(term_d, 1e3, 2), summary(kill_ev_d, 1e3, 2), summary(kill_real_d, 1e3, 2)
        note = (f"cap {cap:g}s, kill_grace {grace:g}s, worker ignores SIGTERM; from run.started_at "
                f"(claim time, before spawn: conservative); {n} runs, {conc} at a time")
        return [row("cap_accuracy.sigterm", ts["median"], "ms", None, ("value", "<=", 100),
                    {"sigterm": ts, "runs": rows_detail}, "worker's own SIGTERM receipt - cap; " + note),
                row("cap_accuracy.sigkill", rs["median"], "ms", None, ("value", "<=", 100),
                    {"sigkill_seen_dead": rs}, "worker death (pidfd, seen by the bench) - (cap + grace)"),
                row("cap_accuracy.recorded", ks["median"], "ms", None, None,
                    {"timed_out_event": ks}, "information: timed_out event created_at - (cap + grace)")]
    finally:
        d.stop()


METRICS: dict[str, Callable[[bool], list[Row]]] = {
    "rpc_ping": rpc_ping,
    "rpc_show": rpc_show,
    "cli_show": cli_show,
    "create_seq": create_seq,
    "create_pipelined": create_pipelined,
    "dispatch_latency": dispatch_latency,
    "exit_detect": exit_detect,
    "throughput": throughput,
    "idle_1000": idle_1000,
    "kill_burst": kill_burst,
    "board_100k": board_100k,
    "cap_accuracy": cap_accuracy,
}
