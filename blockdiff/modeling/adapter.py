"""``GatedLoRA``: a drafting adapter that only noisy rows use (docs/design.md §14).

A LoRA update on the decoder's linear layers (attention q/k/v/o and the MLP) whose delta is multiplied by a
per-token gate::

    y = W x + gate * (alpha / r) * B A x        gate (b, q): 1 on noisy (x_t) rows, 0 on clean rows

With the base frozen, every clean row is computed by the unmodified decoder — bit for bit, since ``W x + 0`` is
``W x`` — and so are its keys and values: the clean stream *is* the base model and its KV cache *is* the base
model's cache, while the noisy rows draft with the adapter. ``B`` starts at zero, so a fresh adapter is the base.

The gate is passed per forward, never kept: ``with adapter.gated(gate): decoder(...)`` sets it for that call and
restores the previous value on exit (``BlockDiffusionLM.hidden_states(..., gate=...)`` does this). Outside a
``gated`` block the gate is off everywhere, so the decoder alone is always the base model. The delta is added by
forward hooks on the wrapped layers, so the decoder's own parameters, names and ``save_pretrained`` files are
untouched; the adapter's tensors live here and are saved apart (``adapter.safetensors``). It is not mergeable:
a merged update would reach the clean rows too.

Which layers: chosen by module name inside the decoder body (``TARGET_NAMES``): Llama / Qwen2 / Qwen3 / Mistral
(``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``), GPT-2 (``c_attn c_proj c_fc``, its fused ``Conv1D``
layers), Phi-3 (``qkv_proj gate_up_proj``), Phi (``dense fc1 fc2``). The output head and embeddings are never wrapped.

Gradient checkpointing cannot be combined with it (the recomputation in the backward pass runs outside the
``gated`` block); ``model.adapter=gated_lora`` refuses ``model.gradient_checkpointing``.

Shape legend: ``b`` batch, ``q`` query tokens, ``i``/``o`` a layer's input/output width, ``r`` the rank.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from blockdiff.errors import MissingFileError, UsageError

__all__ = ["ADAPTER_FILE", "TARGET_NAMES", "GatedLoRA", "target_modules"]

ADAPTER_FILE = "adapter.safetensors"  # the adapter's tensors in a model directory, next to model.safetensors

TARGET_NAMES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Llama, Qwen2/3, Mistral
    "c_attn", "c_proj", "c_fc",  # GPT-2 (Conv1D)
    "qkv_proj", "gate_up_proj",  # Phi-3
    "dense", "fc1", "fc2",  # Phi
)


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear layer: ``nn.Linear`` (weight ``(o, i)``) or transformers' ``Conv1D`` (``(i, o)``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def target_modules(backbone: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of the decoder body the adapter wraps, by name relative to the body (``layers.0.self_attn.
    q_proj``; ``h.0.attn.c_attn`` for GPT-2). An architecture with none of ``TARGET_NAMES`` is refused."""
    body = backbone.base_model
    found = {
        name: module
        for name, module in body.named_modules()
        if name.rsplit(".", 1)[-1] in TARGET_NAMES and _widths(module) is not None
    }
    if not found:
        raise UsageError(
            f"model.adapter=gated_lora found no linear layer to adapt in the {backbone.config.model_type} decoder "
            f"(it looks for {', '.join(TARGET_NAMES)}); use a Llama, Qwen2 or GPT-2 family model"
        )
    return found


