"""Block-by-block generation with an exact KV cache over finished blocks (docs/design.md §8).

```
cache = empty
for each new block:
    block = prompt tail + [m] * rest          # blocks sit on the training grid: block k = positions [k l, (k+1) l)
    first forward: [finished block not yet cached ; block]   -> writes the finished block into the cache
    repeat until no m left (and no editing sampler keeps the block open):
        logits = net(block, past=cache)        # the cache is read-only: it is cropped back after every forward
        block  = sampler.step(logits, block)   # which masks to reveal (or re-open, or edit), with which tokens
        adaptive stop (if set): a stable, confident block takes the argmax and is final
    stop the samples whose block holds EOS or a stop string, or reaches max_new_tokens; they leave the batch
```

Editing samplers (``Sampler.edits``) get a proposal at every generated position and may keep a block open after
its last mask (post steps); the adaptive stop (``samplers/adaptive_stop.py``) runs after any sampler's step; a
self-conditioning model (``spec.self_conditioning``) reads the last forward's prediction of the block
(``grid.next_soft``). A row's prediction is reused only while its whole input (tokens and self-conditioning) is
unchanged, so each of these keeps cached == uncached and batch == one by one (docs/design.md §3.3, §9).

Layout: a batch is a grid of *columns*. Prompts are left-padded by whole blocks so that every sample's
first generation block occupies the same columns; pad columns are never attended to. Position ids are
``column - first valid column`` per sample. A sliding window keeps the last ``window`` columns: when a
new block would not fit, the oldest half is dropped, the cache is reset, and the kept tokens are
re-encoded at fresh positions by the next block's first forward (rotary keys are stored rotated, so
they cannot simply be shifted).

Counting: every network call is one forward of the whole active batch (``nfe``); ``sample_nfe`` counts, per
sample, the forwards that denoised it (its block still had masks), which is what it would cost alone.
``tokens_processed_per_forward`` counts input tokens summed over the active batch; ``tokens_per_forward`` counts
kept new tokens of *all* samples per batch forward (so it grows with the batch); ``sample_tokens_per_forward``
is the per-sequence figure.

What a step costs (docs/benchmarks.md, "Cost of a forward"): the decoder body, then the output head and the
token choice on the rows that are still masked only (``choose_rows``). The attention mask of a forward is built
once per block (``grid._mask``); a forward over the current block alone with no padding in the window needs none
(``model.sampling_mask(..., allow_full=True)``), so SDPA runs without a mask.

Lengths: ``max_new_tokens`` is compared with ``column - gen_start`` (never added to a column index), so any
value up to ``2**63 - 1`` just means "until EOS".

Shape legend: ``b`` active batch, ``c`` columns, ``q`` input columns, ``s`` key columns, ``l`` block
length, ``v`` vocab, ``d`` hidden.
"""

from __future__ import annotations

from typing import Callable

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.config import BlockDiffusionGenerationConfig
from blockdiff.sampling.grid import (
    State,
    block_rows,
    drop_finished,
    empty_soft,
    layout,
    next_soft,
    slide,
)
from blockdiff.sampling.logits import choose_rows
from blockdiff.sampling.outputs import GenerationOutput, StepEvent
from blockdiff.sampling.resolve import Settings, resolve
from blockdiff.sampling.rewrite import denoise_uniform_block
from blockdiff.sampling.samplers.base import BlockState, reveal, uniform

