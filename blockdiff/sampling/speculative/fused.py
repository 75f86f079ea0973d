"""Fused speculative block decoding: ONE forward per step both verifies the previous drafts and drafts the next
ones (TiDAR's scheme with the frozen base as the exact AR head; docs/design.md §14, docs/generation.md).

It needs a ``BlockDiffusionLM`` whose clean stream *is* the base decoder: ``spec.clean_attention == "causal"`` and
a gated adapter (``spec.adapter == "gated_lora"``) over the decoder. With the gate off, the rows of a forward are
computed by ``model.backbone`` alone, token-causally: their logits are the decoder's own next-token logits and
their keys and values are its KV cache (tests/test_adapter.py checks this bit for bit). With the gate on, mask
rows draft with the adapter. So one network call can do both jobs:

```
cache   = the base's KV of committed[:-1]                       (c = committed, n = len(c))
forward = [c_{n-1} (or the whole prompt at first) ; d_0 .. d_{k-1}]     clean rows: gate 0, causal
        + [m] * j   at positions n+k .. n+k+j-1                          mask rows: gate 1, see every clean
                                                                         row and each other (one noisy block)
clean row i   -> the base's logits after c + d[:i]  (k + 1 rows: what accept_greedy / accept_sampled read)
mask rows     -> the next drafts: token at n+k is the base's own (the last clean row; the logit shift makes the
                 first token of a block the clean stream's), tokens n+k+1 .. n+k+j-1 read mask rows 0 .. j-2
cache   cropped to the committed tokens but the last: the mask rows' KV never stays, rejected drafts leave
```

The mask rows' drafts assume every one of the ``k`` drafts survives. They do (``accepted == k``): the step commits
``d_0 .. d_{k-1}`` plus the base's token at ``n+k``, and the next step checks the ``j - 1`` drafts after it. They
do not: the drafts are discarded and the next step checks nothing, feeding only the correction token and fresh
masks (it commits the base's next token and drafts again). So a step commits ``accepted + 1`` tokens for one
forward of ``1 + k + j`` tokens (``j = block_length`` masks; none in a last step, fewer at the end of the
decoder's positions).

``every_length=True`` (TiDAR's drafting for every acceptance length): the forward holds ``k + 1`` mask blocks, block
``i`` right after ``committed + d[:i]`` (positions ``n+i .. n+i+j-1``; it sees the committed tokens, the first ``i``
drafts and itself). Whatever the verifier keeps, ``a`` drafts, block ``a`` was drafted under exactly the committed
tokens, so the next step always has drafts to check: no step after a rejection checks nothing. The price is
``(k + 1) j`` masks per forward instead of ``j``; whether it pays depends on the forward's cost curve
(docs/benchmarks.md).

``FusedBlockDiffusion`` is the registered drafter ``fused`` (the step protocol of ``base.py``: ``propose`` / ``score``
/ ``commit``; knobs ``masks`` and ``every_length``),
so the acceptance code is the same ``verify.accept_greedy`` / ``accept_sampled`` as for two models, and
the output is token for token (greedy) or in distribution (sampling) ``model.backbone.generate``'s: the base
decoder's. ``propose`` runs no network: it returns the drafts of the previous forward (drawn then with
``sampling.draw``, from the mask rows' distributions ``q``). ``verifier_forwards`` counts the fused forwards (one
per step); ``drafter_forwards`` stays 0.

The verifier's logits are the output head on the clean rows, in the decoder's dtype, read as float32 (as
transformers' ``generate`` reads them), without blockdiff's SUBS (the base may well predict the mask token's id).
This is the whole head of Llama / Qwen2 / Mistral / GPT-2 style decoders; a decoder whose ``forward`` rescales or
soft-caps its logits after the head (Gemma 2, Cohere) is refused. There is no sliding window: the base sees every
committed token (up to its ``max_position_embeddings``), and the adapter drafts from the same forward.

Shape legend: ``q`` fed tokens, ``s`` key tokens, ``k`` drafts checked, ``j`` masks, ``v`` vocab, ``d`` hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.speculative.base import Draft, Drafter, knob
from blockdiff.sampling.speculative.registry import register_drafter
from blockdiff.sampling.speculative.settings import Sampling
from blockdiff.sampling.speculative.verify import crop_to

__all__ = ["FusedBlockDiffusion", "supports_fused"]

_RESCALED_HEADS = ("final_logit_softcapping", "logit_scale")  # decoder configs whose forward changes the head's output


def supports_fused(model) -> bool:
    """Whether ``model`` (a ``BlockDiffusionLM``) can verify its own drafts in one forward: a gated adapter over its
    decoder and a token-causal clean stream."""
    spec = getattr(model, "spec", None)
    return spec is not None and spec.clean_attention == "causal" and spec.adapter == "gated_lora"


@register_drafter
@dataclass(eq=False)
class FusedBlockDiffusion(Drafter):
    """A ``BlockDiffusionLM`` that verifies with its own base decoder (gate off) and drafts with its adapter (gate
    on) in the same forward (module docstring). Invariant between steps: ``cache`` holds the base's keys and values
    of ``committed[:-1]`` exactly, and ``pending`` holds the mask rows' logits for the drafts after the last
    committed token, or ``None`` when no mask block was drafted after them (a rejection without ``every_length``, or
    no room left)."""

    name = "fused"
    needs_verifier = False
    model: Any = None
    masks: int | None = knob(None, "masks drafted per forward, 2 .. block_length (default: block_length)")
    every_length: bool = knob(False, "draft one mask block for every acceptance length (TiDAR's full scheme)")

    def __post_init__(self):
        model, masks = self.model, self.masks
        if not supports_fused(model):
            spec = model.spec
            raise UsageError(
                "fused speculative decoding needs a model whose clean stream is its base decoder: trained with "
                "model.clean_attention=causal model.adapter=gated_lora (this one has clean_attention="
                f"{spec.clean_attention}, adapter={spec.adapter}); verify it with a separate base decoder instead "
                "(speculative_generate(base, model, ...), or --base NAME on the command line)"
            )
        config = model.backbone.config
        rescaled = [key for key in _RESCALED_HEADS if getattr(config, key, None) not in (None, 1, 1.0)]
        if rescaled:
            raise UsageError(
                f"the {config.model_type} decoder changes its logits after the output head ({rescaled[0]}), which the "
                "fused step does not reproduce; verify with the base decoder as a separate model (--base NAME)"
            )
        masks = masks or model.block_length
        if not 2 <= masks <= model.block_length:  # the masks are one noisy block, as in training
            raise UsageError(
                f"the fused step feeds 2 .. block_length ({model.block_length}) masks per forward, got {masks}"
            )
        self.masks = masks
        self.reset()

    @classmethod
    def fits(cls, model, verifier) -> bool:
        return verifier is None and supports_fused(model)

    @classmethod
    def from_config(cls, model, config, verifier=None) -> "FusedBlockDiffusion":
        if verifier is not None:
            raise UsageError("the fused drafter verifies with the model's own frozen base: give no separate verifier "
                             "(--base), or pick drafter=two_model")
        return cls(model, **cls.knob_values(config))

    @classmethod
    def check_knobs(cls, config) -> None:
        super().check_knobs(config)
        if config.masks is not None and config.masks < 2:
            raise UsageError(f"masks must be an integer >= 2 (the masks are one noisy block), got {config.masks!r}")

    # -- what the loop reads -------------------------------------------------------------------------
    @property
    def verifier_model(self):
        """The causal LM whose output this is: the decoder itself (with the gate off it is the base)."""
        return self.model.backbone

    @property
    def vocab_size(self) -> int:
        return self.model.backbone.get_output_embeddings().weight.shape[0]

    @property
    def block_model(self):
        return self.model

    @property
    def drafter_forwards(self) -> int:
        return 0  # drafting shares the verifier's forward

    def reset(self) -> None:
        self.cache = self.model.new_cache()
        self.pending: torch.Tensor | None = None  # (j - 1, v) mask-row logits of the drafts after the committed ones
        self._blocks: dict[int, torch.Tensor] = {}  # drafts kept -> that mask block's draft rows (j - 1, d)
        self.verifier_forwards = 0
        self.processed = 0  # input tokens over all forwards
        self.max_cache = 0
        self._next_limit = 0  # drafts the next step can check at most, if this one keeps all of its own
        self._checked = 0  # drafts fed to the last forward

    # -- the step ------------------------------------------------------------------------------------
    def propose(self, committed: list[int], limit: int, sampling: Sampling, generator=None) -> Draft:
        """The drafts to check now (no forward): drawn from the last forward's mask rows, at most ``limit``; none at
        the first step or after a rejection."""
        self._next_limit = limit
        if self.pending is None or limit < 1:
            return Draft(torch.zeros(0, dtype=torch.long))
        tokens, probs = sampling.draw(self.pending[:limit], generator)  # (k,), (k, v) | None
        return Draft(tokens, probs)

    @torch.no_grad()
    def score(self, committed: list[int], drafts: torch.Tensor) -> torch.Tensor:
        """Logits ``(k + 1, v)``: row ``i`` is the base decoder's prediction after ``committed + drafts[:i]``. The same
        forward drafts what follows ``committed + drafts`` (kept in ``pending`` until ``commit``)."""
        model = self.model
        k = len(drafts)
        start = self.cache.get_seq_length()  # == len(committed) - 1 after a commit, 0 at first
        # mask blocks: one after all k drafts (every_length: one after each a = 0 .. k drafts), but only for the
        # acceptance lengths after which the next step has room to check a draft; each a whole block, cut only where
        # it would pass the decoder's positions. Never cut to the room left under max_new_tokens: the drafts would
        # then depend on it (the masks see each other).
        useful = [a for a in (range(k + 1) if self.every_length else [k]) if self._next_limit - a - 1 >= 1]
        n = len(committed)
        fits = self.model.max_positions - n - max(useful, default=0) if self.model.max_positions else self.masks
        j = min(self.masks, fits) if useful and fits >= 2 else 0
        follows = useful if j else []
        clean = committed[start:] + drafts.tolist()
        ids, columns, mask, gate = self._forward_inputs(clean, start, n, follows, j)
        hidden, self.cache = model.hidden_states(
            ids[None], columns[None], mask, past_key_values=self.cache, use_cache=True, gate=gate, fast_gqa=True,
        )  # (1, q, d)
        self.verifier_forwards += 1
        self.processed += len(ids)
        self.max_cache = max(self.max_cache, self.cache.get_seq_length())
        self._checked = k
        rows = len(clean) - k - 1  # the clean row of committed[-1]
        head = model.backbone.get_output_embeddings()
        logits = head(hidden[0, rows : len(clean)]).float()  # (k + 1, v) the base's own head, no SUBS
        # mask row r of a block predicts the block's token r + 1 under the logit shift (its own token r without it);
        # the block's token 0 is the verifier's (the clean row before it)
        first = 0 if model.spec.logit_shift else 1
        rows_of = hidden[0, len(clean) :].unflatten(0, (len(follows), j))[:, first : first + j - 1]  # (blocks, j-1, d)
        self._blocks = dict(zip(follows, rows_of))
        # until commit: the drafts that assume every draft is kept (every_length: none yet; commit projects only
        # the block that follows what was kept, one head call per step)
        self.pending = None if self.every_length else self._drafts_after(k)
        return logits

    def _forward_inputs(self, clean: list[int], start: int, n: int, follows: list[int], j: int):
        """``(ids (q,), columns (q,), mask, gate (1, q))`` of one fused forward: the clean rows ``clean`` (columns
        ``start ..``, token-causal), then one block of ``j`` masks per entry ``a`` of ``follows``, at columns
        ``n + a ..``: it sees the cache, the clean rows before column ``n + a`` (the committed tokens and the first
        ``a`` drafts) and itself."""
        model, device = self.model, self.model.device
        c = len(clean)
        blocks = len(follows)
        follows = torch.tensor(follows, dtype=torch.long, device=device)  # (blocks,)
        block_of = torch.arange(blocks, device=device).repeat_interleave(j)  # (m,) m = blocks j
        ids = torch.tensor(clean + [model.mask_token_id] * len(block_of), dtype=torch.long, device=device)  # (q,)
        mask_cols = n + follows[block_of] + torch.arange(j, device=device).repeat(blocks)  # (m,) blocks overlap
        columns = torch.cat([torch.arange(start, start + c, device=device), mask_cols])  # (q,)
        group = torch.cat([torch.full((c,), -1, device=device), block_of])  # (q,) -1: a clean row
        last_seen = torch.cat([columns[:c], n + follows[block_of] - 1])  # (q,) the last clean column each row sees
        clean_key = (group == -1)[None, :] & (columns[None, :] <= last_seen[:, None])  # (q, q)
        same_block = (group >= 0)[None, :] & (group[None, :] == group[:, None])  # (q, q)
        cached = torch.ones(len(ids), start, dtype=torch.bool, device=device)  # (q, start) everyone sees the cache
        allowed = torch.cat([cached, clean_key | same_block], dim=1)  # (q, s)
        gate = (group >= 0).to(model.backbone.dtype)[None]  # (1, q): 1 on the mask rows
        return ids, columns, model.format_mask(allowed[None, None]), gate

    def commit(self, committed: list[int], accepted: int) -> None:
        """The step is final: crop the cache to ``committed[:-1]`` (the mask rows and rejected drafts leave it) and
        keep the drafts of the mask block made after exactly the ``accepted`` kept drafts (none after a rejection
        unless ``every_length``)."""
        crop_to(self.cache, len(committed) - 1)
        if self.every_length or accepted != self._checked:
            self.pending = self._drafts_after(accepted)
        self._blocks = {}

    def _drafts_after(self, accepted: int) -> torch.Tensor | None:
        """``(j - 1, v)`` logits of the mask block drafted after ``accepted`` drafts (``None``: there is none)."""
        rows = self._blocks.get(accepted)
        return None if rows is None else self.model.logits(rows[None])[0]  # SUBS: a draft is never the mask token
