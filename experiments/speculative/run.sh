#!/usr/bin/env bash
# One command: a demo-size AR verifier, its self-distilled set, a gated-adapter block drafter, and the
# speculative / native measurements (experiments/speculative/README.md). Every step is skipped when its output
# exists and resumes when it was stopped, so running this again continues where it left off.
#
#   bash experiments/speculative/run.sh                 # from the repository root
#   BL=8 bash experiments/speculative/run.sh            # the drafter at block length 8 (runs/spec_demo/drafter_bl8)
#
# Knobs (environment): AR_MINUTES (8), DISTILL_PROMPTS (4000), DRAFT_MINUTES (13), BL (4), RANK (32),
# THREADS (2), BLOCKDIFF (the CLI to call), PYTHON.
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
BLOCKDIFF=${BLOCKDIFF:-blockdiff}
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/spec_demo}
AR_MINUTES=${AR_MINUTES:-8}
DISTILL_PROMPTS=${DISTILL_PROMPTS:-4000}
DRAFT_MINUTES=${DRAFT_MINUTES:-13}
BL=${BL:-4}
RANK=${RANK:-32}
THREADS=${THREADS:-2}
HERE=$(dirname "$0")
mkdir -p "$OUT"

# train RUN_DIR ARGS...: skip a finished run (model/ written), resume a stopped one, else start it.
train() {
  local dir=$1; shift
  if [[ -f $dir/model/blockdiff.json ]]; then echo "== $dir: done, skipped"; return; fi
  if compgen -G "$dir/checkpoints/*.ckpt" > /dev/null; then
    echo "== $dir: resuming"; "$BLOCKDIFF" train --resume "$dir"
  else
    echo "== $dir: training"; "$BLOCKDIFF" train "$@" trainer.out_dir="$dir" --overwrite
  fi
}

# 1. The AR model: demo sizes at block length 1 with the logit shift, so its backbone is a plain causal LM.
#    noise.beta=noise.omega=1 masks every token (t = 1): at L'=1 the loss is then exactly the AR cross-entropy,
#    instead of the 1/t-weighted estimate of it that t ~ U[0, 1] gives (same expectation, far noisier).
train "$OUT/ar" -c configs/demo.yaml model.block_length=1 model.logit_shift=true noise.beta=1.0 noise.omega=1.0 \
  trainer.max_steps=200 trainer.max_minutes="$AR_MINUTES" trainer.val_every_n_steps=100 \
  trainer.checkpoint_every_n_steps=100
if [[ ! -f $OUT/base/check.json ]]; then
  echo "== $OUT/base: the backbone as an HF causal LM, checked against the blockdiff model at L'=1"
  "$PYTHON" "$HERE/spec_demo.py" export-base "$OUT/ar" "$OUT/base"
fi
cat "$OUT/base/check.json"

# 2. Self-distillation: the base model's greedy and T=0.8 continuations of training-split prompts (resumable:
#    the same command skips finished shards).
echo "== $OUT/distilled"
"$BLOCKDIFF" distill --teacher "$OUT/base" -c configs/demo.yaml --out "$OUT/distilled" \
  --temperature 0 --temperature 0.8 --num-prompts "$DISTILL_PROMPTS" --prompt-tokens 16 --new-tokens 96 \
  --batch-size 32 --shard-size 256

# 3. The drafter: the AR run at block length $BL, token-causal clean stream, frozen base + gated LoRA on the
#    noisy rows, trained on the distilled set.
train "$OUT/drafter_bl$BL" -c configs/demo.yaml model.init_from="$OUT/ar" model.block_length="$BL" \
  model.clean_attention=causal model.adapter=gated_lora model.adapter_rank="$RANK" model.adapter_alpha="$RANK" \
  data.source=distilled:"$OUT/distilled" optim.lr=1e-3 optim.warmup_steps=20 optim.ema_decay=0 \
  trainer.max_steps=1200 trainer.max_minutes="$DRAFT_MINUTES" trainer.val_every_n_steps=400 \
  trainer.checkpoint_every_n_steps=100

# 4. Measure: speculative (drafter drafts, base verifies) vs HF generate of the base, native threshold.
echo "== measure"
"$BLOCKDIFF" sample "$OUT/drafter_bl$BL" --speculative --base "$OUT/base" --prompt "ROMEO." --max-new-tokens 64
if [[ ! -f $OUT/bench_bl$BL/results.json ]]; then
  "$PYTHON" "$HERE/spec_demo.py" bench "$OUT/drafter_bl$BL" "$OUT/base" "$OUT/ar" --out "$OUT/bench_bl$BL" \
    --threads "$THREADS" --sampled
fi
cat "$OUT/bench_bl$BL/table.md"
