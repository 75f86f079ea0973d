"""The DFlash drafter network: a few decoder layers that denoise one block ``[last committed token, m, ..., m]`` in
one forward, attending to a fusion of the frozen target's hidden states of the committed tokens (DFlash, arXiv
2602.06036, code ``z-lab/dflash``; docs/design.md §14). It shares the target's input embedding (the block is embedded
with it) and output head (the drafts are scored with its rows), so it stores neither.

```
features  = cat(target hidden_states[i + 1] for i in target_layer_ids)     (c, F)  the committed tokens but the last
context   = hidden_norm(fc(features))                                       (c, d)  once per token, cached as K/V
block     = embed([c_{n-1}, m, ..., m])                                     (q, d)  q = block_length
per layer: queries from the block; keys / values from [context ; block]; no mask (the block sees all of both)
drafts    = head(norm(out))[1:]                                             token i of the block predicts c_{n-1+i}
```

The checkpoint *is* DFlash's layout (``save`` / ``load``): a Qwen3-style ``config.json`` with ``dflash_config``
(``target_layer_ids``, ``block_size``, ``mask_token_id``) and ``model.safetensors`` with DFlash's parameter names,
so the ``dflash`` package's ``DFlashDraftModel.from_pretrained`` loads it as it is, and vLLM / SGLang read the same
layout. What blockdiff adds lives in documented extra keys the other readers ignore: ``dflash_config.draft_vocab``
(the drafts use only these rows of the head, EAGLE-3 / FR-Spec; absent: the whole head) stored as the tensor
``draft_ids``, and ``dflash_config.target`` (what the drafter was trained for: ``check_target``).

Feature scale. SmolLM2's residual stream grows ~8x from layer 3 to layer 27 and its first token carries values near
25,000 (an attention sink), so raw features would let the late layers swamp the fusion. Training feeds each target
layer's features divided by a per-layer constant (its median per-token RMS, ``feature_scales``) and ``fold_scales``
moves those constants into ``fc`` before saving: a linear map, so the saved drafter reads the raw features exactly as
DFlash's code feeds them.

Shape legend: ``b`` batch, ``c`` context tokens, ``q`` block tokens, ``s`` keys, ``F`` fused feature width
(``len(target_layer_ids) * d``), ``d`` hidden, ``h`` heads, ``g`` key/value heads, ``e`` head dim, ``v`` vocab.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from blockdiff.errors import MissingFileError, UsageError

__all__ = [
    "DFlashDrafter", "ContextCache", "drafter_config", "default_layer_ids", "target_features", "target_fingerprint",
    "check_target", "WEIGHTS", "CONFIG", "load_drafter", "shipped_drafter", "SHIPPED",
]

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def default_layer_ids(num_target_layers: int, count: int) -> list[int]:
    """DFlash's rule for which target layers feed the drafter: ``count`` layers spread over ``[1, layers - 3]``
    (over every layer for a target too shallow for that), without repeats."""
    if count == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    if end - start < count - 1:
        start, end = 0, num_target_layers - 1
    return sorted({round(start + i * (end - start) / (count - 1)) for i in range(count)})


def target_features(hidden_states: tuple[torch.Tensor, ...], layer_ids: list[int]) -> torch.Tensor:
    """The drafter's input from a target forward's ``output_hidden_states``: ``(b, n, F)`` (layer ``i``'s output is
    ``hidden_states[i + 1]``, as in DFlash)."""
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


def target_fingerprint(target) -> dict:
    """What a drafter records about its target and ``check_target`` compares: shapes, and the norms of 16 embedding
    rows (stable across fp32 / bf16 / quantised copies of the same weights; unrelated models differ by far more)."""
    cfg = target.config
    emb = target.get_input_embeddings().weight.detach().float()
    rows = torch.linspace(0, emb.shape[0] - 1, 16).long()
    return {
        "model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "vocab_size": int(emb.shape[0]), "embedding_norms": [round(float(x), 4) for x in emb[rows].norm(dim=-1)],
    }


def check_target(want: dict, target, where: str = "the drafter") -> None:
    """Refuse a target other than the one ``want`` (a drafter's recorded ``target``) describes, naming what differs
    (one line)."""
    have = target_fingerprint(target)
    if not want:
        return
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if key in want and want[key] != have[key]:
            raise UsageError(
                f"{where} was trained for a {key}={want[key]} target but this one has {key}={have[key]}: pass the "
                "model it was trained for (its model card names it), or train a drafter for this one "
                "(blockdiff train-drafter --target NAME)"
            )
    norms = torch.tensor(want.get("embedding_norms", []))
    if len(norms):
        diff = float(((torch.tensor(have["embedding_norms"]) - norms).abs() / norms.clamp(min=1e-6)).max())
        if diff > 0.1:
            raise UsageError(
                f"{where} was trained for another model of the same shape (its embedding rows differ by {diff:.0%}): "
                "pass the model it was trained for (its model card names it), or train a drafter for this one"
            )


def drafter_config(target_config, *, num_layers: int, layer_ids: list[int], block_length: int, mask_token_id: int,
                   draft_vocab: int = 0, target: dict | None = None) -> Qwen3Config:
    """A drafter's config for ``target_config``: the target's width, heads and rotary settings, ``num_layers``
    layers, DFlash's ``dflash_config`` (``block_size`` is blockdiff's ``block_length``) plus blockdiff's extra keys."""
    t = target_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    rope = getattr(t, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(t, "rope_theta", 1e4)}
    bad = [i for i in layer_ids if not 0 <= i < t.num_hidden_layers]
    if bad or not layer_ids:
        raise UsageError(f"drafter.target_layer_ids {layer_ids} must be layers of the target (0 .. "
                         f"{t.num_hidden_layers - 1})")
    extra = {"draft_vocab": draft_vocab} if draft_vocab else {}
    width = getattr(t, "intermediate_size", None) or getattr(t, "n_inner", None) or 4 * t.hidden_size  # GPT-2: n_inner
    eps = getattr(t, "rms_norm_eps", None) or getattr(t, "layer_norm_epsilon", None) or 1e-6
    return Qwen3Config(
        hidden_size=t.hidden_size, intermediate_size=width, num_hidden_layers=num_layers,
        num_attention_heads=t.num_attention_heads, head_dim=head_dim,
        num_key_value_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
        rms_norm_eps=eps, rope_parameters=dict(rope), max_position_embeddings=t.max_position_embeddings,
        vocab_size=t.vocab_size, hidden_act=getattr(t, "hidden_act", "silu"), tie_word_embeddings=False,
        architectures=["DFlashDraftModel"], num_target_layers=t.num_hidden_layers,
        dflash_config={"target_layer_ids": list(layer_ids), "block_size": block_length,
                       "mask_token_id": mask_token_id, **extra, "target": target or {}},
    )


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (b, h, n, e) at the positions ``cos`` / ``sin`` (b, n, e) were made for."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class DraftAttention(nn.Module):
    """DFlash's attention: queries from the block; keys and values from the context and the block, both through the
    same projections and ``k_norm`` (Qwen3's per-head RMS norms)."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        d, e = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, e
        self.q_proj = nn.Linear(d, self.heads * e, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * e, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * e, bias=False)
        self.o_proj = nn.Linear(self.heads * e, d, bias=False)
        self.q_norm = Qwen3RMSNorm(e, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(e, eps=config.rms_norm_eps)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` (b, g, n, e) of ``x`` (b, n, d): what a token contributes as a key, rotated to its position."""
        b, n, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, n, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return _rope(k, cos, sin), v

    def forward(self, x, context: tuple[torch.Tensor, torch.Tensor], cos, sin, mask=None) -> torch.Tensor:
        b, q, _ = x.shape
        queries = self.q_norm(self.q_proj(x).view(b, q, self.heads, self.head_dim)).transpose(1, 2)  # (b, h, q, e)
        k, v = self.keys_values(x, cos, sin)  # (b, g, q, e)
        k, v = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)  # (b, g, s, e)
        out = F.scaled_dot_product_attention(_rope(queries, cos, sin), k, v, attn_mask=mask,
                                             enable_gqa=self.heads != self.kv_heads)  # (b, h, q, e)
        return self.o_proj(out.transpose(1, 2).reshape(b, q, -1))


