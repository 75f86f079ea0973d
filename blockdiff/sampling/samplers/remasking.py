"""Remasking within the current block (ReMDM-style): the model may revise a token it already wrote.

Each step reveals the most confident masked positions on the even schedule of ``fixed.py``; then, while
``step < remask_until * steps_per_block``, up to ``max_remask`` *generated* tokens of the current block
whose confidence (the model's probability when they were revealed) is below ``remask_threshold`` are
re-opened and will be predicted again with more context. Prompt tokens and finished blocks are never
touched, so the cross-block cache stays exact. After ``remask_until`` (and always on the last step) it
behaves like ``fixed``, so every block finishes within ``steps_per_block`` steps with no mask left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.base import BlockState, Sampler, StepResult, knob, reveal, top_confident
from blockdiff.sampling.samplers.fixed import even_share
from blockdiff.sampling.samplers.registry import register_sampler

__all__ = ["RemaskingSampler"]


@register_sampler
@dataclass
class RemaskingSampler(Sampler):
    name = "remask"

    remask_threshold: float = knob(0.3, "re-open generated tokens below this confidence")
    max_remask: int = knob(1, "at most this many re-opened per step")
    remask_until: float = 0.75  # fraction of steps_per_block after which nothing is re-opened (not a knob)

    def __post_init__(self):
        threshold, most = self.remask_threshold, self.max_remask
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise UsageError(f"remask_threshold must be in (0, 1], got {threshold!r}")
        if isinstance(most, bool) or not isinstance(most, int) or most < 1:
            raise UsageError(f"max_remask must be an integer >= 1, got {most!r}")

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        result = reveal(state, tokens, confidence, top_confident(confidence, state.masked, even_share(state)))
        if state.step >= min(self.remask_until * state.num_steps, state.num_steps - 1):
            return result  # no re-opening late, nor on the last step: the block ends within its budget
        # Re-open the least confident earlier commitments (not the ones revealed just now).
        # Only in blocks still being denoised: a block with no mask left is finished.
        still_open = state.masked.any(-1, keepdim=True)  # (b, 1)
        candidates = still_open & state.editable & ~state.masked & (state.confidence < self.remask_threshold)
        k = torch.full((len(tokens),), self.max_remask, device=tokens.device)
        result.remasked = top_confident(-state.confidence, candidates, k)  # lowest confidence first
        return result  # the block loop puts the mask token back at `remasked`
