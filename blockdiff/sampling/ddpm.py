"""Ancestral (DDPM-style) sampling of the absorbing process over ``steps_per_block`` steps.

Step ``s`` moves from ``t = 1 - s/T`` to ``t' = 1 - (s+1)/T``; each masked token is revealed
independently with probability ``(alpha(t') - alpha(t)) / (1 - alpha(t))`` (``1 / (T - s)`` for the
log-linear schedule), so the last step reveals everything. A step may reveal nothing: the block loop then
reuses the previous prediction (the network has no time input), which costs no forward.
"""

from __future__ import annotations

import torch

from blockdiff.core.noise import LogLinearSchedule
from blockdiff.sampling.base import BlockState, StepResult, reveal, uniform

__all__ = ["DDPMSampler"]


class DDPMSampler:
    name = "ddpm"

    def __init__(self, schedule=None):
        self.schedule = schedule or LogLinearSchedule()

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        steps = state.num_steps
        t = torch.tensor(1.0 - state.step / steps)
        t_next = torch.tensor(max(0.0, 1.0 - (state.step + 1) / steps))
        a, a_next = self.schedule.alpha(t), self.schedule.alpha(t_next)
        p = 1.0 if state.step >= steps - 1 else float((a_next - a) / (1.0 - a))
        chosen = uniform(state.masked.shape, generator, state.masked.device, rows=state.masked.any(-1)) < p
        return reveal(state, tokens, confidence, chosen)
