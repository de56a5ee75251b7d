#!/usr/bin/env bash
# Sets up .venv and runs nf4-explorer's main job on this machine: on a GPU, check every variant,
# tune the `quick` preset and show the winners; without a GPU, check every variant in Triton's
# interpreter (tiny shapes). Extra arguments go to `nf4-explorer tune`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nf4-explorer check
    nf4-explorer tune --preset quick "$@"
    nf4-explorer show
else
    TRITON_INTERPRET=1 nf4-explorer check
fi
