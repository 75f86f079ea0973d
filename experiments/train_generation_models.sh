#!/usr/bin/env bash
# Models for experiments/bench_generation.py: the demo network (Llama, hidden 192, 4 layers) trained on the
# offline Shakespeare corpus with a 256-token context, 800 steps each (~6-8 min each on 2 CPU cores):
#   runs/gen_bl{4,8,16}  block diffusion at block length 4, 8, 16
#   runs/gen_ar          the same network as a plain AR LM (block length 1, every token masked, logit shift:
#                        the loss is exactly next-token cross-entropy, so its backbone works with HF generate())
set -euo pipefail
BIN=${BIN:-.venv/bin}
common="data.max_seq_len=256 data.batch_size=8 trainer.max_steps=800 trainer.max_minutes=null
        trainer.val_every_n_steps=400 trainer.checkpoint_every_n_steps=400"
for bl in 4 8 16; do
  $BIN/blockdiff train $common model.block_length=$bl trainer.out_dir=runs/gen_bl$bl --overwrite
done
$BIN/blockdiff train $common model.block_length=1 model.logit_shift=true noise.beta=1.0 noise.omega=1.0 \
  trainer.out_dir=runs/gen_ar --overwrite
