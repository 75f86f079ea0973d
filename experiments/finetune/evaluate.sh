#!/usr/bin/env bash
# Before/after numbers for docs/finetuning.md, for each fine-tuned run given (default: bl4 and bl16):
#   the untrained wrapper ("step 0") and the fine-tuned model, each against SmolLM2's exact AR perplexity on
#   the same held-out tokens; samples (threshold tau=0.9, first-hitting, and SmolLM2's own generate())
#   judged by SmolLM2. JSON lands in experiments/results/finetune/.
#   bash experiments/finetune/evaluate.sh 4 16
set -euo pipefail
BIN=${BIN:-.venv/bin}
THREADS=${THREADS:-2}
OUT=experiments/results/finetune
mkdir -p "$OUT"
for bl in "${@:-4 16}"; do
  run=runs/finetune_bl$bl
  OMP_NUM_THREADS=$THREADS $BIN/python experiments/finetune/step0.py "$run" "${run}_step0"
  OMP_NUM_THREADS=$THREADS $BIN/blockdiff eval "${run}_step0" --base-ppl --max-batches 16 --json "$OUT/bl${bl}_step0.json"
  OMP_NUM_THREADS=$THREADS $BIN/blockdiff eval "$run" --base-ppl --gen --num-samples 8 --gen-length 64 \
    --max-batches 16 --json "$OUT/bl${bl}.json"
done
