"""First-hitting sampler: exactly one token per step (Zheng et al., 2024).

Under the absorbing process every masked token is revealed at its own time; jumping straight to the
next reveal time unmasks one uniformly chosen masked position per step, with a token from its
predictive distribution. A block of ``l`` masks takes exactly ``l`` forwards (fewer with a prompt tail).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.sampling.samplers.base import BlockState, Sampler, StepResult, reveal, uniform
from blockdiff.sampling.samplers.registry import register_sampler

__all__ = ["FirstHittingSampler"]


@register_sampler
@dataclass
class FirstHittingSampler(Sampler):
    name = "first_hitting"  # no knobs

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        scores = uniform(state.masked.shape, generator, state.masked.device, rows=state.masked.any(-1))  # (b, l)
        pick = scores.masked_fill(~state.masked, -1.0).argmax(-1, keepdim=True)  # (b, 1)
        chosen = torch.zeros_like(state.masked).scatter_(-1, pick, True)
        return reveal(state, tokens, confidence, chosen)