__all__ = ["GenerationOutput", "StepEvent", "generate", "beam_generate"]


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    config: BlockDiffusionGenerationConfig,
    generator: torch.Generator | None = None,
    streamer=None,
    observer: Callable[[StepEvent], None] | None = None,
    tokenizer=None,
    cancelled: Callable[[int], bool] | None = None,
) -> GenerationOutput:
    """Continue each prompt (a list of token ids, at least one) by up to ``config.max_new_tokens`` tokens.

    ``num_return_sequences`` rows per prompt (prompt 0's first). ``generator``: one ``torch.Generator`` for the
    batch, or one per returned sequence (then each sample's output is the same whatever else is in the batch).
    ``tokenizer`` is needed only for ``stop_strings``. ``cancelled(i)`` is asked after every block for each sample
    still going (``i`` its row in the output): ``True`` ends it there, with the tokens it has (stop reason
    ``"cancelled"``), e.g. when the client of a server request went away.
    """
    settings = resolve(model, config, prompts, streamer=streamer)  # every check, before any work
    prompts, copies = settings.prompts, settings.copies
    if config.block_beams > 1 or config.beam_width > 1:
        return _beams(model, settings, generator, streamer)
    if settings.stops and tokenizer is None:
        raise UsageError("stop_strings needs the tokenizer to read the text: pass tokenizer=... (as in transformers)")
    if isinstance(generator, list) and len(generator) != len(prompts):
        per = f" ({len(prompts) // copies} prompts x num_return_sequences={copies})" if copies > 1 else ""
        raise UsageError(
            f"got {len(generator)} generators for {len(prompts)} sequences{per}; pass one per prompt (one per returned "
            "sequence with num_return_sequences) or one"
        )
    device = next(model.parameters()).device
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    l = model.block_length
    st = layout(prompts, l, settings.pad_id, device)
    if streamer is not None:
        streamer.put(torch.tensor([prompts[0]]))
    while st.active:
        start = st.cols.shape[1] - l  # the new block is always the last l columns
        if settings.window is not None:
            slide(model, st, settings.window)
        st.masks.clear()  # new columns, perhaps fewer samples: the block's forwards build their masks afresh
        tokens = _denoise_block(model, st, start, settings, generator, observer)  # (b, l)
        st.cols[torch.tensor(st.active, device=device), start:] = tokens
        keep = _finish_samples(st, start, l, settings, tokenizer, cancelled)
        if streamer is not None:
            _stream_block(streamer, st, start, l)
        if len(keep) < len(st.active):
            drop_finished(st, keep)
        if st.active:
            st.cols = torch.cat([st.cols, torch.full((len(st.cols), l), settings.pad_id, device=device)], dim=1)
    if streamer is not None:
        streamer.end()
    return _output(st, prompts, settings.pad_id)


def _beams(model, settings: Settings, generator, streamer, scorer=None, observer=None) -> GenerationOutput:
    """Block beam search (``beams.py``) with this module's block denoiser; what it does not support is refused."""
    from blockdiff.sampling.beams import beam_search

    config, prompts = settings.config, settings.prompts
    if streamer is not None or config.stop_strings is not None or settings.copies > 1 or config.min_new_tokens:
        raise UsageError(
            "block beam search (block_beams > 1 or beam_width > 1) returns one sequence per prompt and supports no "
            "streamer, stop_strings, num_return_sequences or min_new_tokens; remove them or set block_beams=1 "
            "beam_width=1"
        )
    if isinstance(generator, list) and len(generator) != len(prompts):
        raise UsageError(f"got {len(generator)} generators for {len(prompts)} prompts; pass one per prompt or one")
    device = next(model.parameters()).device
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    return beam_search(model, settings, _denoise_block, generator, scorer, observer)


def beam_generate(model, prompts: list[list[int]], config: BlockDiffusionGenerationConfig, generator=None,
                  scorer=None, observer=None) -> GenerationOutput:
    """Block beam search with an explicit ``scorer`` (AR next-token logits, e.g. ``scoring.causal_lm_logits(base)``)
    and a ``BeamEvent`` ``observer``; ``model.generate(..., block_beams=N)`` is this without them."""
    return _beams(model, resolve(model, config, prompts), generator, None, scorer, observer)


