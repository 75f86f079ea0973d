"""Evaluation: the NELBO bound on held-out text, as nats/token, perplexity and bits per byte.

``evaluate(path)`` loads a model directory (or a run directory holding ``model/``), rebuilds the held-out
split from the config it was trained with (optionally overridden, e.g. ``data.source=other.txt``) and
averages the per-token NELBO over the full ``t`` range ``[eps, 1]`` with a seeded generator. The held-out
batches come from ``heldout.held_out_split`` (the one loader every evaluation shares).
No Lightning here: a plain ``no_grad`` loop over batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer

from blockdiff.config import Config, load_config
from blockdiff.core.loss import bits_per_byte, block_diffusion_loss
from blockdiff.core.noise import make_schedule
from blockdiff.errors import MissingFileError, UsageError, require_divides
from blockdiff.evaluation.heldout import held_out_split
from blockdiff.modeling.model import SPEC_FILE, BlockDiffusionLM, read_json_file

Progress = Callable[[str, int, int], None]  # (stage, done, total): what a long evaluation is doing

__all__ = ["EvalResult", "LoadedModel", "load_model_dir", "evaluate_nelbo", "evaluate_held_out", "evaluate"]


@dataclass
class EvalResult:
    nll: float  # NELBO, nats/token
    ppl: float  # exp(nll): perplexity upper bound
    bpb: float  # bits per UTF-8 byte
    num_tokens: int  # predicted tokens the average is over
    block_length: int


@dataclass
class LoadedModel:
    model: BlockDiffusionLM
    tokenizer: object
    config: Config
    directory: Path


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json")
ADJUSTABLE_MODEL_KEYS = ("model.block_length",)  # the model.* overrides a trained model accepts


def load_model_dir(path: str | Path, overrides: list[str] = (), device: str | None = None) -> LoadedModel:
    """Load model, tokenizer and training config from a model or run directory; checks they agree.

    ``overrides`` are ``key=value`` changes of the training config (e.g. ``data.source=other.txt``). Of the
    ``model.*`` keys only ``model.block_length`` can change for a trained network: the model then evaluates
    and generates at that block length (as ``--block-length``); any other ``model.*`` key is refused.
    ``device``: ``cpu`` (default), ``cuda``, ``mps`` or ``auto``.
    """
    path = Path(path)
    if (path / "model" / SPEC_FILE).is_file():
        path = path / "model"
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
    config_path = path / "train_config.yaml"
    cfg = load_config([config_path] if config_path.is_file() else [], overrides)
    if "model.block_length" in keys:
        model = model.with_block_length(cfg.model.block_length)
    return LoadedModel(model.eval(), tokenizer, cfg, path)


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


@torch.no_grad()
def evaluate_nelbo(
    model: BlockDiffusionLM, batches, schedule, t_range, tokens_per_byte: float, seed: int = 0, max_batches: int | None = None,
    block_length: int | None = None, progress: Progress | None = None,
) -> EvalResult:
    """Token-weighted mean NELBO over ``batches`` of ``(b, n)`` token tensors, at the model's block length or
    at ``block_length`` (e.g. a block-length-mixture model evaluated at each length it was trained on).
    ``progress(stage, done, total)`` is told after every batch (``stage="held-out batches"``)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    nll_sum, num_tokens = 0.0, 0
    total = len(batches) if hasattr(batches, "__len__") else 0
    total = min(total, max_batches) if max_batches is not None else total
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        out = block_diffusion_loss(model, batch.to(device), schedule, t_range, True, generator, block_length=block_length)
        nll_sum += out.nll_sum.item()
        num_tokens += int(out.num_tokens)
        if progress is not None:
            progress("held-out batches", i + 1, total)
    if num_tokens == 0:
        raise UsageError("no held-out tokens to evaluate on")
    nll = nll_sum / num_tokens
    return EvalResult(nll, math.exp(nll), bits_per_byte(nll, tokens_per_byte), num_tokens, block_length or model.block_length)


def evaluate_held_out(
    loaded: LoadedModel, max_batches: int | None = None, seed: int = 0, block_length: int | None = None,
    progress: Progress | None = None,
):
    """``(EvalResult, corpus, loader)``: the NELBO of a loaded model on the held-out split of its config's corpus,
    with the packed corpus and the loader, for callers that evaluate more on the same tokens."""
    cfg = loaded.config
    if block_length is not None and (isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1):
        raise UsageError(f"--block-length must be an integer >= 1, got {block_length!r}")
    if block_length is not None:
        require_divides("--block-length", block_length, "the model's data.max_seq_len", cfg.data.max_seq_len)
    if progress is not None:
        progress("packing the held-out split", 0, 0)
    held = held_out_split(cfg.data, loaded.tokenizer)
    result = evaluate_nelbo(
        loaded.model, held.loader, make_schedule(cfg.noise.schedule), cfg.noise.eval_range, held.tokens_per_byte, seed,
        max_batches, block_length, progress,
    )
    return result, held.corpus, held.loader


def evaluate(
    path: str | Path, overrides: list[str] = (), max_batches: int | None = None, seed: int = 0, block_length: int | None = None,
    device: str | None = None, progress: Progress | None = None,
) -> EvalResult:
    """NELBO / PPL / BPB of a trained model on the held-out split of its (possibly overridden) corpus."""
    if progress is not None:
        progress("loading the model", 0, 0)
    return evaluate_held_out(load_model_dir(path, overrides, device), max_batches, seed, block_length, progress)[0]
