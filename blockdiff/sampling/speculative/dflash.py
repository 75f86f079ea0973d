"""The DFlash drafter (``drafter="dflash"``): a small block-diffusion network drafts a whole block in one forward
from the verifier's own hidden states of the committed tokens (``modeling/dflash.py``; DFlash, arXiv 2602.06036;
docs/design.md §14). The verifier's forward that checks a step also yields the states the next draft reads, so the
drafter costs one small forward per step and nothing on the verifier's side.

```
step 0:   no states yet: propose nothing; the verifier's forward over the prompt commits one token and yields states
step t:   absorb the states of the newly committed tokens (all but the last) into the drafter's context cache
          block = [c_{n-1}, m, ..., m] at positions n-1 ..;  one drafter forward -> up to block_length - 1 drafts
          cut at the first draft whose own probability is below dflash_threshold (a weak drafter proposes less)
verify:   [c_{n-1} ; drafts] through the verifier as every drafter is (greedy: longest agreeing prefix + one)
```

The context cache holds committed tokens only, each added once from the verifier forward that committed it (a
draft's states are exact once it is accepted: causal attention saw only accepted tokens before it), so it equals a
fresh prefill of the committed tokens after any accept / reject sequence (tested). Drafts are drawn from the
drafter's distribution on the draft vocabulary (zero elsewhere), which speculative sampling accepts exactly.

Sampling loads no network (docs/design.md §11): the drafter network arrives built, from
``blockdiff.modeling.dflash.load_drafter`` (checked against the verifier, packed for CPU, its draft head attached),
as the second argument of ``speculative_generate`` or through ``modeling/speculative.py`` for the CLI and server.

Shape legend: ``k`` drafts, ``l`` block length, ``v`` the verifier's vocabulary, ``F`` feature width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from blockdiff.errors import UsageError
from blockdiff.sampling.speculative.base import Draft, knob
from blockdiff.sampling.speculative.drafters import Verified
from blockdiff.sampling.speculative.registry import register_drafter
from blockdiff.sampling.speculative.settings import Sampling
from blockdiff.sampling.speculative.verify import CausalLMVerifier

__all__ = ["DFlash", "DFlashProposer", "is_dflash_network"]

LOAD_IT = ("load the drafter network with blockdiff.modeling.dflash.load_drafter(DIR, verifier) and pass it: "
           "speculative_generate(verifier, network, ids, drafter=\"dflash\") (on the command line: --dflash-path DIR)")


def is_dflash_network(model) -> bool:
    """Whether ``model`` is a DFlash drafter network (``modeling/dflash.py``'s ``DFlashDrafter``; duck-typed, since
    sampling imports no network class)."""
    return all(hasattr(model, a) for a in ("context_cache", "target_layer_ids", "draft_ids", "mask_token_id"))


class DFlashProposer:
    """A ``Proposer`` drafting with a ``DFlashDrafter`` from the states its ``CausalLMVerifier`` keeps (module
    docstring). ``max_drafts`` caps the drafts per step (0: ``block_length - 1``); ``threshold`` cuts them at the
    first one whose own probability is below it."""

    def __init__(self, drafter, verifier: CausalLMVerifier, max_drafts: int = 0, threshold: float = 0.0):
        self.net, self.verifier = drafter, verifier
        target = verifier.model
        self.embed = target.get_input_embeddings().weight
        self.head = getattr(drafter, "draft_head", None)  # the draft rows as one (packed) linear: load_drafter's
        if self.head is None:
            head = target.get_output_embeddings().weight.detach()
            self.head = nn.Linear(head.shape[1], len(drafter.draft_ids), bias=False)
            rows = head[drafter.draft_ids].to(drafter.fc.weight.dtype).clone()
            self.head.weight = nn.Parameter(rows, requires_grad=False)
        self.max_drafts = min(max_drafts or drafter.block_length - 1, drafter.block_length - 1)
        self.threshold = threshold
        self.reset()

    @property
    def vocab_size(self) -> int:
        return self.verifier.vocab_size

    def reset(self) -> None:
        self.cache = None  # the drafter's keys / values of committed tokens [0, self.known)
        self.known = 0
        self.forwards = 0
        self.processed = 0

    def commit(self, committed: list[int], accepted: int) -> None:
        """Nothing to undo: the context cache only ever holds committed tokens (absorbed at the next draft)."""

    def absorb(self, committed: list[int]) -> None:
        """Add the verifier's states of ``committed[known : n - 1]`` (the last forward fed them) to the cache."""
        end = len(committed) - 1
        if end <= self.known or self.verifier.features is None:
            return
        rows = self.verifier.features[self.known - self.verifier.fed_start : end - self.verifier.fed_start]  # (c, F)
        positions = torch.arange(self.known, end, device=rows.device)[None]
        self.cache = self.net.context_cache(rows[None].to(self.net.fc.weight.dtype), positions, self.cache)
        self.known = end
        self.processed += len(rows)

    @torch.no_grad()
    def draft(self, committed: list[int], limit: int, sampling: Sampling, generator=None) -> Draft:
        self.absorb(committed)
        count = min(limit, self.max_drafts)
        if self.cache is None or count < 1:  # step 0: the verifier has not read the prompt yet
            return Draft(torch.zeros(0, dtype=torch.long))
        n, l = len(committed), self.net.block_length
        ids = torch.tensor([committed[-1]] + [self.net.mask_token_id] * (l - 1), device=self.embed.device)
        embeds = F.embedding(ids, self.embed)[None].to(self.net.fc.weight.dtype)  # (1, l, d)
        hidden = self.net(embeds, torch.arange(n - 1, n - 1 + l, device=ids.device)[None], self.cache)  # (1, l, d)
        small = self.head(hidden[0, 1 : 1 + count]).float()  # (k, v_draft)
        full = small.new_full((count, self.vocab_size), float("-inf"))
        ids_ok = self.net.draft_ids < self.vocab_size
        full[:, self.net.draft_ids[ids_ok]] = small[:, ids_ok]  # (k, v): -inf off the draft vocabulary
        tokens, probs = sampling.draw(full, generator)
        self.forwards += 1
        self.processed += l
        keep = self._confident(full, tokens, probs, sampling)
        return Draft(tokens[:keep], None if probs is None else probs[:keep])

    def _confident(self, logits, tokens, probs, sampling: Sampling) -> int:
        """How many leading drafts have their own probability >= ``threshold``."""
        if self.threshold <= 0:
            return len(tokens)
        own = (probs if probs is not None else sampling.fit(logits).softmax(-1)).gather(1, tokens[:, None])[:, 0]
        low = (own < self.threshold).nonzero()
        return int(low[0]) if len(low) else len(tokens)


