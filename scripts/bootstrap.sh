#!/usr/bin/env bash
# Idempotent set-up: virtual environment, editable install, real MNIST/FashionMNIST files.
# Safe to run again: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CDI_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[bootstrap] installing torch 2.14.1 / torchvision 0.29.1"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi

stamp="$VENV/.bootstrap-stamp"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing cdi-experiments (editable) and its dependencies"
  "$VPY" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi

# Real data: torchvision layout under data/ (or $CDI_DATA_DIR), checksums verified.
"$VENV/bin/cdi-data" fetch --quiet
