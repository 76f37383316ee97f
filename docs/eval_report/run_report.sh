#!/usr/bin/env bash
# Rebuild the report in docs/evaluation.md: the quickstart model served by Atlas and by the
# `transformers` OpenAI shim (bench/hf_openai_shim.py) on the same weights, every suite on
# both, then `atlas-eval compare` into docs/img/.
#
# Usage: bash docs/eval_report/run_report.sh [CHECKPOINT] [SUITE ...]
#   CHECKPOINT  default: the `atlas-train quickstart` output, $ATLAS_HOME/quickstart/checkpoint
#   SUITE       default: perplexity generation hallucination latency
# Runs one suite on one server at a time (latency figures need the machine to themselves).
set -euo pipefail
cd "$(dirname "$0")/../.."
ckpt=${1:-${ATLAS_HOME:-$HOME/.cache/atlas}/quickstart/checkpoint}
shift || true
suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(perplexity generation hallucination latency)
[ -f "$ckpt/config.json" ] || { echo "error: no checkpoint at $ckpt (run: atlas-train quickstart)" >&2; exit 2; }
out=docs/eval_report
# A fresh response cache: every figure comes from requests sent in this run.
cache=$(mktemp -d)/eval-cache.sqlite
atlas_url=http://127.0.0.1:8750
hf_url=http://127.0.0.1:8733

atlas serve --checkpoint "$ckpt" --port 8750 --model-name quickstart --log-level warning &
atlas_pid=$!
python bench/hf_openai_shim.py --checkpoint "$ckpt" --port 8733 --model-name quickstart --threads 2 &
hf_pid=$!
trap 'kill $atlas_pid $hf_pid 2>/dev/null || true' EXIT
for url in $atlas_url $hf_url; do
  for _ in $(seq 120); do curl -sf "$url/health" >/dev/null && break; sleep 1; done
done

# The report's own settings (one example, shorter sources and passages, its load levels),
# kept so the committed numbers rerun as they were made. They are not needed to fit the
# quickstart model's 512-token context: every suite fits its prompts to the server's
# context by itself (docs/evaluation.md, "Fitting the context").
args_perplexity=()
args_generation=(--set num_shots=1 --set max_source_chars=300)
args_hallucination=(--set max_passage_chars=160)
args_latency=(--no-cache --set 'concurrencies=[1,4,16]' --set 'request_rates=[4.0]')

for suite in "${suites[@]}"; do
  declare -n extra="args_$suite"
  for server in atlas hf; do
    url=${server}_url
    rm -rf "$out/$server-$suite"
    atlas-eval run "$suite" --base-url "${!url}" --cache "$cache" "${extra[@]}" -o "$out/$server-$suite"
  done
  unset -n extra
done

# Atlas again on the hallucination items, retrieving through its own `rag` field (the
# shim has no RAG, so this one runs on Atlas only).
if [[ " ${suites[*]} " == *" hallucination "* ]]; then
  rm -rf "$out/atlas-hallucination-rag"
  atlas-eval run hallucination --base-url $atlas_url --cache "$cache" --set context=rag --set max_passage_chars=160 \
    -o "$out/atlas-hallucination-rag"
fi

runs=() labels=()
for run in atlas-perplexity hf-perplexity atlas-generation hf-generation atlas-hallucination \
  hf-hallucination atlas-hallucination-rag atlas-latency hf-latency; do
  if [ -f "$out/$run/results.json" ]; then
    runs+=("$out/$run")
    label=${run%%-*}
    [[ $run == *-rag ]] && label=atlas-rag
    labels+=(--label "$label")
  fi
done
atlas-eval compare "${runs[@]}" "${labels[@]}" -o docs/img --overwrite
