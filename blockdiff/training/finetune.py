"""Fine-tuning recipe: a pretrained decoder -> a block diffuser.

``blockdiff finetune`` is ``train(finetune_config(base, paths, overrides))``: training with the fine-tuning
defaults below (``FINETUNE_DEFAULTS``, also shipped as ``configs/finetune_smollm2.yaml``): the offline
SmolLM2-135M-Instruct, block length 4 with the logit shift, a short block-length curriculum from the AR end
(1 -> 2 -> 4), a small learning rate and no EMA. Any key can be overridden as usual.
"""

from __future__ import annotations

from blockdiff.config import Config, load_config

__all__ = ["FINETUNE_DEFAULTS", "finetune_config"]

FINETUNE_DEFAULTS = {
    "model": {"pretrained": "smollm2", "block_length": 4, "logit_shift": None},
    "data": {"max_seq_len": 128, "batch_size": 8, "val_fraction": 0.02},
    "optim": {"lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 20, "ema_decay": 0.0, "min_lr_ratio": 0.1},
    "trainer": {
        "max_steps": 300, "max_minutes": 45.0, "val_every_n_steps": 100, "limit_val_batches": 8,
        "checkpoint_every_n_steps": 50, "out_dir": "runs/finetune",
    },
    "curriculum": {"block_length_fraction": 0.2},
    "sample": {"temperature": 0.8, "prompt": "ROMEO."},
}


def finetune_config(base: str | None = None, paths: list[str] = (), overrides: list[str] = ()) -> Config:
    """The fine-tuning config: defaults, then files, then overrides; ``base`` sets ``model.pretrained``."""
    overrides = list(overrides)
    if base is not None:
        overrides.insert(0, f"model.pretrained={base}")
    return load_config(paths, overrides, defaults=FINETUNE_DEFAULTS)
