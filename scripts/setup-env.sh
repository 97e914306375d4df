#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install QSMDIP with the CPU build
# of PyTorch. The plain registry 'torch' pulls gigabytes of CUDA libraries; the pin below does not.
# Usage: source scripts/setup-env.sh [extra]   (extra: demo or test; default demo)
set -e
EXTRA="${1:-demo}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    "$PYTHON" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e "$ROOT[$EXTRA]"
