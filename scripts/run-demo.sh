#!/usr/bin/env bash
# Install QSMDIP with CPU PyTorch into .venv and run the demo (phantom -> TKD and DIP -> table + PNG).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup-env.sh" demo
cd "$ROOT"
qsmdip demo "$@"
