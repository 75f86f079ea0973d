"""Training loaders over a ``PackedCorpus``: a resumable, rank-sharded sampler and the LightningDataModule.

Shape legend: ``b`` batch, ``n`` tokens (``max_seq_len``).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from blockdiff.config import ConfigError
from blockdiff.data.corpus import PackedCorpus, collate_windows
from blockdiff.errors import UsageError

__all__ = ["ShardedResumableSampler", "BlockDiffusionDataModule"]


class ShardedResumableSampler(Sampler[int]):
    """Shuffled indices for one rank, reproducible per epoch and resumable mid-epoch.

    Epoch ``e`` uses the permutation drawn from ``seed + e``; rank ``r`` of ``w`` takes every ``w``-th
    index starting at ``r`` (like ``DistributedSampler``: the ranks' shards never overlap, and the union of
    the ranks' ``i``-th batches is the ``i``-th batch of a single process with ``w`` times the batch).
    Each shard is cut to the same length so every rank takes the same number of steps. ``resume(epoch,
    batches_done, batch_size)`` makes the next iteration of that epoch skip the batches already trained on.
    Lightning calls ``set_epoch`` at the start of every epoch.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise UsageError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples to skip in that epoch)

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int, batch_size: int) -> None:
        self._skip = (epoch, batches_done * batch_size)

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        shard = order[self.rank :: self.world_size][: len(self)].tolist()
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
            self._skip = None
        return iter(shard[start:])


class BlockDiffusionDataModule(L.LightningDataModule):
    """Train/val loaders over a ``PackedCorpus``; batches are ``(b, n)`` token tensors.

    ``batch_size`` is the *global* batch: with ``w`` processes (DDP) each rank loads ``batch_size / w``
    sequences from its own shard of the training windows. The position in the epoch is part of the
    checkpoint (``state_dict``), so a resumed run continues with the next unseen batch. Validation is not
    sharded: every rank evaluates the same ``limit_val_batches`` batches (its metric is then the same on
    every rank, and the same as in a single process).
    """

    def __init__(self, corpus: PackedCorpus, batch_size: int, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.corpus, self.batch_size, self.num_workers, self.seed = corpus, batch_size, num_workers, seed
        self._sampler: ShardedResumableSampler | None = None
        self._resume: dict | None = None

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def per_rank_batch_size(self) -> int:
        rank, world = self._rank_and_world()
        global_batch = min(self.batch_size, len(self.corpus.train))
        if global_batch % world or global_batch < world:
            raise ConfigError(
                f"data.batch_size={global_batch} (the global batch) must be a multiple of the {world} processes "
                "(trainer.devices x trainer.num_nodes)"
            )
        return global_batch // world

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        batch_size = self.per_rank_batch_size()
        self._sampler = ShardedResumableSampler(len(self.corpus.train), self.seed, rank, world)
        if self._resume is not None:
            self._sampler.resume(self._resume["epoch"], self._resume["batches_done"], batch_size)
            self._resume = None
        return DataLoader(
            self.corpus.train,
            batch_size=batch_size,
            sampler=self._sampler,
            drop_last=True,
            collate_fn=collate_windows,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds; never the global generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.corpus.val, batch_size=self.batch_size, shuffle=False, collate_fn=collate_windows,
            num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed),
        )

    def state_dict(self) -> dict:
        """Where training is in the epoch: batches of this epoch whose training step has run."""
        trainer = self.trainer
        if trainer is None:
            return {}
        return {
            "epoch": trainer.current_epoch,
            "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = dict(state_dict) if state_dict else None
