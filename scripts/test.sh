#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (GPU tests run only where CUDA is present).
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
workers=$(python -c "import os; print(max(1, min(4, os.cpu_count() or 1)))")
python -m pytest -n "$workers" "$@"
