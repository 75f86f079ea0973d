"""The hybrid drafter (``drafter="hybrid"``): n-gram lookup when the text so far has a long enough match, the DFlash
drafter otherwise (docs/design.md §14). Lookup is free and strong where text repeats (names, refrains, quotes,
code); the learned drafter covers the rest. Its drafts are cut at its own confidence (``hybrid_threshold``), so
where it is unsure a step checks few drafts: the verifier's forward then costs what a one-token step costs.

```
each step:  the DFlash drafter absorbs the newly committed tokens' states (always: its cache stays complete)
            lookup match of length >= hybrid_min_match   -> the lookup drafts
            otherwise                                     -> the DFlash drafts, cut where p_draft < hybrid_threshold
```

Both are lossless under the one acceptance code (one-hot lookup drafts, the drafter's own ``q``), so the output is
the verifier's; the counts say which drafter proposed each step (``lookup_steps``).

``hybrid_tree=True`` (greedy only): when both have drafts and they differ at the first token, ONE verifier forward
checks both chains as a 2-branch tree (``tree.py``) and the branch with the longer accepted prefix commits (ties:
lookup). Otherwise, and always when sampling (two branches would need recursive rejection sampling to stay exact),
when the verifier's attention does not apply custom 4-D masks, or when its cache has sliding-window layers, a step
checks one chain as above. The DFlash drafter then drafts on every step (lookup steps too). Counted:
``tree_steps``, ``tree_lookup_wins``, ``tree_dflash_wins`` and ``tree_drafts`` (both branches' drafts; the loop's
``drafted_tokens`` counts the winner's) in ``SpeculativeOutput.drafter_counts``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.speculative.base import Draft, knob
from blockdiff.sampling.speculative.dflash import DFlash, DFlashProposer
from blockdiff.sampling.speculative.lookup import NgramProposer
from blockdiff.sampling.speculative.registry import register_drafter
from blockdiff.sampling.speculative.settings import Sampling
from blockdiff.sampling.speculative.tree import (
    TreeStep,
    choose_branch,
    keep_branch,
    plain_cache,
    score_tree,
    takes_tree_masks,
)

__all__ = ["Hybrid", "HybridProposer"]


class HybridProposer:
    """A ``Proposer`` choosing per step between an ``NgramProposer`` and a ``DFlashProposer`` (module docstring)."""

    def __init__(self, lookup: NgramProposer, learned: DFlashProposer, min_match: int):
        self.lookup, self.learned, self.min_match = lookup, learned, min_match
        self.reset()

    vocab_size = property(lambda self: self.learned.vocab_size)
    forwards = property(lambda self: self.learned.forwards)
    processed = property(lambda self: self.learned.processed)

    def reset(self) -> None:
        self.lookup.reset()
        self.learned.reset()
        self.lookup_steps = 0

    def draft(self, committed: list[int], limit: int, sampling: Sampling, generator=None) -> Draft:
        self.learned.absorb(committed)
        drafts, matched = self.lookup.match(committed, limit)
        if matched >= self.min_match and len(drafts.tokens):
            self.lookup_steps += 1
            return drafts
        return self.learned.draft(committed, limit, sampling, generator)

    def branches(self, committed: list[int], limit: int, sampling: Sampling, generator=None) -> tuple[Draft, Draft]:
        """Both drafters' drafts ``(lookup's, dflash's)``, either possibly empty (lookup's when its match is shorter
        than ``min_match``); the tree's two branches."""
        self.learned.absorb(committed)
        drafts, matched = self.lookup.match(committed, limit)
        if matched < self.min_match:
            drafts = Draft(torch.zeros(0, dtype=torch.long))
        return drafts, self.learned.draft(committed, limit, sampling, generator)

    def commit(self, committed: list[int], accepted: int) -> None:
        """Nothing to undo (neither part keeps a draft)."""