@register_drafter
@dataclass(eq=False)
class DFlash(Verified):
    """The verifier checks what a ``DFlashDrafter`` drafts from the verifier's own states (module docstring)."""

    name = "dflash"
    needs_block_model = False
    dflash_path: str | None = knob(None, "folder of the DFlash drafter network, read by whoever loads it (the CLI, "
                                         "the server; None: the one shipped for the verifier)")
    dflash_tokens: int = knob(0, "most drafts per step of the DFlash drafter (0: its block length - 1)")
    dflash_threshold: float = knob(0.0, "drop DFlash drafts from the first one whose own probability is below this")

    def __post_init__(self):
        super().__post_init__()
        net, target = self.drafter, self.verifier.model
        if not is_dflash_network(net):
            raise UsageError(f"the {self.name} drafter needs a DFlash drafter network; {LOAD_IT}")
        width = len(net.target_layer_ids) * target.config.hidden_size
        if net.fc.in_features != width or max(net.target_layer_ids) >= target.config.num_hidden_layers:
            raise UsageError(f"the DFlash drafter reads layers {net.target_layer_ids} ({net.fc.in_features} feature "
                             f"columns) but this verifier has {target.config.num_hidden_layers} layers of width "
                             f"{target.config.hidden_size}: it was trained for another model; pass that one")
        self.net = net
        self.verifier.feature_layers = net.target_layer_ids
        self.drafter = DFlashProposer(net, self.verifier, self.dflash_tokens, self.dflash_threshold)

    @classmethod
    def accepts(cls, model) -> bool:
        return is_dflash_network(model)

    @classmethod
    def check_knobs(cls, config) -> None:
        super().check_knobs(config)
        if not 0 <= config.dflash_tokens <= 64:
            raise UsageError(f"dflash_tokens={config.dflash_tokens}: must be between 0 and 64")
        if not 0 <= config.dflash_threshold <= 1:
            raise UsageError(f"dflash_threshold={config.dflash_threshold}: must be in [0, 1]")

    @classmethod
    def from_config(cls, model, config, verifier=None) -> "DFlash":
        if verifier is None:
            raise UsageError(f"the {cls.name} drafter needs a verifier: the decoder it was trained for (--base NAME)")
        if not is_dflash_network(model):
            raise UsageError(f"the {cls.name} drafter needs a DFlash drafter network; {LOAD_IT}")
        return cls(verifier, model, **cls.knob_values(config))
