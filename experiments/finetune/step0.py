"""Write the *untrained* block diffuser (SmolLM2 + mask token, wrapped at a block length) as a model directory,
with the same data config as a fine-tuning run, so `blockdiff eval --base-ppl` gives the "before" numbers.

    python experiments/finetune/step0.py runs/finetune_bl4 runs/finetune_bl4_step0
"""

from __future__ import annotations

import sys
from pathlib import Path

from blockdiff.config import load_config
from blockdiff.modeling.io import export_model
from blockdiff.training.builders import build_model


def main(run_dir: str, out_dir: str) -> None:
    cfg = load_config([Path(run_dir) / "config.yaml"])
    tokenizer, model = build_model(cfg, docs=None)  # the base decoder + mask token, as training starts from it
    export_model(model, tokenizer, cfg, Path(out_dir))
    print(f"untrained block diffuser written to {out_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
