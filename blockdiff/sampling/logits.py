"""Turning logits into token choices: temperature, top-k, nucleus (top-p), seeded sampling.

``choose_tokens`` returns, for every position, a token drawn from the processed distribution and its
*confidence*: the model's own (untempered) probability of that token, so thresholds like ``tau`` mean
the same thing whatever the temperature. ``temperature == 0`` is greedy (argmax).

Shape legend: ``b`` batch, ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

import torch

__all__ = ["filter_logits", "choose_tokens"]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to ``-inf`` (the most likely token always survives)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (b, l, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (b, l, v)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop_sorted[..., 0] = False  # the most likely token always survives (a top_p that rounds to 0 in float32)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator=None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens (b, l), confidence (b, l), probs (b, l, v))`` — probs are the model's untempered ones.

    ``generator`` is one ``torch.Generator`` or a list with one per row; with a list only the ``rows``
    (bool (b,)) still denoising draw, so each row's random stream is independent of the batch.
    """
    probs = logits.float().softmax(-1)  # (b, l, v)
    if temperature == 0:
        tokens = probs.argmax(-1)
    else:
        dist = (filter_logits(logits.float(), top_k, top_p) / temperature).softmax(-1)  # (b, l, v)
        if isinstance(generator, list):
            tokens = probs.argmax(-1)  # rows that do not draw keep a placeholder (they have nothing to reveal)
            for i, g in enumerate(generator):
                if rows is None or rows[i]:
                    tokens[i] = torch.multinomial(dist[i], 1, generator=g).squeeze(-1)
        else:
            tokens = torch.multinomial(dist.flatten(0, -2), 1, generator=generator).view(dist.shape[:-1])
    confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)  # (b, l)
    return tokens, confidence, probs
