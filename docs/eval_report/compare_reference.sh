#!/usr/bin/env bash
# The worked example of docs/evaluation.md, "Comparing with reference models": an
# Atlas-trained model beside (1) the same model exported to Hugging Face and imported back
# (`export-hf` then `import-hf`: the interop round trip must change nothing) and (2) a
# reference architecture imported from a Hugging Face folder (a GPT-NeoX / Pythia-shaped
# model made by `transformers`, random weights, the same tokenizer): every model served by
# `atlas serve`, every suite on each, then `atlas-eval compare`.
#
# Usage: bash docs/eval_report/compare_reference.sh [OUT]     (default docs/eval_report/reference)
# Needs: the test extra (transformers) for step 2's reference model. No network.
# With real reference models the same steps read, e.g.:
#   atlas checkpoint import-hf EleutherAI/pythia-70m ckpt/pythia-70m
#   atlas checkpoint import-hf HuggingFaceTB/SmolLM2-135M ckpt/smollm2-135m
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-docs/eval_report/reference}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
stdlib=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
corpus="$stdlib/json $stdlib/email $stdlib/http $stdlib/urllib $stdlib/logging"

echo "== 1. an Atlas model: 1,024-token BPE, gpt2-tiny with a 512-token context, 300 steps"
atlas tokenizer train $corpus --vocab-size 1024 --output "$work/tok" --quiet
atlas-train prepare-data $corpus --tokenizer "$work/tok/atlas_tokenizer.json" \
  --output "$work/data" --val-fraction 0.02 --workers 2
atlas-train --config /dev/null --set model.preset='"gpt2-tiny"' \
  --set 'model.overrides={max_seq_len=512}' --set data.path="'$work/data'" \
  --set data.seq_len=128 --set data.micro_batch=16 --set schedule.max_steps=300 \
  --set schedule.warmup_steps=30 --set run.out_dir="'$work/run'" --set run.checkpoint_every=300 \
  --set run.eval_every=300 --set run.threads=2
mkdir -p "$work/ckpt"
cp -r "$work/run/checkpoints/step_000300" "$work/ckpt/atlas"

echo "== 2. the same model through Hugging Face and back"
atlas checkpoint export-hf "$work/ckpt/atlas" "$work/hf-atlas"
atlas checkpoint import-hf "$work/hf-atlas" "$work/ckpt/roundtrip"

echo "== 3. a reference architecture from a Hugging Face folder (GPT-NeoX, random weights)"
python - "$work/hf-atlas/tokenizer.json" "$work/hf-neox" <<'EOF'
import shutil, sys
import torch, transformers
tokenizer_json, folder = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
config = transformers.GPTNeoXConfig(
    vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25,
    use_parallel_residual=True, tie_word_embeddings=False,
)
transformers.GPTNeoXForCausalLM(config).save_pretrained(folder)
shutil.copy(tokenizer_json, f"{folder}/tokenizer.json")
EOF
atlas checkpoint import-hf "$work/hf-neox" "$work/ckpt/neox-random"
atlas checkpoint inspect "$work/ckpt/neox-random" | head -3

echo "== 4. serve each, run the suites"
cache="$work/eval-cache.sqlite"
suites=(perplexity generation hallucination latency)
declare -A opts=(
  [perplexity]=""
  [generation]="--set num_shots=0 --set max_source_chars=200 --set max_tokens=32 --set num_items=25"
  [hallucination]="--set max_passage_chars=120 --set max_tokens=32"
  [latency]="--no-cache --set concurrencies=[1,4] --set request_rates=[] --set mode=\"sweep\" --set num_prompts=16 --set input_len=64 --set output_len=32"
)
set -f  # the options hold brackets: no globbing
port=8760
models=(atlas roundtrip neox-random)
for model in "${models[@]}"; do
  atlas serve --checkpoint "$work/ckpt/$model" --port $port --model-name "$model" \
    --log-level warning >"$work/$model.log" 2>&1 &
  pid=$!
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
  for suite in "${suites[@]}"; do
    rm -rf "$out/$model-$suite"
    # shellcheck disable=SC2086
    atlas-eval run "$suite" --base-url "http://127.0.0.1:$port" --cache "$cache" ${opts[$suite]} \
      -o "$out/$model-$suite"
  done
  kill $pid && wait $pid || true
  port=$((port + 1))
done

runs=() labels=()
for suite in "${suites[@]}"; do
  for model in "${models[@]}"; do runs+=("$out/$model-$suite"); labels+=(--label "$model"); done
done
atlas-eval compare "${runs[@]}" "${labels[@]}" -o "$out" --overwrite
