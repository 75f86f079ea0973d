"""Training curricula that move an AR-initialised decoder towards block diffusion. Pure functions of the step.

Two recipes from the AR-to-diffusion adaptation literature, selectable in the ``curriculum`` config
section and usable together:

* **block-length curriculum** — train at block length ``start`` (1 = the AR end, exactly where a
  pretrained decoder with the logit shift already is), then ``2*start``, ``4*start``, … up to the
  target, in equal stages over the first ``fraction`` of the steps; the target from then on. Every
  stage length divides the target, so it divides ``data.max_seq_len`` too.
* **attention-mask annealing** — inside each noisy block, a query may attend to *later* positions of its
  block with probability ``p`` rising linearly from 0 (causal, as the decoder was trained) to 1
  (bidirectional, the block-diffusion mask) over the first ``fraction`` of the steps.
* **mask-floor curriculum** (toward fewer denoising steps per block, issue 23) — the lowest training noise level
  (the floor of ``t ~ U[floor, omega]``) rises linearly from ``noise.beta`` to ``end`` over the first ``fraction``
  of the steps: training moves toward heavily masked blocks, the state a sampler that reveals many tokens per
  forward works in. Validation keeps the full range, so ``val/nll`` stays the NELBO.
"""

from __future__ import annotations

__all__ = ["block_length_stages", "block_length_at", "bidirectional_fraction_at", "mask_floor_at"]


def block_length_stages(start: int, target: int) -> list[int]:
    """``[start, 2*start, 4*start, ..., target]`` (every entry divides ``target``)."""
    if start < 1 or target % start:
        raise ValueError(f"the curriculum's start block length {start} must be >= 1 and divide the target {target}")
    stages = [start]
    while stages[-1] < target:
        nxt = stages[-1] * 2
        stages.append(nxt if target % nxt == 0 and nxt < target else target)
    return stages


def block_length_at(step: int, max_steps: int, target: int, fraction: float, start: int = 1) -> int:
    """Training block length at optimiser step ``step`` (0-based)."""
    stages = block_length_stages(start, target)
    curriculum_steps = fraction * max_steps
    if fraction <= 0 or step >= curriculum_steps or len(stages) == 1:
        return target
    stage_steps = curriculum_steps / (len(stages) - 1)  # the last stage (target) runs to the end
    return stages[min(int(step // stage_steps), len(stages) - 1)]


def bidirectional_fraction_at(step: int, max_steps: int, fraction: float) -> float:
    """Probability that an anti-causal in-block attention cell is open at ``step`` (1.0 = no annealing)."""
    if fraction <= 0:
        return 1.0
    return min(1.0, step / (fraction * max_steps))


def mask_floor_at(step: int, max_steps: int, start: float, end: float, fraction: float) -> float:
    """Lowest training noise level at ``step``: ``start`` rising linearly to ``end`` over the first ``fraction`` of
    ``max_steps``, then ``end`` (``start`` throughout when ``fraction`` is 0)."""
    if fraction <= 0:
        return start
    return start + (end - start) * min(1.0, step / (fraction * max_steps))
