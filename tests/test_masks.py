"""Tests for ``blockdiff/core/masks.py``: the three-part training mask and the sampling mask (docs/design.md §4, §7.3).

Every mask is checked cell by cell against a reference written here with plain Python loops over
query ``q`` and key ``k`` of the doubled ``x_t ⊕ x_0`` sequence, straight from the prose of docs/design.md §4:

* x_t → x_t block-diagonal (a noisy block sees itself);
* x_t → x_0 offset block-causal (noisy block ``b`` sees clean blocks strictly before ``b``);
* x_0 → x_0 block-causal (clean block ``b`` sees clean blocks ``<= b``);
* x_0 → x_t never.

With ``clean_attention=causal`` the x_0 → x_0 part is token-causal instead (clean position ``i`` sees clean
positions ``<= i``), the x_t parts unchanged; the causal sampling mask (``causal_prefix_mask``) is checked against
its own loop reference and against the rows of the causal training mask.

The flex-attention ``BlockMask`` is only built when CUDA is available (compiling flex on CPU is slow).
"""

from __future__ import annotations

import pytest
import torch

from blockdiff.core.masks import (
    block_causal,
    block_causal_mask,
    block_diagonal,
    causal_prefix_mask,
    offset_block_causal,
    token_causal,
    training_block_mask,
    training_mask,
    training_mask_mod,
)

CASES = [(8, 1), (8, 2), (8, 4), (8, 8), (6, 3), (6, 1), (6, 2), (4, 2)]


# -- independent reference ------------------------------------------------------------------------
def _where(i: int, n: int, l: int) -> tuple[bool, int]:
    """(is_clean, block index) of index ``i`` of the doubled sequence."""
    clean = i >= n
    pos = i - n if clean else i
    return clean, pos // l


def reference_parts(n: int, l: int) -> dict[str, torch.Tensor]:
    """The three parts as (2n, 2n) bool tensors, built with explicit loops."""
    parts = {name: torch.zeros(2 * n, 2 * n, dtype=torch.bool) for name in ("diag", "offset", "causal")}
    for q in range(2 * n):
        q_clean, q_blk = _where(q, n, l)
        for k in range(2 * n):
            k_clean, k_blk = _where(k, n, l)
            if not q_clean and not k_clean and q_blk == k_blk:
                parts["diag"][q, k] = True
            if not q_clean and k_clean and k_blk < q_blk:
                parts["offset"][q, k] = True
            if q_clean and k_clean and k_blk <= q_blk:
                parts["causal"][q, k] = True
    return parts


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(2 * n)
    return idx[:, None], idx[None, :]


# -- the three parts and their union --------------------------------------------------------------
@pytest.mark.parametrize("n,l", CASES)
def test_parts_match_reference(n, l):
    ref = reference_parts(n, l)
    q, k = _grid(n)
    assert torch.equal(block_diagonal(q, k, n, l), ref["diag"])
    assert torch.equal(offset_block_causal(q, k, n, l), ref["offset"])
    assert torch.equal(block_causal(q, k, n, l), ref["causal"])


@pytest.mark.parametrize("n,l", CASES)
def test_training_mask_matches_reference(n, l):
    ref = reference_parts(n, l)
    expected = ref["diag"] | ref["offset"] | ref["causal"]
    mask = training_mask(n, l)
    assert mask.shape == (2 * n, 2 * n)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    # the quadrants, read directly
    assert torch.equal(mask[:n, :n], ref["diag"][:n, :n])  # x_t -> x_t
    assert torch.equal(mask[:n, n:], ref["offset"][:n, n:])  # x_t -> x_0
    assert torch.equal(mask[n:, n:], ref["causal"][n:, n:])  # x_0 -> x_0
    assert not mask[n:, :n].any(), "x_0 must never attend to x_t"


@pytest.mark.parametrize("n,l", CASES)
def test_training_mask_mod_on_grid_equals_training_mask(n, l):
    q, k = _grid(n)
    mod = training_mask_mod(n, l)
    assert torch.equal(mod(None, None, q, k), training_mask(n, l))
    # also cell by cell with scalar tensors, the way flex-attention calls it
    dense = training_mask(n, l)
    for qi in range(2 * n):
        for ki in range(2 * n):
            assert bool(mod(torch.tensor(0), torch.tensor(0), torch.tensor(qi), torch.tensor(ki))) == bool(
                dense[qi, ki]
            ), (qi, ki)


