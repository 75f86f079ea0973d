"""The denoising loop of one block under uniform (random-token) noise (``spec.noise_kind == "uniform"``).

```
block = prompt tail + random tokens             # the uniform prior: no mask token anywhere
repeat until the sampler says the block is final:
    logits = net(block, past=cache)             # the same cached forward as under absorbing noise
    block  = sampler.rewrite(proposal, probs)   # may write any generated position, a written one included
    adaptive stop (if set): a stable, confident block becomes the forward's argmax and is final
```

Self-conditioning and the adaptive stop work as in ``generation.py``; ``RewriteState.post_steps`` counts the steps
after every position was written (editing), ``RewriteState.probs`` holds the model's own distribution for samplers
that read entropies.

The cache is the one ``generation.py`` keeps (``grid.block_rows``): read-only while the block is denoised, written
once it is final, so cached == uncached holds as under absorbing noise. ``reuse_predictions`` is valid here too
(the network has no time input): a step that changed no token keeps the last logits.

Counting: ``st.rewrites`` adds, per step, the positions that already held a token the sampler had written and now
hold another one (a corrected token); ``GenerationOutput.rewrites`` reports the sum.

Shape legend: ``b`` active batch, ``l`` block length, ``r`` editable positions, ``v`` vocab.
"""

from __future__ import annotations

import torch

from blockdiff.sampling.grid import State, block_rows, empty_soft, next_soft
from blockdiff.sampling.logits import choose_rows, filter_logits
from blockdiff.sampling.outputs import StepEvent
from blockdiff.sampling.samplers.base import RewriteResult, RewriteState, Sampler, noise_tokens, uniform

__all__ = ["denoise_uniform_block", "noise_tokens"]


def denoise_uniform_block(
    model, st: State, start: int, config, sampler: Sampler, generator, observer, in_gen: torch.Tensor,
    after_prompt: torch.Tensor, no_eos: torch.Tensor | None, eos_cols: torch.Tensor, temperature: float, stop=None,
) -> torch.Tensor:
    """Denoise the block at columns ``[start, start + l)`` of the active samples; returns its tokens (b, l).
    ``in_gen`` (b, l): the positions to generate; ``after_prompt``: those that start as noise (``in_gen`` plus the
    ones past ``max_new_tokens``, which stay noise); ``stop``: the adaptive stop (``samplers/adaptive_stop.py``) or
    ``None``."""
    l, device = model.block_length, st.cols.device
    act = torch.tensor(st.active, device=device)
    noise = noise_tokens(after_prompt.shape, model.vocab_size, model.mask_token_id, generator, device)  # (b, l)
    tokens = torch.where(after_prompt, noise, st.cols[act, start:])  # (b, l)
    num_steps = config.steps_per_block or l
    b = len(tokens)
    post = torch.zeros(b, dtype=torch.long, device=device)  # (b,) steps after every position was written (editing)
    vocab, mask_id = model.vocab_size, model.mask_token_id
    state = RewriteState(tokens, torch.zeros_like(in_gen), in_gen, 0, num_steps, mask_id, vocab, post)
    done = ~in_gen.any(-1)  # (b,)
    hard_cap = num_steps + 2 * l + sampler.post_steps_budget  # samplers finish sooner; the cap guards bugs
    history = stop.start(b, l, device) if stop is not None else None
    need_probs = sampler.needs_probs or stop is not None
    fresh = torch.ones(b, dtype=torch.bool, device=device)  # (b,) rows whose block changed since their last forward
    soft = empty_soft(model, b, l, device)  # (b, l, d) self-conditioning input, or None
    logits, changed = None, True
    while not bool(done.all()):
        ran = logits is None or changed or not config.reuse_predictions
        if ran:
            st.cols[act, start:] = state.tokens
            st.sample_nfe[act[~done].cpu()] += 1
            fed = None if soft is None else soft * in_gen[..., None]  # (b, l, d) at the generated positions only
            rows = block_rows(model, st, start, start + l, config.use_cache, fed)  # (b, l, d)
            logits = model.logits(rows[in_gen])  # (r, v)
            if no_eos is not None:
                logits[:, eos_cols] = logits[:, eos_cols].masked_fill(no_eos[in_gen][:, None], float("-inf"))
        seen = ~done if ran else torch.zeros_like(done)  # (b,) rows this step's forward predicted
        soft_moved = torch.zeros_like(done)  # (b,) rows whose self-conditioning input changed with this forward
        if soft is not None and ran:
            soft, soft_moved = next_soft(model, soft, logits, in_gen, seen)
        step_temperature = sampler.temperature_at(temperature, state.step, num_steps)
        proposal, conf, probs, model_probs = _choose_all(logits, in_gen, ~done, step_temperature, config, generator,
                                                         need_probs)
        state.probs = model_probs
        if state.step < hard_cap:
            result = sampler.rewrite(proposal, conf, probs, state, generator)
        else:  # write every unwritten position (only reached if a sampler fails to finish)
            tokens = torch.where(state.written, state.tokens, proposal)
            result = RewriteResult(tokens, in_gen.clone(), torch.ones_like(done))
        new_tokens, finished = result.tokens, result.done
        if stop is not None:  # a stable, confident block is final, as the forward's argmax (DiffusionGemma)
            argmax = model_probs.argmax(-1)  # (b, l)
            canvas = torch.where(in_gen, argmax, state.tokens)
            stopped = stop.update(history, canvas, model_probs, in_gen, fresh & seen)
            new_tokens = torch.where(stopped[:, None] & in_gen, argmax, new_tokens)
            finished = finished | stopped
        fresh = fresh & ~seen
        new = torch.where(done[:, None], state.tokens, new_tokens)  # a final block never changes
        rewritten = state.written & (new != state.tokens)  # (b, l)
        st.rewrites += int(rewritten.sum())
        changed = bool((new != state.tokens).any() or soft_moved.any())  # a new input: a new forward
        fresh = fresh | (new != state.tokens).any(-1) | soft_moved
        newly = result.written & ~state.written & ~done[:, None]
        post = post + (~done & ~(in_gen & ~state.written).any(-1)).long()
        state = RewriteState(new, state.written | (result.written & ~done[:, None]), in_gen, state.step + 1,
                             num_steps, mask_id, vocab, post)
        done = done | finished
        if observer is not None:
            observer(_event(st, start, state, newly, rewritten, ran, bool(done.all())))
    return state.tokens


