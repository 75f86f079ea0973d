"""Stable-and-confident adaptive stop of a block's denoising, with any sampler (docs/design.md §9).

DiffusionGemma's ``StableAndConfidentStoppingCriteria`` (``transformers``' ``generation_diffusion_gemma.py``): a
block is finished once the model's argmax prediction of it has not changed over the last ``stop_stable_steps``
forwards (*stable*) and the mean entropy of its predictions is below ``stop_entropy`` nats (*confident*). The block
then takes the argmax: under absorbing noise every position still masked is revealed with the model's argmax token
(committed tokens stay), under uniform noise every generated position becomes the argmax (DiffusionGemma's final
canvas). ``stop_stable_steps=0`` is the confidence test alone; ``None`` (the default) turns the rule off, and the
block loop is then exactly what it was without it.

It is a *rule* rather than a sampler because it composes with every sampler's step: the block loop applies it after
the sampler's step (``generation.py``, ``rewrite.py``), so ``sampler=threshold stop_stable_steps=1`` means "threshold
decoding that may end a block early". Its knobs are registered like a sampler's (``registry.register_rule``), so they
are generation-config fields, ``blockdiff sample`` flags, sweep keys and server request fields.

Definitions that keep the block loop's exactness (cached == uncached, batch == one by one):

* the *argmax canvas* of a forward is the argmax at every position the model predicted, the current token elsewhere
  (committed tokens under absorbing noise); the *entropy* is the model's own (untempered) one, averaged over the
  positions it predicted, so ``stop_entropy`` means the same at every temperature, as ``tau`` does;
* a row's history grows only on forwards whose input block changed for that row since its previous forward. A row
  whose block did not change gets the same prediction again (the network has no time input): alone, the block loop
  would not even run that forward (``reuse_predictions``), so counting it would make a sample's stop depend on its
  batch.

Shape legend: ``b`` batch, ``k`` history (``stop_stable_steps``), ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.base import entropy, knob
from blockdiff.sampling.samplers.registry import register_rule

__all__ = ["AdaptiveStop", "StopHistory"]


@dataclass
class StopHistory:
    """The argmax canvases of one block's last forwards, per row (``AdaptiveStop.start``)."""

    canvases: torch.Tensor  # (b, k, l) oldest first; -1 where there is no forward yet


@register_rule
@dataclass
class AdaptiveStop:
    name = "adaptive_stop"

    stop_stable_steps: int | None = knob(
        None, "with any sampler: end a block once its argmax prediction is unchanged over this many forwards and "
        "its mean entropy is below stop_entropy (0: the entropy test alone; default: off)"
    )
    stop_entropy: float = knob(0.005, "with stop_stable_steps: the mean entropy (nats) under which a block is sure")

    def __post_init__(self):
        k, h = self.stop_stable_steps, self.stop_entropy
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise UsageError(f"stop_stable_steps must be an integer >= 0 (or unset: no adaptive stop), got {k!r}")
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 < h < math.inf:
            raise UsageError(f"stop_entropy must be a finite number > 0 (nats), got {h!r}")

    @classmethod
    def from_config(cls, config, schedule=None) -> "AdaptiveStop":
        return cls(config.stop_stable_steps, config.stop_entropy)

    @property
    def active(self) -> bool:
        return self.stop_stable_steps is not None

    def start(self, rows: int, l: int, device) -> StopHistory:
        """An empty history for a new block of ``rows`` rows."""
        return StopHistory(torch.full((rows, self.stop_stable_steps or 0, l), -1, dtype=torch.long, device=device))

    def update(
        self, history: StopHistory, canvas: torch.Tensor, probs: torch.Tensor, predicted: torch.Tensor,
        fresh: torch.Tensor,
    ) -> torch.Tensor:
        """Bool (b,): the rows whose block is stable and confident after this forward. ``canvas`` (b, l): the argmax
        canvas; ``probs`` (b, l, v): the model's untempered distribution (zero where not ``predicted`` (b, l));
        ``fresh`` (b,): the rows whose input changed since their previous forward (only they are tested, and only
        their history moves)."""
        if history.canvases.shape[1]:
            stable = (history.canvases == canvas[:, None]).all(-1).all(-1)  # (b,)
            moved = torch.cat([history.canvases[:, 1:], canvas[:, None]], dim=1)  # (b, k, l)
            history.canvases = torch.where(fresh[:, None, None], moved, history.canvases)
        else:
            stable = torch.ones_like(fresh)
        h = entropy(probs)  # (b, l), 0 where nothing was predicted
        count = predicted.sum(-1)  # (b,)
        mean = h.sum(-1) / count.clamp(min=1)
        return fresh & stable & (count > 0) & (mean < self.stop_entropy)
