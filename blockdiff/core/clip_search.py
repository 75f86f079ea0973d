"""Data-driven clipped schedules: pick ``(beta, omega)`` that minimises the variance of the per-block NELBO.

BD3-LM (Arriola et al., 2025, §4) trains with ``t ~ U[beta, omega]`` and chooses the window by a search on
held-out batches: for every window of a grid, estimate the NELBO with that window's ``t`` and keep the
window whose estimate varies least. Two pieces, kept apart so the choice can be tested on synthetic data:

* ``block_nelbo_samples`` — one held-out batch, one window -> the per-block NELBO estimates ``(b, k)``
  (nats per token of the block: the weighted ``-log p`` of its masked tokens divided by ``l``);
* ``select_clip_window`` — ``{window: samples}`` -> the window with the lowest sample variance (pure).

Note that a clipped window's estimate is not the full NELBO (that needs ``t ~ U[eps, 1]``); like BD3-LM,
the search trades that bias for a lower-variance training signal. Evaluation always uses the full range.

Shape legend: ``b`` batch, ``n`` tokens, ``k`` blocks, ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blockdiff.core.noise import add_noise, sample_t

__all__ = ["ClipChoice", "block_nelbo_samples", "select_clip_window"]

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
    b, n = x0.shape
    l = block_length or model.block_length
    low, high = max(window[0], eps), max(window[1], eps)
    t = sample_t((b, n // l), low, high, antithetic=True, generator=generator, device=x0.device)  # (b, k)
    noised = add_noise(x0, t, schedule, l, model.mask_token_id, generator=generator)
    sel = noised.masked.clone()  # (b, n)
    sel[:, : model.num_unpredictable] = False
    hidden = model.training_hidden(noised.xt, x0, l)  # (b, n, d)
    nll = torch.zeros(b, n, device=x0.device)  # (b, n)
    nll[sel] = F.cross_entropy(model.logits(hidden[sel]), x0[sel], reduction="none")  # (m,) into (b, n)
    return (noised.weight * nll).reshape(b, n // l, l).sum(-1) / l  # (b, k)


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
