"""The column grid of a generating batch and the forwards over it (``generation.py`` drives them).

A batch is a grid of *columns*: prompts left-padded by whole blocks so that every sample's first generation block
occupies the same columns; position ids are ``column - first valid column`` per sample. ``forward`` runs a
range of columns of the active samples against the block cache (the mask built once per block, none at all when
it would allow everything; the gated adapter on for the block being denoised); ``slide`` drops the oldest half
of the window and resets the cache, so the next forward re-encodes the kept tokens at fresh positions.

Shape legend: ``b`` active batch, ``c`` columns, ``q`` input columns, ``s`` key columns, ``l`` block length,
``d`` hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

__all__ = ["State", "layout", "forward", "block_logits", "block_rows", "slide", "drop_finished", "empty_soft",
           "next_soft"]


@dataclass
class State:
    cols: torch.Tensor  # (B, c) every column of every sample (pads, prompt, generated)
    first_valid: torch.Tensor  # (B,) first non-pad column per sample
    gen_start: torch.Tensor  # (B,) column of the first generated token per sample
    active: list[int]  # original indices of samples still generating
    window_start: int = 0  # first column the network sees
    cache: DynamicCache | None = None  # KV of columns [window_start, cache_end) for the active samples
    cache_end: int = 0
    last_hidden: torch.Tensor | None = None  # (b, d) hidden state at column cache_end - 1 (logit shift)
    nfe: int = 0
    processed: int = 0
    max_cache: int = 0
    sample_nfe: torch.Tensor | None = None  # (B,) forwards that denoised each sample
    rewrites: int = 0  # uniform noise: written tokens later replaced by another (``rewrite.py``)
    masks: dict = field(default_factory=dict)  # the attention masks of the current block's forwards, by shape
    final_length: dict[int, int] = field(default_factory=dict)  # new tokens kept, per finished sample
    stop_reason: dict[int, str] = field(default_factory=dict)


def layout(prompts: list[list[int]], l: int, pad_id: int, device) -> State:
    full_blocks = [len(p) // l for p in prompts]
    start = max(full_blocks) * l  # first column of the first generation block
    first_valid = torch.tensor([start - k * l for k in full_blocks], device=device)
    cols = torch.full((len(prompts), start + l), pad_id, device=device)
    for i, p in enumerate(prompts):
        cols[i, int(first_valid[i]) : int(first_valid[i]) + len(p)] = torch.tensor(p, device=device)
    gen_start = first_valid + torch.tensor([len(p) for p in prompts], device=device)
    return State(cols=cols, first_valid=first_valid, gen_start=gen_start, active=list(range(len(prompts))),
                  sample_nfe=torch.zeros(len(prompts), dtype=torch.long))


def forward(model, st: State, feed_from: int, end: int, use_cache: bool, soft: torch.Tensor | None = None):
    """Run columns ``[feed_from, end)`` of the active samples against the cache; returns
    ``(hidden (b, q, d), cache)``. ``soft`` (b, l, d): self-conditioning input of the block being denoised (the last
    ``l`` columns; the other fed columns get none)."""
    act = torch.tensor(st.active, device=st.cols.device)
    q_cols = torch.arange(feed_from, end, device=st.cols.device)  # (q,)
    k_cols = torch.arange(st.window_start, end, device=st.cols.device)  # (s,)
    first = st.first_valid[act].clamp(min=st.window_start)  # (b,)
    positions = (q_cols[None, :] - first[:, None]).clamp(min=0)  # (b, q)
    past = st.cache if use_cache else None
    if use_cache and past is None:
        past = model.new_cache()
    noisy_from = end - model.block_length  # the block being denoised: the noisy stream (adapter on, if any)
    extra = {}  # the call of a model without self-conditioning is the one it has always been
    if soft is not None:
        extra["soft"] = torch.cat([soft.new_zeros(soft.shape[0], noisy_from - feed_from, soft.shape[-1]), soft], dim=1)
    hidden, past = model.hidden_states(
        st.cols[act, feed_from:end], positions, _mask(model, st, q_cols, k_cols, first, noisy_from),
        past_key_values=past, use_cache=use_cache, gate=(q_cols >= noisy_from)[None], fast_gqa=True, **extra,
    )
    st.nfe += 1
    st.processed += hidden.shape[0] * hidden.shape[1]
    if use_cache:
        st.max_cache = max(st.max_cache, past.get_seq_length())
    return hidden, past


def _mask(model, st: State, q_cols: torch.Tensor, k_cols: torch.Tensor, first: torch.Tensor, noisy_from: int):
    """The sampling mask of a forward (``model.sampling_mask``), built once per block: the forwards of a block
    that feed the same columns share it (``st.masks`` is emptied when a block starts)."""
    key = (int(q_cols[0]), len(q_cols), int(k_cols[0]), len(k_cols))
    if key not in st.masks:
        st.masks[key] = model.sampling_mask(q_cols, k_cols, first, noisy_from, allow_full=True)
    return st.masks[key]


def block_logits(model, st: State, start: int, end: int, use_cache: bool) -> torch.Tensor:
    """Logits (b, l, v) for the block at columns ``[start, end)``; folds the finished block into the cache."""
    return model.logits(block_rows(model, st, start, end, use_cache))


def block_rows(
    model, st: State, start: int, end: int, use_cache: bool, soft: torch.Tensor | None = None
) -> torch.Tensor:
    """The hidden states (b, l, d) that predict the block at columns ``[start, end)`` (logit shift applied: the
    output head turns them into its logits); folds the finished block into the cache. ``soft`` (b, l, d): the block's
    self-conditioning input (``None``: none)."""
    feed_from = st.cache_end if use_cache else st.window_start
    hidden, past = forward(model, st, feed_from, end, use_cache, soft)  # (b, q, d)
    if use_cache:
        past.crop(-(end - start))  # keep finished columns only: the cache stays read-only for the block
        st.cache, st.cache_end = past, start
    rows = hidden[:, start - feed_from : end - feed_from]  # (b, l, d)
    if model.spec.logit_shift:  # the block's first token reads the last finished column (kept for later forwards)
        if start > feed_from:
            prev = hidden[:, start - feed_from - 1]  # (b, d): last finished column, clean
            st.last_hidden = prev
        else:
            prev = st.last_hidden if st.last_hidden is not None else torch.zeros_like(rows[:, 0])
        rows = model.apply_logit_shift(rows, prev[:, None])  # (b, l, d)
    return rows


def empty_soft(model, b: int, l: int, device) -> torch.Tensor | None:
    """The self-conditioning input of a new block (zeros: no prediction yet), or ``None`` for a model without it."""
    if not getattr(model.spec, "self_conditioning", False):
        return None
    return torch.zeros(b, l, model.backbone.get_input_embeddings().embedding_dim, device=device)


def next_soft(model, soft: torch.Tensor, logits: torch.Tensor, predict: torch.Tensor, rows: torch.Tensor):
    """``(soft (b, l, d), moved (b,))``: the self-conditioning input of the next forward (docs/design.md §3.3), i.e.
    this forward's prediction (``logits`` (r, v) at the ``predict`` (b, l) positions) for the ``rows`` (b,) it
    predicted, the previous input for the others; ``moved``: the rows whose input changed. A forward whose block and
    input are unchanged would give the same logits again, so the block loop reuses them only when no row moved, and a
    row's tokens do not depend on its batch."""
    new = torch.zeros_like(soft)
    new[predict] = model.soft_embedding(logits).to(soft.dtype)
    new = torch.where(rows[:, None, None], new, soft)
    return new, (new != soft).flatten(1).any(-1)


def slide(model, st: State, window: int) -> None:
    """Drop the oldest columns so the next block fits in ``window``; the cache is rebuilt at fresh positions."""
    l = model.block_length
    end = st.cols.shape[1]
    if end - st.window_start <= window:
        return
    keep = max(l, (window // 2) // l * l)
    st.window_start = end - l - keep
    st.cache, st.cache_end, st.last_hidden = None, st.window_start, None


def drop_finished(st: State, keep_rows: list[int]) -> None:
    idx = torch.tensor(keep_rows, dtype=torch.long, device=st.cols.device)
    st.active = [st.active[r] for r in keep_rows]
    if st.cache is not None and st.cache.get_seq_length() == 0:
        st.cache = None  # an empty cache (no finished column yet) would keep every row: transformers skips it
    elif st.cache is not None:
        st.cache.batch_select_indices(idx)
    if st.last_hidden is not None:
        st.last_hidden = st.last_hidden[idx]
