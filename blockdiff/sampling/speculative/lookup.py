"""The lookup drafter (``drafter="lookup"``): n-gram drafts copied from the prompt and the output so far (prompt
lookup decoding, Saxena 2023; transformers' ``prompt_lookup_num_tokens``), checked by the AR verifier. No network
drafts: the drafts are free, strong on text that repeats itself (code, quotes, names, lists) and absent where it
does not, so a step then checks nothing and commits the verifier's own token, as plain decoding would.

```
committed = c_0 .. c_{n-1}
for m = lookup_ngram .. 1:                          # the longest suffix that occurred before wins
    j = the latest start < n - m with c_j .. c_{j+m-1} == the last m committed tokens
    if j exists: drafts = c_{j+m} .. (at most lookup_tokens, never past the committed end); stop
no match: no drafts
```

The drafts are deterministic (``q`` one-hot), so speculative sampling keeps the verifier's distribution exactly
with them (``verify.accept_sampled``). The n-gram index grows with the committed tokens, each new position indexed
once, so a step costs what its new tokens cost, not the whole text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.speculative.base import Draft, knob
from blockdiff.sampling.speculative.drafters import Verified
from blockdiff.sampling.speculative.registry import register_drafter
from blockdiff.sampling.speculative.settings import Sampling

__all__ = ["Lookup", "NgramProposer"]


class NgramProposer:
    """The n-gram proposer (module docstring): a ``Proposer`` with no network."""

    def __init__(self, vocab_size: int, max_ngram: int = 3, num_tokens: int = 7):
        self.vocab_size, self.max_ngram, self.num_tokens = vocab_size, max_ngram, num_tokens
        self.reset()

    def reset(self) -> None:
        self.forwards = 0  # never a network forward
        self.processed = 0
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> the position right after its latest occurrence
        self._indexed = 0  # n-grams ending before this position are indexed

    def draft(self, committed: list[int], limit: int, sampling: Sampling, generator=None) -> Draft:
        return self.match(committed, limit)[0]

    def match(self, committed: list[int], limit: int) -> tuple[Draft, int]:
        """The drafts and the length of the n-gram that matched (0: none matched, no drafts)."""
        self._index(committed)
        n = len(committed)
        for m in range(min(self.max_ngram, n - 1), 0, -1):
            start = self._next.get(tuple(committed[n - m :]))
            if start is not None:
                drafts = committed[start : start + min(limit, self.num_tokens)]
                return Draft(torch.tensor(drafts, dtype=torch.long)), m
        return Draft(torch.zeros(0, dtype=torch.long)), 0

    def commit(self, committed: list[int], accepted: int) -> None:
        """Nothing to undo: the index only ever holds committed tokens."""

    def _index(self, committed: list[int]) -> None:
        """Index every n-gram that ends before the last committed token (its continuation is known)."""
        for end in range(self._indexed, len(committed) - 1):  # the n-gram c[end-m+1 .. end] is followed by end + 1
            for m in range(1, min(self.max_ngram, end + 1) + 1):
                self._next[tuple(committed[end - m + 1 : end + 1])] = end + 1
        self._indexed = max(self._indexed, len(committed) - 1)


@register_drafter
@dataclass(eq=False)
class Lookup(Verified):
    """The verifier checks n-gram lookup drafts (module docstring); no block diffuser is needed."""

    name = "lookup"
    needs_block_model = False
    lookup_ngram: int = knob(3, "longest n-gram the lookup drafter matches (it tries n, n-1, ..., 1)")
    lookup_tokens: int = knob(7, "most drafts the lookup drafter copies per step")

    def __post_init__(self):
        super().__post_init__()
        self.drafter = NgramProposer(self.verifier.vocab_size, self.lookup_ngram, self.lookup_tokens)

    @classmethod
    def check_knobs(cls, config) -> None:
        super().check_knobs(config)
        for key in ("lookup_ngram", "lookup_tokens"):
            value = getattr(config, key)
            if not 1 <= value <= 64:
                raise UsageError(f"{key}={value}: must be between 1 and 64")

    @classmethod
    def from_config(cls, model, config, verifier=None) -> "Lookup":
        if verifier is None:
            raise UsageError("the lookup drafter needs a verifier: the decoder whose output this is (--base NAME)")
        return cls(verifier, None, **cls.knob_values(config))  # a block diffuser given is not used
