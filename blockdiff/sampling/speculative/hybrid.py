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
"""

from __future__ import annotations

from dataclasses import dataclass

from blockdiff.errors import UsageError
from blockdiff.sampling.speculative.base import Draft, knob
from blockdiff.sampling.speculative.dflash import DFlash, DFlashProposer
from blockdiff.sampling.speculative.lookup import NgramProposer
from blockdiff.sampling.speculative.registry import register_drafter
from blockdiff.sampling.speculative.settings import Sampling

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
    hybrid_threshold: float = knob(0.1, "the hybrid drafter drops learned drafts from the first one below this "
                                        "probability")

    def __post_init__(self):
        super().__post_init__()
        learned = self.drafter
        learned.threshold = max(learned.threshold, self.hybrid_threshold)
        self.drafter = HybridProposer(NgramProposer(self.vocab_size, self.lookup_ngram, self.lookup_tokens), learned,
                                      self.hybrid_min_match)

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