def _choose_all(logits, in_gen, rows, temperature: float, config, generator, need_probs: bool = False):
    """``(proposal (b, l), confidence (b, l), probs (b, l, v), model_probs (b, l, v) or None)`` at the editable
    positions: a token drawn from the tempered, filtered distribution with the model's own confidence in it (as
    ``generation._choose``), that distribution itself (one-hot of the argmax when greedy) for samplers that draw from a
    posterior, and with ``need_probs`` the model's own untempered distribution (entropy rules, the adaptive stop)."""
    u = None
    if temperature != 0:
        u = uniform(in_gen.shape, generator, in_gen.device, rows=rows)[in_gen]  # (r,)
    tokens, confidence, own = choose_rows(logits, u, temperature, config.top_k, config.top_p, need_probs=need_probs)
    if temperature == 0:
        dist = torch.zeros_like(logits).scatter_(-1, tokens[:, None], 1.0)  # (r, v)
    else:
        dist = filter_logits(logits / temperature, config.top_k, config.top_p).softmax(-1)  # (r, v)
    proposal = torch.zeros(in_gen.shape, dtype=torch.long, device=in_gen.device).masked_scatter(in_gen, tokens)
    conf = torch.zeros(in_gen.shape, device=in_gen.device).masked_scatter(in_gen, confidence)
    probs = dist.new_zeros((*in_gen.shape, dist.shape[-1]))  # (b, l, v)
    probs[in_gen] = dist
    model_probs = None
    if own is not None:
        model_probs = own.new_zeros((*in_gen.shape, own.shape[-1]))  # (b, l, v)
        model_probs[in_gen] = own
    return proposal, conf, probs, model_probs


def _event(st: State, start: int, state: RewriteState, newly, rewritten, ran: bool, finished: bool) -> StepEvent:
    """A ``StepEvent``: ``revealed`` the positions written for the first time, ``remasked`` the rewritten ones."""
    offsets = [start - int(st.first_valid[i]) for i in st.active]

    def positions(mask):
        return [[off + j for j in torch.nonzero(row).flatten().tolist()] for row, off in zip(mask, offsets)]

    return StepEvent(
        block=start // state.tokens.shape[1], step=state.step, samples=list(st.active), block_start=offsets,
        tokens=state.tokens.tolist(), revealed=positions(newly), remasked=positions(rewritten),
        confidence=[[] for _ in offsets], forward=ran, finished=finished,
    )
