"""The certainty-forcing term of dParallel (Chen et al. 2025, "dParallel: Learnable Parallel Decoding for dLLMs"):
make a model that is already right also sure, so a confidence-threshold sampler reveals more tokens per forward.

At every noised position the model is scored on, take the entropy of its tempered prediction
``softmax(logits / temperature)``, but only where its argmax is the target (``only_correct``): sharpening a wrong
prediction would teach confident mistakes. The term is the mean of those entropies over the positions counted (0 when
none is). ``train/loss = NELBO + certainty.weight * term``; the NELBO itself is unchanged and is what ``val/nll`` and
``blockdiff eval`` report (docs/design.md §3.2): the term is not part of any likelihood bound.

Pure functions of logits and targets, no state. Shape legend: ``m`` scored positions, ``v`` vocab.
"""

from __future__ import annotations

import torch

__all__ = ["certainty_entropies", "certainty_term"]


def certainty_entropies(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, only_correct: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entropies (m,), counted (m,) bool)``: the entropy (nats) of ``softmax(logits / temperature)`` per row of
    ``logits`` (m, v), zero where the row is not counted; a row counts where its argmax is ``targets`` (m,), or
    everywhere without ``only_correct``. ``-inf`` logits (the mask token under SUBS) carry no mass."""
    logp = (logits.float() / temperature).log_softmax(-1)  # (m, v)
    p = logp.exp()
    h = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # (m,)
    counted = logits.argmax(-1) == targets if only_correct else torch.ones_like(targets, dtype=torch.bool)
    return torch.where(counted, h, 0.0), counted


def certainty_term(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, only_correct: bool = True
) -> torch.Tensor:
    """Scalar: the mean entropy over the counted rows (``certainty_entropies``), 0 when no row counts; differentiable
    through ``logits``."""
    h, counted = certainty_entropies(logits, targets, temperature, only_correct)
    return h.sum() / counted.sum().clamp(min=1)
