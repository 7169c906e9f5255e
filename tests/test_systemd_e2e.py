"""End to end under a real systemd: kanband installed in a debootstrapped Debian
container booted with systemd-nspawn, driven with systemctl and journalctl.

Needs root, systemd-nspawn and debootstrap (.ci/run installs them). Elsewhere
the module is skipped and says why. The base root file system is cached in
$KANBAN_NSPAWN_ROOT (default /var/tmp/kanband-nspawn-root) across runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, wait_for

BASE = Path(os.environ.get("KANBAN_NSPAWN_ROOT", "/var/tmp/kanband-nspawn-root"))
MIRROR = os.environ.get("KANBAN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,procps"

_why = None
if os.geteuid() != 0:
    _why = "needs root to boot a systemd-nspawn container"
elif not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"):
    _why = "needs systemd-nspawn and debootstrap (apt-get install systemd-container debootstrap)"
elif os.environ.get("KANBAN_SKIP_NSPAWN"):
    _why = "KANBAN_SKIP_NSPAWN is set"
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

TEST_CONFIG = """
[daemon]
kill_grace = "1s"
retry_backoff = "1s"
exit_grace = "2s"
"""
# Short watchdog and stop timeouts so the test does not wait out the defaults.
DROP_IN = """
[Service]
WatchdogSec=4s
TimeoutStopSec=8s
RestartSec=1s
"""


class Container:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the container's systemd, seen from the host

    def boot(self) -> None:
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit", "-b",
             "--console=pipe"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, start_new_session=True)

        def init_pid() -> int | None:
            if self.proc.poll() is not None:
                pytest.fail(f"systemd-nspawn exited with {self.proc.returncode}")
            for c in psutil.Process(self.proc.pid).children():
                try:  # the container's PID 1 once nspawn's child has exec'd systemd
                    if c.name() == "systemd" or c.exe().endswith("/systemd"):
                        return c.pid
                except psutil.Error:
                    pass
            return None
        self.pid = wait_for(init_pid, 60, "the container's systemd to start")
        wait_for(lambda: self.sh("systemctl is-system-running", check=False).stdout.strip()
                 in ("running", "degraded"), 120, "the container to finish booting",
                 interval=0.5)

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside the container, with a clean environment."""
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "env", "-i",
                            "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
                            "LANG=C.UTF-8", "/bin/sh", "-c", script],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            pytest.fail(f"in container: {script!r} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def show(self, prop: str) -> str:
        return self.sh(f"systemctl show -p {prop} --value kanband").stdout.strip()

    def ctl(self, args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sh(f"kanbanctl {args}", check=check)

    def ctl_json(self, args: str) -> object:
        return json.loads(self.ctl(args + " --json").stdout)

    def shutdown(self) -> None:
        if self.proc is None:
            return
        if self.pid and self.proc.poll() is None:
            subprocess.run(["nsenter", "-t", str(self.pid), "-a", "systemctl", "poweroff"],
                           capture_output=True, timeout=30)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def _base_root() -> Path:
    if (BASE / "usr/bin/python3").exists() and (BASE / ".kanband-base-ok").exists():
        return BASE
    shutil.rmtree(BASE, ignore_errors=True)
    r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm",
                        str(BASE), MIRROR], capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        pytest.fail(f"debootstrap failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    (BASE / ".kanband-base-ok").write_text("ok\n")
    return BASE


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Container:
    base = _base_root()
    wheels = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # A fresh copy of the base for each run: nothing of an earlier run survives.
    root = Path(str(base) + ".run")
    subprocess.run(["rm", "-rf", str(root)], check=True)
    subprocess.run(["cp", "-a", str(base), str(root)], check=True)
    shutil.copytree(wheels, root / "wheels")
    pk = ROOT / "packaging"
    etc = root / "etc/systemd/system"
    for unit in ("kanband.service", "kanband.socket"):
        shutil.copy(pk / "systemd" / unit, etc / unit)
    (etc / "kanband.service.d").mkdir(exist_ok=True)
    (etc / "kanband.service.d/test.conf").write_text(DROP_IN)
    (root / "usr/lib/sysusers.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(pk / "systemd/kanband.sysusers", root / "usr/lib/sysusers.d/kanband.conf")
    shutil.copy(pk / "systemd/kanband.tmpfiles", root / "usr/lib/tmpfiles.d/kanband.conf")
    (root / "etc/kanband").mkdir(exist_ok=True)
    (root / "etc/kanband/kanband.toml").write_text(TEST_CONFIG)
    c = Container(root)
    try:
        c.boot()
        c.sh("python3 -m venv /opt/kanband && /opt/kanband/bin/pip install -q --no-index "
             "--find-links /wheels kanband && ln -sf /opt/kanband/bin/kanband "
             "/usr/local/bin/kanband && ln -sf /opt/kanband/bin/kanbanctl /usr/local/bin/kanbanctl",
             timeout=300)
        c.sh("systemd-sysusers && systemd-tmpfiles --create && systemctl daemon-reload")
        yield c
    finally:
        c.shutdown()
        subprocess.run(["rm", "-rf", str(root)])


def _main_pid(box: Container) -> int:
    return int(box.show("MainPID") or 0)


def _wait_active(box: Container, what: str, old_pid: int | None = None) -> int:
    def check() -> int | None:
        if box.show("ActiveState") != "active":
            return None
        pid = _main_pid(box)
        return pid if pid and pid != old_pid else None
    return wait_for(check, 90, what, interval=0.2)


def test_start_runs_a_task_and_journal_has_its_fields(box: Container) -> None:
    """systemctl start reaches active (Type=notify), a shell task runs, and journalctl finds its lines by TASK_ID."""
    box.sh("systemctl start kanband")
    assert box.show("ActiveState") == "active" and box.show("Type") == "notify"
    status = box.show("StatusText")
    assert "running=" in status and "ready=" in status
    task = box.ctl_json("create hello --assignee shell --body 'echo from-the-container'")
    box.ctl(f"wait {task['id']} --timeout 60")
    assert box.ctl_json(f"show {task['id']}")["task"]["result"] == "from-the-container"
    lines = wait_for(lambda: box.sh(f"journalctl -u kanband TASK_ID={task['id']} -o json "
                                    "--no-pager").stdout.strip().splitlines(), 30,
                     "journal entries with the task's TASK_ID")
    events = {json.loads(ln).get("EVENT") for ln in lines}
    assert {"worker_spawned", "worker_exited"} <= events
    entry = next(json.loads(ln) for ln in lines if '"worker_spawned"' in ln)
    assert entry["PRIORITY"] == "6" and entry["PROFILE"] == "shell" and entry["RUN_ID"].startswith("r_")
    warn = box.sh("journalctl -u kanband -p warning -o cat --no-pager", check=False).stdout
    assert "worker_spawned" not in warn  # -p filters by the syslog priority we set


def test_reload_keeps_serving(box: Container) -> None:
    """systemctl reload re-reads the config (RELOADING then READY) and the service stays active on the same pid."""
    box.sh("systemctl start kanband")
    pid = _main_pid(box)
    box.sh("printf '\\n[profiles.echoer]\\ncommand = [\"/bin/echo\", \"{task_id}\"]\\n"
           "complete_on_exit = true\\n' >> /etc/kanband/kanband.toml")
    box.sh("systemctl reload kanband")
    assert box.show("ActiveState") == "active" and _main_pid(box) == pid
    names = {a["name"] for a in box.ctl_json("assignees")}
    assert "echoer" in names
    assert "config_reloaded" in box.sh("journalctl -u kanband EVENT=config_reloaded -o cat "
                                       "--no-pager").stdout


def test_sigkill_of_main_restarts_and_requeues_the_killed_worker(box: Container) -> None:
    """kill -9 of kanband gets it restarted; with KillMode=mixed its worker was killed too, and the run ends `lost` then runs again."""
    box.sh("systemctl start kanband")
    marker = f"/tmp/kb-kill9-{time.time_ns()}"
    task = box.ctl_json(f"create sleeper --assignee shell --body 'touch {marker}.$KANBAN_RUN_ID; "
                        f"sleep 3600'")
    wait_for(lambda: box.ctl_json(f"show {task['id']}")["task"]["worker_pid"], 30,
             "the worker to start")
    old = _main_pid(box)
    box.sh(f"kill -9 {old}")
    _wait_active(box, "kanband to be restarted after SIGKILL", old)
    runs = wait_for(lambda: (rs := box.ctl_json(f"runs {task['id']}")) and len(rs) >= 2 and rs,
                    60, "the task to be dispatched again")
    assert runs[0]["outcome"] == "lost"
    assert int(box.show("NRestarts")) >= 1
    box.ctl(f"archive {task['id']}")


def test_watchdog_restarts_a_wedged_daemon(box: Container) -> None:
    """A SIGSTOPped (wedged) kanband stops sending WATCHDOG=1 and systemd restarts it."""
    box.sh("systemctl start kanband")
    old = _main_pid(box)
    restarts = int(box.show("NRestarts"))
    box.sh(f"kill -STOP {old}")
    new = _wait_active(box, "the watchdog to restart kanband", old)
    assert new != old and int(box.show("NRestarts")) > restarts
    assert "watchdog" in box.sh("journalctl -u kanband --no-pager -o cat | tail -n 200").stdout.lower()


def test_stop_leaves_no_worker(box: Container) -> None:
    """systemctl stop with the default config interrupts running workers and leaves no process of theirs behind."""
    box.sh("systemctl start kanband")
    marker = f"sleep 86400.{time.time_ns()}"  # a command line no other process has
    tasks = [box.ctl_json(f"create w{i} --assignee shell --body '{marker}'")["id"]
             for i in range(3)]
    for t in tasks:
        wait_for(lambda t=t: box.ctl_json(f"show {t}")["task"]["worker_pid"], 30,
                 f"worker of {t} to start")
    pattern = f"[{marker[0]}]{marker[1:]}"  # a regexp that does not match pgrep's own shell
    assert box.sh(f"pgrep -f '{pattern}' | wc -l").stdout.strip() == "3"
    box.sh("systemctl stop kanband", timeout=90)
    assert box.show("ActiveState") in ("inactive", "failed")
    left = box.sh(f"pgrep -af '{pattern}' || true").stdout.strip()
    assert left == "", f"workers left after systemctl stop: {left}"
    box.sh("systemctl start kanband")
    for t in tasks:
        runs = box.ctl_json(f"runs {t}")
        assert runs[0]["outcome"] == "interrupted"
        box.ctl(f"archive {t}")
