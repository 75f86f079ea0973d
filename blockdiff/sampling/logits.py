"""Turning logits into token choices: temperature, top-k, nucleus (top-p), seeded sampling.

``choose_tokens`` returns, for every position, a token drawn from the processed distribution and its
*confidence*: the model's own (untempered) probability of that token, so thresholds like ``tau`` mean
the same thing whatever the temperature. ``temperature == 0`` is greedy (argmax).

What it costs (docs/benchmarks.md): the block loop calls ``choose_rows`` on the still-masked rows only. Greedy
is one softmax and its max (on CPU torch's fused softmax measured 1.2-1.8x cheaper than ``max`` plus
``logsumexp``, which needs no softmax written out). Sampling draws one ``U[0, 1)`` per row and
inverts the CDF of the tempered distribution (``_inverse_cdf``: two levels, chunks then tokens, in float64), so it
costs a few passes over the vocabulary instead of one exponential variate per vocabulary entry
(``torch.multinomial``). The nucleus is found among the ``topk`` candidates (``_nucleus``), widened until it
fits, instead of sorting the whole vocabulary.

Shape legend: ``b`` batch, ``l`` block length, ``r`` rows (positions) being chosen, ``v`` vocab, ``c`` candidates.
"""

from __future__ import annotations

import torch

from blockdiff.sampling.samplers.base import uniform

__all__ = ["filter_logits", "warped_probs", "choose_tokens", "choose_rows", "inverse_cdf"]

_NUCLEUS_WIDTHS = (256, 4096)  # candidates tried for the nucleus before sorting the whole vocabulary
_CHUNK = 256  # tokens per chunk of the two-level inverse CDF