def _denoise_block(model, st: State, start: int, settings: Settings, generator, observer) -> torch.Tensor:
    """Denoise the block at columns ``[start, start + l)`` of the active samples; returns its tokens (b, l)."""
    config, sampler, eos_ids = settings.config, settings.sampler, settings.eos_ids
    l, mask_id, device = model.block_length, model.mask_token_id, st.cols.device
    act = torch.tensor(st.active, device=device)
    cols = torch.arange(start, start + l, device=device)[None]  # (1, l)
    offset = cols - st.gen_start[act][:, None]  # (b, l) index among the new tokens (< 0: prompt)
    after_prompt = offset >= 0  # (b, l)
    # Columns past max_new_tokens stay masked in the input (still noise) but are never revealed.
    in_gen = after_prompt & (offset < config.max_new_tokens)  # (b, l)
    no_eos = None  # (b, l) positions where EOS may not be chosen yet (min_new_tokens)
    eos_cols = torch.tensor(sorted(t for t in eos_ids if t < model.vocab_size), dtype=torch.long, device=device)
    if config.min_new_tokens and len(eos_cols):
        no_eos = offset < config.min_new_tokens
    temperature = settings.temperature
    if isinstance(generator, list):  # per-sample generators of the samples still in the batch
        generator = [generator[i] for i in st.active]
    if model.spec.noise_kind == "uniform":  # random tokens, no mask: the sampler may rewrite any position
        return denoise_uniform_block(
            model, st, start, config, sampler, generator, observer, in_gen, after_prompt, no_eos, eos_cols, temperature,
            settings.stop,
        )
    tokens = st.cols[act, start:].masked_fill(after_prompt, mask_id)  # (b, l): prompt tail, then masks
    num_steps = config.steps_per_block or l
    b = len(tokens)
    post = torch.zeros(b, dtype=torch.long, device=device)  # (b,) steps after the row's last mask (editing)
    state = BlockState(tokens, in_gen.clone(), in_gen, torch.ones(tokens.shape, device=device), 0, num_steps, post)
    hard_cap = num_steps + 2 * l + sampler.post_steps_budget  # samplers finish sooner; the cap guards bugs
    stop = settings.stop  # the adaptive stop, or None
    need_probs = sampler.needs_probs or stop is not None
    history = stop.start(b, l, device) if stop is not None else None
    opened = torch.zeros(b, dtype=torch.bool, device=device)  # (b,) rows kept open with no mask left (editing)
    fresh = torch.ones(b, dtype=torch.bool, device=device)  # (b,) rows whose block changed since their last forward
    soft = empty_soft(model, b, l, device)  # (b, l, d) self-conditioning input: the last new prediction, or None
    logits, changed, predicted = None, True, None
    while True:
        live = state.masked.any(-1) | opened  # (b,) rows whose block is not final
        if not live.any():
            break
        # The positions the head predicts: the masked ones, or every generated one of a live row for editing samplers.
        predict = (state.editable & live[:, None]) if sampler.edits else state.masked  # (b, l)
        ran = logits is None or changed or not config.reuse_predictions
        if ran:  # otherwise nothing changed since the last forward: its logits stand (for the rows still predicted)
            st.cols[act, start:] = state.tokens
            st.sample_nfe[act[live].cpu()] += 1  # the samples this forward denoises
            fed = None if soft is None else soft * state.masked[..., None]  # (b, l, d) at the masked positions only
            rows = block_rows(model, st, start, start + l, config.use_cache, fed)  # (b, l, d)
            logits = model.logits(rows[predict])  # (r, v): the head runs on the predicted rows only
            if no_eos is not None:
                logits[:, eos_cols] = logits[:, eos_cols].masked_fill(no_eos[predict][:, None], float("-inf"))
        else:
            logits = logits[predict[predicted]]  # a row may have closed since (predict only shrinks)
        predicted = predict
        seen = live & predict.any(-1) if ran else torch.zeros_like(live)  # (b,) rows this step's forward predicted
        soft_moved = torch.zeros_like(live)  # (b,) rows whose self-conditioning input changed with this forward
        if soft is not None and ran:
            soft, soft_moved = next_soft(model, soft, logits, predict, seen)
        temperature = sampler.temperature_at(settings.temperature, state.step, num_steps)
        proposal, conf, probs = _choose(logits, predict, temperature, config, generator, need_probs)
        step = sampler.step if state.step < hard_cap else _force
        result = step(proposal, conf, state, generator, probs)
        tokens = result.tokens.masked_fill(result.remasked, mask_id)
        if stop is not None:
            tokens, stopped = _adaptive_stop(stop, history, state, tokens, probs, predict, fresh & seen, mask_id)
            result.revealed = result.revealed | (stopped[:, None] & state.masked & (tokens != mask_id))
        edited = result.edited if result.edited is not None else torch.zeros_like(result.revealed)
        moved = result.revealed | result.remasked | edited  # (b, l)
        changed = bool(moved.any() or soft_moved.any())  # a new input (tokens or self-conditioning): a new forward
        fresh = (fresh & ~seen) | moved.any(-1) | soft_moved
        opened = result.open if result.open is not None else torch.zeros_like(opened)
        if stop is not None:
            opened = opened & ~stopped
        post = post + (live & ~state.masked.any(-1)).long()
        state = BlockState(tokens, (tokens == mask_id) & in_gen, in_gen, result.confidence, state.step + 1, num_steps,
                           post)
        if observer is not None:
            observer(_event(st, start, l, state, result, ran, conf))
    if observer is not None:
        observer(_event(st, start, l, state, None, False, None, finished=True))
    return state.tokens