class DraftLayer(nn.Module):
    """One pre-norm decoder layer (Qwen3's, with DFlash's attention); the context arrives as keys and values."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.self_attn = DraftAttention(config)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, context, cos, sin, mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), context, cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class ContextCache:
    """The keys and values of the committed tokens the drafter has read, per layer ``(b, g, c, e)``: written once per
    token, never holding a draft (the block's own keys are recomputed each forward)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]


class DFlashDrafter(nn.Module):
    """The drafter network (module docstring). ``context_cache`` turns target features into keys and values;
    ``forward`` denoises blocks against them; ``logits`` scores hidden states on the draft vocabulary."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DraftLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)
        self.fc = nn.Linear(len(self.target_layer_ids) * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        vocab = int(self.dflash.get("draft_vocab") or 0)
        self.register_buffer("draft_ids", torch.arange(vocab or config.vocab_size), persistent=bool(vocab))

    @property
    def dflash(self) -> dict:
        return dict(self.config.dflash_config)

    target_layer_ids = property(lambda self: list(self.dflash["target_layer_ids"]))
    block_length = property(lambda self: int(self.dflash["block_size"]))
    mask_token_id = property(lambda self: int(self.dflash["mask_token_id"]))
    target = property(lambda self: dict(self.dflash.get("target") or {}))

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(x, positions)  # (b, n, e) each

    def context_cache(self, features: torch.Tensor, positions: torch.Tensor,
                      cache: ContextCache | None = None) -> ContextCache:
        """``cache`` extended by the committed tokens whose target ``features`` (b, c, F) sit at ``positions`` (b, c)
        (a new cache when ``None``)."""
        fused = self.hidden_norm(self.fc(features))  # (b, c, d)
        cos, sin = self._rotary(fused, positions)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.keys_values(fused, cos, sin)  # (b, g, c, e)
            if cache is not None:
                k, v = torch.cat([cache.keys[i], k], dim=2), torch.cat([cache.values[i], v], dim=2)
            keys.append(k)
            values.append(v)
        return ContextCache(keys, values)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: ContextCache,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``(b, q, d)`` (final norm applied) of the block tokens ``embeds`` (b, q, d) at ``positions``
        (b, q), against ``cache``; ``mask`` (b | 1, 1, q, c + q) boolean, ``None``: every key visible."""
        cos, sin = self._rotary(embeds, positions)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cache.layer(i), cos, sin, mask)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        """``(..., v_draft)`` logits over the draft vocabulary (``draft_ids``) from the target's head rows."""
        return F.linear(hidden, head_weight[self.draft_ids] if len(self.draft_ids) < len(head_weight) else head_weight)

    def fold_scales(self, scales: torch.Tensor) -> None:
        """Fold per-layer feature divisors ``scales`` (len(target_layer_ids),) into ``fc``: afterwards ``fc`` reads raw
        features exactly as it read ``features / scale`` before (module docstring)."""
        width = self.config.hidden_size
        with torch.no_grad():
            self.fc.weight.div_(scales.to(self.fc.weight).repeat_interleave(width)[None, :])

    # -- the checkpoint: DFlash's layout -------------------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
        """Write ``config.json`` and ``model.safetensors`` (``dtype``) into ``directory`` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(directory / WEIGHTS, 0o666 & ~umask)  # safetensors writes 0600; every output follows the umask
        self.config.save_pretrained(directory)

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> "DFlashDrafter":
        """The drafter saved in ``directory`` (``save``, or a DFlash checkpoint), in ``dtype``."""
        directory = Path(directory)
        for name in (CONFIG, WEIGHTS):
            if not (directory / name).is_file():
                raise MissingFileError(f"{directory} holds no DFlash drafter ({name} missing): pass the directory "
                                       "blockdiff train-drafter or blockdiff export wrote")
        raw = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
        if "dflash_config" not in raw:
            raise UsageError(f"{directory / CONFIG} has no dflash_config: not a DFlash drafter")
        model = cls(Qwen3Config.from_pretrained(directory))
        state = load_file(str(directory / WEIGHTS))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "draft_ids"]
        if missing or unexpected:
            raise UsageError(f"{directory / WEIGHTS} does not match its config (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}): re-export the drafter")
        return model.to(dtype).eval()


# -- loading a drafter for a verifier ----------------------------------------------------------------------------------
SHIPPED = Path(__file__).resolve().parents[1] / "drafters"  # drafters that ship with the package, one folder each


def shipped_drafter(verifier) -> Path | None:
    """The folder of the shipped drafter trained for ``verifier`` (``blockdiff/drafters/*``, matched by its recorded
    target), or ``None``."""
    for directory in sorted(SHIPPED.glob("*/")) if SHIPPED.is_dir() else ():
        try:
            target = json.loads((directory / CONFIG).read_text(encoding="utf-8"))["dflash_config"].get("target")
            check_target(target or {}, verifier)
        except (OSError, KeyError, ValueError, UsageError):
            continue
        return directory
    return None


def load_drafter(path: str | Path | None, verifier, lean: bool | None = None) -> DFlashDrafter:
    """The DFlash drafter network in ``path`` (``None``: the one shipped for ``verifier``), checked against
    ``verifier``, on its device, with its draft head (the verifier's head rows of ``draft_ids``) attached as
    ``draft_head``; fp32 linear layers packed for oneDNN on CPU unless ``lean=False`` (``lean.py``)."""
    from blockdiff.modeling.lean import pack_linears, use_lean

    if path is None:
        path = shipped_drafter(verifier)
        if path is None:
            raise UsageError("no shipped DFlash drafter fits this model: train one (blockdiff train-drafter) and pass "
                             "its folder (--dflash-path DIR), or use --drafter lookup")
    drafter = DFlashDrafter.load(path)
    check_target(drafter.target, verifier, where=f"the drafter in {path}")
    head = verifier.get_output_embeddings().weight.detach()
    drafter.draft_head = nn.Linear(head.shape[1], len(drafter.draft_ids), bias=False)
    drafter.draft_head.weight = nn.Parameter(head[drafter.draft_ids].float().clone(), requires_grad=False)
    drafter = drafter.to(head.device)
    if use_lean(verifier, lean):
        pack_linears(drafter)
    return drafter.eval()
