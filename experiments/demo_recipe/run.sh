#!/usr/bin/env bash
# Which recipe gives the better block diffuser for the demo's budget? (issue 13; docs/benchmarks.md, "The demo")
#   scratch:  block length 4 from random init, 2N steps (the demo before issue 13)
#   from AR:  N steps of an AR model (block length 1, every token masked, logit shift: exactly next-token CE),
#             then N steps of block length 4 started from it (model.init_from)
#   AR 2N:    the same AR run continued to 2N steps (the equally-trained AR baseline)
# A step costs about the same at block length 1 and 4 (docs/benchmarks.md, "Training cost"), so equal steps are equal
# compute; wall times are printed too. Every model is evaluated on the same held-out batches (eval --max-batches 16).
# Usage: bash experiments/demo_recipe/run.sh [N=200] [OUT=runs/demo_recipe]
set -euo pipefail
N=${1:-200}
OUT=${2:-runs/demo_recipe}
BIN=${BIN:-.venv/bin}
COMMON=(-c configs/demo.yaml trainer.max_minutes=null trainer.val_every_n_steps=100000 trainer.checkpoint_every_n_steps=100000)
AR=(model.block_length=1 model.logit_shift=true noise.beta=1 noise.omega=1)
mkdir -p "$OUT"
t() { local name=$1; shift; local s=$(date +%s); "$@" > "$OUT/$name.log" 2>&1; echo "$name $(( $(date +%s) - s )) s" | tee -a "$OUT/times.txt"; }
t scratch "$BIN/blockdiff" train "${COMMON[@]}" trainer.max_steps=$((2 * N)) trainer.out_dir="$OUT/scratch"
t ar "$BIN/blockdiff" train "${COMMON[@]}" "${AR[@]}" trainer.max_steps=$N trainer.out_dir="$OUT/ar"
t from_ar "$BIN/blockdiff" train "${COMMON[@]}" model.init_from="$OUT/ar" model.logit_shift=true trainer.max_steps=$N \
  trainer.out_dir="$OUT/from_ar"
rm -rf "$OUT/ar2"; cp -r "$OUT/ar" "$OUT/ar2"
t ar2 "$BIN/blockdiff" train --resume "$OUT/ar2" trainer.max_steps=$((2 * N)) trainer.out_dir="$OUT/ar2"
for run in scratch ar from_ar ar2; do
  "$BIN/blockdiff" eval "$OUT/$run" --max-batches 16 --json "$OUT/$run.eval.json" > "$OUT/$run.eval.log" 2>&1
  echo "$run $(grep -o '"nelbo_ppl": [0-9.]*' "$OUT/$run.eval.json")" | tee -a "$OUT/evals.txt"
done
