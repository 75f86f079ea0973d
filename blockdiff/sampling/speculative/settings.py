"""How speculative decoding turns logits into a choice, on both models alike (docs/generation.md, "Speculative
decoding"): ``Sampling`` gives the distribution a sampling step draws from, in transformers' order (temperature,
top-k, top-p; ``sampling/logits.py``'s ``warped_probs``, the block loop's filters), so ``p`` is what
``verifier.generate(do_sample=True, ...)`` samples from. ``temperature == 0`` is greedy (argmax). ``from_settings``
builds it from the resolved generation settings (``sampling/resolve.py``), the same ones the block loop runs with.

Shape legend: ``m`` rows, ``v`` the verifier's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.sampling.logits import warped_probs

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

    @classmethod
    def from_settings(cls, settings, vocab_size: int, suppress=()) -> "Sampling":
        """From resolved generation ``settings`` (``resolve.Settings``): its temperature rule, top-k and top-p."""
        config = settings.config
        return cls(vocab_size, settings.temperature, config.top_k, config.top_p, tuple(int(t) for t in suppress))

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
        return warped_probs(self.fit(logits), self.temperature, self.top_k, self.top_p)  # (m, v)

    def draw(self, logits: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens (m,), probs (m, v) or None when greedy)``: one independent draw per row."""
        if self.greedy:
            return self.fit(logits).argmax(-1), None
        probs = self.probs(logits)  # (m, v)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs
