# Sourced by ./run and ./test: make a venv in .venv and install kanband into it.
# Re-running is cheap: pip is only called when pyproject.toml changed.
set -eu
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KANBAN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.kanband-installed"
extra="${1:-}"
# compat editable mode: a plain path in a .pth file. The default mode installs an
# import hook that every Python start in the venv pays for (~16 ms of each
# kanbanctl call here: it imports pathlib, re and importlib.util).
mode="editable_mode=compat"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)$extra $mode"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # --config-settings needs pip 22.1 (some distributions' venvs bring 22.0)
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'pip>=22.1'
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --config-settings "$mode" -e "$ROOT$extra"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
