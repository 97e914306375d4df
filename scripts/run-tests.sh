#!/usr/bin/env bash
# Install what the tests need (CPU PyTorch 2.13.0, SimpleITK, slicer-core, pytest) into .venv and run them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup-env.sh" test
cd "$ROOT"
python -m pytest -q "$@"
