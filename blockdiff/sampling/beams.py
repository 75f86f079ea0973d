"""Block beam search (``block_beams=N``, ``beam_width=k``): at every block, draw ``N`` candidate blocks per kept beam,
score each, keep the ``k`` best beams with their caches.

```
beams = [prompt]                                     # one beam, its block cache
for each new block:
    rows = every beam repeated N times               # the cache rows too (DynamicCache.batch_repeat_interleave)
    denoise the block of every row at once           # the chosen sampler, one batch: N k candidates per forward
    score(row) += log-likelihood of its new block    # an AR scorer if given, else minus the block NELBO
    keep the k best rows                             # the cache rows with them (batch_select_indices)
stop when the best beam holds EOS or max_new_tokens are written; return the best beam
```

Scores: with ``scorer`` (a ``next_token_logits(ids (b, n)) -> (b, n - 1, v)`` function, e.g. an AR base decoder's or
the speculative verifier's; ``evaluation.scoring`` builds them) a block scores its exact AR log-probability given the
beam's text; without one, minus the model's own NELBO of the block given the beam's cache, estimated over
``beam_score_draws`` noise draws (each one more forward of every row; stratified ``t``, the trained schedule and
noise kind). Scores add up over blocks, so beams are ranked by the likelihood of their whole continuation.

Counting: ``nfe`` counts batch forwards (candidates and scoring draws of all rows share one); ``sample_nfe[i]`` counts
*row* forwards of prompt ``i`` (a forward of ``r`` rows counts ``r``): its compute, which is what the ablation
compares at equal cost. With ``N = k = 1`` no score is computed and the output is plain sampling's, token for token
(the same layout, slides and denoising calls; ``tests/test_beams.py``).

Prompts are searched one at a time (a prompt's beams form the batch). Not supported with beams: streamers, stop
strings, ``num_return_sequences`` (refused by ``generation.generate``).

Shape legend: ``r`` rows (beams x candidates), ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from blockdiff.config import T_EPS
from blockdiff.core.loss import masked_nelbo
from blockdiff.core.noise import add_noise, make_schedule, sample_t
from blockdiff.core.uniform import add_uniform_noise, uniform_token_nelbo
from blockdiff.sampling.grid import State, block_rows, layout, slide
from blockdiff.sampling.outputs import GenerationOutput

__all__ = ["BeamEvent", "beam_search"]

Scorer = Callable[[torch.Tensor], torch.Tensor]  # (b, n) ids -> (b, n - 1, v) next-token logits


@dataclass
class BeamEvent:
    """One block of a beam search, for observers and tests."""

    prompt: int  # index of the prompt being searched
    block: int  # column block index
    candidates: torch.Tensor  # (r, l) the candidate blocks
    scores: torch.Tensor  # (r,) cumulative score of each candidate's beam
    kept: torch.Tensor  # (k,) rows kept, best first


def beam_search(
    model, settings, denoise_block, generator, scorer: Scorer | None = None,
    observer: Callable[[BeamEvent], None] | None = None,
) -> GenerationOutput:
    """Beam search of every prompt of ``settings`` (``resolve.Settings``; ``denoise_block``:
    ``generation._denoise_block``); see the module docstring."""
    outs = []
    for i, prompt in enumerate(settings.prompts):
        gen = generator[i] if isinstance(generator, list) else generator
        outs.append(_search_one(model, i, prompt, settings, denoise_block, gen, scorer, observer))
    return _output(settings.prompts, outs, settings.pad_id)


def _search_one(model, index, prompt, settings, denoise_block, generator, scorer, observer):
    """``(new tokens, batch forwards, row forwards, stop reason, tokens processed, largest cache)`` of one prompt's
    search."""
    config, window, eos_ids, pad_id = settings.config, settings.window, settings.eos_ids, settings.pad_id
    l, device = model.block_length, next(model.parameters()).device
    n_cand, width = config.block_beams, config.beam_width
    st = layout([prompt], l, pad_id, device)
    scores = torch.zeros(1, device=device)  # (r,)
    row_forwards = 0
    gen_start = int(st.gen_start[0])
    while True:
        start = st.cols.shape[1] - l
        if window is not None:
            slide(model, st, window)
        _repeat(st, n_cand)
        scores = scores.repeat_interleave(n_cand)
        st.masks.clear()
        nfe0, rows = st.nfe, st.cols.shape[0]
        tokens = denoise_block(model, st, start, settings, generator, None)  # (r, l)
        st.cols[:, start:] = tokens
        if rows > 1:
            scores = scores + _block_score(model, st, start, config, generator, scorer)
            kept = scores.topk(min(width, rows)).indices  # (k,) best first
            if observer is not None:
                observer(BeamEvent(index, start // l, tokens.clone(), scores.clone(), kept.clone()))
            _select(st, kept)
            scores = scores[kept]
        row_forwards += (st.nfe - nfe0) * rows
        written = start + l - gen_start
        new = st.cols[0, gen_start : gen_start + min(written, config.max_new_tokens)].tolist()
        earlier = max(0, start - gen_start)
        eos_at = next((j + 1 for j in range(earlier, len(new)) if new[j] in eos_ids), None)
        if eos_at is not None:
            return new[:eos_at], st.nfe, row_forwards, "eos", st.processed, st.max_cache
        if written >= config.max_new_tokens:
            return new, st.nfe, row_forwards, "max_new_tokens", st.processed, st.max_cache
        st.cols = torch.cat([st.cols, torch.full((len(st.cols), l), pad_id, device=device)], dim=1)


def _drop_empty_cache(st: State) -> None:
    """An empty cache (nothing finished yet) is dropped: ``DynamicCache`` leaves the batch of an empty layer alone on
    ``batch_repeat_interleave`` / ``batch_select_indices``, and the next forward makes a fresh one anyway."""
    if st.cache is not None and st.cache.get_seq_length() == 0:
        st.cache = None


def _repeat(st: State, n: int) -> None:
    """Every row (and its cache) ``n`` times, in place: row ``j`` becomes rows ``j n .. j n + n - 1``."""
    if n == 1:
        return
    idx = torch.arange(st.cols.shape[0], device=st.cols.device).repeat_interleave(n)
    st.cols, st.first_valid, st.gen_start = st.cols[idx], st.first_valid[idx], st.gen_start[idx]
    _drop_empty_cache(st)
    if st.cache is not None:
        st.cache.batch_repeat_interleave(n)
    if st.last_hidden is not None:
        st.last_hidden = st.last_hidden.repeat_interleave(n, dim=0)
    st.active = list(range(len(idx)))
    st.sample_nfe = torch.zeros(len(idx), dtype=torch.long)


def _select(st: State, idx: torch.Tensor) -> None:
    """Keep rows ``idx`` (and their cache rows), in that order."""
    st.cols, st.first_valid, st.gen_start = st.cols[idx], st.first_valid[idx], st.gen_start[idx]
    _drop_empty_cache(st)
    if st.cache is not None:
        st.cache.batch_select_indices(idx)
    if st.last_hidden is not None:
        st.last_hidden = st.last_hidden[idx]
    st.active = list(range(len(idx)))
    st.sample_nfe = torch.zeros(len(idx), dtype=torch.long)


def _block_score(model, st: State, start: int, config, generator, scorer: Scorer | None) -> torch.Tensor:
    """Log-likelihood score of every row's new block (r,): exact AR log-prob under ``scorer``, else minus the
    block NELBO under the model (``core.loss.masked_nelbo``, ``beam_score_draws`` draws of ``t ~ U[noise.eps, 1]``).
    Only generated positions (not the prompt) count."""
    l = model.block_length
    cols = torch.arange(start, start + l, device=st.cols.device)
    scored = (cols[None] >= st.gen_start[:, None])  # (r, l)
    block = st.cols[:, start:].clone()  # (r, l)
    if scorer is not None:
        first = int(st.first_valid[0])
        ids = st.cols[:, first : start + l]  # (r, n): the beams share their prompt, so one width
        logp = scorer(ids).float().log_softmax(-1)  # (r, n - 1, v): row j predicts token j + 1
        logp = torch.cat([logp.new_zeros(logp[:, :1].shape), logp], dim=1)[:, start - first :]  # (r, l, v)
        return (logp.gather(-1, block[..., None]).squeeze(-1) * scored).sum(-1)
    schedule = make_schedule(model.spec.schedule)
    uniform = model.spec.noise_kind == "uniform"
    total = torch.zeros(len(block), device=block.device)
    for _ in range(config.beam_score_draws):
        t = sample_t((len(block), 1), T_EPS, 1.0, generator=generator, device=block.device)  # (r, 1)
        if uniform:
            noised = add_uniform_noise(block, t, schedule, l, model.vocab_size, model.mask_token_id, generator)
        else:
            noised = add_noise(block, t, schedule, l, model.mask_token_id, generator)
        sel = noised.masked & scored  # (r, l)
        st.cols[:, start:] = torch.where(scored, noised.xt, block)
        logits = model.logits(block_rows(model, st, start, start + l, config.use_cache)[sel])  # (m, v)
        terms = None  # absorbing noise: the cross-entropy of the masked rows
        if uniform:
            terms = uniform_token_nelbo(logits, block[sel], noised.xt[sel], noised.alpha[sel], model.mask_token_id)
        total += masked_nelbo(logits, block, sel, noised.weight, terms).sum(-1)
    st.cols[:, start:] = block
    return -total / config.beam_score_draws


def _output(prompts, outs, pad_id: int) -> GenerationOutput:
    rows = [p + new for p, (new, *_) in zip(prompts, outs)]
    longest = max(len(r) for r in rows)
    sequences = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        sequences[i, : len(r)] = torch.tensor(r)
    lengths = [len(new) for new, *_ in outs]
    nfe = sum(o[1] for o in outs)
    reasons = [o[3] for o in outs]
    return GenerationOutput(
        sequences=sequences,
        prompt_lengths=torch.tensor([len(p) for p in prompts]),
        lengths=torch.tensor(lengths),
        stopped_at_eos=torch.tensor([r == "eos" for r in reasons]),
        nfe=nfe,
        tokens_processed_per_forward=sum(o[4] for o in outs) / max(1, nfe),
        tokens_per_forward=sum(lengths) / max(1, nfe),
        sample_nfe=torch.tensor([o[2] for o in outs]),
        stop_reasons=reasons,
        max_cache_length=max(o[5] for o in outs),
    )
