#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, train the embedded default model once
# (`atlas-train quickstart`, a few minutes on 2 CPU cores), then serve it on
# http://127.0.0.1:8000 with the OpenAI-compatible API. Extra arguments go to `atlas serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ATLAS_HOME=${ATLAS_HOME:-$HOME/.cache/atlas}
if [ ! -f "$ATLAS_HOME/quickstart/checkpoint/config.json" ]; then
  echo "Training the quickstart model into $ATLAS_HOME/quickstart (once; a few minutes)..."
  .venv/bin/atlas-train quickstart --output "$ATLAS_HOME/quickstart"
fi
exec .venv/bin/atlas serve "$@"
