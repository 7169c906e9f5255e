"""Entry point: `python -m bench [--quick] [--only NAME[,NAME]] [--json PATH]`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import harness as h
from bench.metrics import METRICS, Row, row

DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.3g}" if abs(x) >= 0.01 else f"{x:.2g}"
    return str(x)


def table(rows: list[Row]) -> str:
    head = ["metric", "kanband", "baseline", "ratio", "target", "pass"]
    lines = []
    for r in rows:
        unit = r["unit"]
        k = f"{_fmt(r['kanband'])} {unit}" if r["kanband"] is not None else "-"
        b = f"{_fmt(r['baseline'])} {unit}" if r["baseline"] is not None else "-"
        ratio = f"{_fmt(r['ratio'])}x" if r["ratio"] is not None else "-"
        p = {True: "PASS", False: "FAIL", None: "info"}[r["pass"]]
        lines.append([r["metric"], k, b, ratio, r["target"], p])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(head, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def markdown(rows: list[Row]) -> str:
    out = ["| metric | kanband | baseline | ratio | target | pass |", "|---|---|---|---|---|---|"]
    for r in rows:
        unit = r["unit"]
        k = f"{_fmt(r['kanband'])} {unit}" if r["kanband"] is not None else "-"
        b = f"{_fmt(r['baseline'])} {unit}" if r["baseline"] is not None else "-"
        ratio = f"{_fmt(r['ratio'])}x" if r["ratio"] is not None else "-"
        p = {True: "PASS", False: "**FAIL**", None: "info"}[r["pass"]]
        out.append(f"| {r['metric']} | {k} | {b} | {ratio} | {r['target']} | {p} |")
    return "\n".join(out)


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


SLOW_CREATE_US = 150  # a mkdir plus a file create slower than this at start-up gets a warning


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller counts; under a minute")
    ap.add_argument("--only", metavar="NAME", action="append", default=[],
                    help="run only these metrics (repeat or comma-separate): "
                         + ", ".join(METRICS))
    ap.add_argument("--json", metavar="PATH",
                    help="write results here (default bench/results.json)")
    ap.add_argument("--pin", metavar="CPU", type=int,
                    help="run the bench and every process it starts (daemons, baselines, "
                         "workers) on this one CPU. Both sides of each ratio then pay the "
                         "same, and no cross-CPU wake-ups: on a VM these cost 0.1-0.7 ms "
                         "at random and swamp sub-millisecond round trips")
    ap.add_argument("--profile", metavar="DIR",
                    help="attach `py-spy record` to every kanband started and write collapsed "
                         "stacks to DIR/<metric>-<n>.txt (summarise with python -m bench.stacks)")
    ap.add_argument("--tmp", metavar="DIR", default="/tmp",
                    help="base directory for the temporary homes (default /tmp); socket "
                         "paths under it must fit in 107 bytes")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    ap.add_argument("--busy-poll", metavar="DURATION",
                    help="[daemon] busy_poll for every kanband started (default: kanband's "
                         "own, 100us); 0 measures the daemon without it")
    args = ap.parse_args(argv)
    names = [n for arg in args.only for n in arg.split(",") if n] or list(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        ap.error(f"unknown metric(s): {', '.join(unknown)} (known: {', '.join(METRICS)})")

    if args.json is None:
        args.json = str(DEFAULT_JSON)
    if args.pin is not None:
        try:
            os.sched_setaffinity(0, {args.pin})
        except (OSError, ValueError) as e:
            ap.error(f"--pin {args.pin}: {e}")
    h.TMP_BASE = args.tmp
    if not h.unix_socket_path_ok(Path(args.tmp) / "kbenchXXXXXXXX" / "h" / "kanband.sock"):
        ap.error(f"--tmp {args.tmp}: too long for a Unix socket path")
    if args.busy_poll is not None:
        from kanband.config import from_dict
        try:  # kanband's own check: a value it refuses would stop every daemon
            from_dict({"daemon": {"busy_poll": args.busy_poll}})
        except Exception as e:
            ap.error(f"--busy-poll: {getattr(e, 'message', e)}")
        h.DAEMON_DEFAULTS["busy_poll"] = args.busy_poll
    if args.profile:
        h.PROFILE_DIR = Path(args.profile).resolve()
    h.become_subreaper()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    # File creation is probed at start-up (a warning when it is slow) and again
    # after the metrics, before cleanup; the probes' files go with the homes.
    # Deleting many files makes creating new ones slower for a minute or so on
    # some filesystems (see fs_probe), so nothing is deleted while metrics run.
    machine = h.machine_info(probe=False)
    mode = ("quick" if args.quick else "full") + (
        f", pinned to cpu {args.pin}" if args.pin is not None else "") + (
        f", busy_poll {args.busy_poll}" if args.busy_poll is not None else "")
    print(f"kanband bench ({mode}): {machine['nproc']} x "
          f"{machine['cpu']}, Linux {machine['kernel']}, Python {machine['python']}; "
          f"homes under {args.tmp}", flush=True)
    load_start = os.getloadavg()
    code = h.code_version()
    print(f"kanband at {code['commit'] or '?'}{' + uncommitted changes' if code['dirty'] else ''}",
          flush=True)
    rows: list[Row] = []
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}
    t_all = time.perf_counter()
    try:
        slow = h.fs_probe(args.tmp, 20)
        machine["fs_create_us_at_start"] = round(slow, 1)
        if slow > SLOW_CREATE_US:
            print(f"warning: a mkdir plus a file create under {args.tmp} takes {slow:.0f} us "
                  f"now (under {SLOW_CREATE_US} us when the disk is quiet). On ext4 without a "
                  "journal this happens for a minute or so after many files were deleted (a "
                  "test run, an earlier bench's cleanup): the spawn-path metrics will pay "
                  "for it.", flush=True)
        for name in names:
            t = time.perf_counter()
            h.CURRENT = name
            print(f"  {name} ...", end="", flush=True)
            try:
                got = METRICS[name](args.quick)
                rows += got
                print(f" {time.perf_counter() - t:.1f}s", flush=True)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                errors[name] = "".join(traceback.format_exception(e))[-3000:]
                rows.append(row(name, None, "", None, ("value", "<=", 0), {"error": str(e)},
                                f"ERROR: {e}"))
                print(f" ERROR: {e}", flush=True)
            finally:
                timings[name] = round(time.perf_counter() - t, 2)
                h.kill_strays()
        total = round(time.perf_counter() - t_all, 1)
        machine["fs_create_us"] = h.fs_probes()  # before cleanup's deletions slow it down
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        errors["interrupted"] = "interrupted"
        total = round(time.perf_counter() - t_all, 1)
    finally:
        h.cleanup_all()
    print("mkdir + small file create: "
          + ", ".join(f"{k} {v:.0f} us" for k, v in machine["fs_create_us"].items()))
    print()
    print(table(rows))
    if args.markdown:
        print()
        print(markdown(rows))
    failed = [r["metric"] for r in rows if r["pass"] is False]
    print(f"\n{len(rows)} rows, {sum(r['pass'] is True for r in rows)} pass, {len(failed)} fail"
          f" ({', '.join(failed) or 'none'}); {total}s; load average "
          f"{load_start[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    doc = {"mode": mode, "pinned_cpu": args.pin, "code": code, "when": dt.datetime.now(dt.timezone.utc)
           .isoformat(timespec="seconds"), "machine": machine, "duration_s": total,
           "metric_seconds": timings,
           "loadavg_1m": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)}, "rows": rows, "errors": errors}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")
    for name, tb in errors.items():
        print(f"\n{name}:\n{tb}", file=sys.stderr)
    return 1 if errors else 0
