"""Write the *untrained* block diffuser (SmolLM2 + mask token, wrapped at a block length) as a model directory,
with the same data config as a fine-tuning run, so `blockdiff eval --base-ppl` gives the "before" numbers.

    python experiments/finetune/step0.py runs/finetune_bl4 runs/finetune_bl4_step0
"""

from __future__ import annotations

import sys
from pathlib import Path

from blockdiff.config import load_config
from blockdiff.model import BlockDiffusionLM, BlockDiffusionSpec
from blockdiff.pretrained import load_pretrained
from blockdiff.train import export_model


def main(run_dir: str, out_dir: str) -> None:
    cfg = load_config([Path(run_dir) / "config.yaml"])
    backbone, tokenizer, _ = load_pretrained(cfg.model.pretrained)
    spec = BlockDiffusionSpec(tokenizer.mask_token_id, cfg.model.block_length, cfg.logit_shift, cfg.data.max_seq_len)
    export_model(BlockDiffusionLM(backbone.eval(), spec), tokenizer, cfg, Path(out_dir))
    print(f"untrained block diffuser written to {out_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
