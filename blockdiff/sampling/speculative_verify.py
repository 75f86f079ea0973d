"""The verifier's half of speculative decoding (docs/generation.md, "Speculative decoding"): the sampling
settings both models share, the AR verifier with its exact KV cache, and the two acceptance rules.

* ``Sampling`` turns logits into the distribution a sampling step draws from, with transformers' own logits
  warpers in transformers' order (temperature, top-k, top-p), so ``p`` is exactly what
  ``verifier.generate(do_sample=True, ...)`` samples from. ``temperature == 0`` is greedy (argmax).
* ``CausalLMVerifier`` wraps a plain Hugging Face causal LM and a ``DynamicCache`` that always holds the
  committed tokens but the last; one ``score`` forward feeds [that last token ; the drafts] and returns the
  verifier's logits for every position after it; ``commit`` crops the cache back to the committed tokens.
* ``accept_greedy``: the longest prefix of the drafts equal to the verifier's argmax, plus the verifier's own
  next token. ``accept_sampled``: keep draft ``i`` with probability ``min(1, p_i(d)/q_i(d))``; at the first
  rejection draw from ``norm(max(0, p_i - q_i))``; if every draft survives, draw one more token from ``p``.
  Either way the step commits ``accepted + 1`` tokens.

Nothing here knows about block diffusion: a drafter is anything that proposes tokens with their ``q``.

Shape legend: ``k`` drafts, ``v`` the verifier's vocabulary, ``n`` committed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

__all__ = ["Sampling", "CausalLMVerifier", "accept_greedy", "accept_sampled", "crop_to"]


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


def crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of ``cache`` (``DynamicCache.crop`` takes how many to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class CausalLMVerifier:
    """A plain Hugging Face causal LM as the verifier. Invariant between steps: ``cache`` holds the keys and
    values of ``committed[:-1]`` exactly (``commit`` crops away whatever the last forward added beyond that)."""

    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.forwards = 0
        self.processed = 0  # input tokens over all forwards
        self.max_cache = 0

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @torch.no_grad()
    def score(self, committed: list[int], drafts: torch.Tensor) -> torch.Tensor:
        """Logits ``(k + 1, v)``: row ``i`` is the verifier's prediction after ``committed + drafts[:i]``.
        One forward over the committed tokens not yet cached (the last one, or the whole prompt at first) and
        the ``k`` drafts."""
        device = self.model.device
        start = self.cache.get_seq_length()  # == len(committed) - 1 after a commit, 0 at first
        fed = torch.cat([torch.tensor(committed[start:], dtype=torch.long), drafts.cpu().long()]).to(device)  # (q,)
        positions = torch.arange(start, start + len(fed), device=device)  # no padding: position = index
        out = self.model(
            input_ids=fed[None], position_ids=positions[None], past_key_values=self.cache, use_cache=True,
            logits_to_keep=len(drafts) + 1,
        )
        self.cache = out.past_key_values
        self.forwards += 1
        self.processed += len(fed)
        self.max_cache = max(self.max_cache, self.cache.get_seq_length())
        return out.logits[0].float()  # (k + 1, v), float32 as transformers' generate reads them

    def commit(self, committed: list[int]) -> None:
        """The step's tokens are final: crop the cache to ``committed[:-1]`` (rejected drafts leave it)."""
        crop_to(self.cache, len(committed) - 1)


def accept_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, int]:
    """``(accepted, next token)``: the longest prefix of ``drafts`` (k,) where each equals the verifier's argmax
    (``logits`` (k + 1, v)), then the verifier's own token after it."""
    target = logits.argmax(-1)  # (k + 1,)
    agree = (drafts.to(target.device) == target[: len(drafts)]).long()  # (k,)
    accepted = int(agree.cumprod(0).sum())
    return accepted, int(target[accepted])


def accept_sampled(
    p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, generator=None
) -> tuple[int, int]:
    """``(accepted, next token)`` by speculative sampling. ``p`` (k + 1, v): the verifier's sampling distributions;
    ``q`` (k, v): those the drafts were drawn from (``None``: deterministic drafts, i.e. one-hot ``q``).

    Draft ``i`` survives with probability ``min(1, p_i(d_i) / q_i(d_i))``; the first rejected one is replaced by a
    draw from ``max(0, p_i - q_i)`` normalised; when all survive, one more token is drawn from ``p_k``. The
    token written at each position is then distributed exactly as ``p`` (Leviathan et al. 2023, Chen et al. 2023).
    """
    drafts = drafts.to(p.device)
    if q is None:
        q = torch.nn.functional.one_hot(drafts, p.shape[-1]).to(p.dtype)  # (k, v)
    q = q.to(p.device, p.dtype)
    for i, d in enumerate(drafts.tolist()):
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i, d] < p[i, d]:  # u < p/q, i.e. kept with probability min(1, p/q)
            continue
        residual = (p[i] - q[i]).clamp(min=0)  # (v,)
        if residual.sum() <= 0:  # p == q up to rounding: a rejection has probability 0, fall back to p
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    k = len(drafts)
    return k, int(torch.multinomial(p[k], 1, generator=generator))
