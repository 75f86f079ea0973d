"""Threshold decoding with token editing: LLaDA 2.1's sampler (diffusers' ``BlockRefinementScheduler`` with an
``editing_threshold``, as its ``LLaDA2Pipeline`` runs it with ``max_post_steps``).

Each step fills masks by the confidence-threshold rule (``threshold.py``: every masked position with confidence
``>= tau``, at least the most confident one) and *edits*: a committed generated token of the current block is
replaced when the model now proposes another token there with confidence ``> editing_threshold``. Once the block has
no mask left it stays open for *post steps*, forwards that only edit, while the last one edited something and at
most ``max_post_steps`` of them (``max_post_steps=0``: edits happen only while masks are being filled). Prompt
tokens and finished blocks are never touched, so the cache stays exact (§7.3).

``editing_threshold`` is a probability in (0, 1]; the comparison is strict, so ``editing_threshold=1`` never edits
(a softmax that rounds to exactly 1 included). Which positions a step reads: every generated position of the block
(``edits``), so the head runs on committed rows too.

What the model says at a committed position: under absorbing noise the network is trained on masked positions only
(SUBS), so its prediction where the token is visible is only as good as training made it (LLaDA 2.1 trains for it
with token-to-token editing data; a blockdiff model is not, unless fine-tuned so). Under uniform noise every position
is trained, and editing is the natural correction step: ``rewrite`` runs the threshold rule's rewrite (a written
position whose proposal reaches ``tau`` is rewritten) plus the same edits and post steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.base import BlockState, RewriteResult, RewriteState, StepResult, knob
from blockdiff.sampling.samplers.registry import register_sampler
from blockdiff.sampling.samplers.threshold import ThresholdSampler

__all__ = ["EditingSampler"]


@register_sampler
@dataclass
class EditingSampler(ThresholdSampler):
    name = "edit"
    rewrites = True
    edits = True

    editing_threshold: float = knob(0.5, "replace a committed token when another is proposed with confidence > this")
    max_post_steps: int = knob(16, "edit-only forwards allowed after a block's last mask is filled")

    def __post_init__(self):
        super().__post_init__()
        threshold, most = self.editing_threshold, self.max_post_steps
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise UsageError(f"editing_threshold must be in (0, 1] (1: never edit), got {threshold!r}")
        if isinstance(most, bool) or not isinstance(most, int) or most < 0:
            raise UsageError(f"max_post_steps must be an integer >= 0, got {most!r}")

    @property
    def post_steps_budget(self) -> int:
        return self.max_post_steps

    def _edits(self, tokens, confidence, current, committed, post_steps, filling) -> torch.Tensor:
        """Bool (b, l): the committed positions whose proposal differs from ``current`` with confidence above the
        threshold, in rows still filling or within their post-step budget."""
        post = post_steps if post_steps is not None else torch.zeros_like(filling, dtype=torch.long)
        may_edit = filling | (post < self.max_post_steps)  # (b,)
        return committed & (tokens != current) & (confidence > self.editing_threshold) & may_edit[:, None]

    def _open(self, filling, filled, edited, post_steps) -> torch.Tensor:
        """Bool (b,): rows with no mask left that get another (edit-only) step: just filled and some post steps are
        allowed, or a post step that edited something with budget left."""
        post = post_steps if post_steps is not None else torch.zeros_like(filling, dtype=torch.long)
        just_filled = filling & (self.max_post_steps > 0)
        editing = ~filling & edited.any(-1) & (post + 1 < self.max_post_steps)
        return filled & (just_filled | editing)

    def step(self, tokens, confidence, state: BlockState, generator: torch.Generator | None, probs=None) -> StepResult:
        filling = state.masked.any(-1)  # (b,) rows that still had masks at this step
        result = super().step(tokens, confidence, state, generator, probs)  # fill (nothing in a row with no mask)
        committed = state.editable & ~state.masked  # (b, l) committed before this step
        edited = self._edits(tokens, confidence, state.tokens, committed, state.post_steps, filling)
        result.tokens = torch.where(edited, tokens, result.tokens)
        result.confidence = torch.where(edited, confidence, result.confidence)
        result.edited = edited
        filled = ~(state.masked & ~result.revealed).any(-1)  # (b,) no mask left after this step
        result.open = self._open(filling, filled, edited, state.post_steps)
        return result

    def rewrite(self, tokens, confidence, probs, state: RewriteState, generator) -> RewriteResult:
        filling = (state.editable & ~state.written).any(-1)  # (b,)
        result = super().rewrite(tokens, confidence, probs, state, generator)
        edited = self._edits(tokens, confidence, state.tokens, state.written & state.editable, state.post_steps,
                             filling)
        new = torch.where(edited, tokens, result.tokens)
        changed = state.written & (new != state.tokens)  # (b, l) written tokens replaced at this step
        filled = ~(state.editable & ~result.written).any(-1)
        still_open = self._open(filling, filled, changed, state.post_steps)
        return RewriteResult(new, result.written, filled & ~still_open)
