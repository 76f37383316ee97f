#!/usr/bin/env bash
# The post-training recipe end to end, on CPU (docs/training.md, "Post-training"):
#   quickstart base model -> SFT on a docstring instruction set -> DPO on preference pairs
#   -> each served by `atlas serve` and scored through /v1/chat/completions and
#   /v1/completions by the `atlas-eval` instruct suite -> base vs SFT vs DPO side by side
#   (compare.md and a plot).
#
# Usage: scripts/posttrain_recipe.sh [WORK]        (default WORK=posttrain)
#   SEED=0        instruction-set split and training seed
#   BASE=DIR      the base checkpoint (default: the quickstart's, built first if missing)
#   THREADS=N     torch threads for training (default: all cores)
#   PYTHON=...    the interpreter with Atlas installed (default: python)
# Every stage writes into WORK; timings.txt records how long each took. A rerun reuses
# the finished stages: the data (WORK/instruct), SFT (run WORK/sft, model WORK/sft-final)
# and DPO (run WORK/dpo, model WORK/dpo-final); the evaluations always run again. Delete a
# stage's folder, WORK/instruct, WORK/sft or WORK/dpo, to redo that stage and every stage
# after it (a stage that was interrupted continues where its last checkpoint left it).
# The data records its SEED (WORK/instruct/manifest.json) and another SEED is refused: the
# finished models would be scored on a held-out split that overlaps their training data.
# Delete WORK/instruct (everything is redone) or use another WORK to run another seed.
# Likewise the SFT run records its BASE (WORK/base.txt) and another BASE is refused: the
# reused models would not be the new base's. Delete WORK/sft or use another WORK.
set -euo pipefail

WORK=${1:-posttrain}
SEED=${SEED:-0}
PYTHON=${PYTHON:-python}
THREADS=${THREADS:-}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
TIMINGS="$WORK/timings.txt"
: >"$TIMINGS"
threads=()
[ -n "$THREADS" ] && threads=(--set "run.threads=$THREADS")

stage() {  # stage NAME COMMAND...: run and record the wall time
    local name=$1 start end
    shift
    echo "== $name: $*" >&2
    start=$(date +%s)
    "$@"
    end=$(date +%s)
    echo "$name $((end - start)) s" | tee -a "$TIMINGS" >&2
}

# 1. The base model: the quickstart (a few minutes on 2 cores), unless BASE is given.
if [ -z "${BASE:-}" ]; then
    QS=$("$PYTHON" -c 'from atlas_server.paths import quickstart_dir; print(quickstart_dir())')
    BASE="$QS/checkpoint"
    if [ ! -f "$BASE/config.json" ]; then
        stage quickstart "$PYTHON" -m trainer.cli quickstart
    fi
fi
[ -d "$BASE" ] || { echo "error: BASE=$BASE is not a checkpoint folder" >&2; exit 1; }
BASE=$(cd "$BASE" && pwd)  # one spelling of the folder, for the record below
echo "base checkpoint: $BASE" >&2

redo_after() {  # redo_after STAGE: STAGE starts afresh, so the stages built on it go too
    case $1 in
        data) rm -rf "$WORK/sft" "$WORK/sft-final" "$WORK/dpo" "$WORK/dpo-final" ;;
        sft) rm -rf "$WORK/dpo" "$WORK/dpo-final" ;;
    esac
}

# 2. The instruction and preference data, from this Python's docstrings (held-out split).
#    instruct_data writes manifest.json last: with it, the data is whole.
MANIFEST="$WORK/instruct/manifest.json"
if [ -f "$MANIFEST" ]; then
    made_with=$(grep -o '"seed": *-\{0,1\}[0-9]*' "$MANIFEST" | grep -o -- '-\{0,1\}[0-9]*$' || true)
    if [ "$made_with" != "$SEED" ]; then
        echo "error: $WORK/instruct was made with SEED=$made_with, not SEED=$SEED; its held-out" \
            "split would overlap the training data of the models trained on it. Rerun with" \
            "SEED=$made_with, delete $WORK/instruct to redo every stage, or use another WORK" >&2
        exit 1
    fi
    echo "== data: reusing $WORK/instruct (SEED=$SEED)" >&2
else
    redo_after data
    stage data "$PYTHON" -m trainer.instruct_data "$WORK/instruct" --seed "$SEED"
fi

# 3. SFT from the base, 4. DPO from the SFT model (reference log-probs cached beside the data).
final() {  # the run's last checkpoint, without its trainer state: a servable checkpoint
    local run=$1 out=$2 last
    last=$(ls -d "$run"/checkpoints/step_* | sort | tail -n 1)
    rm -rf "$out" && mkdir -p "$out"
    for f in "$last"/*; do
        case $(basename "$f") in trainer_state.*) ;; *) cp "$f" "$out/" ;; esac
    done
}
# A stage is finished when its run folder and its model are there; without the run folder
# it starts afresh (and the stages after it go); with it, --resume continues the run.
finished() { [ -d "$WORK/$1" ] && [ -f "$WORK/$1-final/config.json" ]; }
BASE_RECORD="$WORK/base.txt"
if [ -d "$WORK/sft" ] && [ -f "$BASE_RECORD" ] && [ "$(cat "$BASE_RECORD")" != "$BASE" ]; then
    echo "error: $WORK/sft was trained from BASE=$(cat "$BASE_RECORD"), not BASE=$BASE;" \
        "delete $WORK/sft to redo SFT and DPO from the new base, or use another WORK" >&2
    exit 1
fi
if finished sft; then
    echo "== sft: reusing $WORK/sft-final" >&2
else
    [ -d "$WORK/sft" ] || redo_after sft
    echo "$BASE" >"$BASE_RECORD"
    stage sft "$PYTHON" -m trainer.cli sft --config configs/train/sft-instruct.toml \
        --set "model.init_from=\"$BASE\"" \
        --set "sft.train=[\"$WORK/instruct/sft_train.jsonl\"]" \
        --set "sft.val=[\"$WORK/instruct/sft_heldout.jsonl\"]" \
        --set "run.out_dir=\"$WORK/sft\"" --set "run.seed=$SEED" "${threads[@]}" \
        --resume  # a rerun after an interruption continues the run (a fresh folder: step 0)
    final "$WORK/sft" "$WORK/sft-final"
fi
if finished dpo; then
    echo "== dpo: reusing $WORK/dpo-final" >&2
else
    stage dpo "$PYTHON" -m trainer.cli dpo --config configs/train/dpo-instruct.toml \
        --set "model.init_from=\"$WORK/sft-final\"" \
        --set "dpo.train=[\"$WORK/instruct/prefs_train.jsonl\"]" \
        --set "dpo.val=[\"$WORK/instruct/prefs_heldout.jsonl\"]" \
        --set "run.out_dir=\"$WORK/dpo\"" --set "run.seed=$SEED" "${threads[@]}" \
        --resume  # a rerun after an interruption continues the run (a fresh folder: step 0)
    final "$WORK/dpo" "$WORK/dpo-final"
fi

# 5. Serve each model and score it on the held-out instructions and pairs.
for name in base sft dpo; do
    case $name in base) ckpt=$BASE ;; *) ckpt="$WORK/$name-final" ;; esac
    stage "eval-$name" "$PYTHON" -m eval_suites.cli run instruct --checkpoint "$ckpt" \
        --output "$WORK/eval/$name" --overwrite --seed "$SEED" --cache "$WORK/eval-cache.sqlite" \
        --set "data=\"$WORK/instruct/sft_heldout.jsonl\"" \
        --set "pairs=\"$WORK/instruct/prefs_heldout.jsonl\"" >/dev/null
done
stage compare "$PYTHON" -m eval_suites.cli compare \
    "$WORK/eval/base" "$WORK/eval/sft" "$WORK/eval/dpo" \
    --label base --label sft --label dpo --output "$WORK/compare" --overwrite

# 6. The lineage of the final model, and a few held-out answers from each.
"$PYTHON" -m atlas_server.cli checkpoint inspect "$WORK/dpo-final" | sed -n '/^lineage/,/^files/p'
"$PYTHON" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = {n: [json.loads(l) for l in (work / "eval" / n / "samples.jsonl").open()] for n in ("base", "sft", "dpo")}
answers = {n: {r["id"]: r for r in rs if r.get("kind") == "answer"} for n, rs in rows.items()}
for item_id in sorted(answers["base"])[:3]:
    print(f"\nQ: {answers['base'][item_id]['question']}\nreference: {answers['base'][item_id]['reference']}")
    for n in ("base", "sft", "dpo"):
        print(f"{n:>5}: {answers[n][item_id]['prediction'][:160]!r}")
EOF
echo "timings (s):" && cat "$TIMINGS"
echo "side by side: $WORK/compare/compare.md"
