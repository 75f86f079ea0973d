"""Model I/O: the one place a blockdiff model directory is loaded (``load_model_dir``) and written (``export_model``).

A model directory is what ``BlockDiffusionLM.save_pretrained`` writes (weights, ``config.json``, ``blockdiff.json``,
generation defaults) plus the tokenizer and ``train_config.yaml``, the config it was trained with. A run directory
(``rundir.RunDir``) holds one as ``model/``; both are accepted wherever a model is read.

``load_model_dir`` reads the training config only when it is asked for (``LoadedModel.config``, or ``overrides``):
sampling a model needs the network and the tokenizer, not the run's data and trainer settings. No Lightning and no
``datasets`` here (docs/design.md, "Layers").
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from transformers import AutoTokenizer

from blockdiff.config import Config, load_config, to_yaml
from blockdiff.errors import MissingFileError, StorageError, UsageError
from blockdiff.files import read_json_file, write_failure_reason
from blockdiff.modeling.lean import pack_linears, use_lean
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.model_card import write_model_card
from blockdiff.modeling.rundir import (
    TRAIN_CONFIG,
    check_replaceable,
    export_target,
    model_dir_of,
    replace_dir,
    staging_dir,
    write_export_manifest,
)

__all__ = [
    "LoadedModel", "load_model_dir", "read_train_config", "export_model", "TOKENIZER_JSON_FILES",
    "ADJUSTABLE_MODEL_KEYS",
]

TOKENIZER_JSON_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
)
ADJUSTABLE_MODEL_KEYS = ("model.block_length",)  # the model.* overrides a trained model accepts


@dataclass
class LoadedModel:
    """A loaded model directory: the network (in eval mode), its tokenizer, and where they came from."""

    model: BlockDiffusionLM
    tokenizer: object
    directory: Path
    overrides: tuple[str, ...] = ()  # key=value changes of the training config

    @cached_property
    def config(self) -> Config:
        """The training config saved with the model, with ``overrides`` applied; read (and checked) on first use."""
        return read_train_config(self.directory, self.overrides)


def read_train_config(model_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config a model was trained with (its ``train_config.yaml``; the defaults if it has none), plus
    ``overrides``."""
    config_path = Path(model_dir) / TRAIN_CONFIG
    return load_config([config_path] if config_path.is_file() else [], list(overrides))


def load_model_dir(
    path: str | Path, overrides: list[str] = (), device: str | None = None, lean: bool | None = None
) -> LoadedModel:
    """Load model and tokenizer from a model or run directory (or a hub id: ``hub.local_model_dir``); checks they
    agree.

    ``overrides`` are ``key=value`` changes of the training config (e.g. ``data.source=other.txt``); with overrides
    the config is read and checked here, otherwise on first use of ``LoadedModel.config``. Of the ``model.*`` keys
    only ``model.block_length`` can change for a trained network: the model then evaluates and generates at that
    block length (as ``--block-length``); any other ``model.*`` key is refused.
    ``device``: ``cpu`` (default), ``cuda``, ``mps`` or ``auto``. ``lean``: run inference on oneDNN-packed weights
    (``lean.py``; ``None``: whenever that can pay, i.e. fp32 on CPU; ``False`` for a model that will be trained).
    """
    from blockdiff.modeling.hub import local_model_dir

    path = model_dir_of(local_model_dir(path))
    if not path.exists():
        raise MissingFileError(f"{path} does not exist; pass a run directory or its model/ folder")
    keys = [o.split("=", 1)[0].strip().lstrip("+~") for o in overrides]
    fixed = [k for k in keys if k.startswith("model.") and k not in ADJUSTABLE_MODEL_KEYS]
    if fixed:
        raise UsageError(
            f"{', '.join(fixed)}: a trained model's network is fixed, so these model.* keys cannot be overridden "
            "(model.block_length=N can: the model then runs at that block length, like --block-length N)"
        )
    model = BlockDiffusionLM.from_pretrained(path, device=device)
    tokenizer = _load_tokenizer(path)
    if len(tokenizer) > model.vocab_size:  # fewer is fine: some decoders pad their embedding matrix
        raise UsageError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model has {model.vocab_size} embedding rows: "
            "the checkpoint comes from a different vocabulary"
        )
    if tokenizer.mask_token_id != model.mask_token_id:
        raise UsageError(
            f"the tokenizer's mask token id {tokenizer.mask_token_id} differs from the model's {model.mask_token_id}"
        )
    loaded = LoadedModel(model.eval(), tokenizer, path, tuple(overrides))
    if overrides:
        cfg = loaded.config  # bad overrides fail here, before any work
        if "model.block_length" in keys:
            loaded.model = model.with_block_length(cfg.model.block_length).eval()
    if use_lean(loaded.model, lean):
        pack_linears(loaded.model)
    return loaded


def _load_tokenizer(path: Path):
    """The tokenizer saved in ``path``; a damaged file is a user error naming it."""
    for name in TOKENIZER_JSON_FILES:
        if (path / name).is_file():
            read_json_file(path / name)  # bad JSON / UTF-8: the error names the file
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - the files parse as JSON, so any failure here is their content
        raise UsageError(
            f"could not load the tokenizer saved in {path} ({type(err).__name__}: {err}); its files are damaged or "
            "were written by an incompatible tokenizers version: copy them again from the run's model/ folder"
        ) from None


def export_model(
    model: BlockDiffusionLM, tokenizer, cfg: Config, model_dir: Path, overwrite: bool = True,
    metrics: dict | None = None,
) -> None:
    """Write weights, tokenizer, the training config and the model card (``README.md``, with the held-out
    ``metrics`` when given: ``val/nll``, ``val/ppl``, ``val/bpb``, ``step``) to ``model_dir``: into a staging folder
    next to it, which replaces ``model_dir`` only when complete. An existing ``model_dir`` is replaced only if it is
    a blockdiff model export (and ``overwrite``); a failed write (disk full) leaves ``model_dir`` as it was and no
    staging folder. The export lists its files in ``export.json`` (what a later ``--overwrite`` may delete: nothing
    else in the folder); a symbolic link ``model_dir`` is written through (``rundir.export_target``)."""
    from blockdiff.modeling.pretrained import merge_lora

    model_dir = export_target(model_dir)
    check_replaceable(model_dir, overwrite)
    tmp = staging_dir(model_dir)
    try:
        export = BlockDiffusionLM(merge_lora(model.backbone), model.spec)  # LoRA (if any) folded in
        export.generation_config = model.generation_config
        export.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAIN_CONFIG).write_text(to_yaml(cfg))
        write_model_card(tmp, export, cfg, metrics, _card_name(model_dir))
        write_export_manifest(tmp)
        replace_dir(tmp, model_dir, overwrite)
    except Exception as err:
        reason = write_failure_reason(err)
        if reason is None:
            raise
        raise StorageError(
            errno.ENOSPC,
            f"could not write the model to {model_dir} ({reason}); nothing under {model_dir} was changed. "
            "Free some space and export again (`blockdiff export RUN OUT`)"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _card_name(model_dir: Path) -> str:
    """What the model card's snippets call the folder: a run's ``model/`` by the run's name."""
    model_dir = Path(model_dir).resolve()
    return model_dir.parent.name if model_dir.name == "model" else model_dir.name
