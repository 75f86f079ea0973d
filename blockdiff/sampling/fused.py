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

``FusedBlockDiffusion`` implements the step interface of ``speculative.py`` (``propose`` / ``score`` / ``commit``),
so the acceptance code is the same ``speculative_verify.accept_greedy`` / ``accept_sampled`` as for two models, and
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

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.speculative_drafters import Draft
from blockdiff.sampling.speculative_verify import Sampling, crop_to

__all__ = ["FusedBlockDiffusion", "supports_fused"]

_RESCALED_HEADS = ("final_logit_softcapping", "logit_scale")  # decoder configs whose forward changes the head's output


def supports_fused(model) -> bool:
    """Whether ``model`` (a ``BlockDiffusionLM``) can verify its own drafts in one forward: a gated adapter over its
    decoder and a token-causal clean stream."""
    spec = getattr(model, "spec", None)
    return spec is not None and spec.clean_attention == "causal" and spec.adapter == "gated_lora"


class FusedBlockDiffusion:
    """A ``BlockDiffusionLM`` that verifies with its own base decoder (gate off) and drafts with its adapter (gate
    on) in the same forward (module docstring). Invariant between steps: ``cache`` holds the base's keys and values
    of ``committed[:-1]`` exactly, and ``pending`` holds the mask rows' logits for the drafts after the last
    committed token, or ``None`` when the last step rejected a draft."""

    def __init__(self, model, masks: int | None = None):
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
        self.model = model
        self.masks = masks
        self.reset()

    # -- what the loop reads -------------------------------------------------------------------------
    @property
    def verifier_model(self):
        """The causal LM whose output this is: the decoder itself (with the gate off it is the base)."""
        return self.model.backbone

    @property
    def vocab_size(self) -> int:
        return self.model.backbone.get_output_embeddings().weight.shape[0]

    @property
    def drafter_forwards(self) -> int:
        return 0  # drafting shares the verifier's forward

    def reset(self) -> None:
        self.cache = self.model.new_cache()
        self.pending: torch.Tensor | None = None  # (j - 1, v) mask-row logits of the drafts after the committed ones
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
        device = model.device
        k = len(drafts)
        start = self.cache.get_seq_length()  # == len(committed) - 1 after a commit, 0 at first
        # masks: none when no later step could check a draft (the next one has room for at most the base's token);
        # else a whole block, cut only where it would pass the decoder's positions. Never cut to the room left
        # under max_new_tokens: the drafts would then depend on it (the masks see each other).
        end = len(committed) + k  # the first mask's position
        fits = self.model.max_positions - end if self.model.max_positions else self.masks
        j = min(self.masks, fits) if self._next_limit - k - 1 >= 1 and fits >= 2 else 0
        clean = committed[start:] + drafts.tolist()
        ids = torch.tensor(clean + [model.mask_token_id] * j, dtype=torch.long, device=device)  # (q,)
        columns = torch.arange(start, start + len(ids), device=device)  # (q,) no padding: position = index
        keys = torch.arange(0, start + len(ids), device=device)  # (s,)
        noisy_from = start + len(clean)  # == len(committed) + k: the first mask
        mask = model.sampling_mask(columns, keys, torch.zeros(1, dtype=torch.long, device=device), noisy_from)
        gate = (columns >= noisy_from).to(model.backbone.dtype)[None]  # (1, q): 1 on the mask rows
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
        if j:  # mask row i predicts token n + k + 1 + i under the logit shift (row i + 1 without it)
            draft_rows = hidden[:, len(clean) : len(clean) + j - 1] if model.spec.logit_shift else hidden[
                :, len(clean) + 1 : len(clean) + j
            ]
            self.pending = model.logits(draft_rows)[0]  # (j - 1, v) SUBS: a draft is never the mask token
        else:
            self.pending = None
        return logits

    def commit(self, committed: list[int], accepted: int) -> None:
        """The step is final: crop the cache to ``committed[:-1]`` (the mask rows and rejected drafts leave it) and
        keep the next drafts only if every checked draft survived (they assumed it)."""
        crop_to(self.cache, len(committed) - 1)
        if accepted < self._checked:
            self.pending = None
