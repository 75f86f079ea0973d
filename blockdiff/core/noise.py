"""Noise schedules and the absorbing-state forward process (docs/design.md §2; uniform noise: ``uniform.py``).
Pure, no hidden state.

``alpha(t)`` is the probability that a token is still clean at time ``t`` (``alpha(0) = 1``,
``alpha(1) = 0``). The NELBO weight of a masked token at time ``t`` is ``-alpha'(t) / (1 - alpha(t))``
(``1/t`` for the log-linear schedule). Each *block* gets its own ``t``; ``sample_t`` draws them
stratified (antithetic) across the batch so the Monte-Carlo estimate of the loss has low variance.
Training may clip ``t ~ U[beta, omega]``; evaluation always uses the full range ``[eps, 1]``.
``add_noise(..., clean_prefix=1)`` never masks position 0: under the logit shift it is the conditioning
token, never scored, so noising it would only hide context from the network.

This module does not know about networks or attention masks.

Shape legend: ``b`` batch, ``n`` tokens, ``k`` number of blocks, ``l`` block length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blockdiff.errors import require_divides

__all__ = ["LogLinearSchedule", "CosineSchedule", "make_schedule", "sample_t", "add_noise", "NoisedBatch"]


class LogLinearSchedule:
    """``alpha(t) = 1 - t``; weight ``1/t``. The MDLM/BD3-LM default."""

    name = "loglinear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def alpha_rate(self, t: torch.Tensor) -> torch.Tensor:
        """``-alpha'(t)`` (the uniform-noise weight is built from it, ``uniform.py``)."""
        return torch.ones_like(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``-alpha'(t) / (1 - alpha(t))``."""
        return 1.0 / t


class CosineSchedule:
    """``alpha(t) = cos(pi t / 2)``; weight ``(pi/2) sin(pi t/2) / (1 - cos(pi t/2))``."""

    name = "cosine"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * t).clamp(min=0.0)

    def alpha_rate(self, t: torch.Tensor) -> torch.Tensor:
        """``-alpha'(t) = (pi/2) sin(pi t/2)``."""
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        half = 0.5 * math.pi * t
        return 0.5 * math.pi * torch.sin(half) / (1.0 - torch.cos(half))


_SCHEDULES = {"loglinear": LogLinearSchedule, "cosine": CosineSchedule}


def make_schedule(name) -> LogLinearSchedule | CosineSchedule:
    """Schedule object by name (``loglinear`` or ``cosine``; a ``config.Schedule`` member works too)."""
    try:
        return _SCHEDULES[getattr(name, "value", name)]()
    except KeyError:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(_SCHEDULES)}") from None


def sample_t(
    shape: tuple[int, ...],
    low: float,
    high: float,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``t ~ U[low, high]`` for every entry of ``shape`` (typically ``(b, k)``: one per block).

    With ``antithetic`` the ``m`` draws are stratified: one uniform in each of ``m`` equal strata of
    ``[0, 1)``, randomly assigned to entries, then mapped affinely to ``[low, high]``.
    ``low == high`` gives the constant ``t = low`` (``(1, 1)`` masks everything).
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1 for t, got low={low}, high={high}")
    m = math.prod(shape)
    u = torch.rand(m, generator=generator, device=device)  # (m,)
    if antithetic and m > 1:
        strata = torch.randperm(m, generator=generator, device=device)  # (m,)
        u = (strata + u) / m
    return (low + (high - low) * u).reshape(shape)


@dataclass
class NoisedBatch:
    """Output of the forward process."""

    xt: torch.Tensor  # (b, n) noisy tokens, mask_token_id where masked
    masked: torch.Tensor  # (b, n) bool, True where the token was replaced by the mask
    t: torch.Tensor  # (b, k) time of each block
    weight: torch.Tensor  # (b, n) NELBO weight of each token's block, -alpha'(t)/(1-alpha(t))
    alpha: torch.Tensor | None = None  # (b, n) alpha(t) per token (uniform noise only: its loss needs it)


def add_noise(
    x0: torch.Tensor,
    t: torch.Tensor,
    schedule,
    block_length: int,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    clean_prefix: int = 0,
) -> NoisedBatch:
    """Mask each token of block ``k`` independently with probability ``1 - alpha(t[:, k])``.

    The first ``clean_prefix`` positions are never masked (``model.num_unpredictable``: the conditioning
    token under the logit shift). The random draws do not depend on it, so every other position is noised
    exactly as without it."""
    b, n = x0.shape
    require_divides("block_length", block_length, "the sequence length n", n, ValueError)
    if t.shape != (b, n // block_length):
        raise ValueError(f"t must have shape (batch, num_blocks)=({b}, {n // block_length}), got {tuple(t.shape)}")
    t_tok = t.repeat_interleave(block_length, dim=1)  # (b, n)
    p_mask = 1.0 - schedule.alpha(t_tok)  # (b, n)
    masked = torch.rand(x0.shape, generator=generator, device=x0.device) < p_mask  # (b, n)
    masked[:, :clean_prefix] = False
    xt = torch.where(masked, torch.full_like(x0, mask_token_id), x0)  # (b, n)
    return NoisedBatch(xt=xt, masked=masked, t=t, weight=schedule.loss_weight(t_tok))
