"""Entropy-bounded parallel decoding (the sampler of ``transformers``' DiffusionGemma generation).

Sort the masked positions by the entropy of their predictive distribution and reveal the lowest-entropy
ones, as many as keep ``sum(entropies) - max(entropy) <= entropy_bound`` (so the first is always
revealed). A small bound means nearly one token per step; a large bound reveals many when the model is
sure of them collectively, not just one by one as the confidence threshold does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.base import BlockState, Sampler, StepResult, knob, reveal
from blockdiff.sampling.samplers.registry import register_sampler

__all__ = ["EntropyBoundSampler"]


@register_sampler
@dataclass
class EntropyBoundSampler(Sampler):
    name = "entropy_bound"
    needs_probs = True

    entropy_bound: float = knob(0.5, "reveal lowest-entropy tokens while sum - max <= this (nats)")

    def __post_init__(self):
        bound = self.entropy_bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < math.inf:
            raise UsageError(f"entropy_bound must be a finite number > 0 (nats), got {bound!r}")

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        if probs is None:
            raise UsageError("the entropy_bound sampler needs the predictive distribution (probs)")
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # (b, l) nats
        entropy = entropy.masked_fill(~state.masked, float("inf"))
        sorted_h, order = entropy.sort(dim=-1)  # (b, l) ascending; unmasked last (inf)
        finite = torch.isfinite(sorted_h)
        cum = torch.where(finite, sorted_h, 0.0).cumsum(-1)
        take_sorted = finite & (cum - sorted_h.masked_fill(~finite, 0.0) <= self.entropy_bound)
        chosen = torch.zeros_like(take_sorted).scatter(-1, order, take_sorted)
        return reveal(state, tokens, confidence, chosen)
