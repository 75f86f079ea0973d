"""The verifier's half of speculative decoding (docs/generation.md, "Speculative decoding"): the AR verifier with its
exact KV cache, and the two acceptance rules (the sampling settings both models share are ``settings.py``'s).

* ``CausalLMVerifier`` wraps a plain Hugging Face causal LM and a ``DynamicCache`` that always holds the
  committed tokens but the last; one ``score`` forward feeds [that last token ; the drafts] and returns the
  verifier's logits for every position after it; ``commit`` crops the cache back to the committed tokens.
  ``forward`` is that forward's bookkeeping for any fed tokens, positions and 4-D mask (the draft tree's, ``tree.py``).
* ``accept_greedy``: the longest prefix of the drafts equal to the verifier's argmax, plus the verifier's own
  next token. ``accept_sampled``: keep draft ``i`` with probability ``min(1, p_i(d)/q_i(d))``; at the first
  rejection draw from ``norm(max(0, p_i - q_i))``; if every draft survives, draw one more token from ``p``.
  Either way the step commits ``accepted + 1`` tokens.

Nothing here knows about block diffusion: a drafter is anything that proposes tokens with their ``q``.

Shape legend: ``k`` drafts, ``v`` the verifier's vocabulary, ``n`` committed tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

__all__ = ["CausalLMVerifier", "accept_greedy", "accept_sampled", "crop_to"]


def crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of ``cache`` (``DynamicCache.crop`` takes how many to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class CausalLMVerifier:
    """A plain Hugging Face causal LM as the verifier. Invariant between steps: ``cache`` holds the keys and
    values of ``committed[:-1]`` exactly (``commit`` crops away whatever the last forward added beyond that)."""

    def __init__(self, model, feature_layers: list[int] | None = None):
        self.model = model
        self.feature_layers = feature_layers  # keep these layers' states of the fed tokens (a DFlash drafter)
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.forwards = 0
        self.processed = 0  # input tokens over all forwards
        self.max_cache = 0
        self.features = None  # (q, F) the last forward's states at feature_layers (None: not kept)
        self.fed_start = 0  # position of the first token that forward fed

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
        return self.forward(fed, positions, len(drafts) + 1)

    @torch.no_grad()
    def forward(self, fed: torch.Tensor, positions: torch.Tensor, keep: int, attention_mask=None) -> torch.Tensor:
        """One cached forward of ``fed`` (q,) at ``positions`` (q,) (``attention_mask``: a 4-D mask over cache and
        fed tokens, ``None``: causal): the last ``keep`` rows' logits ``(keep, v)`` in float32 (as transformers'
        generate reads them); the cache grows by ``q`` entries, and the fed tokens' features are kept."""
        start = self.cache.get_seq_length()
        out = self.model(
            input_ids=fed[None], position_ids=positions[None], attention_mask=attention_mask,
            past_key_values=self.cache, use_cache=True, logits_to_keep=keep,
            output_hidden_states=self.feature_layers is not None,
        )
        if self.feature_layers is not None:
            self.features = torch.cat([out.hidden_states[i + 1][0] for i in self.feature_layers], dim=-1)  # (q, F)
            self.fed_start = start
        self.cache = out.past_key_values
        self.forwards += 1
        self.processed += len(fed)
        self.max_cache = max(self.max_cache, self.cache.get_seq_length())
        return out.logits[0].float()  # (keep, v)

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
