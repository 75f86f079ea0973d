"""Attention masks for block diffusion, as named pieces (docs/design.md §4).

The vectorised training forward feeds ``x_t ⊕ x_0`` (length ``2n``) through the network once. Query
``q`` and key ``k`` index that doubled sequence; ``block(i) = (i mod n) // l``. The mask is the union
of three parts:

* ``block_diagonal``       — x_t → x_t: a noisy block sees itself (bidirectionally);
* ``offset_block_causal``  — x_t → x_0: noisy block ``k`` sees the clean blocks ``< k``;
* ``block_causal``         — x_0 → x_0: clean block ``k`` sees the clean blocks ``<= k``.

The x_0 → x_0 piece is chosen by ``clean_attention`` (``model.clean_attention``): ``block_causal`` (above, the
default) or ``causal``, where ``token_causal`` replaces it — clean token ``i`` sees clean tokens ``<= i``, so the
clean half computes exactly what a plain causal decoder computes and its keys/values are that decoder's cache
(docs/design.md §4, §14). The x_t parts do not change.

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
    "token_causal",
    "CLEAN_ATTENTION",
    "training_mask",
    "training_mask_mod",
    "training_block_mask",
    "block_causal_mask",
    "causal_prefix_mask",
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


def token_causal(q, k, n: int, block_length: int) -> torch.Tensor:
    """x_0 → x_0 under ``clean_attention=causal``: a clean query sees the clean keys at its own and earlier
    positions (a plain causal decoder; ``block_length`` is unused and kept for the common signature)."""
    q_clean, k_clean, _, _ = _halves_and_blocks(q, k, n, block_length)
    return q_clean & k_clean & (k <= q)


CLEAN_ATTENTION = {"block_causal": block_causal, "causal": token_causal}
"""The x_0 → x_0 piece for each ``clean_attention`` setting."""


def _clean_piece(clean_attention: str):
    try:
        return CLEAN_ATTENTION[clean_attention]
    except KeyError:
        raise ValueError(f"clean_attention must be one of {list(CLEAN_ATTENTION)}, got {clean_attention!r}") from None


def training_mask_mod(n: int, block_length: int, clean_attention: str = "block_causal"):
    """The full training mask as a ``mask_mod(b, h, q, k)`` function (flex-attention style)."""
    _check(n, block_length)
    clean_piece = _clean_piece(clean_attention)

    def mask_mod(b, h, q, k):
        return (
            block_diagonal(q, k, n, block_length)
            | offset_block_causal(q, k, n, block_length)
            | clean_piece(q, k, n, block_length)
        )

    return mask_mod


def training_mask(
    n: int, block_length: int, device: torch.device | str | None = None, clean_attention: str = "block_causal"
) -> torch.Tensor:
    """Dense boolean mask ``(2n, 2n)`` for the vectorised ``x_t ⊕ x_0`` forward (works with SDPA anywhere)."""
    idx = torch.arange(2 * n, device=device)
    return training_mask_mod(n, block_length, clean_attention)(None, None, idx[:, None], idx[None, :])  # (2n, 2n)


def training_block_mask(
    n: int,
    block_length: int,
    batch_size: int | None = None,
    device="cuda",
    length: int | None = None,
    clean_attention: str = "block_causal",
):
    """Sparse flex-attention ``BlockMask`` of the same mask (its leading ``length`` rows and columns,
    default ``2n``); the fast path on CUDA (never compiled on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = 2 * n if length is None else length
    mask_mod = training_mask_mod(n, block_length, clean_attention)
    return create_block_mask(mask_mod, batch_size, None, length, length, device=device)


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


def causal_prefix_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, block_length: int, noisy_from: int
) -> torch.Tensor:
    """Sampling mask under ``clean_attention=causal``: ``[clean prefix ; noisy block]`` forwards.

    A clean query (position ``< noisy_from``) sees the keys at its own and earlier positions (token-causal, the
    plain decoder); a noisy query (position ``>= noisy_from``) sees every clean key and the noisy keys of its own
    block, blocks counted from ``noisy_from`` (``noisy_from`` need not lie on the block grid: the clean stream has
    no blocks, so a draft block may start after any committed token). With ``noisy_from`` on the grid and one noisy
    block this is the training mask's x_t rows (``offset_block_causal`` | ``block_diagonal``) and its causal x_0 rows.
    """
    q = query_positions[:, None]  # (q, 1)
    k = key_positions[None, :]  # (1, k)
    q_noisy, k_noisy = q >= noisy_from, k >= noisy_from
    same_block = (q - noisy_from).div(block_length, rounding_mode="floor") == (k - noisy_from).div(
        block_length, rounding_mode="floor"
    )
    clean_rows = ~q_noisy & (k <= q)  # (q, k)
    noisy_rows = q_noisy & (~k_noisy | same_block)  # (q, k)
    return clean_rows | noisy_rows
