"""The block-diffusion NELBO (DESIGN.md §2).

For block ``k`` with its own time ``t_k``:
``E_t [ -alpha'(t)/(1-alpha(t)) * sum_{l masked} -log p_theta(x^{k,l} | x_t^k, x^{<k}) ]``,
summed over blocks and normalised per token (divided by the number of predicted positions, masked
or not). Only masked positions contribute (SUBS: unmasked positions are copied, their loss is zero).
The returned ``nll`` is in nats/token; ``exp(nll)`` is the NELBO perplexity bound, and
``nll / ln 2 * tokens_per_byte`` the bits-per-byte bound.

This module composes the pure pieces (``noise.py``) with a network call; it holds no state.

Shape legend: ``b`` batch, ``n`` tokens, ``k`` blocks, ``m`` masked positions, ``v`` vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blockdiff.noise import add_noise, sample_t

__all__ = ["LossOutput", "nelbo", "block_diffusion_loss", "bits_per_byte"]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: NELBO in nats per token (what is optimised)
    nll_sum: torch.Tensor  # scalar: summed weighted -log p over masked tokens
    num_tokens: torch.Tensor  # scalar: predicted positions (the per-token denominator)
    num_masked: torch.Tensor  # scalar: positions that were masked and contributed


def nelbo(
    logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor
) -> LossOutput:
    """NELBO per token from logits at masked positions.

    ``logits`` may be ``(b, n, v)`` or already gathered to the masked-and-valid rows ``(m, v)``.
    """
    sel = masked & valid  # (b, n)
    rows = logits[sel] if logits.dim() == 3 else logits  # (m, v)
    nll = F.cross_entropy(rows.float(), x0[sel], reduction="none")  # (m,)
    nll_sum = (weight[sel] * nll).sum()
    num_tokens = valid.sum()
    return LossOutput(
        loss=nll_sum / num_tokens.clamp(min=1), nll_sum=nll_sum, num_tokens=num_tokens, num_masked=sel.sum()
    )


def block_diffusion_loss(
    model,
    x0: torch.Tensor,
    schedule,
    t_range: tuple[float, float],
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    block_length: int | None = None,
) -> LossOutput:
    """Noise ``x0`` with one ``t ~ U[t_range]`` per block (or the given ``t`` of shape ``(b, k)``), run
    the vectorised forward, and return the per-token NELBO. ``block_length`` overrides the model's."""
    b, n = x0.shape
    block_length = block_length or model.block_length
    if t is None:
        t = sample_t((b, n // block_length), *t_range, antithetic=antithetic, generator=generator, device=x0.device)
    noised = add_noise(x0, t, schedule, block_length, model.mask_token_id, generator=generator)
    valid = torch.ones_like(x0, dtype=torch.bool)  # (b, n)
    valid[:, : model.num_unpredictable] = False
    hidden = model.training_hidden(noised.xt, x0, block_length)  # (b, n, d)
    logits = model.logits(hidden[noised.masked & valid])  # (m, v)
    return nelbo(logits, x0, noised.masked, noised.weight, valid)


def bits_per_byte(nll_per_token: float, tokens_per_byte: float) -> float:
    """Convert nats/token to bits/byte, so models with different tokenizers compare."""
    return nll_per_token / math.log(2) * tokens_per_byte
