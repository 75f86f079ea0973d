"""How speculative decoding turns logits into a choice, on both models alike (docs/generation.md, "Speculative
decoding"): ``Sampling`` gives the distribution a sampling step draws from, with transformers' own logits warpers in
transformers' order (temperature, top-k, top-p), so ``p`` is exactly what ``verifier.generate(do_sample=True, ...)``
samples from. ``temperature == 0`` is greedy (argmax).

Shape legend: ``m`` rows, ``v`` the verifier's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

__all__ = ["Sampling"]


@dataclass(frozen=True)
class Sampling:
    """How both models turn logits into a choice. ``vocab_size``: the verifier's vocabulary; every distribution
    here lives on it (a drafter's logits for ids the verifier does not have are dropped)."""

    vocab_size: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    suppress: tuple[int, ...] = ()  # ids never chosen (the verifier's generation_config.suppress_tokens, as generate)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def fit(self, logits: torch.Tensor) -> torch.Tensor:
        """``(m, v')`` logits of either model -> ``(m, v)`` float32 (as transformers' generate reads them): extra
        columns dropped, missing ones and ``suppress`` ``-inf`` (transformers' ``SuppressTokensLogitsProcessor``)."""
        logits = logits.float()
        v = self.vocab_size
        if logits.shape[-1] >= v:
            logits = logits[..., :v]
        else:
            pad = logits.new_full((*logits.shape[:-1], v - logits.shape[-1]), float("-inf"))
            logits = torch.cat([logits, pad], dim=-1)
        if self.suppress:  # out of place: the caller's tensor stays as it was
            ids = torch.tensor(self.suppress, dtype=torch.long, device=logits.device)
            logits = logits.index_fill(-1, ids, float("-inf"))
        return logits

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a sampling step draws from: ``(m, v')`` logits -> ``(m, v)`` probabilities."""
        scores = self.fit(logits)  # (m, v)
        unused = scores.new_zeros((scores.shape[0], 0), dtype=torch.long)  # the warpers below never read input ids
        if self.temperature != 1.0:
            scores = TemperatureLogitsWarper(self.temperature)(unused, scores)
        if self.top_k:
            scores = TopKLogitsWarper(self.top_k)(unused, scores)
        if self.top_p is not None and self.top_p < 1.0:
            scores = TopPLogitsWarper(self.top_p)(unused, scores)
        return scores.softmax(-1)

    def draw(self, logits: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens (m,), probs (m, v) or None when greedy)``: one independent draw per row."""
        if self.greedy:
            return self.fit(logits).argmax(-1), None
        probs = self.probs(logits)  # (m, v)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs
