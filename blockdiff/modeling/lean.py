"""Lean CPU inference: linear layers run on weights packed once for oneDNN (docs/design.md §8).

On CPU, ``F.linear`` goes to MKL, whose sgemm for a handful of rows costs several times the arithmetic; the same
weight reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the call
Inductor's CPU freezing emits) and multiplied with ``_linear_pointwise`` does not. Every path that feeds a few
rows at a time (speculative verification, block steps, drafters) gains; one-row decode is no faster, so one-row
inputs keep the plain kernel.

```
pack_linears(module)             # every fp32 nn.Linear (GPT-2's Conv1D too) becomes its packed twin, in place
  PackedLinear.forward(x):
      rows(x) >= min_rows, fp32, CPU, no autograd  ->  oneDNN on the packed copy
      otherwise                                   ->  nn.Linear.forward (training is untouched)
unpack_linears(module)           # back to plain nn.Linear; the packed copies are freed
```

The module keeps its own ``weight`` parameter (state dicts, tied embeddings, adapters' hooks and saving are
unchanged); the packed copy is a derived cache, rebuilt when the weight is written in place (its version
counter moves: an optimiser step, ``load_state_dict``). Packing changes the summation order, so outputs equal
the plain kernel's within fp32 rounding, not bit for bit.

oneDNN builds a primitive the first time it sees a row count; ``pack_linears`` runs each packed shape once for
``warm_rows`` so that no timed call pays for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from blockdiff.errors import UsageError

__all__ = [
    "PackedConv1D", "PackedLinear", "PackReport", "WARM_ROWS", "is_packed", "lean_available", "pack_linears",
    "unpack_linears", "use_lean",
]

WARM_ROWS = tuple(range(1, 18))  # the row counts a verify/block step of up to 17 query tokens uses


def lean_available() -> bool:
    """Whether this torch build has the oneDNN linear ops (CPU builds with mkldnn do)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class _Packed:
    """The packed forward shared by ``PackedLinear`` and ``PackedConv1D``: ``_dense_weight()`` is the weight as
    ``(out, in)``; any input the packed kernel does not serve goes to the plain class's own ``forward``."""

    _packed: torch.Tensor
    _packed_version: int
    min_rows: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        if not self._takes_packed(x):
            return super().forward(x)
        if self.weight._version != self._packed_version:  # written in place since packing: repack
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def _takes_packed(self, x: torch.Tensor) -> bool:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return False
        return x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() >= self.min_rows * x.shape[-1] > 0

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed copy behind (oneDNN tensors have no storage to copy); it is rebuilt on
        first use."""
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        state["_packed_version"] = -1
        return state

    def _pack(self) -> None:
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self._dense_weight().detach().contiguous(), None)
        self._packed_version = self.weight._version


class PackedLinear(_Packed, nn.Linear):
    """An ``nn.Linear`` whose inference forward uses a oneDNN-packed copy of its weight (the module docstring).
    Made only by ``pack_linears``, which swaps the class of an existing layer."""

    def _dense_weight(self) -> torch.Tensor:
        return self.weight  # (out, in)


class PackedConv1D(_Packed, Conv1D):
    """GPT-2's ``Conv1D`` (a linear layer with its weight stored ``(in, out)``) on a packed weight."""

    def _dense_weight(self) -> torch.Tensor:
        return self.weight.t()  # (in, out) -> (out, in)

    @property
    def in_features(self) -> int:
        return self.nx


_PACKED = {nn.Linear: PackedLinear, Conv1D: PackedConv1D}


@dataclass(frozen=True)
class PackReport:
    """What ``pack_linears`` did: how many linear layers were packed and how many parameters they hold."""

    layers: int
    parameters: int

    def __str__(self) -> str:
        return f"{self.layers} linear layers ({self.parameters / 1e6:.1f}M parameters) packed for oneDNN"


def use_lean(module: nn.Module, lean: bool | None) -> bool:
    """Whether inference on ``module`` should run packed: ``lean=None`` (the default everywhere) means yes exactly
    when it can pay (fp32 weights on CPU, a torch with oneDNN); ``True`` insists (``pack_linears`` then refuses
    what it cannot pack); ``False`` never."""
    if lean is not None:
        return lean
    weight = next((p for p in module.parameters() if p.dim() >= 2), None)
    return lean_available() and weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32


def pack_linears(module: nn.Module, min_rows: int = 2, warm_rows: tuple[int, ...] = WARM_ROWS) -> PackReport:
    """Pack every fp32 CPU ``nn.Linear`` under ``module`` for oneDNN, in place (idempotent); returns what was packed.

    ``min_rows``: inputs with fewer rows keep MKL's kernel (one-row decode is no faster packed).
    Raises ``UsageError`` if this torch build lacks the oneDNN ops; a module on another device or dtype is
    refused rather than silently left slow."""
    if not lean_available():
        raise UsageError(
            "the lean CPU path needs a torch build with oneDNN (torch.backends.mkldnn); this one has none: "
            "pass --no-lean (or lean=False)"
        )
    if min_rows < 1:
        raise UsageError(f"min_rows={min_rows}: must be at least 1")
    linears = [m for m in module.modules() if type(m) in _PACKED or isinstance(m, _Packed)]
    wrong = {(str(m.weight.device), str(m.weight.dtype)) for m in linears} - {("cpu", str(torch.float32))}
    if wrong:
        device, dtype = sorted(wrong)[0]
        raise UsageError(
            f"the lean path packs fp32 weights on CPU; this model has {dtype} weights on {device}: "
            "load it in fp32 on CPU, or pass --no-lean (lean=False)"
        )
    shapes: dict[tuple[int, int], _Packed] = {}
    for linear in linears:
        if not isinstance(linear, _Packed):
            linear.__class__ = _PACKED[type(linear)]
            linear._pack()
        linear.min_rows = min_rows
        shapes.setdefault(tuple(linear.weight.shape), linear)
    with torch.no_grad():
        for linear in shapes.values():
            for rows in warm_rows:
                linear(torch.zeros(1, rows, linear.in_features))
    return PackReport(len(linears), sum(m.weight.numel() for m in linears))


def unpack_linears(module: nn.Module) -> int:
    """Turn every packed layer under ``module`` back into its plain class (freeing the packed copies); returns how
    many were unpacked."""
    plain = {packed: original for original, packed in _PACKED.items()}
    count = 0
    for linear in module.modules():
        if isinstance(linear, _Packed):
            del linear._packed, linear._packed_version, linear.min_rows
            linear.__class__ = plain[type(linear)]
            count += 1
    return count


def is_packed(module: nn.Module) -> bool:
    """Whether any linear layer under ``module`` runs on packed weights."""
    return any(isinstance(m, _Packed) for m in module.modules())
