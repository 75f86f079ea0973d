"""Confidence-threshold parallel decoding (Fast-dLLM).

Reveal every masked position whose confidence (the model's probability of the proposed token) is at
least ``tau``; if none is, reveal the single most confident one, so every step makes progress. With a
confident model most of a block is written in one or two forwards.
"""

from __future__ import annotations

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.base import BlockState, StepResult, reveal, top_confident

__all__ = ["ThresholdSampler"]


class ThresholdSampler:
    name = "threshold"

    def __init__(self, tau: float = 0.9):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau <= 1.0:
            raise UsageError(f"tau must be in (0, 1], got {tau!r}")
        self.tau = tau

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        sure = state.masked & (confidence >= self.tau)  # (b, l)
        best = top_confident(confidence, state.masked, torch.ones(len(sure), dtype=torch.long, device=sure.device))
        return reveal(state, tokens, confidence, sure | best)