def _adaptive_stop(stop, history, state: BlockState, tokens, probs, predict, tested, mask_id: int):
    """Apply the adaptive stop after a step (``samplers/adaptive_stop.py``): ``(tokens (b, l), stopped (b,))``, where
    the rows that are stable and confident have every mask left replaced by the forward's argmax. ``tested`` (b,): the
    rows whose input changed since their previous forward (only they are tested)."""
    argmax = probs.argmax(-1)  # (b, l)
    canvas = torch.where(predict, argmax, state.tokens)  # (b, l) the forward's argmax canvas
    stopped = stop.update(history, canvas, probs, predict, tested)  # (b,)
    fill = stopped[:, None] & (tokens == mask_id) & state.editable
    return torch.where(fill, argmax, tokens), stopped


def _choose(logits, predict: torch.Tensor, temperature: float, config, generator, need_probs: bool):
    """Token choice at the ``predict`` (b, l) positions (``logits`` (r, v) holds their rows), as the samplers take it:
    ``(proposal (b, l), confidence (b, l), probs (b, l, v) or None)``; other positions get token 0, confidence 0
    and zero probabilities (a sampler reveals masked positions only, or edits the predicted committed ones). Sampling
    draws one ``U[0, 1)`` per position of the block (``uniform``: with per-sample generators only the rows with a
    predicted position draw)."""
    u = None
    if temperature != 0:
        u = uniform(predict.shape, generator, predict.device, rows=predict.any(-1))[predict]  # (r,)
    tokens, confidence, probs = choose_rows(logits, u, temperature, config.top_k, config.top_p, need_probs)
    proposal = torch.zeros(predict.shape, dtype=torch.long, device=predict.device).masked_scatter(predict, tokens)
    conf = torch.zeros(predict.shape, device=predict.device).masked_scatter(predict, confidence)
    if probs is not None:
        full = probs.new_zeros((*predict.shape, probs.shape[-1]))  # (b, l, v)
        full[predict] = probs
        probs = full
    return proposal, conf, probs


