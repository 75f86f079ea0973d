"""Fixed tokens-per-step decoding, most confident first (MaskGIT / LLaDA low-confidence order).

Reveal ``tokens_per_step`` masked positions per step, choosing the most confident. Without
``tokens_per_step`` the block's budget ``steps_per_block`` is spread evenly: ``ceil(remaining / steps_left)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.base import BlockState, Sampler, StepResult, knob, reveal, top_confident
from blockdiff.sampling.samplers.registry import register_sampler

__all__ = ["FixedStepSampler", "even_share"]


def even_share(state: BlockState) -> torch.Tensor:
    """Per row: ``ceil(masked / steps_left)``, at least 1 (all of it on the last step)."""
    steps_left = max(1, state.num_steps - state.step)
    return (state.masked.sum(-1) + steps_left - 1) // steps_left


@register_sampler
@dataclass
class FixedStepSampler(Sampler):
    name = "fixed"

    tokens_per_step: int | None = knob(None, "tokens revealed per step (default: spread over steps_per_block)")

    def __post_init__(self):
        k = self.tokens_per_step
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UsageError(f"tokens_per_step must be an integer >= 1, got {k!r}")

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        if self.tokens_per_step is None:
            k = even_share(state)
        else:
            k = torch.full((len(tokens),), self.tokens_per_step, device=tokens.device)
        return reveal(state, tokens, confidence, top_confident(confidence, state.masked, k.clamp(min=1)))
