"""The vectorised training forward of ``BlockDiffusionLM`` (a mixin it inherits): one network call over
``x_t ⊕ x_0`` under the three-part training mask (docs/design.md §4), or two calls when the gated adapter is on
(the clean stream first, without gradients when the base is frozen).

It uses the model's ``hidden_states``, ``format_mask``, ``new_cache``, ``apply_logit_shift`` and ``logits``.

Shape legend: ``b`` batch, ``n`` tokens per half, ``l`` block length, ``d`` hidden, ``v`` vocab.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from blockdiff.core.masks import training_block_mask, training_mask
from blockdiff.errors import UsageError

__all__ = ["TrainingForward"]


@lru_cache(maxsize=16)
def _cached_training_mask(n: int, block_length: int, device: str, kind: str, clean_attention: str = "block_causal"):
    """The training mask without the last clean block (no query ever needs it): ``2n - l`` square."""
    length = 2 * n - block_length
    if kind == "flex_attention":
        return training_block_mask(n, block_length, None, device=device, length=length, clean_attention=clean_attention)
    mask = training_mask(n, block_length, device=device, clean_attention=clean_attention)
    return mask[None, None, :length, :length]  # (1, 1, 2n-l, 2n-l)


def _annealing_keep(n: int, block_length: int, p: float, generator, device) -> torch.Tensor:
    """Cells kept open while annealing: everything except anti-causal x_t cells, which stay with probability ``p``."""
    length = 2 * n - block_length
    idx = torch.arange(length, device=device)
    anticausal = (idx[None, :] > idx[:, None]) & (idx[:, None] < n) & (idx[None, :] < n)  # (q, s), inside x_t
    drawn = torch.rand((length, length), generator=generator, device=device) < p
    return (~anticausal | drawn)[None, None]  # (1, 1, q, s)


class TrainingForward:
    """``forward`` / ``training_hidden`` / ``training_streams`` of a ``BlockDiffusionLM``."""

    def forward(self, xt: torch.Tensor, x0: torch.Tensor, block_length: int | None = None) -> torch.Tensor:
        """Vectorised training forward: logits ``(b, n, v)`` predicting ``x0`` at every position of ``xt``.

        Runs the network once on ``x_t ⊕ x_0`` (positions ``0..n-1`` twice) under the three-part mask.
        The last clean block is left out of the input: no noisy block may see it and no clean block
        before it does, so dropping it is exact and the input is ``2n - l`` tokens (``n`` for MDLM).
        With the logit shift, row ``0`` has no predecessor and holds no prediction (``num_unpredictable``).
        """
        return self.logits(self.training_hidden(xt, x0, block_length))

    def training_hidden(
        self,
        xt: torch.Tensor,
        x0: torch.Tensor,
        block_length: int | None = None,
        bidirectional: float = 1.0,
        generator: torch.Generator | None = None,
        soft: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The hidden states behind ``forward``'s logits, ``(b, n, d)`` (lets the loss project only masked rows).

        ``block_length`` overrides the model's own for this call (block-length curricula and mixtures);
        the spec, and so generation, keeps the model's. ``bidirectional < 1`` anneals the mask: each
        anti-causal cell inside a noisy block stays open with that probability (``curriculum.py``).
        ``soft`` (b, n, d): self-conditioning input added at the ``x_t`` positions (docs/design.md §3.3).
        """
        block_length = block_length or self.block_length
        h_xt, h_x0 = self.training_streams(xt, x0, block_length, bidirectional, generator, soft)
        if self.spec.logit_shift:  # block k > 0 reads the clean stream at its last position; block 0 a placeholder
            before = torch.cat([h_xt[:, :1], h_x0[:, block_length - 1 :: block_length]], dim=1)  # (b, n/l, d)
            h_xt = self.apply_logit_shift(h_xt, before, block_length)  # (b, n, d); row 0 is a placeholder
        return h_xt

    def training_streams(
        self,
        xt: torch.Tensor,
        x0: torch.Tensor,
        block_length: int | None = None,
        bidirectional: float = 1.0,
        generator: torch.Generator | None = None,
        soft: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two halves of the training forward before the logit shift: ``(noisy (b, n, d), clean (b, n - l, d))``,
        row ``i`` of each being the decoder's output at position ``i`` of ``x_t`` / ``x_0``.

        Without an adapter: one forward over ``x_t ⊕ x_0[:n-l]`` under the training mask. With the gated adapter (on
        for the x_t rows, off for the x_0 rows) and a dense mask: two forwards with the same result — the clean
        stream alone first (the base decoder; without gradients when the base is frozen, so the backward pass runs
        over the ``n`` noisy rows only), then the noisy stream against the clean stream's keys and values."""
        b, n = xt.shape
        block_length = block_length or self.block_length
        if n % block_length:
            raise UsageError(f"block_length={block_length} must divide the sequence length {n}")
        kind = self.attn_implementation
        if kind == "flex_attention" and xt.device.type != "cuda":
            raise RuntimeError("model.attn_implementation=flex_attention needs CUDA; use sdpa on CPU")
        if bidirectional < 1.0 and kind == "flex_attention":
            raise UsageError("attention-mask annealing needs a dense mask; use attn_implementation=sdpa or eager")
        mask = _cached_training_mask(n, block_length, str(xt.device), kind, self.spec.clean_attention)
        if bidirectional < 1.0:
            mask = mask & _annealing_keep(n, block_length, bidirectional, generator, xt.device)
        if self.adapter is not None and kind != "flex_attention":
            return self._split_streams(xt, x0, block_length, mask, soft)
        if kind != "flex_attention":
            mask = self.format_mask(mask)
        clean = n - block_length  # clean tokens fed: all blocks but the last
        positions = torch.cat([torch.arange(n), torch.arange(clean)]).to(xt.device)[None].expand(b, -1)  # (b, n+clean)
        gate = (torch.arange(n + clean, device=xt.device) < n)[None] if self.adapter is not None else None  # x_t rows
        if soft is not None:  # self-conditioning on the noisy half only
            soft = torch.cat([soft, soft.new_zeros(b, clean, soft.shape[-1])], dim=1)  # (b, n + clean, d)
        hidden, _ = self.hidden_states(torch.cat([xt, x0[:, :clean]], dim=1), positions, mask, gate=gate, soft=soft)
        return hidden[:, :n], hidden[:, n:]  # (b, n, d), (b, clean, d)

    def _split_streams(self, xt, x0, block_length: int, mask: torch.Tensor, soft: torch.Tensor | None = None):
        """``training_streams`` as two forwards (``mask``: the dense training mask (1, 1, n + clean, n + clean) over
        ``[x_t ; x_0[:clean]]``): the clean stream with the gate off, then the noisy rows, gate on, against its cache
        (keys ``[x_0[:clean] ; x_t]``)."""
        b, n = xt.shape
        clean = n - block_length
        device = xt.device
        cache = None
        h_x0 = torch.zeros(b, 0, self.backbone.config.hidden_size, device=device, dtype=self.backbone.dtype)
        if clean > 0:
            base_trainable = any(p.requires_grad for p in self.backbone.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and base_trainable):
                h_x0, cache = self.hidden_states(
                    x0[:, :clean], torch.arange(clean, device=device)[None].expand(b, -1),
                    self.format_mask(mask[..., n:, n:]), past_key_values=self.new_cache(), use_cache=True,
                )  # (b, clean, d)
        noisy_mask = torch.cat([mask[..., :n, n:], mask[..., :n, :n]], dim=-1)  # (1, 1, n, clean + n)
        h_xt, _ = self.hidden_states(
            xt, torch.arange(n, device=device)[None].expand(b, -1), self.format_mask(noisy_mask),
            past_key_values=cache, use_cache=cache is not None, gate=torch.ones(1, n, device=device), soft=soft,
        )  # (b, n, d)
        return h_xt, h_x0