def _finish_samples(
    st: State, start: int, l: int, settings: Settings, tokenizer, cancelled: Callable[[int], bool] | None = None,
) -> list[int]:
    """Record the final length of every sample whose new block holds EOS or completes a stop string, that reached
    ``max_new_tokens`` or that was ``cancelled``; returns the rows of the samples that go on."""
    max_new_tokens, eos_ids, stops = settings.max_new_tokens, settings.eos_ids, settings.stops
    keep = []
    for row, i in enumerate(st.active):
        gen_start = int(st.gen_start[i])
        written = min(start + l - gen_start, max_new_tokens)  # new tokens so far (python ints: no overflow)
        earlier = max(0, start - gen_start)  # of them, written before this block (no EOS / stop string there)
        new = st.cols[i, gen_start : gen_start + written].tolist()
        length = next((j + 1 for j in range(earlier, written) if new[j] in eos_ids), None)
        reason = "eos" if length is not None else None
        cut = _stop_string_cut(new[:length], earlier, stops, tokenizer) if stops else None
        if cut is not None:
            length, reason = cut, "stop_string"
        if length is None and written >= max_new_tokens:
            length, reason = written, "max_new_tokens"
        if length is None and cancelled is not None and cancelled(i):
            length, reason = max(written, 0), "cancelled"
        if length is None:
            keep.append(row)
        else:
            st.final_length[i], st.stop_reason[i] = length, reason
    return keep


def _stop_string_cut(tokens: list[int], earlier: int, stops: tuple[str, ...], tokenizer) -> int | None:
    """The shortest prefix of ``tokens`` whose text contains a stop string (the first ``earlier`` tokens did not)."""
    def hit(k: int) -> bool:
        text = tokenizer.decode(tokens[:k], skip_special_tokens=False)
        return any(s in text for s in stops)

    if not hit(len(tokens)):
        return None
    return next(k for k in range(earlier + 1, len(tokens) + 1) if hit(k))


def _stream_block(streamer, st: State, start: int, l: int) -> None:
    """Hand the streamer the kept new tokens of the finished block (single sample), up to EOS / the stop string."""
    first = int(st.gen_start[0])
    end = first + st.final_length[0] if 0 in st.final_length else start + l
    streamer.put(torch.tensor([st.cols[0, max(start, first) : end].tolist()], dtype=torch.long))


def _force(proposal, conf, state: BlockState, generator=None, probs=None):
    """Reveal everything still masked (only reached if a sampler fails to make progress)."""
    return reveal(state, proposal, conf, state.masked)


def _event(st: State, start: int, l: int, state: BlockState, result, ran: bool, conf, finished=False) -> StepEvent:
    """A ``StepEvent`` for observers; positions are per-sample token positions (column - first valid column)."""
    offsets = [start - int(st.first_valid[i]) for i in st.active]  # position of the block's first column

    def positions(mask: torch.Tensor) -> list[list[int]]:
        return [[off + j for j in torch.nonzero(row).flatten().tolist()] for row, off in zip(mask, offsets)]

    if result is None:  # the block-is-final event
        revealed = remasked = confidence = [[] for _ in offsets]
    else:
        revealed, remasked = positions(result.revealed), positions(result.remasked)
        confidence = [[round(float(c), 4) for c in row[m]] for row, m in zip(conf, result.revealed)]
    return StepEvent(
        block=start // l, step=state.step, samples=list(st.active), block_start=offsets,
        tokens=state.tokens.tolist(), revealed=revealed, remasked=remasked, confidence=confidence,
        forward=ran, finished=finished,
    )


def _output(st: State, prompts, pad_id: int) -> GenerationOutput:
    rows, lengths = [], []
    for i, p in enumerate(prompts):
        gen_start = int(st.gen_start[i])
        new = st.cols[i, gen_start : gen_start + st.final_length[i]].tolist()
        rows.append(p + new)
        lengths.append(len(new))
    longest = max(len(r) for r in rows)
    sequences = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        sequences[i, : len(r)] = torch.tensor(r)
    nfe = max(1, st.nfe)
    reasons = [st.stop_reason[i] for i in range(len(prompts))]
    return GenerationOutput(
        sequences=sequences,
        prompt_lengths=torch.tensor([len(p) for p in prompts]),
        lengths=torch.tensor(lengths),
        stopped_at_eos=torch.tensor([r == "eos" for r in reasons]),
        nfe=st.nfe,
        tokens_processed_per_forward=st.processed / nfe,
        tokens_per_forward=sum(lengths) / nfe,
        max_cache_length=st.max_cache,
        sample_nfe=st.sample_nfe.clone(),
        stop_reasons=reasons,
        rewrites=st.rewrites,
    )