def test_hand_picked_cells_n4_l2():
    n, l = 4, 2
    m = training_mask(n, l)
    noisy = lambda i: i  # noqa: E731 - index of noisy position i
    clean = lambda i: n + i  # noqa: E731 - index of clean position i

    # noisy position 2 (block 1) sees noisy 2, 3 and clean 0, 1 — not clean 2, 3, not noisy 0, 1
    row = m[noisy(2)]
    assert row[noisy(2)] and row[noisy(3)]
    assert row[clean(0)] and row[clean(1)]
    assert not row[clean(2)] and not row[clean(3)]
    assert not row[noisy(0)] and not row[noisy(1)]
    assert row.sum() == 4

    # noisy position 0 (block 0) sees only noisy 0, 1 (no clean context before the first block)
    row = m[noisy(0)]
    assert row[noisy(0)] and row[noisy(1)]
    assert row.sum() == 2

    # clean position 0 sees clean 0, 1 (its own block, bidirectionally) and no noisy position at all
    row = m[clean(0)]
    assert row[clean(0)] and row[clean(1)]
    assert not row[clean(2)] and not row[clean(3)]
    assert not row[:n].any()
    assert row.sum() == 2

    # clean position 3 sees all clean positions
    assert m[clean(3), n:].all() and not m[clean(3), :n].any()


def test_block_length_1_clean_half_is_causal():
    n = 8
    m = training_mask(n, 1)
    assert torch.equal(m[n:, n:], torch.ones(n, n, dtype=torch.bool).tril())
    assert torch.equal(m[:n, :n], torch.eye(n, dtype=torch.bool))  # a noisy token sees only itself
    assert torch.equal(m[:n, n:], torch.ones(n, n, dtype=torch.bool).tril(-1))  # ... and strictly earlier clean


def test_block_length_n_is_mdlm():
    n = 8
    m = training_mask(n, n)
    assert m[n:, n:].all()
    assert m[:n, :n].all()
    assert not m[:n, n:].any()  # one block: nothing before it
    assert not m[n:, :n].any()


@pytest.mark.parametrize("n,l", [(8, 3), (6, 4), (8, 0), (8, -2), (4, 5)])
def test_non_dividing_block_length_raises(n, l):
    with pytest.raises(ValueError):
        training_mask(n, l)
    with pytest.raises(ValueError):
        training_mask_mod(n, l)


# -- the sampling mask ----------------------------------------------------------------------------
def _reference_block_causal(qpos, kpos, l):
    out = torch.zeros(len(qpos), len(kpos), dtype=torch.bool)
    for i, qp in enumerate(qpos):
        for j, kp in enumerate(kpos):
            out[i, j] = kp // l <= qp // l
    return out


@pytest.mark.parametrize(
    "qpos,kpos,l",
    [
        (list(range(8)), list(range(8)), 1),
        (list(range(8)), list(range(8)), 2),
        (list(range(8)), list(range(8)), 4),
        (list(range(8, 12)), list(range(12)), 4),  # a new noisy block against prefix + itself
        (list(range(6, 9)), list(range(9)), 3),
        (list(range(20, 24)), list(range(10, 24)), 4),  # sliding window: keys start mid-sequence
        ([5, 9, 2], [0, 3, 4, 8, 11], 4),  # arbitrary, unsorted positions
    ],
)
def test_block_causal_mask_matches_reference(qpos, kpos, l):
    got = block_causal_mask(torch.tensor(qpos), torch.tensor(kpos), l)
    assert got.shape == (len(qpos), len(kpos))
    assert torch.equal(got, _reference_block_causal(qpos, kpos, l))


def test_block_causal_mask_equals_clean_training_quadrant():
    for n, l in CASES:
        pos = torch.arange(n)
        assert torch.equal(block_causal_mask(pos, pos, l), training_mask(n, l)[n:, n:]), (n, l)


def test_block_causal_mask_new_block_sees_prefix_and_itself():
    pos = torch.arange(12)
    m = block_causal_mask(pos, pos, 4)
    assert m[8:, :].all()  # last block sees everything
    assert not m[:8, 8:].any()  # earlier blocks never see the last block
    assert m[4, 7] and not m[3, 4]  # bidirectional within a block, causal across


# -- clean_attention=causal: the token-causal clean stream -------------------------------------------
def reference_token_causal(n: int, l: int) -> torch.Tensor:
    """x_0 → x_0 token-causal, from the prose: a clean query at position ``i`` sees the clean keys at positions
    ``j <= i``; nothing else (no noisy query, no noisy key)."""
    out = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(2 * n):
        for k in range(2 * n):
            if q >= n and k >= n and (k - n) <= (q - n):
                out[q, k] = True
    return out


@pytest.mark.parametrize("n,l", CASES)
def test_token_causal_piece_matches_reference(n, l):
    q, k = _grid(n)
    assert torch.equal(token_causal(q, k, n, l), reference_token_causal(n, l))


