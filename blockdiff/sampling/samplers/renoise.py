"""Threshold rewriting with renoising of the unconfident positions, under uniform noise only (DiffusionGemma).

The threshold rule's ``rewrite`` (``threshold.py``: write every generated position whose proposal is ``>= tau``
confident, a written one included, plus the most confident unwritten one when none passes), then *renoise*: every
position still unwritten after the step gets a fresh uniformly random token, instead of keeping the noise the model
has just read. This is how DiffusionGemma treats the positions its sampler did not accept (``transformers``'
``EntropyBoundSampler.renoise_canvas``; diffusers' ``BlockRefinementScheduler`` in its uniform corruption mode
does the same with a confidence rule): an unaccepted position is noise again at the next step, so the model is never
asked to trust a random token it has already declined. The block is final once every position is written, as with
``threshold``, so the forwards per block are comparable with it.

Under absorbing noise there is nothing to renoise (an undecided position already holds the mask): the sampler is
refused there (``reveals = False``); use ``threshold``, or ``remask`` to re-open committed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.sampling.samplers.base import RewriteResult, RewriteState, noise_tokens
from blockdiff.sampling.samplers.registry import register_sampler
from blockdiff.sampling.samplers.threshold import ThresholdSampler

__all__ = ["RenoiseSampler"]


@register_sampler
@dataclass
class RenoiseSampler(ThresholdSampler):
    name = "renoise"
    rewrites = True
    reveals = False

    def step(self, tokens, confidence, state, generator, probs=None):
        raise NotImplementedError("the renoise sampler runs under uniform noise only (resolve refuses it otherwise)")

    def rewrite(self, tokens, confidence, probs, state: RewriteState, generator) -> RewriteResult:
        result = super().rewrite(tokens, confidence, probs, state, generator)
        still = state.editable & ~result.written  # (b, l) unconfident: not written at this step nor before
        rows = still.any(-1)
        noise = noise_tokens(still.shape, state.vocab_size, state.mask_token_id, generator, still.device, rows=rows)
        return RewriteResult(torch.where(still, noise, result.tokens), result.written, result.done)
