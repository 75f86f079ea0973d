"""AR scoring of text: the nats of tokens given their prefix under an autoregressive scorer, defined once.

A scorer is any ``next_token_logits(ids (b, n)) -> (b, n - 1, v)`` function whose row ``i`` predicts token
``i + 1``. Two are built here: ``causal_lm_logits`` for a plain Hugging Face causal LM (a judge, a base
decoder, a block diffuser's backbone), and ``block_diffusion_ar_logits`` for a block diffuser run at block
length 1 with every position masked (``t = 1``), where the NELBO *is* the causal cross-entropy
(docs/design.md §7.1). On top of a scorer:

* ``scored_nll`` — summed nats of ``ids[:, start:]`` (each token given everything before it);
* ``continuation_nll`` — ``(nats, tokens)`` of a continuation after its prompt, in one window or, past a
  context limit, in sliding windows (every token scored once, with the most left context that fits).

Every caller scores through these: the judge (``judge.py``: held-out windows and judged samples), the sweep
runner (generated text under a reference run) and ``experiments/bench_generation.py``.
``unigram_entropy`` (the repetition check reported next to a score) lives here too. No Lightning.

Shape legend: ``b`` batch, ``n`` tokens, ``v`` vocab.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "NextTokenLogits", "causal_lm_logits", "block_diffusion_ar_logits", "scored_nll", "continuation_nll",
    "unigram_entropy",
]

NextTokenLogits = Callable[[torch.Tensor], torch.Tensor]  # (b, n) ids -> (b, n - 1, v) float logits


def causal_lm_logits(model, suppress_token_id: int | None = None) -> NextTokenLogits:
    """A Hugging Face causal LM as a scorer (no cache); ``suppress_token_id`` gets ``-inf`` (e.g. the mask token)."""

    def next_token_logits(ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (b, n-1, v)
        if suppress_token_id is not None:
            logits[..., suppress_token_id] = float("-inf")
        return logits

    return next_token_logits


def block_diffusion_ar_logits(model) -> NextTokenLogits:
    """A block diffuser at block length 1, every position masked: its exact AR next-token logits."""
    model = model.with_block_length(1)

    def next_token_logits(ids: torch.Tensor) -> torch.Tensor:
        xt = torch.full_like(ids, model.mask_token_id)  # (b, n)
        return model(xt, ids, 1)[:, 1:]  # (b, n-1, v): row i predicts token i + 1

    return next_token_logits


def scored_nll(next_token_logits: NextTokenLogits, ids: torch.Tensor, start: int = 1) -> torch.Tensor:
    """Summed nats (a scalar tensor) of ``ids[:, start:]``, each token given all tokens before it."""
    if start < 1:
        raise ValueError(f"start must be >= 1 (token 0 has no prefix to be predicted from), got {start}")
    logits = next_token_logits(ids)[:, start - 1 :]  # (b, n-start, v)
    return F.cross_entropy(logits.flatten(0, 1), ids[:, start:].flatten(), reduction="sum")


@torch.no_grad()
def continuation_nll(
    next_token_logits: NextTokenLogits, head: list[int], tail: list[int], context: int | None = None,
    stride: int | None = None, device=None,
) -> tuple[float, int]:
    """``(summed nats, len(tail))`` of ``tail`` after ``head`` (a non-empty prompt, BOS included where used).

    With ``context`` (and ``stride``, default ``context // 2``), a sequence longer than ``context`` is scored in
    windows of at most ``context`` tokens, ``stride`` new targets each: every token once, with as much left
    context as fits."""
    if not tail:
        return 0.0, 0
    seq = torch.tensor(head + tail, device=device)  # (n,)
    if context is None or len(seq) <= context:
        return scored_nll(next_token_logits, seq[None], len(head)).item(), len(tail)
    stride = stride or context // 2
    total, scored = 0.0, len(head)  # the next target position to score
    while scored < len(seq):
        end = min(len(seq), scored + stride)
        begin = max(0, end - context)
        total += scored_nll(next_token_logits, seq[None, begin:end], scored - begin).item()
        scored = end
    return total, len(tail)


def unigram_entropy(tokens: list[int], base: float = math.e) -> float:
    """Entropy of the token frequencies of one sample, in nats (``base=2``: bits); 0 for an empty sample."""
    if not tokens:
        return 0.0
    counts = Counter(tokens)
    total = len(tokens)
    return -sum(c / total * math.log(c / total, base) for c in counts.values())


def distinct_ngrams(tokens: list[int], n: int = 2) -> float:
    """Distinct n-grams / all n-grams of one sample (1.0: no n-gram repeats; repetition lowers it); 1.0 for a sample
    shorter than ``n`` (nothing can repeat)."""
    if n < 1:
        raise ValueError(f"distinct_ngrams: n must be >= 1, got {n}")
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0
