#!/usr/bin/env bash
# Creates .venv (if missing) and installs nf4-explorer with its test dependencies into it.
# Without a GPU it pins the CPU build of torch (Triton kernels then run in Triton's interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q --disable-pip-version-check torch triton
else
    # CPU-only machine (CI): the CPU build of torch, and Triton 3.6 for its interpreter. Triton 3.6's
    # interpreter needs numpy < 2.4 (it converts 1-element arrays to Python ints in range()).
    python -m pip install -q --disable-pip-version-check torch==2.13.0 triton==3.6.0 "numpy<2.4"
fi
python -m pip install -q --disable-pip-version-check -e ".[test]"
