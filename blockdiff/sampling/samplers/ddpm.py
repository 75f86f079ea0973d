"""Ancestral (DDPM-style) sampling of the absorbing process over ``steps_per_block`` steps.

Step ``s`` moves from ``t = 1 - s/T`` to ``t' = 1 - (s+1)/T``; each masked token is revealed
independently with probability ``(alpha(t') - alpha(t)) / (1 - alpha(t))`` (``1 / (T - s)`` for the
log-linear schedule), so the last step reveals everything. A step may reveal nothing: the block loop then
reuses the previous prediction (the network has no time input), which costs no forward.

Under uniform noise (``rewrite``) it is the ancestral sampler of the uniform process: every generated position
draws ``z_s ~ q(z_s | z_t, x = p_theta)`` (``core.uniform.uniform_posterior``) at every step, so any token may change
until the last step, which draws clean tokens; the block is final after ``steps_per_block`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from blockdiff.core.noise import LogLinearSchedule
from blockdiff.core.uniform import uniform_posterior
from blockdiff.sampling.logits import inverse_cdf
from blockdiff.sampling.samplers.base import (
    BlockState,
    RewriteResult,
    RewriteState,
    Sampler,
    StepResult,
    reveal,
    uniform,
)
from blockdiff.sampling.samplers.registry import register_sampler

__all__ = ["DDPMSampler"]


@register_sampler
@dataclass
class DDPMSampler(Sampler):
    name = "ddpm"
    rewrites = True

    schedule: Any = None  # the noise schedule the model was trained with (not a knob: it comes from the model)

    def __post_init__(self):
        self.schedule = self.schedule or LogLinearSchedule()

    @classmethod
    def from_config(cls, config, schedule=None) -> "DDPMSampler":
        return cls(schedule)  # no knobs: the step budget is steps_per_block, alpha(t) the trained schedule

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        steps = state.num_steps
        t = torch.tensor(1.0 - state.step / steps)
        t_next = torch.tensor(max(0.0, 1.0 - (state.step + 1) / steps))
        a, a_next = self.schedule.alpha(t), self.schedule.alpha(t_next)
        p = 1.0 if state.step >= steps - 1 else float((a_next - a) / (1.0 - a))
        chosen = uniform(state.masked.shape, generator, state.masked.device, rows=state.masked.any(-1)) < p
        return reveal(state, tokens, confidence, chosen)

    def rewrite(self, tokens, confidence, probs, state: RewriteState, generator) -> RewriteResult:
        steps = state.num_steps
        t = torch.tensor(1.0 - state.step / steps)
        s = torch.tensor(max(0.0, 1.0 - (state.step + 1) / steps))
        a_t, a_s = float(self.schedule.alpha(t)), float(self.schedule.alpha(s))
        last = state.step >= steps - 1
        edit = state.editable
        rows = edit.any(-1)
        post = uniform_posterior(probs[edit], state.tokens[edit], a_t, 1.0 if last else a_s, state.mask_token_id)
        u = uniform(edit.shape, generator, edit.device, rows=rows)[edit]  # (r,)
        drawn = inverse_cdf(post, u)  # (r,)
        new = state.tokens.masked_scatter(edit, drawn)
        done = torch.full_like(rows, last)
        return RewriteResult(new, edit.clone(), done)
