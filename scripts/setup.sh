#!/usr/bin/env bash
# Creates .venv (if missing) and installs Atlas into it: CPU torch first, then the project.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. EXTRAS=test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine, install the CUDA build of torch yourself before running this script.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
