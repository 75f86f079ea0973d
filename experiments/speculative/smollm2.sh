#!/usr/bin/env bash
# One command: a fused speculative drafter for the offline SmolLM2-135M (a frozen SmolLM2 with a gated LoRA that
# drafts, token-causal clean stream, so one forward verifies and drafts), trained on SmolLM2's own greedy
# continuations, then measured against SmolLM2's generate() and its prompt-lookup decoding
# (experiments/speculative/README.md, docs/benchmarks.md). Every step is skipped when its output exists and resumes
# when it was stopped.
#
#   bash experiments/speculative/smollm2.sh               # from the repository root
#   BL=8 bash experiments/speculative/smollm2.sh          # block length 8 (runs/spec_smollm2/drafter_bl8)
#
# Knobs (environment): DISTILL_PROMPTS (512), NEW (48: tokens per continuation), STEPS (400), MINUTES (35),
# BL (4), RANK (32), LR (1e-3), BATCH (4), THREADS (2), BLOCKDIFF, PYTHON.
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
BLOCKDIFF=${BLOCKDIFF:-blockdiff}
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/spec_smollm2}
DISTILL_PROMPTS=${DISTILL_PROMPTS:-512}
NEW=${NEW:-48}
STEPS=${STEPS:-400}
MINUTES=${MINUTES:-35}
BL=${BL:-4}
RANK=${RANK:-32}
LR=${LR:-1e-3}
BATCH=${BATCH:-4}
THREADS=${THREADS:-2}
CFG=configs/finetune_smollm2.yaml
mkdir -p "$OUT"

# 1. Self-distillation: SmolLM2's greedy continuations of training-split prompts (16 prompt tokens + $NEW new).
echo "== $OUT/distilled"
"$BLOCKDIFF" distill --teacher smollm2 -c "$CFG" --out "$OUT/distilled" --num-prompts "$DISTILL_PROMPTS" \
  --prompt-tokens 16 --new-tokens "$NEW" --temperature 0 --batch-size 32 --shard-size 64

# 2. The drafter: SmolLM2 frozen, a gated LoRA on the noisy rows only, clean stream token-causal (so the clean rows
#    ARE SmolLM2 and its KV cache), block length $BL from the start (no curriculum: a 1-token block has nothing to
#    draft), windows of one distilled row.
DIR=$OUT/drafter_bl$BL
if [[ -f $DIR/model/blockdiff.json ]]; then
  echo "== $DIR: done, skipped"
elif compgen -G "$DIR/checkpoints/*.ckpt" > /dev/null; then
  echo "== $DIR: resuming"; "$BLOCKDIFF" train --resume "$DIR"
else
  echo "== $DIR: training"
  "$BLOCKDIFF" train -c "$CFG" model.block_length="$BL" model.clean_attention=causal model.adapter=gated_lora \
    model.adapter_rank="$RANK" model.adapter_alpha="$RANK" data.source=distilled:"$OUT/distilled" \
    data.max_seq_len=$((16 + NEW)) data.batch_size="$BATCH" optim.lr="$LR" optim.warmup_steps=20 \
    curriculum.block_length_fraction=0 trainer.max_steps="$STEPS" trainer.max_minutes="$MINUTES" \
    trainer.val_every_n_steps=200 trainer.checkpoint_every_n_steps=50 trainer.out_dir="$DIR" --overwrite
fi

# 3. Measure on held-out prompts: HF generate (greedy, T=0.8), HF prompt lookup, speculative (fused and two-model),
#    native threshold.
if [[ ! -f $OUT/bench_bl$BL/results.json ]]; then
  "$PYTHON" experiments/bench_speculative.py --model "$DIR" --num-prompts 8 --prompt-tokens 32 --new-tokens 64 \
    --rounds 2 --threads "$THREADS" --out-dir "$OUT/bench_bl$BL"
fi
cat "$OUT/bench_bl$BL/table.md"
