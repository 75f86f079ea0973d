"""Uniform-state (random-token) noise inside each block: the forward process, its continuous-time NELBO and the
reverse step (docs/design.md §3.1, where the loss is derived). Pure functions, no hidden state.

The forward process replaces a token, with probability ``1 - alpha(t)``, by a token drawn uniformly from the ``K``
real classes (every id but the mask token, which uniform noise never uses; the draw may give the token back):
``q_t(. | x) = alpha x + (1 - alpha) / K``. Unlike absorbing noise, a noisy block does not say which positions
were changed, so every position is scored, and the sampler may re-write any position of the block.

With ``xbar = (1 - alpha) + K alpha onehot(x)``, ``xbar_theta = (1 - alpha) + K alpha p_theta`` and ``i = z_t``,
the NELBO of one token at time ``t`` is (UDLM, Schiff et al. 2024; DUO, Sahoo et al. 2025)

    (-alpha'(t) / (K alpha(t))) * sum_{y != i} [ r_theta(y) - r(y) - r(y) log(r_theta(y) / r(y)) ],
    r(y) = xbar_y / xbar_i,  r_theta(y) = xbar_theta_y / xbar_theta_i,

a Bregman divergence between the true and the model's reverse rates: >= 0, and 0 exactly when ``p_theta = x``.
``uniform_token_nelbo`` computes it stably (``log1p`` / ``expm1``) from logits.

This module does not know about networks or attention masks.

Shape legend: ``b`` batch, ``n`` tokens, ``k`` blocks, ``m`` scored rows, ``v`` vocab (``K = v - 1`` classes).
"""

from __future__ import annotations

import torch

from blockdiff.core.noise import NoisedBatch
from blockdiff.errors import require_divides

__all__ = ["random_tokens", "add_uniform_noise", "uniform_token_nelbo", "uniform_posterior"]


def random_tokens(shape, vocab_size: int, mask_token_id: int, generator=None, device=None) -> torch.Tensor:
    """Tokens drawn uniformly from the ``vocab_size - 1`` ids that are not the mask token: ``shape`` long tensor."""
    r = torch.randint(0, vocab_size - 1, shape, generator=generator, device=device)
    return r + (r >= mask_token_id).long()  # skip the mask id


def add_uniform_noise(
    x0: torch.Tensor,
    t: torch.Tensor,
    schedule,
    block_length: int,
    vocab_size: int,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    clean_prefix: int = 0,
) -> NoisedBatch:
    """Resample each token of block ``k`` with probability ``1 - alpha(t[:, k])`` uniformly over the ``K`` classes.

    Every position but the first ``clean_prefix`` is scored (``masked`` is True there: under uniform noise it means
    "scored", since a noisy block does not say which tokens changed); ``weight`` is ``-alpha'(t) / (K alpha(t))``
    and ``alpha`` the per-token ``alpha(t)`` the loss needs."""
    b, n = x0.shape
    require_divides("block_length", block_length, "the sequence length n", n, ValueError)
    if t.shape != (b, n // block_length):
        raise ValueError(f"t must have shape (batch, num_blocks)=({b}, {n // block_length}), got {tuple(t.shape)}")
    t_tok = t.repeat_interleave(block_length, dim=1)  # (b, n)
    alpha = schedule.alpha(t_tok)  # (b, n)
    resampled = torch.rand(x0.shape, generator=generator, device=x0.device) < 1.0 - alpha  # (b, n)
    resampled[:, :clean_prefix] = False
    noise = random_tokens(x0.shape, vocab_size, mask_token_id, generator, x0.device)  # (b, n)
    xt = torch.where(resampled, noise, x0)  # (b, n)
    scored = torch.ones_like(resampled)
    scored[:, :clean_prefix] = False
    k = vocab_size - 1
    weight = schedule.alpha_rate(t_tok) / (k * alpha.clamp(min=1e-12))  # (b, n): -alpha'/(K alpha)
    return NoisedBatch(xt=xt, masked=scored, t=t, weight=weight, alpha=alpha)


def uniform_token_nelbo(
    logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, alpha: torch.Tensor, mask_token_id: int
) -> torch.Tensor:
    """The bracket of the uniform NELBO per row, *without* the weight ``-alpha'/(K alpha)``: ``(m,)``.

    ``logits`` (m, v) (the mask column is ignored), ``x0``/``xt``/``alpha`` (m,). Ratios are taken after dividing
    ``xbar`` by ``1 - alpha`` (``c = K alpha / (1 - alpha)``), so ``log r`` is a difference of ``log1p`` terms and
    each summand ``r (e^u - 1 - u)`` with ``u = log(r_theta / r)`` keeps its precision when ``alpha`` is small."""
    v = logits.shape[-1]
    k = v - 1
    logits = logits.float().clone()
    logits[:, mask_token_id] = float("-inf")
    p = logits.softmax(-1)  # (m, v); p[:, mask] = 0
    c = (k * alpha / (1.0 - alpha).clamp(min=1e-12))[:, None]  # (m, 1)
    onehot = torch.zeros_like(p).scatter_(-1, x0[:, None], 1.0)  # (m, v)
    log_xbar = torch.log1p(c * onehot)  # (m, v): log(xbar / (1 - alpha))
    log_xbar_theta = torch.log1p(c * p)  # (m, v)
    at_i = xt[:, None]
    log_r = log_xbar - log_xbar.gather(-1, at_i)  # (m, v)
    u = (log_xbar_theta - log_xbar_theta.gather(-1, at_i)) - log_r  # (m, v): log(r_theta / r)
    terms = log_r.exp() * (torch.expm1(u) - u)  # (m, v); 0 at y = i
    terms[:, mask_token_id] = 0.0  # not a class of the uniform process
    return terms.sum(-1)


def uniform_posterior(
    probs: torch.Tensor, zt: torch.Tensor, alpha_t: float, alpha_s: float, mask_token_id: int
) -> torch.Tensor:
    """The reverse step ``q(z_s | z_t, x = p_theta)`` for ``s < t`` (``alpha_s > alpha_t``): ``(m, v)``.

    ``q(z_s = j | z_t = i, x) ∝ [a δ_ij + (1 - a) / K] [alpha_s x_j + (1 - alpha_s) / K]`` with
    ``a = alpha_t / alpha_s``, the clean ``x`` replaced by the model's distribution ``probs`` (m, v) (UDLM's
    reverse process). ``alpha_s = 1`` gives the last step (a clean token); ``alpha_t = 0`` the first (the prior
    is uniform, so it is ``alpha_s p + (1 - alpha_s) / K``)."""
    v = probs.shape[-1]
    k = v - 1
    a = alpha_t / alpha_s
    prior = alpha_s * probs + (1.0 - alpha_s) / k  # (m, v)
    lik = torch.full_like(probs, (1.0 - a) / k).scatter_add_(
        -1, zt[:, None], torch.full((len(zt), 1), a, device=probs.device, dtype=probs.dtype)
    )  # (m, v)
    post = prior * lik
    post[:, mask_token_id] = 0.0
    return post / post.sum(-1, keepdim=True)
