"""The two-model drafter (``drafter="two_model"``): a separate AR verifier checks what a proposer drafts.

``TwoModels`` is the registered ``Drafter`` (the loop's one step protocol, ``base.py``): one ``CausalLMVerifier``
forward and one proposer forward per step. A proposer is anything with the ``Proposer`` calls: ``reset``,
``draft(committed, limit, sampling, generator) -> Draft`` (tokens and the distributions ``q`` they were drawn
from) and ``commit(committed, accepted)`` once the step's tokens are final (tests pass oracles; a
``BlockDiffusionLM`` is wrapped in ``BlockDrafter``). A drafter that shares its forward with the verifier is a
``Drafter`` of its own (``fused.py``).

``BlockDrafter`` drafts with a ``BlockDiffusionLM`` in one forward:

```
committed = c_0 .. c_{n-1}           blocks on the training grid: block j = positions [j l, (j+1) l)
cache     = KV of the whole blocks before the one holding c_{n-1}        (clean, block-causal, final)
forward   = [committed tokens not in the cache] + [m] * k                 (the block after the committed tokens)
q         = the model's distribution at the k mask rows (logit shift: row i reads the row before it)
cache     cropped back to whole committed blocks: the masks and the partial block never stay in it
```

The committed tokens attend block-causally, as the clean stream does in training. The ``k`` masks form one
noisy block that sees every committed token and itself bidirectionally; by default it holds ``block_length``
masks right after the committed tokens (``aligned=False``). With ``aligned=True`` the masks fill only the rest
of the grid block the committed tokens end in (fewer drafts when they end mid-block), and the committed tokens
of that block are its unmasked noisy tokens — exactly the block loop's forward (``sampling/generation.py``). Drafts
never enter the drafter's cache, so a rejection needs no rollback there: the cache holds committed tokens only.
Past the training context the drafter sees the last ``window`` tokens (re-encoded at fresh positions when the
window slides, as in the block loop); the verifier always sees everything.

Shape legend: ``q`` input tokens, ``s`` key tokens, ``k`` drafts, ``v`` vocab, ``d`` hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from blockdiff.sampling.resolve import window_of
from blockdiff.sampling.speculative.base import Draft, Drafter, knob
from blockdiff.sampling.speculative.registry import register_drafter
from blockdiff.sampling.speculative.settings import Sampling
from blockdiff.sampling.speculative.verify import CausalLMVerifier, crop_to

__all__ = ["Proposer", "BlockDrafter", "Verified", "TwoModels"]


@runtime_checkable
class Proposer(Protocol):
    """What ``TwoModels`` needs from the model that drafts for a separate verifier."""

    forwards: int  # network forwards so far (since ``reset``)
    processed: int  # input tokens over those forwards

    @property
    def vocab_size(self) -> int:
        """Token ids it can read: every committed token must be below this."""

    def reset(self) -> None:
        """Forget everything (a new prompt follows)."""

    def draft(self, committed: list[int], limit: int, sampling: Sampling, generator=None) -> Draft:
        """Propose at most ``limit`` (>= 1) tokens to follow ``committed``; drawn with ``sampling.draw``."""

    def commit(self, committed: list[int], accepted: int) -> None:
        """The step is final: ``committed`` now ends with ``accepted`` of the drafts plus the verifier's token."""


