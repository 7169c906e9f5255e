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
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)$extra"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT$extra"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
