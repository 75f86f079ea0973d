"""Checkpoint -> model directory: ``blockdiff export CKPT|RUN_DIR OUT``.

``export_checkpoint`` rebuilds the network from a run's ``config.yaml`` (``builders.build_model``), takes the weights
from a Lightning checkpoint (``torch.load(weights_only=True)``, so no pickled code can run) and writes a model
directory through the one export path, ``modeling.io.export_model``.
"""

from __future__ import annotations

from pathlib import Path

from blockdiff.config import load_config, path_problem
from blockdiff.data.corpus import load_documents
from blockdiff.errors import MissingFileError, UsageError
from blockdiff.modeling.io import export_model
from blockdiff.modeling.model_card import held_out_metrics
from blockdiff.modeling.rundir import RunDir, check_replaceable
from blockdiff.modeling.tokenizer import load_tokenizer
from blockdiff.training.builders import build_model
from blockdiff.training.checkpoint import load_checkpoint

__all__ = ["export_checkpoint"]


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, config_path: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write a model directory from a Lightning checkpoint of a blockdiff run; returns ``out_dir``.

    The network and tokenizer are rebuilt from the run's ``config.yaml`` (next to ``checkpoints/``), the
    weights come from the checkpoint (``weights_only=True``); LoRA adapters are merged. A non-empty
    ``out_dir`` is refused unless it is a blockdiff model export and ``overwrite`` is set: nothing that is
    not a previous export is ever deleted.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite)  # before any work
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():  # a run directory
        checkpoint = RunDir(checkpoint).last_checkpoint
    problem = path_problem(checkpoint)
    if problem is not None:
        raise MissingFileError(f"checkpoint {checkpoint} {problem}; pass a .ckpt file or a run directory")
    run = RunDir(checkpoint.parent.parent)  # RUN/checkpoints/x.ckpt
    config_path = Path(config_path) if config_path else run.config
    problem = path_problem(config_path)
    if problem is not None:
        raise MissingFileError(f"the run config {config_path} {problem}; pass --run-config with the run's config.yaml")
    cfg = load_config([config_path])
    state = load_checkpoint(checkpoint).get("state_dict")  # weights_only; clear errors naming the file
    if not isinstance(state, dict):
        raise UsageError(f"checkpoint {checkpoint} holds no state_dict; is it a blockdiff Lightning checkpoint?")
    tokenizer = load_tokenizer(str(run.tokenizer)) if run.tokenizer.is_dir() else None
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
    export_model(model, tokenizer, cfg, out_dir, overwrite, metrics=held_out_metrics(run.root))
    return out_dir
