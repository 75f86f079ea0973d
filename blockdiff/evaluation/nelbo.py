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

from blockdiff.core.loss import bits_per_byte, block_diffusion_loss
from blockdiff.core.noise import make_schedule
from blockdiff.errors import UsageError, require_divides
from blockdiff.evaluation.heldout import held_out_split
from blockdiff.modeling.io import LoadedModel, load_model_dir
from blockdiff.modeling.model import BlockDiffusionLM

Progress = Callable[[str, int, int], None]  # (stage, done, total): what a long evaluation is doing

__all__ = ["EvalResult", "evaluate_nelbo", "evaluate_held_out", "evaluate"]


@dataclass
class EvalResult:
    nll: float  # NELBO, nats/token
    ppl: float  # exp(nll): perplexity upper bound
    bpb: float  # bits per UTF-8 byte
    num_tokens: int  # predicted tokens the average is over
    block_length: int
    per_position: list[float] | None = None  # NELBO (nats/token) at each in-block position 0..L'-1 (by_position)


@torch.no_grad()
def evaluate_nelbo(
    model: BlockDiffusionLM,
    batches,
    schedule,
    t_range,
    tokens_per_byte: float,
    seed: int = 0,
    max_batches: int | None = None,
    block_length: int | None = None,
    progress: Progress | None = None,
    by_position: bool = False,
) -> EvalResult:
    """Token-weighted mean NELBO over ``batches`` of ``(b, n)`` token tensors, at the model's block length or
    at ``block_length`` (e.g. a block-length-mixture model evaluated at each length it was trained on).
    ``progress(stage, done, total)`` is told after every batch (``stage="held-out batches"``). ``by_position``
    also fills ``per_position``: the same estimate split by position inside the block (same noise draws)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    nll_sum, num_tokens = 0.0, 0
    position_sums = position_tokens = 0
    total = len(batches) if hasattr(batches, "__len__") else 0
    total = min(total, max_batches) if max_batches is not None else total
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        out = block_diffusion_loss(
            model, batch.to(device), schedule, t_range, True, generator, block_length=block_length,
            reduction="position" if by_position else "token",
        )
        nll_sum += out.nll_sum.item()
        num_tokens += int(out.num_tokens)
        if by_position:
            position_sums, position_tokens = position_sums + out.per_position, position_tokens + out.position_tokens
        if progress is not None:
            progress("held-out batches", i + 1, total)
    if num_tokens == 0:
        raise UsageError("no held-out tokens to evaluate on")
    nll = nll_sum / num_tokens
    per_position = (position_sums / position_tokens.clamp(min=1)).tolist() if by_position else None
    return EvalResult(
        nll, math.exp(nll), bits_per_byte(nll, tokens_per_byte), num_tokens, block_length or model.block_length,
        per_position,
    )


def evaluate_held_out(
    loaded: LoadedModel,
    max_batches: int | None = None,
    seed: int = 0,
    block_length: int | None = None,
    progress: Progress | None = None,
    by_position: bool = False,
):
    """``(EvalResult, corpus, loader)``: the NELBO of a loaded model on the held-out split of its config's corpus,
    with the packed corpus and the loader, for callers that evaluate more on the same tokens."""
    cfg = loaded.config
    if block_length is not None and (
        isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1
    ):
        raise UsageError(f"--block-length must be an integer >= 1, got {block_length!r}")
    if block_length is not None:
        require_divides("--block-length", block_length, "the model's data.max_seq_len", cfg.data.max_seq_len)
    if progress is not None:
        progress("packing the held-out split", 0, 0)
    held = held_out_split(cfg.data, loaded.tokenizer)
    result = evaluate_nelbo(
        loaded.model,
        held.loader,
        make_schedule(cfg.noise.schedule),
        cfg.noise.eval_range,
        held.tokens_per_byte,
        seed,
        max_batches,
        block_length,
        progress,
        by_position,
    )
    return result, held.corpus, held.loader


def evaluate(
    path: str | Path,
    overrides: list[str] = (),
    max_batches: int | None = None,
    seed: int = 0,
    block_length: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """NELBO / PPL / BPB of a trained model on the held-out split of its (possibly overridden) corpus."""
    if progress is not None:
        progress("loading the model", 0, 0)
    return evaluate_held_out(load_model_dir(path, overrides, device), max_batches, seed, block_length, progress)[0]
