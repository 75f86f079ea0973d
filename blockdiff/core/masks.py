"""Attention masks for block diffusion, as named pieces (docs/design.md §4).

The vectorised training forward feeds ``x_t ⊕ x_0`` (length ``2n``) through the network once. Query
``q`` and key ``k`` index that doubled sequence; ``block(i) = (i mod n) // l``. The mask is the union
of three parts:

* ``block_diagonal``       — x_t → x_t: a noisy block sees itself (bidirectionally);
* ``offset_block_causal``  — x_t → x_0: noisy block ``k`` sees the clean blocks ``< k``;
* ``block_causal``         — x_0 → x_0: clean block ``k`` sees the clean blocks ``<= k``.

Every mask here is boolean with ``True`` = "may attend". ``model.py`` converts it to whatever the
attention implementation wants (bool for SDPA, additive float for eager, ``BlockMask`` for flex).
This module knows nothing about the network, noise or sampling.

Shape legend: ``n`` tokens per half (``max_seq_len``), ``l`` block length, ``q``/``k`` query/key index.
"""

from __future__ import annotations

import torch

__all__ = [
    "block_diagonal",
    "offset_block_causal",
    "block_causal",
    "training_mask",
    "training_mask_mod",
    "training_block_mask",
]


def _check(n: int, block_length: int) -> None:
    if block_length < 1 or n % block_length != 0:
        raise ValueError(f"block_length={block_length} must be >= 1 and divide the sequence length {n}")


def _halves_and_blocks(q: torch.Tensor, k: torch.Tensor, n: int, block_length: int):
    """Which half (0 = x_t, 1 = x_0) and which block each query/key index falls in."""
    return q >= n, k >= n, (q % n) // block_length, (k % n) // block_length


def block_diagonal(q, k, n: int, block_length: int) -> torch.Tensor:
    """x_t → x_t: query and key are both noisy and in the same block."""
    q_clean, k_clean, q_blk, k_blk = _halves_and_blocks(q, k, n, block_length)
    return ~q_clean & ~k_clean & (q_blk == k_blk)


def offset_block_causal(q, k, n: int, block_length: int) -> torch.Tensor:
    """x_t → x_0: a noisy query sees clean keys of strictly earlier blocks."""
    q_clean, k_clean, q_blk, k_blk = _halves_and_blocks(q, k, n, block_length)
    return ~q_clean & k_clean & (k_blk < q_blk)


def block_causal(q, k, n: int, block_length: int) -> torch.Tensor:
    """x_0 → x_0: a clean query sees clean keys of its own and earlier blocks."""
    q_clean, k_clean, q_blk, k_blk = _halves_and_blocks(q, k, n, block_length)
    return q_clean & k_clean & (k_blk <= q_blk)


def training_mask_mod(n: int, block_length: int):
    """The full training mask as a ``mask_mod(b, h, q, k)`` function (flex-attention style)."""
    _check(n, block_length)

    def mask_mod(b, h, q, k):
        return (
            block_diagonal(q, k, n, block_length)
            | offset_block_causal(q, k, n, block_length)
            | block_causal(q, k, n, block_length)
        )

    return mask_mod


def training_mask(n: int, block_length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Dense boolean mask ``(2n, 2n)`` for the vectorised ``x_t ⊕ x_0`` forward (works with SDPA anywhere)."""
    idx = torch.arange(2 * n, device=device)
    return training_mask_mod(n, block_length)(None, None, idx[:, None], idx[None, :])  # (2n, 2n)


def training_block_mask(
    n: int, block_length: int, batch_size: int | None = None, device="cuda", length: int | None = None
):
    """Sparse flex-attention ``BlockMask`` of the same mask (its leading ``length`` rows and columns,
    default ``2n``); the fast path on CUDA (never compiled on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = 2 * n if length is None else length
    return create_block_mask(training_mask_mod(n, block_length), batch_size, None, length, length, device=device)


def block_causal_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, block_length: int
) -> torch.Tensor:
    """Sampling mask: a query at position ``i`` sees every key whose block index is ``<=`` its own.

    Positions are absolute token positions; used for ``[clean prefix ; noisy block]`` forwards where the
    prefix is block-causal and the current block attends to itself and everything before it.
    """
    q_blk = query_positions // block_length  # (q,)
    k_blk = key_positions // block_length  # (k,)
    return k_blk[None, :] <= q_blk[:, None]  # (q, k)