@pytest.mark.parametrize("n,l", CASES)
def test_causal_clean_training_mask_matches_reference(n, l):
    ref = reference_parts(n, l)
    expected = ref["diag"] | ref["offset"] | reference_token_causal(n, l)
    mask = training_mask(n, l, clean_attention="causal")
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    assert torch.equal(mask[n:, n:], torch.ones(n, n, dtype=torch.bool).tril())  # x_0 -> x_0: a causal decoder
    assert torch.equal(mask[:n], training_mask(n, l)[:n])  # the noisy rows do not change
    assert not mask[n:, :n].any(), "x_0 must never attend to x_t"
    q, k = _grid(n)
    assert torch.equal(training_mask_mod(n, l, "causal")(None, None, q, k), mask)


def test_causal_clean_mask_differs_from_block_causal_only_inside_clean_blocks():
    n, l = 8, 4
    diff = training_mask(n, l) ^ training_mask(n, l, clean_attention="causal")
    q, k = _grid(n)
    inside = (q >= n) & (k >= n) & ((q - n) // l == (k - n) // l) & (k > q)  # anti-causal cells of a clean block
    assert torch.equal(diff, inside)


def test_unknown_clean_attention_raises():
    with pytest.raises(ValueError, match="clean_attention"):
        training_mask(8, 4, clean_attention="bidirectional")


def _reference_causal_prefix(qpos, kpos, l, noisy_from):
    """From the prose: a clean query (< noisy_from) sees keys at its own and earlier positions; a noisy query sees
    every clean key and the noisy keys of its own block (blocks of l counted from noisy_from)."""
    out = torch.zeros(len(qpos), len(kpos), dtype=torch.bool)
    for i, qp in enumerate(qpos):
        for j, kp in enumerate(kpos):
            if qp < noisy_from:
                out[i, j] = kp <= qp
            else:
                out[i, j] = kp < noisy_from or (kp - noisy_from) // l == (qp - noisy_from) // l
    return out


@pytest.mark.parametrize(
    "qpos,kpos,l,noisy_from",
    [
        (list(range(12)), list(range(12)), 4, 8),  # [clean prefix ; one noisy block]
        (list(range(4, 12)), list(range(12)), 4, 8),  # a finished block folded in + the noisy block, cache before
        (list(range(8, 12)), list(range(12)), 4, 8),  # the noisy block alone against the cache
        (list(range(9)), list(range(9)), 3, 6),
        (list(range(10)), list(range(10)), 4, 5),  # a draft block after any committed token (off the grid)
        (list(range(20, 24)), list(range(10, 24)), 4, 20),  # sliding window
        (list(range(8)), list(range(8)), 1, 8),  # all clean: a plain causal decoder
    ],
)
def test_causal_prefix_mask_matches_reference(qpos, kpos, l, noisy_from):
    got = causal_prefix_mask(torch.tensor(qpos), torch.tensor(kpos), l, noisy_from)
    assert torch.equal(got, _reference_causal_prefix(qpos, kpos, l, noisy_from))


@pytest.mark.parametrize("n,l", CASES)
def test_causal_prefix_mask_is_the_causal_training_mask_seen_from_one_block(n, l):
    """[x_0 blocks < k ; x_t block k] under causal_prefix_mask = the rows and columns of the causal training mask
    that the naive per-block loop (test_loss.py) feeds."""
    full = training_mask(n, l, clean_attention="causal")
    for blk in range(n // l):
        start, end = blk * l, (blk + 1) * l
        pos = torch.arange(end)
        rows = torch.cat([n + torch.arange(start), torch.arange(start, end)])  # clean prefix, then noisy block
        want = full[rows][:, rows]
        assert torch.equal(causal_prefix_mask(pos, pos, l, start), want), (n, l, blk)


# -- flex attention (CUDA only) -------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex-attention BlockMask needs CUDA (never compiled on CPU)")
@pytest.mark.parametrize("n,l", [(128, 16), (256, 32), (128, 128)])
def test_training_block_mask_matches_dense_on_cuda(n, l):
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    block_mask = training_block_mask(n, l, device="cuda")
    q, k, v = (torch.randn(1, 2, 2 * n, 16, device="cuda") for _ in range(3))
    dense = training_mask(n, l, device="cuda")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[None, None])
    got = flex_attention(q, k, v, block_mask=block_mask)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex-attention BlockMask needs CUDA (never compiled on CPU)")
def test_causal_clean_block_mask_matches_dense_on_cuda():
    from torch.nn.attention.flex_attention import flex_attention

    n, l = 128, 16
    torch.manual_seed(0)
    block_mask = training_block_mask(n, l, device="cuda", clean_attention="causal")
    q, k, v = (torch.randn(1, 2, 2 * n, 16, device="cuda") for _ in range(3))
    dense = training_mask(n, l, device="cuda", clean_attention="causal")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[None, None])
    got = flex_attention(q, k, v, block_mask=block_mask)
    assert (got - want).abs().max().item() < 1e-4
