#!/usr/bin/env bash
# Create .venv and install Centrifuge into it. Idempotent: re-running only installs what is missing.
# Torch: where a torch is already importable (a GPU machine), the venv sees it and keeps it; otherwise
# `pip install torch==2.13.0` takes the CPU wheel these machines carry (a bare `torch` would pull CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] torch already importable ($("$PY" -c 'import torch; print(torch.__version__)')): keeping it"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU wheel)"
  "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
stamp="$VENV/.centrifuge-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing centrifuge-llm and its dependencies"
  "$VENV/bin/python" -m pip install -q -e ".[dev,tensorboard,integrations]"
  touch "$stamp"
fi
