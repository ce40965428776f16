#!/usr/bin/env bash
# Set everything up (first time only) and run the whole test suite.
# Arguments pass through to pytest, e.g. `scripts/test.sh -k dashboard`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
source "${QEXPLORER_VENV:-.venv}/bin/activate"
ruff check qexplorer tests scripts
exec python -m pytest "$@"
