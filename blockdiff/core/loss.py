"""The block-diffusion NELBO (docs/design.md §3).

For block ``k`` with its own time ``t_k``:
``E_t [ -alpha'(t)/(1-alpha(t)) * sum_{l masked} -log p_theta(x^{k,l} | x_t^k, x^{<k}) ]``,
summed over blocks and normalised per token (divided by the number of predicted positions, masked
or not). Only masked positions contribute (SUBS: unmasked positions are copied, their loss is zero).
The returned ``nll`` is in nats/token; ``exp(nll)`` is the NELBO perplexity bound, and
``nll / ln 2 * tokens_per_byte`` the bits-per-byte bound.

``block_diffusion_loss(..., reduction="block")`` also returns the per-block estimates ``(b, k)`` (nats per
token of each block) the clip search measures the variance of (``clip_search.py``); ``reduction="position"`` the
sums and counts per in-block position ``(l,)`` (does the bound get worse later in a block? ``blockdiff plot``):
one NELBO, three reductions.
Under the logit shift position 0 is the conditioning token: never scored, so never noised either.

``mixture_loss`` trains one network on several block lengths at once (each sequence draws its own).

Under uniform (random-token) noise (``model.spec.noise_kind == "uniform"``, ``uniform.py``) every position is
scored and the per-token term is the uniform-state NELBO (docs/design.md §3.1) instead of the weighted
cross-entropy; the reductions, the per-token normalisation and the mixture are the same.

This module composes the pure pieces (``noise.py``) with a network call; it holds no state.

Shape legend: ``b`` batch, ``n`` tokens, ``k`` blocks, ``m`` masked positions, ``v`` vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from blockdiff.core.certainty import certainty_term
from blockdiff.core.noise import add_noise, sample_t
from blockdiff.core.uniform import add_uniform_noise, uniform_token_nelbo

__all__ = [
    "LossOutput", "masked_nelbo", "nelbo", "weighted_sum", "block_diffusion_loss", "draw_block_lengths",
    "mixture_loss", "bits_per_byte",
]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: NELBO in nats per token (what is optimised)
    nll_sum: torch.Tensor  # scalar: summed weighted -log p over masked tokens
    num_tokens: torch.Tensor  # scalar: predicted positions (the per-token denominator)
    num_masked: torch.Tensor  # scalar: positions that were masked and contributed
    block_lengths: torch.Tensor | None = None  # (b,) block length each sequence drew (mixtures only)
    per_block: torch.Tensor | None = None  # (b, k) nats per token of each block (reduction="block" only)
    per_position: torch.Tensor | None = None  # (l,) summed weighted -log p at each in-block position ("position")
    position_tokens: torch.Tensor | None = None  # (l,) predicted positions at each in-block position ("position")
    certainty: torch.Tensor | None = None  # scalar: the certainty-forcing term (``certainty.py``), when asked for


def masked_nelbo(
    logits: torch.Tensor | None, x0: torch.Tensor, sel: torch.Tensor, weight: torch.Tensor,
    terms: torch.Tensor | None = None,
) -> torch.Tensor:
    """The NELBO of each position (b, n) (docs/design.md §3): ``weight * -log p(x0)`` at the scored positions ``sel``
    (b, n), 0 elsewhere; its sum over a row is that row's NELBO in nats. The one home of this arithmetic: the training
    loss (``nelbo``), the lm-eval continuation ELBO (``evaluation/continuation.py``) and the beam score
    (``sampling/beams.py``) all call it.

    ``logits``: the rows at ``sel``, ``(m, v)``, or all of them ``(b, n, v)``; ``terms`` (m,): per-row terms computed
    elsewhere (uniform noise, ``uniform.uniform_token_nelbo``) instead of the cross-entropy of ``logits``."""
    if terms is None:
        rows = logits[sel] if logits.dim() == 3 else logits  # (m, v)
        terms = F.cross_entropy(rows.float(), x0[sel], reduction="none")  # (m,)
    dtype = torch.promote_types(weight.dtype, terms.dtype)
    per_token = torch.zeros(x0.shape, dtype=dtype, device=x0.device)  # (b, n)
    per_token[sel] = weight[sel] * terms
    return per_token


def nelbo(
    logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor,
    block_length: int | None = None, by_position: bool = False,
) -> LossOutput:
    """NELBO per token from logits at masked positions.

    ``logits`` may be ``(b, n, v)`` or already gathered to the masked-and-valid rows ``(m, v)``. With
    ``block_length`` the output also holds ``per_block``: each block's weighted ``-log p`` of its masked
    tokens divided by ``block_length`` (they average to ``loss`` when every position is valid); with
    ``by_position`` instead ``per_position`` / ``position_tokens``: the weighted sum and the predicted positions at
    each in-block position (``per_position.sum() / position_tokens.sum() == loss``).
    """
    sel = masked & valid  # (b, n)
    return weighted_sum(masked_nelbo(logits, x0, sel, weight), sel, valid, block_length, by_position)


def weighted_sum(
    per_token: torch.Tensor, sel: torch.Tensor, valid: torch.Tensor, block_length: int | None = None,
    by_position: bool = False,
) -> LossOutput:
    """``LossOutput`` from the per-position NELBO ``per_token`` (b, n) (``masked_nelbo``) of the scored positions
    ``sel`` (b, n): its sum per valid token (and ``per_block`` with ``block_length``, or ``per_position`` /
    ``position_tokens`` with ``by_position``, as ``nelbo`` says). Shared by both noise kinds."""
    nll_sum = per_token[sel].sum()
    num_tokens = valid.sum()
    out = LossOutput(
        loss=nll_sum / num_tokens.clamp(min=1), nll_sum=nll_sum, num_tokens=num_tokens, num_masked=sel.sum()
    )
    if block_length is not None:
        b, n = per_token.shape
        weighted = per_token.reshape(b, n // block_length, block_length)  # (b, k, l)
        if by_position:
            out.per_position = weighted.sum((0, 1))  # (l,)
            out.position_tokens = valid.reshape(b, n // block_length, block_length).sum((0, 1))  # (l,)
        else:
            out.per_block = weighted.sum(-1) / block_length
    return out


def check_batch(model, x0: torch.Tensor) -> torch.Tensor:
    """A ``(b, n)`` batch of token ids in the model's vocabulary (never the mask token), as ``long``; else
    ``ValueError``."""
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2 or x0.numel() == 0:
        shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"a training batch must be a non-empty (batch, length) tensor of token ids, got {shape}")
    if x0.dtype.is_floating_point or x0.dtype.is_complex or x0.dtype == torch.bool:
        raise ValueError(f"a training batch must hold integer token ids, got dtype {x0.dtype}")
    x0 = x0.long()
    if bool(((x0 < 0) | (x0 >= model.vocab_size) | (x0 == model.mask_token_id)).any()):
        raise ValueError(
            f"a training batch holds token ids outside [0, {model.vocab_size}) or the mask token "
            f"{model.mask_token_id}; "
            "was it tokenised with another tokenizer?"
        )
    return x0


def block_diffusion_loss(
    model,
    x0: torch.Tensor,
    schedule,
    t_range: tuple[float, float],
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    block_length: int | None = None,
    bidirectional: float = 1.0,
    reduction: Literal["token", "block", "position"] = "token",
    certainty: tuple[float, bool] | None = None,
    self_condition: Literal["always", "random", "never"] = "always",
) -> LossOutput:
    """Noise ``x0`` with one ``t ~ U[t_range]`` per block (or the given ``t`` of shape ``(b, k)``), run
    the vectorised forward, and return the per-token NELBO. ``block_length`` overrides the model's;
    ``bidirectional < 1`` anneals the in-block attention (see ``BlockDiffusionLM.training_hidden``).
    ``reduction="block"`` also fills ``per_block`` ``(b, k)`` (the clip search's samples); ``"position"`` fills
    ``per_position`` and ``position_tokens`` ``(l,)``. ``certainty=(temperature, only_correct)`` also fills
    ``certainty``, the certainty-forcing term on the same logits (``certainty.py``); ``loss`` stays the NELBO.

    A model with ``spec.self_conditioning`` first predicts the scored positions without gradient and feeds that
    prediction's expected embedding back into them (``self_condition="always"``: evaluation, a deterministic function
    of ``x_t``; ``"random"``: training, on half the calls, drawn from ``generator``; ``"never"``: one pass). A model
    without it ignores ``self_condition`` (docs/design.md §3.3).

    The ``model.num_unpredictable`` leading positions (position 0 under the logit shift) are neither
    scored nor noised: the conditioning token stays clean in ``x_t`` (docs/design.md §5)."""
    if reduction not in ("token", "block", "position"):
        raise ValueError(f"reduction must be 'token', 'block' or 'position', got {reduction!r}")
    x0 = check_batch(model, x0)
    b, n = x0.shape
    block_length = block_length or model.block_length
    if t is None:
        t = sample_t((b, n // block_length), *t_range, antithetic=antithetic, generator=generator, device=x0.device)
    unscored = model.num_unpredictable
    uniform = getattr(model.spec, "noise_kind", "absorbing") == "uniform"
    if uniform:
        noised = add_uniform_noise(
            x0, t, schedule, block_length, model.vocab_size, model.mask_token_id, generator, clean_prefix=unscored
        )
    else:
        noised = add_noise(x0, t, schedule, block_length, model.mask_token_id, generator, clean_prefix=unscored)
    valid = torch.ones_like(x0, dtype=torch.bool)  # (b, n)
    valid[:, :unscored] = False
    sel = noised.masked & valid  # (b, n)
    soft = _self_conditioning(model, noised.xt, x0, sel, block_length, bidirectional, generator, self_condition)
    extra = {} if soft is None else {"soft": soft}  # without self-conditioning: the call it has always been
    hidden = model.training_hidden(noised.xt, x0, block_length, bidirectional, generator, **extra)  # (b, n, d)
    logits = model.logits(hidden[sel])  # (m, v)
    per = block_length if reduction != "token" else None
    by_position = reduction == "position"
    if not uniform:
        out = nelbo(logits, x0, noised.masked, noised.weight, valid, per, by_position)
    else:
        terms = uniform_token_nelbo(logits, x0[sel], noised.xt[sel], noised.alpha[sel], model.mask_token_id)  # (m,)
        out = weighted_sum(masked_nelbo(None, x0, sel, noised.weight, terms), sel, valid, per, by_position)
    if certainty is not None:
        out.certainty = certainty_term(logits, x0[sel], *certainty)
    return out


def _self_conditioning(model, xt, x0, sel, block_length, bidirectional, generator, mode: str):
    """The self-conditioning input ``(b, n, d)`` of the scored positions ``sel`` (zero elsewhere), or ``None`` (one
    pass: no self-conditioning, or ``"never"``, or the half of ``"random"`` calls that skip it)."""
    if not getattr(model.spec, "self_conditioning", False) or mode == "never":
        return None
    if mode == "random":
        draw = torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu")
        if float(draw) < 0.5:
            return None
    with torch.no_grad():
        hidden = model.training_hidden(xt, x0, block_length, bidirectional, generator)  # (b, n, d)
        soft = hidden.new_zeros(hidden.shape)
        soft[sel] = model.soft_embedding(model.logits(hidden[sel])).to(hidden.dtype)  # (m, d)
    return soft


def draw_block_lengths(mixture: dict[int, float], batch_size: int, generator=None, device=None) -> torch.Tensor:
    """One block length per sequence, drawn from ``mixture`` (``{L': probability}``): ``(b,)`` long tensor."""
    lengths = torch.tensor(list(mixture), dtype=torch.long)  # (c,)
    weights = torch.tensor(list(mixture.values()), dtype=torch.float)  # (c,)
    weights = weights.to(generator.device if generator is not None else "cpu")
    choice = torch.multinomial(weights, batch_size, replacement=True, generator=generator)  # (b,)
    return lengths[choice].to(device)


def mixture_loss(
    model,
    x0: torch.Tensor,
    schedule,
    t_range: tuple[float, float],
    mixture: dict[int, float],
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    self_condition: Literal["always", "random", "never"] = "always",
) -> LossOutput:
    """NELBO under a mixture of block lengths: each sequence draws its ``L'`` from ``mixture``, and the rows
    that drew the same ``L'`` go through one forward with that length's mask and noise blocks (exact: a row
    never attends across rows). Sums and token counts are pooled, so the loss is per token over the batch."""
    drawn = draw_block_lengths(mixture, x0.shape[0], generator, x0.device)  # (b,)
    parts = [
        block_diffusion_loss(model, x0[drawn == l], schedule, t_range, antithetic, generator, block_length=int(l),
                             self_condition=self_condition)
        for l in torch.unique(drawn).tolist()
    ]
    nll_sum = sum(p.nll_sum for p in parts)
    num_tokens = sum(p.num_tokens for p in parts)
    return LossOutput(
        loss=nll_sum / num_tokens.clamp(min=1),
        nll_sum=nll_sum,
        num_tokens=num_tokens,
        num_masked=sum(p.num_masked for p in parts),
        block_lengths=drawn,
    )


def bits_per_byte(nll_per_token: float, tokens_per_byte: float) -> float:
    """Convert nats/token to bits/byte, so models with different tokenizers compare."""
    return nll_per_token / math.log(2) * tokens_per_byte
