"""Generate-and-judge, defined once: continue prompts one at a time, keeping texts, tokens and costs.

One prompt at a time on purpose: a batch's NFE is that of its slowest row, so per-prompt calls give every
sample its own cost, and the seed of prompt ``i`` is ``seed + i`` whatever the other prompts are.
``generate_each`` is the loop (any generator: a block diffuser, a base decoder's ``generate()``);
``sample_each`` runs it with a block diffuser (``sampling.sample_texts``). The judge (``judge.py``) and the
sweep runner (``sweeps/runner.py``) both use it; scoring is ``scoring.py``'s (docs/design.md §8). No Lightning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Generations", "generate_each", "sample_each"]

GenerateOne = Callable[[int, str], tuple[str, list[int], int]]  # (index, prompt) -> (text, new tokens, forwards)


@dataclass
class Generations:
    prompts: list[str]
    texts: list[str]  # continuations, prompt excluded
    tokens: list[list[int]]  # the new tokens of each continuation
    nfes: list[int]  # network forwards each continuation cost
    seconds: float  # wall time of the whole loop
    rewrites: list[int] = field(default_factory=list)  # per continuation: written tokens later replaced (uniform noise)
    row_forwards: list[int] = field(default_factory=list)  # per continuation: forwards x rows (beam search: compute)

    @property
    def produced(self) -> int:
        return sum(len(t) for t in self.tokens)


def generate_each(prompts: list[str], generate_one: GenerateOne) -> Generations:
    """Call ``generate_one(i, prompt)`` for each prompt in order, timing the whole loop."""
    texts, tokens, nfes, start = [], [], [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        text, new, nfe = generate_one(i, prompt)
        texts.append(text)
        tokens.append(list(new))
        nfes.append(nfe)
    return Generations(list(prompts), texts, tokens, nfes, time.perf_counter() - start)


def sample_each(model, tokenizer, prompts: list[str], seed: int = 0, **settings) -> Generations:
    """Continue each prompt with the block diffuser, prompt ``i`` seeded ``seed + i`` on the model's device;
    ``settings`` are generation overrides (``max_new_tokens``, ``sampler``, ``tau``, ...)."""
    from blockdiff.sampling import sample_texts

    rewrites, row_forwards = [], []

    def one(i: int, prompt: str) -> tuple[str, list[int], int]:
        generator = torch.Generator(device=model.device).manual_seed(seed + i)
        (text,), out = sample_texts(model, tokenizer, [prompt], generator, **settings)
        rewrites.append(out.rewrites)
        row_forwards.append(int(out.sample_nfe[0]) if out.sample_nfe is not None else out.nfe)
        return text, out.new_tokens(0), out.nfe

    gens = generate_each(prompts, one)
    gens.rewrites, gens.row_forwards = rewrites, row_forwards
    return gens
