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
# The CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine, install the CUDA build of torch yourself before running this script.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
if [ -n "$extras" ]; then
  "${PIP[@]}" -e ".[$extras]"
else
  "${PIP[@]}" -e .
fi