@register_drafter
@dataclass(eq=False)
class Hybrid(DFlash):
    """Lookup where the text repeats, the DFlash drafter elsewhere (module docstring)."""

    name = "hybrid"
    lookup_ngram: int = knob(3, "longest n-gram the lookup drafter matches (it tries n, n-1, ..., 1)")
    lookup_tokens: int = knob(7, "most drafts the lookup drafter copies per step")
    hybrid_min_match: int = knob(2, "shortest n-gram match for which the hybrid drafter uses lookup")
    hybrid_threshold: float = knob(0.5, "the hybrid drafter drops learned drafts from the first one below this "
                                        "probability")
    hybrid_tree: bool = knob(False, "greedy: when lookup and the learned drafter disagree, verify both as a 2-branch "
                                    "tree in one forward and keep the longer accepted branch")

    def __post_init__(self):
        super().__post_init__()
        learned = self.drafter
        learned.threshold = max(learned.threshold, self.hybrid_threshold)
        self.drafter = HybridProposer(NgramProposer(self.vocab_size, self.lookup_ngram, self.lookup_tokens), learned,
                                      self.hybrid_min_match)
        self._tree: TreeStep | None = None  # this step's tree, between propose and commit
        self.tree_steps = self.tree_lookup_wins = self.tree_dflash_wins = self.tree_drafts = 0

    def reset(self) -> None:
        super().reset()
        self._tree = None
        self.tree_steps = self.tree_lookup_wins = self.tree_dflash_wins = self.tree_drafts = 0

    def counts(self) -> dict[str, int]:
        return {"lookup_steps": self.drafter.lookup_steps, "tree_steps": self.tree_steps,
                "tree_lookup_wins": self.tree_lookup_wins, "tree_dflash_wins": self.tree_dflash_wins,
                "tree_drafts": self.tree_drafts}

    def propose(self, committed, limit, sampling, generator=None) -> Draft:
        """The step's drafts. With ``hybrid_tree`` and greedy, when both drafters propose and differ at the first
        token, this runs the step's one verifier forward over both branches (``tree.py``) and returns the winner's
        drafts (``score`` then returns its rows); otherwise one chain, as without the tree."""
        self._tree = None
        if not (self.hybrid_tree and sampling.greedy and limit >= 1 and self._tree_fits()):
            return super().propose(committed, limit, sampling, generator)
        a, b = (Draft(d.tokens[:limit].long()) for d in self.drafter.branches(committed, limit, sampling, generator))
        if not len(a.tokens) or not len(b.tokens):
            if len(a.tokens):
                self.drafter.lookup_steps += 1
            return a if len(a.tokens) else b
        if int(a.tokens[0]) == int(b.tokens[0]):
            self.drafter.lookup_steps += 1
            return a  # the chain's choice: lookup where it matches
        self._tree = choose_branch(score_tree(self.verifier, committed, a.tokens, b.tokens), sampling.fit)
        self.tree_steps += 1
        self.tree_dflash_wins += self._tree.winner
        self.tree_lookup_wins += 1 - self._tree.winner
        self.tree_drafts += len(a.tokens) + len(b.tokens)
        return Draft(self._tree.drafts[self._tree.winner])

    def score(self, committed, drafts) -> torch.Tensor:
        if self._tree is not None:  # verified in propose: the winner's rows
            return self._tree.logits[self._tree.winner]
        return super().score(committed, drafts)

    def commit(self, committed, accepted) -> None:
        if self._tree is not None:  # the winner's entries and states as a chain forward would have left them
            keep_branch(self.verifier, self._tree)
            self._tree = None
        super().commit(committed, accepted)

    def _tree_fits(self) -> bool:
        """Whether the verifier can check a tree: it applies custom 4-D masks and its cache is plain."""
        return plain_cache(self.verifier) and takes_tree_masks(self.verifier.model)

    @classmethod
    def fits(cls, model, verifier) -> bool:
        return verifier is not None and cls.accepts(model)  # the default for a DFlash network and its verifier

    @classmethod
    def check_knobs(cls, config) -> None:
        super().check_knobs(config)
        for key in ("lookup_ngram", "lookup_tokens", "hybrid_min_match"):
            if not 1 <= getattr(config, key) <= 64:
                raise UsageError(f"{key}={getattr(config, key)}: must be between 1 and 64")
        if not 0 <= config.hybrid_threshold <= 1:
            raise UsageError(f"hybrid_threshold={config.hybrid_threshold}: must be in [0, 1]")
