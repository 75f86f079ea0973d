"""The one interface every sampler implements, and the state of the block being denoised.

A sampler decides, at one denoising step of the current block, which masked positions to reveal and
with which tokens (and, for remasking, which committed tokens to re-open). It sees only the current
block: the cache of finished blocks is not its business. It must make progress: every sampler reveals
at least one token per step except the ancestral DDPM sampler, whose last step reveals everything.

A sampler is a small dataclass deriving from ``Sampler`` (docs/design.md §9): the fields made with ``knob``
are its settings (a default and a one-line doc each; they become generation-config fields, ``blockdiff
sample`` flags and sweep keys through ``registry.py``), ``__post_init__`` holds its own checks, and
``from_config`` builds it from a generation config. One is built per ``generate`` call and serves every block,
so ``step`` must keep no state between calls.

Under uniform (random-token) noise (``spec.noise_kind == "uniform"``) there is no mask to reveal: the block starts
as random tokens and a sampler that sets ``rewrites`` implements ``rewrite`` instead of ``step``: at each step it
may write *any* generated position of the block, including one it wrote before (``rewrite.py`` is that loop).

A sampler that sets ``edits`` (``editing.py``) also gets a proposal at the block's *committed* generated positions,
may replace committed tokens (``StepResult.edited``) and may keep a block open after its last mask
(``StepResult.open``: post-fill editing steps); ``BlockState.post_steps`` counts those steps. A sampler that clears
``reveals`` runs under uniform noise only (``renoise.py``). ``temperature_at`` lets a sampler set the temperature of
each step's proposal (the entropy-bound sampler's t_max -> t_min schedule).

Shape legend: ``b`` batch, ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = [
    "BlockState", "StepResult", "RewriteState", "RewriteResult", "Sampler", "Generators", "knob", "reveal",
    "top_confident", "uniform", "noise_tokens", "entropy",
]

# One generator for the whole batch, or one per sample (then a sample's random stream, and so its text,
# does not depend on which other prompts share its batch).
Generators = torch.Generator | list[torch.Generator] | None


@dataclass
class BlockState:
    tokens: torch.Tensor  # (b, l) current block, mask id where still masked
    masked: torch.Tensor  # (b, l) bool
    editable: torch.Tensor  # (b, l) bool: positions the model generated (prompt tokens are not)
    confidence: torch.Tensor  # (b, l) model probability of each committed token when it was revealed
    step: int  # 0-based step within this block
    num_steps: int  # the block's step budget (steps_per_block)
    post_steps: torch.Tensor | None = None  # (b,) long: steps taken after the row's last mask was filled (editing)


@dataclass
class StepResult:
    tokens: torch.Tensor  # (b, l) the block after this step
    confidence: torch.Tensor  # (b, l) updated confidences
    revealed: torch.Tensor  # (b, l) bool: positions unmasked at this step
    remasked: torch.Tensor  # (b, l) bool: committed positions re-opened at this step
    edited: torch.Tensor | None = None  # (b, l) bool: committed tokens replaced by another at this step (``edits``)
    open: torch.Tensor | None = None  # (b,) bool: rows whose block stays open with no mask left (``edits``)


@dataclass
class RewriteState:
    """The current block under uniform noise: every editable position holds a token (random until written)."""

    tokens: torch.Tensor  # (b, l) current block
    written: torch.Tensor  # (b, l) bool: positions the sampler has written (the rest still hold their noise)
    editable: torch.Tensor  # (b, l) bool: positions the model generates (not the prompt, not past max_new_tokens)
    step: int  # 0-based step within this block
    num_steps: int  # the block's step budget (steps_per_block)
    mask_token_id: int  # never a class of the uniform process (the posterior gives it no mass)
    vocab_size: int = 0  # the network's vocabulary (random tokens are drawn from it, the mask token excluded)
    post_steps: torch.Tensor | None = None  # (b,) long: steps taken after every position was written (editing)
    probs: torch.Tensor | None = None  # (b, l, v) the model's untempered distribution (samplers with needs_probs)


@dataclass
class RewriteResult:
    tokens: torch.Tensor  # (b, l) the block after this step
    written: torch.Tensor  # (b, l) bool: positions written so far (this step included)
    done: torch.Tensor  # (b,) bool: the block of this sample is final


def knob(default: Any, doc: str):
    """A sampler setting: a dataclass field with a default and a one-line ``doc`` (the help of its CLI flag)."""
    return dataclasses.field(default=default, metadata={"knob": doc})


class Sampler:
    """Base of every sampler: subclass it as a ``@dataclass``, give it a ``name`` and ``knob`` fields, register it
    with ``registry.register_sampler`` (docs/design.md §9)."""

    name: ClassVar[str]
    needs_probs: ClassVar[bool] = False  # whether ``step`` reads ``probs`` (the block loop skips them otherwise)
    rewrites: ClassVar[bool] = False  # implements ``rewrite``: usable with uniform-noise models
    reveals: ClassVar[bool] = True  # implements ``step``: usable with absorbing-noise (mask) models
    edits: ClassVar[bool] = False  # sees proposals at committed positions, may edit them and keep a block open

    @classmethod
    def from_config(cls, config, schedule=None) -> "Sampler":
        """The sampler with its knobs read from ``config`` (a ``BlockDiffusionGenerationConfig``); ``schedule`` is
        the noise schedule the model was trained with (only samplers that follow alpha(t) read it)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if "knob" in f.metadata})

    @property
    def post_steps_budget(self) -> int:
        """Steps a block may take after its last mask is filled (editing samplers); the block loop's safety cap on
        steps per block is ``steps_per_block + 2 * block_length`` plus this."""
        return 0

    def temperature_at(self, temperature: float, step: int, num_steps: int) -> float:
        """The temperature the proposal of step ``step`` (of a budget of ``num_steps``) is drawn at, given the
        call's ``temperature`` (0: greedy). The default keeps the call's."""
        return temperature

    def step(
        self,
        tokens: torch.Tensor,
        confidence: torch.Tensor,
        state: BlockState,
        generator: Generators,
        probs: torch.Tensor | None = None,
    ) -> StepResult:
        """One step. ``tokens``/``confidence`` (b, l): a proposal for every position (from ``choose_tokens``);
        ``probs`` (b, l, v): the model's distribution there, for samplers that need more than the proposal (passed
        only to those that set ``needs_probs``; zero at unmasked positions)."""
        raise NotImplementedError

    def rewrite(
        self, tokens: torch.Tensor, confidence: torch.Tensor, probs: torch.Tensor, state: RewriteState,
        generator: Generators,
    ) -> RewriteResult:
        """One step under uniform noise (only samplers with ``rewrites``). ``tokens``/``confidence`` (b, l): a
        proposal at every editable position; ``probs`` (b, l, v): the tempered, filtered distribution there."""
        raise NotImplementedError