class _LowRank(nn.Module):
    """``(alpha / r) * B A`` for one layer: ``A (r, i)`` Kaiming-uniform as in LoRA, ``B (o, r)`` zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, like: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=like.dtype, device=like.device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=like.dtype, device=like.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.T) @ self.B.T * self.scale  # (b, q, i) -> (b, q, o)


class _GatedDelta:
    """Forward hook adding the gated delta to one layer's output. A plain object (not a closure), so a deep copy of
    the model (EMA) gets hooks that point at the copied adapter."""

    def __init__(self, adapter: "GatedLoRA", key: str):
        self.adapter, self.key = adapter, key

    def __call__(self, module, args, output):
        gate = self.adapter._gate
        if gate is None:  # off everywhere: the base layer, untouched
            return output
        delta = self.adapter.layers[self.key](args[0])  # (b, q, o)
        if self.adapter._gate_all_on:
            return output + delta
        return output + gate * delta  # clean rows: output + 0, exactly the base


class GatedLoRA(nn.Module):
    """The adapter of one decoder: a ``_LowRank`` per wrapped layer, and hooks that add it where the gate is on.

    ``GatedLoRA.attach(backbone, rank, alpha)`` creates one and hooks it into ``backbone`` (once; ``GatedLoRA.of``
    finds it again, so two ``BlockDiffusionLM`` views of one decoder share it). ``BlockDiffusionLM`` registers it as
    its ``adapter`` submodule, so it trains, moves and checkpoints with the model."""

    def __init__(self, backbone: nn.Module, rank: int, alpha: float):
        super().__init__()
        if rank < 1 or not alpha > 0:
            raise UsageError(f"the gated adapter needs rank >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
        self.rank, self.alpha = int(rank), float(alpha)
        like = next(backbone.parameters())
        targets = target_modules(backbone)
        self.names = list(targets)  # layer names relative to the decoder body, in module order
        self.layers = nn.ModuleDict(
            {_key(name): _LowRank(*_widths(m), self.rank, self.alpha / self.rank, like) for name, m in targets.items()}
        )
        self._gate: torch.Tensor | None = None  # set only inside ``gated``
        self._gate_all_on = False
        self._handles = [m.register_forward_hook(_GatedDelta(self, _key(name))) for name, m in targets.items()]

    @classmethod
    def attach(cls, backbone: nn.Module, rank: int, alpha: float) -> "GatedLoRA":
        if cls.of(backbone) is not None:
            raise UsageError("this decoder already has a gated adapter attached")
        adapter = cls(backbone, rank, alpha)
        object.__setattr__(backbone, "_blockdiff_gated_lora", adapter)  # found again by ``of``; not a submodule
        return adapter

    @staticmethod
    def of(backbone: nn.Module) -> "GatedLoRA | None":
        """The adapter attached to ``backbone``, or ``None``."""
        return backbone.__dict__.get("_blockdiff_gated_lora")

    # -- the gate ------------------------------------------------------------------------------------
    @contextmanager
    def gated(self, gate: torch.Tensor | None):
        """Run the decoder with ``gate`` for the duration of the block: ``(b, q)`` (or ``(q,)``, or anything that
        broadcasts to the rows of the call), 1 = noisy row (adapter on), 0 = clean row (base only); fractional
        values scale the delta. ``None`` = off everywhere. The previous gate is restored on exit."""
        previous = self._gate, self._gate_all_on
        if gate is None or not bool(gate.any()):
            self._gate, self._gate_all_on = None, False
        else:
            self._gate = gate[..., None].to(self.layers[_key(self.names[0])].A.dtype)  # (b, q, 1)
            self._gate_all_on = bool((gate == 1).all())
        try:
            yield self
        finally:
            self._gate, self._gate_all_on = previous

    # -- persistence ---------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of ``adapter.safetensors``: ``{layer name}.lora_A`` / ``.lora_B`` (contiguous copies)."""
        out = {}
        for name in self.names:
            low = self.layers[_key(name)]
            out[f"{name}.lora_A"] = low.A.detach().contiguous().cpu()
            out[f"{name}.lora_B"] = low.B.detach().contiguous().cpu()
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file(self.file_tensors(), str(path), metadata={"rank": str(self.rank), "alpha": repr(self.alpha)})

    def load(self, path: str | Path) -> None:
        """Read ``adapter.safetensors``: every tensor there, with this adapter's shapes (errors name the file)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(
                f"{path} does not exist, but blockdiff.json says the model has a gated adapter; copy the whole model "
                "directory again (or re-export the run: blockdiff export RUN_DIR OUT_DIR)"
            )
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise UsageError(f"{path} is not a readable safetensors file ({err}); copy it again") from None
        want = self.file_tensors()
        missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        wrong = sorted(k for k in set(want) & set(tensors) if tensors[k].shape != want[k].shape)
        if missing or unexpected or wrong:
            detail = "; ".join(
                f"{label}: {keys[:2]}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("other shape", wrong)) if keys
            )
            raise UsageError(
                f"{path} does not fit this decoder's gated adapter (rank {self.rank}): {detail}. The file comes from "
                "another model or blockdiff.json was edited; restore the files written together"
            )
        with torch.no_grad():
            for name in self.names:
                low = self.layers[_key(name)]
                low.A.copy_(tensors[f"{name}.lora_A"])
                low.B.copy_(tensors[f"{name}.lora_B"])


def _key(name: str) -> str:
    """``nn.ModuleDict`` keys cannot hold dots."""
    return name.replace(".", "__")
