#!/usr/bin/env bash
# Creates .venv (if missing) and installs Atlas into it: CPU torch first, then the project.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. EXTRAS=test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# --no-compile: pip byte-compiles every file of every package it installs (torch's and the
# test extras' thousands), which took 80 of a fresh setup's ~170 s on 2 cores; Python
# compiles the modules actually imported, once, on first use.
PIP=(.venv/bin/python -m pip install -q --no-compile)
# The CPU wheel first: on Linux, PyPI's `torch` is the multi-GB CUDA build, so it comes
# from PyTorch's CPU index (TORCH_INDEX_URL) when that can be reached; a machine that cannot
# reach it (a CI runner whose pip config finds the CPU wheel locally) asks its own indexes.
# On a GPU machine, install the CUDA build of torch yourself before running this script.
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ "$(uname -s)" = Linux ] && .venv/bin/python -c "import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" "$TORCH_INDEX_URL" 2>/dev/null; then
    "${PIP[@]}" "torch==2.13.0" --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple
  else
    "${PIP[@]}" "torch==2.13.0"
  fi
fi
if [ -n "$extras" ]; then
  "${PIP[@]}" -e ".[$extras]"
else
  "${PIP[@]}" -e .
fi
