#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the test suite (CI runs exactly this).
# With arguments, runs pytest with them. Without, runs the whole suite (two xdist workers), then the engine and
# API tests again on the fallback kernels a machine without a C compiler serves with:
# oneDNN (ATLAS_NATIVE=0), then plain PyTorch (ATLAS_NATIVE=0 ATLAS_ONEDNN=0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
# Two workers, whole files each (module fixtures are built once): run alone, the suite keeps
# one core of two busy (load average ~1 on a 2-core machine); two workers took it from 503 s
# to 299 s there (2026-12-05, same commit, both passing).
.venv/bin/python -m pytest -q -n 2 --dist loadfile
# /health's test fails if a leg claims the C kernels: the legs test what they say.
health=tests/test_native_kernels.py::test_health_says_which_kernels_serve
echo "--- engine and API tests without Atlas's C kernels (oneDNN serves fp32)"
ATLAS_NATIVE=0 .venv/bin/python -m pytest -q -n 2 --dist loadfile \
  tests/test_engine.py tests/test_prefix_cache.py tests/test_api.py "$health"
echo "--- engine tests without the C kernels and without oneDNN (plain PyTorch)"
ATLAS_NATIVE=0 ATLAS_ONEDNN=0 .venv/bin/python -m pytest -q -n 2 --dist loadfile \
  tests/test_engine.py tests/test_prefix_cache.py "$health"
