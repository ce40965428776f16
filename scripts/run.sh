#!/usr/bin/env bash
# Set everything up (first time only) and open qexplorer on the bundled model.
# Arguments pass through, e.g. `scripts/run.sh --simulate gb10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${QEXPLORER_VENV:-.venv}/bin/qexplorer" "$@"