def reveal(state: BlockState, proposal: torch.Tensor, proposal_conf: torch.Tensor, chosen: torch.Tensor) -> StepResult:
    """Commit ``proposal`` at ``chosen & masked`` positions; the common tail of every sampler."""
    chosen = chosen & state.masked
    return StepResult(
        tokens=torch.where(chosen, proposal, state.tokens),
        confidence=torch.where(chosen, proposal_conf, state.confidence),
        revealed=chosen,
        remasked=torch.zeros_like(chosen),
    )


def uniform(shape, generator: Generators, device, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``U[0, 1)`` of ``shape`` (b, ...). With per-sample generators each row draws from its own, and only
    the ``rows`` (bool (b,)) still denoising draw at all."""
    if not isinstance(generator, list):
        return torch.rand(shape, generator=generator, device=device)
    out = torch.zeros(shape, device=device)
    for i, g in enumerate(generator):
        if rows is None or rows[i]:
            out[i] = torch.rand(shape[1:], generator=g, device=device)
    return out


def noise_tokens(shape, vocab_size: int, mask_token_id: int, generator: Generators, device, rows=None) -> torch.Tensor:
    """Tokens uniform over the ``vocab_size - 1`` non-mask ids, one ``U[0, 1)`` each (per-sample generators honoured,
    as ``uniform``): ``shape`` long tensor. The uniform prior of a block, and the fresh noise of a renoised position."""
    r = (uniform(shape, generator, device, rows=rows) * (vocab_size - 1)).long().clamp(max=vocab_size - 2)
    return r + (r >= mask_token_id).long()


def entropy(probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy in nats (...) of each distribution ``probs`` (..., v), after tempering it to ``probs ** (1 /
    temperature)`` renormalised (``temperature`` > 0; 1 leaves it as it is). All-zero rows get entropy 0."""
    if temperature != 1.0:
        logp = torch.where(probs > 0, probs.clamp_min(1e-45).log(), float("-inf")) / temperature
        probs = torch.where(probs.sum(-1, keepdim=True) > 0, logp.softmax(-1), probs)
        probs = torch.nan_to_num(probs)
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def top_confident(confidence: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool (b, l): the ``k[i]`` most confident masked positions of each row."""
    order = confidence.masked_fill(~masked, -1.0).argsort(dim=-1, descending=True)  # (b, l)
    places = torch.arange(order.shape[-1], device=order.device).expand_as(order)  # (b, l)
    rank = torch.empty_like(order).scatter_(-1, order, places)
    return masked & (rank < k[:, None])
