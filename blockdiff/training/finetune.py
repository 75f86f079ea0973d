"""Fine-tuning recipe: a pretrained decoder -> a block diffuser, and checkpoint -> model directory export.

``finetune(base, overrides)`` is ``train`` with the fine-tuning defaults below (``FINETUNE_DEFAULTS``,
also shipped as ``configs/finetune_smollm2.yaml``): the offline SmolLM2-135M-Instruct, block length 4
with the logit shift, a short block-length curriculum from the AR end (1 -> 2 -> 4), a small learning
rate and no EMA. Any key can be overridden as usual.

``export_checkpoint(ckpt, out_dir)`` rebuilds the network from a run's ``config.yaml`` and writes a
Hugging Face directory (safetensors + ``blockdiff.json`` + tokenizer) from a Lightning checkpoint,
loading it with ``torch.load(weights_only=True)`` so no pickled code can run.
"""

from __future__ import annotations

from pathlib import Path

from blockdiff.config import Config, load_config, path_problem
from blockdiff.errors import MissingFileError, UsageError

__all__ = ["FINETUNE_DEFAULTS", "finetune_config", "export_checkpoint"]

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


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, config_path: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write a model directory from a Lightning checkpoint of a blockdiff run; returns ``out_dir``.

    The network and tokenizer are rebuilt from the run's ``config.yaml`` (next to ``checkpoints/``), the
    weights come from the checkpoint (``weights_only=True``); LoRA adapters are merged. A non-empty
    ``out_dir`` is refused unless it is a blockdiff model export and ``overwrite`` is set: nothing that is
    not a previous export is ever deleted.
    """
    from blockdiff.training.checkpoint import LAST, load_checkpoint
    from blockdiff.data.corpus import load_documents
    from blockdiff.modeling.rundir import CHECKPOINTS, CONFIG, TOKENIZER, check_replaceable
    from blockdiff.modeling.tokenizer import load_tokenizer
    from blockdiff.training.train import build_model, export_model

    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite)  # before any work
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():  # a run directory
        checkpoint = checkpoint / CHECKPOINTS / LAST
    problem = path_problem(checkpoint)
    if problem is not None:
        raise MissingFileError(f"checkpoint {checkpoint} {problem}; pass a .ckpt file or a run directory")
    config_path = Path(config_path) if config_path else checkpoint.parent.parent / CONFIG
    problem = path_problem(config_path)
    if problem is not None:
        raise MissingFileError(f"the run config {config_path} {problem}; pass --run-config with the run's config.yaml")
    cfg = load_config([config_path])
    state = load_checkpoint(checkpoint).get("state_dict")  # weights_only; clear errors naming the file
    if not isinstance(state, dict):
        raise UsageError(f"checkpoint {checkpoint} holds no state_dict; is it a blockdiff Lightning checkpoint?")
    saved_tokenizer = checkpoint.parent.parent / TOKENIZER
    tokenizer = load_tokenizer(str(saved_tokenizer)) if saved_tokenizer.is_dir() else None
    from_scratch = cfg.model.pretrained is None and cfg.model.init_from is None
    docs = load_documents(cfg.data) if from_scratch and tokenizer is None else None  # only to re-train a BPE
    tokenizer, model = build_model(cfg, docs, tokenizer)
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise UsageError(
            f"checkpoint {checkpoint} does not match the network of {config_path}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    export_model(model, tokenizer, cfg, out_dir, overwrite)
    return out_dir

