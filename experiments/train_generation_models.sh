#!/usr/bin/env bash
# Models for experiments/bench_generation.py: the demo network (Llama, hidden 192, 4 layers, BPE 2048) trained
# on the offline Shakespeare corpus with a 256-token context (about 3-7 minutes each on 2 idle CPU cores):
#   runs/gen_bl4         block diffusion at block length 4, 800 steps (the sampler comparisons use it)
#   runs/gen_bl8, _bl16  block length 8 and 16, 250 steps (cache vs no-cache speed rows)
#   runs/gen_ar          the same network as a plain AR LM, 500 steps: block length 1, every token masked
#                        (noise.beta = noise.omega = 1), logit shift on, so the loss is exactly next-token
#                        cross-entropy and its backbone is an ordinary causal LM for HF generate()
#   runs/gen_bl4_from_ar block length 4 started from runs/gen_ar (model.init_from), 800 steps
set -euo pipefail
BIN=${BIN:-.venv/bin}
common="data.max_seq_len=256 data.batch_size=8 trainer.max_minutes=null trainer.val_every_n_steps=400
        trainer.checkpoint_every_n_steps=400"
train() { [ -f "runs/$1/model/blockdiff.json" ] || $BIN/blockdiff train $common "${@:2}" trainer.out_dir=runs/$1 --overwrite; }
train gen_bl4 model.block_length=4 trainer.max_steps=800
train gen_ar model.block_length=1 model.logit_shift=true noise.beta=1.0 noise.omega=1.0 trainer.max_steps=500
train gen_bl8 model.block_length=8 trainer.max_steps=250
train gen_bl16 model.block_length=16 trainer.max_steps=250
# Block length 4 adapted from the AR model (logit shift on, as for any AR-initialised backbone), 800 steps.
train gen_bl4_from_ar model.init_from=runs/gen_ar model.block_length=4 model.logit_shift=true optim.lr=1e-3 \
  optim.warmup_steps=20 trainer.max_steps=800