class BlockDrafter:
    """A ``BlockDiffusionLM`` drafting one noisy block after the committed tokens per forward (module docstring)."""

    def __init__(self, model, aligned: bool = False, window: int | None = None):
        self.model = model
        self.aligned = aligned
        self.window = window_of(model, window, context=model.max_positions)  # room for c_{n-1}'s block and the drafts
        self.reset()

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def reset(self) -> None:
        self.cache = None  # KV of columns [window_start, cache_end)
        self.window_start = 0  # first column the network sees (a multiple of the block length)
        self.cache_end = 0
        self.forwards = 0
        self.processed = 0

    def commit(self, committed: list[int], accepted: int) -> None:
        """Nothing to undo: drafts never enter this drafter's cache."""

    @torch.no_grad()
    def draft(self, committed: list[int], limit: int, sampling: Sampling, generator=None) -> Draft:
        model, l = self.model, self.model.block_length
        n = len(committed)
        tail = (n - 1) // l * l  # first column of the block holding the last committed token
        if self.aligned:
            count = -(-n // l) * l - n or l  # the rest of the block the committed tokens end in (a whole one if none)
            mask_block = n // l  # the masks' block on the grid: the tail's when it is partial
        else:
            count, mask_block = l, tail // l + 1  # always a new block after the committed tokens
        count = min(count, limit)
        self._slide(n + count, tail)
        device = model.device
        start, ws = self.cache_end, self.window_start
        ids = torch.tensor(committed[start:] + [model.mask_token_id] * count, device=device)  # (q,)
        columns = torch.arange(start, n + count, device=device)  # (q,)
        keys = torch.arange(ws, n + count, device=device)  # (s,)
        q_block = torch.where(columns < n, columns // l, mask_block)  # (q,)
        k_block = torch.where(keys < n, keys // l, mask_block)  # (s,)
        allowed = k_block[None, :] <= q_block[:, None]  # (q, s): block-causal; the masks are the last block
        if model.spec.clean_attention == "causal":  # committed tokens token-causal (the base's own stream)
            allowed = torch.where((columns < n)[:, None], keys[None, :] <= columns[:, None], allowed)
        gate = (columns >= n)[None] if model.adapter is not None else None  # (1, q): the adapter on the masks only
        cache = self.cache if self.cache is not None else model.new_cache()
        hidden, cache = model.hidden_states(
            ids[None], (columns - ws)[None], model.format_mask(allowed[None, None]), past_key_values=cache,
            use_cache=True, gate=gate,
        )  # (1, q, d)
        crop_to(cache, tail - ws)  # whole committed blocks only
        self.cache, self.cache_end = cache, tail
        self.forwards += 1
        self.processed += len(ids)
        rows = hidden[:, n - start :]  # (1, k, d) the mask rows
        if model.spec.logit_shift:  # draft i reads the row before it; the first reads the last committed token
            rows = model.apply_logit_shift(rows, hidden[:, n - start - 1][:, None], block_length=count)
        tokens, probs = sampling.draw(model.logits(rows)[0], generator)  # (k,), (k, v) | None
        return Draft(tokens, probs)

    def _slide(self, end: int, tail: int) -> None:
        """When columns up to ``end`` would not fit the window, drop the oldest whole blocks (half a window's worth,
        at least one block) and forget the cache: the kept tokens are re-encoded at fresh positions next forward."""
        if self.window is None or end - self.window_start <= self.window:
            return
        l = self.model.block_length
        keep = max(0, min(self.window // 2, self.window - 2 * l)) // l * l  # whole blocks before the tail block
        self.window_start = max(0, tail - keep)
        self.cache, self.cache_end = None, self.window_start


def _is_block_diffuser(model) -> bool:
    return hasattr(model, "spec") and hasattr(model, "block_length")


@dataclass(eq=False)
class Verified(Drafter):
    """A verifier (``CausalLMVerifier``, or a plain causal LM it wraps) and a separate proposer (a ``Proposer``): one
    verifier forward per step, plus what the proposer costs. The base of the drafters that pair the two
    (``two_model`` here, ``lookup`` in ``lookup.py``); not registered itself."""

    verifier: Any = None
    drafter: Any = None

    def __post_init__(self):
        if not isinstance(self.verifier, CausalLMVerifier):
            self.verifier = CausalLMVerifier(self.verifier)

    @property
    def verifier_model(self):
        return self.verifier.model

    @property
    def vocab_size(self) -> int:
        return self.verifier.vocab_size

    @property
    def block_model(self):
        return getattr(self.drafter, "model", None) if isinstance(self.drafter, BlockDrafter) else None

    verifier_forwards = property(lambda self: self.verifier.forwards)
    drafter_forwards = property(lambda self: self.drafter.forwards)
    processed = property(lambda self: self.verifier.processed + self.drafter.processed)
    max_cache = property(lambda self: self.verifier.max_cache)

    def reset(self) -> None:
        self.verifier.reset()
        self.drafter.reset()

    def propose(self, committed, limit, sampling, generator=None) -> Draft:
        if limit < 1:
            return Draft(torch.zeros(0, dtype=torch.long))
        draft = self.drafter.draft(committed, limit, sampling, generator)
        probs = draft.probs[:limit] if draft.probs is not None else None
        return Draft(draft.tokens[:limit].long(), probs)  # never check more than can be kept

    def score(self, committed, drafts) -> torch.Tensor:
        return self.verifier.score(committed, drafts)

    def commit(self, committed, accepted) -> None:
        self.verifier.commit(committed)
        self.drafter.commit(committed, accepted)


@register_drafter
@dataclass(eq=False)
class TwoModels(Verified):
    """A verifier and a separate proposer (a ``Proposer``, or a ``BlockDiffusionLM`` it wraps in ``BlockDrafter``):
    one forward of each per step."""

    name = "two_model"
    aligned: bool = knob(False, "masks fill only the rest of the block the committed tokens end in (fewer drafts)")

    def __post_init__(self):
        super().__post_init__()
        if _is_block_diffuser(self.drafter):
            self.drafter = BlockDrafter(self.drafter, aligned=self.aligned)

    @classmethod
    def fits(cls, model, verifier) -> bool:
        return verifier is not None and model is not None

    @classmethod
    def from_config(cls, model, config, verifier=None) -> "TwoModels":
        return cls(verifier, model, **cls.knob_values(config))
