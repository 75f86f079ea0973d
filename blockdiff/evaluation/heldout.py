"""The held-out split of a run's corpus, packed and batched exactly as training held it out.

Every evaluation of held-out text (``nelbo.evaluate_held_out``, the judge's AR perplexity on the same
windows, the sweep runner's NELBO at each inference block length and its clip-window variances) reads its
batches from ``held_out_split``, so their numbers are over the same tokens by construction (docs/design.md §10).
No Lightning here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.config import DataConfig
from blockdiff.data.corpus import PackedCorpus, collate_windows, load_documents, pack_documents

__all__ = ["HeldOut", "held_out_split"]


@dataclass
class HeldOut:
    corpus: PackedCorpus  # the packed windows (``corpus.val`` is the held-out split)
    loader: torch.utils.data.DataLoader  # (b, n) batches of ``corpus.val``, in order, never shuffled

    @property
    def tokens_per_byte(self) -> float:
        return self.corpus.tokens_per_byte


def held_out_split(data: DataConfig, tokenizer) -> HeldOut:
    """Pack ``data``'s corpus with ``tokenizer`` and batch its held-out tail (``data.batch_size`` windows a batch)."""
    corpus = pack_documents(load_documents(data), tokenizer, data.max_seq_len, data.val_fraction)
    loader = torch.utils.data.DataLoader(corpus.val, batch_size=data.batch_size, collate_fn=collate_windows)
    return HeldOut(corpus, loader)
