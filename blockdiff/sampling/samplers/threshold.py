"""Confidence-threshold parallel decoding (Fast-dLLM).

Reveal every masked position whose confidence (the model's probability of the proposed token) is at
least ``tau``; if none is, reveal the single most confident one, so every step makes progress. With a
confident model most of a block is written in one or two forwards.

Under uniform noise (``rewrite``) the same rule runs over *every* generated position of the block: each position
whose proposal is at least ``tau`` confident is written with it, a position written before included (so a token
can be corrected), plus the most confident unwritten one if no unwritten position passes; the block is final once
every position has been written. Its forwards per block are therefore comparable with the absorbing rule's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.base import (
    BlockState,
    RewriteResult,
    RewriteState,
    Sampler,
    StepResult,
    knob,
    reveal,
    top_confident,
)
from blockdiff.sampling.samplers.registry import register_sampler

__all__ = ["ThresholdSampler"]


@register_sampler
@dataclass
class ThresholdSampler(Sampler):
    name = "threshold"
    rewrites = True

    tau: float = knob(0.9, "reveal tokens with confidence >= tau")

    def __post_init__(self):
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau <= 1.0:
            raise UsageError(f"tau must be in (0, 1], got {tau!r}")

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        sure = state.masked & (confidence >= self.tau)  # (b, l)
        best = top_confident(confidence, state.masked, torch.ones(len(sure), dtype=torch.long, device=sure.device))
        return reveal(state, tokens, confidence, sure | best)

    def rewrite(self, tokens, confidence, probs, state: RewriteState, generator) -> RewriteResult:
        sure = state.editable & (confidence >= self.tau)  # (b, l): written or not
        unwritten = state.editable & ~state.written
        none_new = ~(sure & unwritten).any(-1)  # (b,): no unwritten position passes tau
        best = top_confident(confidence, unwritten, none_new.long())  # (b, l): then the most confident one
        chosen = sure | best
        written = state.written | chosen
        return RewriteResult(torch.where(chosen, tokens, state.tokens), written, ~(state.editable & ~written).any(-1))
