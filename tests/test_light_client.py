"""kanbanctl stays light: no asyncio, structlog or psutil on its import path."""

import subprocess
import sys


def test_kanbanctl_imports_no_heavy_modules():
    """Importing and building the whole CLI parser pulls in none of the daemon's heavy modules."""
    code = ("import sys, kanbanctl.cli as c; c.build_parser(); "
            "print(','.join(m for m in ('asyncio', 'structlog', 'psutil') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_kanbanctl_help_runs_without_daemon():
    """`kanbanctl --help` works with no daemon and lists the board verbs."""
    out = subprocess.run([sys.executable, "-m", "kanbanctl", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0
    for verb in ("create", "list", "claim", "complete", "dispatch", "wait", "reclaim"):
        assert verb in out.stdout


def test_text_output_does_not_import_json_typing_socket_or_shutil(shared_kd):
    """`kanbanctl show ID` (text output) loads neither json, typing, socket.py nor
    shutil: each costs milliseconds of every short-lived call (socket.py builds
    its enums at import; the client uses _socket; argparse's own help formatter
    imports shutil, and bz2 and lzma with it, for the terminal width); only
    --json and --metadata need json."""
    tid = shared_kd.create("light")["id"]
    code = ("import sys, runpy\n"
            "sys.argv = ['kanbanctl', '--socket', sys.argv[1], 'show', sys.argv[2]]\n"
            "try:\n"
            "    runpy.run_module('kanbanctl', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('LOADED:' + ','.join(m for m in ('json', 'typing', 'socket', 'shutil') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, str(shared_kd.socket), tid],
                         capture_output=True, text=True, check=True)
    assert tid in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "LOADED:", out.stdout


def test_help_wraps_to_columns_as_argparse_would():
    """kanbanctl sizes its help without shutil, the way argparse does: $COLUMNS
    when set (lines wrap 2 short of it), else 80 columns off a terminal."""
    import os
    for columns, limit in (("50", 48), (None, 78)):
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        if columns:
            env["COLUMNS"] = columns
        out = subprocess.run([sys.executable, "-m", "kanbanctl", "create", "--help"],
                             capture_output=True, text=True, env=env, check=True)
        widths = [len(line) for line in out.stdout.splitlines()]
        assert max(widths) <= limit, (columns, out.stdout)
        assert max(widths) > limit - 12, (columns, out.stdout)  # it does fill the width
