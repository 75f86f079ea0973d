"""Data-driven clipped schedules: pick ``(beta, omega)`` that minimises the variance of the per-block NELBO.

BD3-LM (Arriola et al., 2025, §4) trains with ``t ~ U[beta, omega]`` and chooses the window by a search on
held-out batches: for every window of a grid, estimate the NELBO with that window's ``t`` and keep the
window whose estimate varies least. Two pieces, kept apart so the choice can be tested on synthetic data:

* ``block_nelbo_samples`` — one held-out batch, one window -> the per-block NELBO estimates ``(b, k)``
  (nats per token of the block: the weighted ``-log p`` of its masked tokens divided by ``l``): the loss of
  ``loss.py`` with its per-block reduction, so the search measures the very estimator training uses;
* ``select_clip_window`` — ``{window: samples}`` -> the window with the lowest sample variance (pure).

``ClipWindowScores`` gathers the samples of every window batch by batch and picks the window: the one scorer
of the validation loop (``training/lightning_module.py``) and the sweep runner (``sweeps/runner.py``).

Note that a clipped window's estimate is not the full NELBO (that needs ``t ~ U[eps, 1]``); like BD3-LM,
the search trades that bias for a lower-variance training signal. Evaluation always uses the full range.

Shape legend: ``b`` batch, ``n`` tokens, ``k`` blocks, ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.core.loss import block_diffusion_loss

__all__ = ["ClipChoice", "ClipWindowScores", "block_nelbo_samples", "select_clip_window"]

Window = tuple[float, float]


@dataclass
class ClipChoice:
    beta: float
    omega: float
    variance: float  # sample variance of the per-block NELBO under the chosen window
    variances: dict[Window, float]  # every window's variance (for the variance-vs-window plot)


@torch.no_grad()
def block_nelbo_samples(
    model, x0: torch.Tensor, schedule, window: Window, eps: float = 1e-3,
    generator: torch.Generator | None = None, block_length: int | None = None,
) -> torch.Tensor:
    """Per-block NELBO estimates ``(b, k)`` of one batch with every block's ``t ~ U[window]`` (floored at eps)."""
    t_range = (max(window[0], eps), max(window[1], eps))
    out = block_diffusion_loss(
        model, x0, schedule, t_range, antithetic=True, generator=generator, block_length=block_length, reduction="block"
    )
    return out.per_block  # (b, k)


def select_clip_window(samples: dict[Window, torch.Tensor]) -> ClipChoice:
    """The window whose samples have the lowest variance (ties: the first in ``samples`` order)."""
    if not samples:
        raise ValueError("clip search needs at least one (beta, omega) window with samples")
    variances = {}
    for window, values in samples.items():
        values = torch.as_tensor(values, dtype=torch.float64).flatten()
        if values.numel() < 2:
            raise ValueError(f"window {window} has {values.numel()} sample(s); a variance needs at least 2")
        variances[tuple(window)] = values.var().item()
    best = min(variances, key=variances.get)
    return ClipChoice(beta=best[0], omega=best[1], variance=variances[best], variances=variances)


class ClipWindowScores:
    """Per-block NELBO samples of every ``(beta, omega)`` window, gathered batch by batch; ``choice()`` picks one.

    ``add(model, x0)`` scores a batch under every window, in grid order; ``add(model, x0, window)`` under one
    (a caller that loops window by window). All draws come from ``generator``, so the order of the calls fixes
    the numbers."""

    def __init__(self, windows, schedule, eps: float, generator: torch.Generator | None = None):
        self.schedule, self.eps, self.generator = schedule, eps, generator
        self.samples: dict[Window, list[torch.Tensor]] = {tuple(w): [] for w in windows}

    def add(self, model, x0: torch.Tensor, window: Window | None = None) -> None:
        for w in [tuple(window)] if window is not None else list(self.samples):
            estimates = block_nelbo_samples(model, x0, self.schedule, w, self.eps, self.generator)  # (b, k)
            self.samples[w].append(estimates.flatten())

    def choice(self) -> ClipChoice:
        """The lowest-variance window over every sample gathered so far (``select_clip_window``)."""
        return select_clip_window({w: torch.cat(s) for w, s in self.samples.items()})