def _top_k_filter(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Logits below the ``top_k``-th largest set to ``-inf`` (ties with it survive)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _nucleus(
    logits: torch.Tensor, top_p: float, probs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of each row of ``logits`` (r, v): ``(values (r, c), token ids (r, c))`` in descending order, the
    values outside the nucleus ``-inf``. The nucleus is the smallest prefix of the tokens sorted by probability whose
    mass reaches ``top_p``; the most likely token always belongs to it (a ``top_p`` that rounds to 0 in float32).

    The rule is evaluated on the ``topk`` candidates of a row, widened (``_NUCLEUS_WIDTHS``, then the whole
    vocabulary) until the prefix ends inside them, so a peaked row costs a ``topk(256)``, not a sort. ``probs``:
    ``logits.softmax(-1)`` if the caller has it."""
    r, v = logits.shape
    probs = logits.softmax(-1) if probs is None else probs  # (r, v)
    values = torch.full((r, 0), float("-inf"), device=logits.device)
    ids = torch.zeros((r, 0), dtype=torch.long, device=logits.device)
    todo = torch.arange(r, device=logits.device)  # rows whose nucleus is not found yet
    for width in (*[w for w in _NUCLEUS_WIDTHS if w < v], v):
        vals, idx = logits[todo].topk(width, dim=-1)  # (t, c) sorted, descending
        p = probs[todo].gather(-1, idx)  # (t, c)
        drop = p.cumsum(-1) - p >= top_p  # keep the smallest prefix reaching top_p
        drop[:, 0] = False
        fits = drop[:, -1] | (width == v)  # (t,) the prefix ended inside the candidates
        vals = vals.masked_fill(drop, float("-inf"))
        if values.shape[1] < width:  # widen the result (padding: never chosen)
            values = torch.nn.functional.pad(values, (0, width - values.shape[1]), value=float("-inf"))
            ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]))
        done = todo[fits]
        values[done, :width], ids[done, :width] = vals[fits], idx[fits]
        todo = todo[~fits]
        if len(todo) == 0:
            break
    return values, ids


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to ``-inf`` (the most likely token always survives)."""
    logits = _top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        flat = logits.reshape(-1, logits.shape[-1])  # (r, v)
        values, ids = _nucleus(flat, top_p)
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, ids, torch.isfinite(values))
        logits = flat.masked_fill(~keep, float("-inf")).view(logits.shape)
    return logits


def warped_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution (..., v) transformers' ``generate(do_sample=True)`` draws from: its warpers' order, the
    logits divided by ``temperature`` (> 0), then top-k, then the nucleus of the *tempered* distribution (speculative
    decoding matches the verifier's own sampling with it; ``choose_rows`` takes the nucleus before tempering)."""
    scores = logits / temperature if temperature != 1.0 else logits
    return filter_logits(scores, top_k, top_p).softmax(-1)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn with probability ``weights / weights.sum()`` per row of ``weights`` (r, n) (non-negative, not
    necessarily normalised), by inverting the CDF at ``u`` (r,) ~ U[0, 1). Two levels: which chunk of ``_CHUNK``
    entries (chunk masses summed in float32, their CDF in float64), then which entry of it (float64), so no
    cumulative sum runs over a whole vocabulary and no entry's share is lost to rounding. An entry of weight 0 is
    never returned (a draw that rounding carries past the last positive entry takes that entry)."""
    r, n = weights.shape
    full = n // _CHUNK * _CHUNK
    mass = weights[:, :full].reshape(r, -1, _CHUNK).sum(-1)  # (r, chunks) (a view when weights is contiguous)
    if full < n:
        mass = torch.cat([mass, weights[:, full:].sum(-1, keepdim=True)], dim=1)
    mass = mass.to(torch.float64)
    cdf = mass.cumsum(-1)  # (r, chunks)
    x = u.to(torch.float64) * cdf[:, -1]  # (r,) in [0, total)
    chunk = _search(cdf, mass, x)  # (r,)
    rows = torch.arange(r, device=weights.device)
    x = x - (cdf[rows, chunk] - mass[rows, chunk])  # (r,) offset inside the chunk
    ids = chunk[:, None] * _CHUNK + torch.arange(_CHUNK, device=weights.device)  # (r, C)
    inner = weights.gather(-1, ids.clamp(max=n - 1)).to(torch.float64).masked_fill(ids >= n, 0.0)  # (r, C)
    return chunk * _CHUNK + _search(inner.cumsum(-1), inner, x)


inverse_cdf = _inverse_cdf  # the public name (the uniform-noise ancestral sampler draws from its posterior with it)


def _search(cdf: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """First index whose ``cdf`` (r, n) exceeds ``x`` (r,), moved back to the last entry of positive ``weight``
    when rounding carries ``x`` past it."""
    idx = torch.searchsorted(cdf, x[:, None].contiguous(), right=True).squeeze(-1).clamp(max=cdf.shape[1] - 1)
    bad = weight.gather(-1, idx[:, None]).squeeze(-1) <= 0  # (r,)
    if bad.any():
        positive = weight[bad] > 0  # (k, n)
        idx[bad] = positive.shape[1] - 1 - positive.flip(-1).int().argmax(-1)  # the last positive entry
    return idx


def choose_rows(
    logits: torch.Tensor,
    u: torch.Tensor | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    need_probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(tokens (r,), confidence (r,), probs (r, v) or None)`` for the rows of ``logits`` (r, v).

    ``u`` (r,): one ``U[0, 1)`` per row (``None`` for greedy); the token is where it falls in the CDF of the
    top-k / nucleus-filtered, tempered distribution. ``confidence`` and ``probs`` (only with ``need_probs``)
    are the model's untempered ones."""
    logits = logits.float()
    probs = logits.softmax(-1)  # (r, v): one fused pass (cheaper on CPU than logsumexp, see docs/benchmarks.md)
    if temperature == 0:  # the argmax survives every filter
        confidence, tokens = probs.max(-1)  # (r,), (r,)
        return tokens, confidence, probs if need_probs else None
    if (top_p is None or top_p >= 1.0) and top_k is not None and 0 < top_k < logits.shape[-1]:
        values, ids = logits.topk(top_k, dim=-1)  # (r, k) the candidates, unless a tie with the k-th adds more
        if not ((logits >= values[:, -1:]).sum(-1) > top_k).any():
            tokens = ids.gather(-1, _inverse_cdf((values / temperature).softmax(-1), u)[:, None]).squeeze(-1)
            return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1), probs if need_probs else None
    filtered = _top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        values, ids = _nucleus(filtered, top_p, probs if filtered is logits else None)  # (r, c) descending
        tokens = ids.gather(-1, _inverse_cdf((values / temperature).softmax(-1), u)[:, None]).squeeze(-1)
    elif filtered is logits and temperature == 1.0:
        tokens = _inverse_cdf(probs, u)
    else:
        tokens = _inverse_cdf((filtered / temperature).softmax(-1), u)
    confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, confidence, probs if need_probs else None


def choose_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator=None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens (b, l), confidence (b, l), probs (b, l, v))`` — probs are the model's untempered ones.

    ``generator`` is one ``torch.Generator`` or a list with one per row; with a list only the ``rows``
    (bool (b,)) still denoising draw, so each row's random stream is independent of the batch. Each position
    draws one ``U[0, 1)`` (``base.uniform``), whatever the vocabulary size.
    """
    shape, v = logits.shape[:-1], logits.shape[-1]
    u = None if temperature == 0 else uniform(shape, generator, logits.device, rows=rows).flatten()
    tokens, confidence, probs = choose_rows(logits.reshape(-1, v), u, temperature, top_k, top_p)
    return tokens.view(shape), confidence.view(shape), probs.view(*shape, v)
