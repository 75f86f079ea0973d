"""Remasking within the current block (ReMDM-style): the model may revise a token it already wrote.

Each step reveals the most confident masked positions on the even schedule of ``fixed.py``; then, while
``step < remask_until * steps_per_block``, up to ``max_remask`` *generated* tokens of the current block
whose confidence (the model's probability when they were revealed) is below ``remask_threshold`` are
re-opened and will be predicted again with more context. Prompt tokens and finished blocks are never
touched, so the cross-block cache stays exact. After ``remask_until`` (and always on the last step) it
behaves like ``fixed``, so every block finishes within ``steps_per_block`` steps with no mask left.
"""

from __future__ import annotations

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.base import BlockState, StepResult, reveal, top_confident
from blockdiff.sampling.fixed import even_share

__all__ = ["RemaskingSampler"]


class RemaskingSampler:
    name = "remask"

    def __init__(self, remask_threshold: float = 0.3, max_remask: int = 1, remask_until: float = 0.75):
        if isinstance(remask_threshold, bool) or not isinstance(remask_threshold, (int, float)) or not 0.0 < remask_threshold <= 1.0:
            raise UsageError(f"remask_threshold must be in (0, 1], got {remask_threshold!r}")
        if isinstance(max_remask, bool) or not isinstance(max_remask, int) or max_remask < 1:
            raise UsageError(f"max_remask must be an integer >= 1, got {max_remask!r}")
        self.remask_threshold, self.max_remask, self.remask_until = remask_threshold, max_remask, remask_until

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
