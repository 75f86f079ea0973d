"""``trainer.strategy=fsdp``: weights, gradients and optimiser state sharded over the processes with FSDP2
(``torch.distributed.fsdp.fully_shard``), run by Lightning's ``ModelParallelStrategy`` (docs/distributed.md).

Why this strategy and not Lightning's ``FSDPStrategy``: that one wraps the model in FSDP1 and refuses CPU ("requires a
GPU accelerator"), so it could never be run here; ``ModelParallelStrategy`` leaves the wrapping to the module's
``configure_model()`` (``shard_model`` below: one FSDP2 unit per decoder layer, then the root over the rest) and runs
on CPU/gloo and on GPUs/NCCL alike. Here it is pure data parallelism: a 1-D ``data_parallel`` mesh over every
process (``tensor_parallel`` of size 1).

Checkpoints are *consolidated* (``save_distributed_checkpoint=False``): the full weights and optimiser state are
gathered onto rank 0 and written through the same atomic writer as every other run (``checkpoint.py``:
``last.ckpt`` + ``prev.ckpt``, NaN refused, ``weights_only`` loading), so ``--resume`` (which re-shards the file on
load), ``blockdiff export`` and ``view`` read them unchanged, and a run can be resumed on another number of
processes. Lightning's sharded format (one directory of shards, written in place) would have no atomic replace and
no kept previous checkpoint.

Shape legend: none (no tensors are shaped here).
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

__all__ = ["FSDP", "DataParallelFSDP", "full_state_dict", "is_sharded", "shard_model"]

FSDP = "fsdp"  # the trainer.strategy value mapped to ``DataParallelFSDP``


class DataParallelFSDP(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 data parallelism: the ``data_parallel`` mesh spans every
    process of every node (Lightning's ``auto`` would put the processes of a node on a tensor-parallel axis), and
    checkpoints are consolidated on rank 0 (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def _decoder_layers(backbone: nn.Module) -> list[nn.Module]:
    """The decoder's repeated layers: modules of the classes transformers names as not to be split
    (``_no_split_modules``: ``LlamaDecoderLayer``, ``GPT2Block``, ...)."""
    names = set(getattr(backbone, "_no_split_modules", None) or ())
    return [m for m in backbone.modules() if type(m).__name__ in names]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``shard_model`` has been applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh) -> None:
    """FSDP2 over ``mesh`` (the ``data_parallel`` mesh): one unit per decoder layer, then the root (embeddings, final
    norm, output head, a gated adapter's tensors). ``training_hidden`` and ``logits`` (the loss's entry points, which
    do not go through ``forward``) gather the root's weights like a ``forward`` does. Idempotent: Lightning calls
    ``configure_model`` again for the validation after ``fit``."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if is_sharded(model):
        return
    layers = _decoder_layers(model.backbone)
    if not layers:
        raise RuntimeError(f"trainer.strategy=fsdp found no decoder layers in {type(model.backbone).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in ("training_hidden", "logits"):
        register_fsdp_forward_method(model, method)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a sharded ``model`` on CPU; a collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
