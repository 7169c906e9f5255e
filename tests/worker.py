#!/usr/bin/env python3
"""A fake kanband worker whose behaviour is chosen by argv (for the supervision tests).

Options are acted on in the order given, so `--print a --sleep 1 --exit 3` prints,
sleeps, then exits 3. Without `--exit` the worker exits 0 at the end.

  --write-pid PATH        write this process's pid to PATH
  --env-dump PATH         write {env, cwd, stdin, pgid, sid, context} as JSON to PATH
  --record PATH           at exit, append one JSON line {pid, profile, task, start, end}
                          (time.monotonic(), comparable across processes) to PATH
  --print TEXT            print TEXT (flushed)
  --ignore-sigterm        ignore SIGTERM from here on (children forked later inherit it)
  --spawn-grandchild      fork a child that calls setsid() and sleeps forever;
                          its pid goes to the file named by --pidfile (given before)
  --pidfile PATH          where --spawn-grandchild writes the grandchild's pid
  --orphan-child          fork a child that exits at once and is never waited for
  --sleep S               sleep S seconds ("inf" = forever)
  --wait-file PATH        sleep until PATH exists
  --heartbeat NOTE        kanbanctl heartbeat $KANBAN_TASK_ID --note NOTE
  --heartbeat-then-stall  one heartbeat, then sleep forever
  --complete              kanbanctl complete $KANBAN_TASK_ID --summary ... --result ...
  --result TEXT           result for --complete (given before it)
  --block REASON          kanbanctl block $KANBAN_TASK_ID REASON
  --ctl ARGS --ctl-out P  run `kanbanctl ARGS` (ARGS split on spaces, $KANBAN_TASK_ID
                          expanded) and append {args, rc, stdout, stderr} to P
  --kill-self SIG         send signal SIG (a number) to this process
  --exit N                exit now with status N
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

START = time.monotonic()
record_path: str | None = None


def finish(code: int) -> None:
    if record_path:
        line = json.dumps({"pid": os.getpid(), "profile": os.environ.get("KANBAN_PROFILE"),
                           "task": os.environ.get("KANBAN_TASK_ID"), "start": START,
                           "end": time.monotonic(), "code": code})
        fd = os.open(record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, (line + "\n").encode())
        os.close(fd)
    sys.stdout.flush()
    os._exit(code)


def sleep_for(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


def kanbanctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kanbanctl", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)


def write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    global record_path
    task_id = os.environ.get("KANBAN_TASK_ID", "")
    pidfile = None
    result = None
    ctl_out = None
    i = 0

    def arg() -> str:
        nonlocal i
        i += 1
        return argv[i]

    while i < len(argv):
        opt = argv[i]
        if opt == "--write-pid":
            write(arg(), str(os.getpid()))
        elif opt == "--env-dump":
            path = arg()
            ctx_file = os.environ.get("KANBAN_CONTEXT_FILE")
            try:
                context = open(ctx_file).read() if ctx_file else None
            except OSError:
                context = None
            write(path, json.dumps({"env": dict(os.environ), "cwd": os.getcwd(),
                                    "stdin": os.readlink("/proc/self/fd/0"),
                                    "pid": os.getpid(), "ppid": os.getppid(),
                                    "pgid": os.getpgid(0), "sid": os.getsid(0),
                                    "context": context}))
        elif opt == "--record":
            record_path = arg()
        elif opt == "--print":
            print(arg(), flush=True)
        elif opt == "--ignore-sigterm":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif opt == "--pidfile":
            pidfile = arg()
        elif opt == "--spawn-grandchild":
            pid = os.fork()
            if pid == 0:
                os.setsid()
                if pidfile:
                    write(pidfile, str(os.getpid()))
                while True:
                    time.sleep(3600)
            if pidfile:  # make sure the pid is on disk before going on
                while not os.path.exists(pidfile):
                    time.sleep(0.01)
        elif opt == "--orphan-child":
            if os.fork() == 0:
                os._exit(0)
        elif opt == "--sleep":
            value = arg()
            sleep_for(float("inf") if value == "inf" else float(value))
        elif opt == "--wait-file":
            path = arg()
            while not os.path.exists(path):
                time.sleep(0.02)
        elif opt == "--heartbeat":
            r = kanbanctl("heartbeat", task_id, "--note", arg())
            print(f"heartbeat rc={r.returncode} {r.stderr.strip()}", flush=True)
        elif opt == "--heartbeat-then-stall":
            r = kanbanctl("heartbeat", task_id, "--note", "working")
            print(f"heartbeat rc={r.returncode} {r.stderr.strip()}", flush=True)
            sleep_for(float("inf"))
        elif opt == "--result":
            result = arg()
        elif opt == "--complete":
            args = ["complete", task_id, "--summary", f"worker {os.getpid()} finished"]
            if result is not None:
                args += ["--result", result]
            r = kanbanctl(*args)
            print(f"complete rc={r.returncode} {r.stderr.strip()}", flush=True)
        elif opt == "--block":
            r = kanbanctl("block", task_id, arg())
            print(f"block rc={r.returncode} {r.stderr.strip()}", flush=True)
        elif opt == "--ctl-out":
            ctl_out = arg()
        elif opt == "--ctl":
            args = [a.replace("$KANBAN_TASK_ID", task_id) for a in arg().split()]
            r = kanbanctl(*args)
            if ctl_out:
                with open(ctl_out, "a") as f:
                    f.write(json.dumps({"args": args, "rc": r.returncode, "stdout": r.stdout,
                                        "stderr": r.stderr}) + "\n")
        elif opt == "--kill-self":
            sys.stdout.flush()
            os.kill(os.getpid(), int(arg()))
            sleep_for(5)
        elif opt == "--exit":
            finish(int(arg()))
        else:
            print(f"worker.py: unknown option {opt}", file=sys.stderr, flush=True)
            finish(64)
        i += 1
    finish(0)


if __name__ == "__main__":
    main(sys.argv[1:])
