"""Entropy-bounded parallel decoding with an optional temperature schedule: DiffusionGemma's sampler.

The acceptance rule is ``transformers``' ``EntropyBoundSampler.accept_canvas`` (DiffusionGemma, after the
entropy-bounded sampler of Ben-Hamu et al. 2025, arXiv 2505.24857): sort the undecided positions by the entropy of
their predictive distribution and accept the lowest-entropy ones, as many as keep
``sum(entropies) - max(entropy) <= entropy_bound`` (an upper bound on the mutual information between them, so the
accepted tokens are nearly independent given the block; the first is always accepted). A small bound means nearly
one token per step; a large one accepts many when the model is sure of them collectively, not just one by one as
the confidence threshold does.

**Temperature schedule** (``t_max``, ``t_min``; DiffusionGemma's ``LinearTemperatureScheduleLogitsProcessor``):
step ``s`` of a block's budget ``T = steps_per_block`` runs at ``t(s) = t_max - (t_max - t_min) * min(s, T-1) /
max(T-1, 1)`` (``t_max`` at the first step, ``t_min`` from step ``T-1`` on). The entropies are those of the tempered
distribution, and when the call samples (``temperature > 0``) the proposal is drawn at ``t(s)`` instead of the call's
temperature; a greedy call keeps the argmax (which no temperature changes). Unset (the default), entropies are the
model's own and the call's temperature holds, exactly as before the schedule existed.

**Under uniform noise** (``rewrite``) the rule runs over the generated positions not yet accepted, and every position
still not accepted after the step is *renoised*: it gets a fresh uniformly random token (DiffusionGemma's
``renoise_canvas``). Accepted positions stay accepted (the committed set of diffusers' ``BlockRefinementScheduler`` in
its uniform corruption mode), so the block is final once every position is accepted: at most ``l`` forwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.base import (
    BlockState,
    RewriteResult,
    RewriteState,
    Sampler,
    StepResult,
    entropy,
    knob,
    noise_tokens,
    reveal,
)
from blockdiff.sampling.samplers.registry import register_sampler

__all__ = ["EntropyBoundSampler", "within_bound", "linear_temperature"]


def linear_temperature(t_max: float, t_min: float, step: int, num_steps: int) -> float:
    """``t_max`` at step 0, falling linearly to ``t_min`` at step ``num_steps - 1`` (and after)."""
    return t_max - (t_max - t_min) * min(step, num_steps - 1) / max(num_steps - 1, 1)


def within_bound(h: torch.Tensor, open_: torch.Tensor, bound: float) -> torch.Tensor:
    """Bool (b, l): among the ``open_`` positions, the lowest-entropy ones (``h`` (b, l) nats) whose summed entropy
    minus the largest of them stays ``<= bound`` (the first always qualifies)."""
    h = h.masked_fill(~open_, float("inf"))
    sorted_h, order = h.sort(dim=-1)  # (b, l) ascending; closed positions last (inf)
    finite = torch.isfinite(sorted_h)
    cum = torch.where(finite, sorted_h, 0.0).cumsum(-1)
    take_sorted = finite & (cum - sorted_h.masked_fill(~finite, 0.0) <= bound)
    return torch.zeros_like(take_sorted).scatter(-1, order, take_sorted)


def _positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


@register_sampler
@dataclass
class EntropyBoundSampler(Sampler):
    name = "entropy_bound"
    needs_probs = True
    rewrites = True

    entropy_bound: float = knob(0.5, "reveal lowest-entropy tokens while sum - max <= this (nats)")
    t_max: float | None = knob(None, "temperature of a block's first step, falling linearly to t_min (default: off)")
    t_min: float | None = knob(None, "temperature of a block's last step (with t_max)")

    def __post_init__(self):
        bound = self.entropy_bound
        if not _positive(bound):
            raise UsageError(f"entropy_bound must be a finite number > 0 (nats), got {bound!r}")
        for key in ("t_max", "t_min"):
            value = getattr(self, key)
            if value is not None and not _positive(value):
                raise UsageError(f"{key} must be a finite number > 0 (a temperature), got {value!r}")
        if (self.t_max is None) != (self.t_min is None):
            raise UsageError(f"the temperature schedule needs both t_max and t_min (got t_max={self.t_max!r}, "
                             f"t_min={self.t_min!r}); set both, or neither")
        if self.t_max is not None and self.t_min > self.t_max:
            raise UsageError(f"t_min={self.t_min!r} must be <= t_max={self.t_max!r} (the temperature falls from t_max "
                             "at a block's first step to t_min at its last)")

    def _schedule(self, step: int, num_steps: int) -> float:
        """The schedule's temperature at ``step`` (1: no schedule, the model's own distribution)."""
        return 1.0 if self.t_max is None else linear_temperature(self.t_max, self.t_min, step, num_steps)

    def temperature_at(self, temperature: float, step: int, num_steps: int) -> float:
        if self.t_max is None or temperature == 0:
            return temperature
        return self._schedule(step, num_steps)

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        if probs is None:
            raise UsageError("the entropy_bound sampler needs the predictive distribution (probs)")
        h = entropy(probs, self._schedule(state.step, state.num_steps))  # (b, l) nats
        return reveal(state, tokens, confidence, within_bound(h, state.masked, self.entropy_bound))

    def rewrite(self, tokens, confidence, probs, state: RewriteState, generator) -> RewriteResult:
        if state.probs is None:
            raise UsageError("the entropy_bound sampler needs the predictive distribution (probs)")
        unwritten = state.editable & ~state.written  # (b, l)
        h = entropy(state.probs, self._schedule(state.step, state.num_steps))  # (b, l)
        accepted = within_bound(h, unwritten, self.entropy_bound)
        written = state.written | accepted
        new = torch.where(accepted, tokens, state.tokens)
        still = state.editable & ~written  # renoised: a fresh random token at every position not accepted yet
        rows = still.any(-1)
        noise = noise_tokens(still.shape, state.vocab_size, state.mask_token_id, generator, still.device, rows=rows)
        return RewriteResult(torch.where(still, noise, new), written, ~rows)
