"""Confidence-threshold parallel decoding (Fast-dLLM).

Reveal every masked position whose confidence (the model's probability of the proposed token) is at
least ``tau``; if none is, reveal the single most confident one, so every step makes progress. With a
confident model most of a block is written in one or two forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.base import BlockState, Sampler, StepResult, knob, reveal, top_confident
from blockdiff.sampling.registry import register_sampler

__all__ = ["ThresholdSampler"]


@register_sampler
@dataclass
class ThresholdSampler(Sampler):
    name = "threshold"

    tau: float = knob(0.9, "reveal tokens with confidence >= tau")

    def __post_init__(self):
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau <= 1.0:
            raise UsageError(f"tau must be in (0, 1], got {tau!r}")

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        sure = state.masked & (confidence >= self.tau)  # (b, l)
        best = top_confident(confidence, state.masked, torch.ones(len(sure), dtype=torch.long, device=sure.device))
        return reveal(state, tokens, confidence, sure | best)
