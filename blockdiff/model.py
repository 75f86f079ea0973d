"""``BlockDiffusionLM``: an ordinary Hugging Face causal decoder driven with block-diffusion masks.

One network path for both uses (DESIGN.md §4): a from-scratch network built from a small config, or a
pretrained decoder. The wrapper adds only what block diffusion needs on top of the decoder:

* the vectorised training forward over ``x_t ⊕ x_0`` with the three-part mask (``masks.py``);
* the SUBS output: the mask token is never predicted (its logit is ``-inf``);
* the optional logit shift for AR-initialised backbones (predict token ``i`` from the output at
  ``i-1``; the first token of block ``k`` reads the clean stream at the last position of block ``k-1``);
* save/load as a plain ``save_pretrained`` directory (safetensors) plus ``blockdiff.json``.

It knows nothing about time, noise schedules or samplers.

Shape legend: ``b`` batch, ``n`` tokens per half, ``q``/``s`` query/key lengths, ``v`` vocab, ``d`` hidden.
"""

from __future__ import annotations

import copy
import json
import numbers
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from blockdiff.config import Family, ModelConfig
from blockdiff.errors import MissingFileError, UsageError
from blockdiff.masks import training_block_mask, training_mask
from blockdiff.sampling.config import GENERATION_CONFIG_FILE, BlockDiffusionGenerationConfig

__all__ = ["BlockDiffusionLM", "BlockDiffusionSpec", "build_backbone"]

SPEC_FILE = "blockdiff.json"


@dataclass
class BlockDiffusionSpec:
    """What turns a decoder into a block diffuser; stored next to the weights as ``blockdiff.json``."""

    mask_token_id: int
    block_length: int
    logit_shift: bool = False
    max_seq_len: int | None = None  # training context length, for reference
    schedule: str = "loglinear"  # noise schedule it was trained with (evaluation uses the same)


def build_backbone(cfg: ModelConfig, vocab_size: int, max_seq_len: int, **special_ids) -> PreTrainedModel:
    """A randomly initialised Hugging Face decoder of the configured family and size."""
    family = Family(cfg.family)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=max_seq_len,
        **{k: v for k, v in special_ids.items() if v is not None},
    )
    if family is Family.gpt2:
        kwargs["n_inner"] = cfg.intermediate_size or 4 * cfg.hidden_size
    else:  # gated-MLP families (llama, qwen2)
        kwargs["intermediate_size"] = cfg.intermediate_size or 64 * round(8 * cfg.hidden_size / 3 / 64)
        kwargs["num_key_value_heads"] = cfg.num_heads
        kwargs["tie_word_embeddings"] = True
    hf_config = AutoConfig.for_model(family.value, **kwargs)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=cfg.attn_implementation)


@lru_cache(maxsize=16)
def _cached_training_mask(n: int, block_length: int, device: str, kind: str):
    """The training mask without the last clean block (no query ever needs it): ``2n - l`` square."""
    length = 2 * n - block_length
    if kind == "flex_attention":
        return training_block_mask(n, block_length, None, device=device, length=length)
    return training_mask(n, block_length, device=device)[None, None, :length, :length]  # (1, 1, 2n-l, 2n-l)


def _annealing_keep(n: int, block_length: int, p: float, generator, device) -> torch.Tensor:
    """Cells kept open while annealing: everything except anti-causal x_t cells, which stay with probability ``p``."""
    length = 2 * n - block_length
    idx = torch.arange(length, device=device)
    anticausal = (idx[None, :] > idx[:, None]) & (idx[:, None] < n) & (idx[None, :] < n)  # (q, s), inside x_t
    drawn = torch.rand((length, length), generator=generator, device=device) < p
    return (~anticausal | drawn)[None, None]  # (1, 1, q, s)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" mask -> additive float mask (eager attention adds it to the scores)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class BlockDiffusionLM(nn.Module):
    """A Hugging Face decoder plus the block-diffusion contract (mask token, block length, logit shift)."""

    def __init__(self, backbone: PreTrainedModel, spec: BlockDiffusionSpec):
        super().__init__()
        vocab = backbone.get_input_embeddings().num_embeddings
        if not 0 <= spec.mask_token_id < vocab:
            raise UsageError(f"mask_token_id={spec.mask_token_id} is outside the backbone's vocabulary of {vocab}")
        if spec.block_length < 1:
            raise UsageError(f"block_length must be >= 1, got {spec.block_length}")
        self.backbone = backbone
        self.spec = spec
        self.generation_config = BlockDiffusionGenerationConfig(
            eos_token_id=backbone.config.eos_token_id, pad_token_id=backbone.config.pad_token_id
        )

    # -- properties -------------------------------------------------------------------------------
    @property
    def mask_token_id(self) -> int:
        return self.spec.mask_token_id

    @property
    def block_length(self) -> int:
        return self.spec.block_length

    @property
    def vocab_size(self) -> int:
        return self.backbone.get_input_embeddings().num_embeddings

    @property
    def num_unpredictable(self) -> int:
        """Leading positions with no prediction (position 0 under the logit shift has no predecessor)."""
        return 1 if self.spec.logit_shift else 0

    @property
    def attn_implementation(self) -> str:
        return self.backbone.config._attn_implementation

    def with_block_length(self, block_length: int) -> "BlockDiffusionLM":
        """The same network (shared weights) generating and evaluating with another block length, e.g. a
        model trained on a block-length mixture sampled at each length it saw."""
        if block_length == self.block_length:
            return self
        if block_length < 1 or (self.spec.max_seq_len and self.spec.max_seq_len % block_length):
            raise UsageError(f"block_length={block_length} must be >= 1 and divide the training context {self.spec.max_seq_len}")
        other = BlockDiffusionLM(self.backbone, replace(self.spec, block_length=block_length))
        other.generation_config = self.generation_config
        return other.train(self.training)

    # -- the network call -------------------------------------------------------------------------
    def hidden_states(self, input_ids, position_ids, attention_mask, past_key_values=None, use_cache=False):
        """Run the decoder body with an explicit 4-D mask and positions; returns ``(hidden (b,q,d), cache)``."""
        out = self.backbone.base_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output head + SUBS: the mask token gets ``-inf`` (never predicted). ``(b, q, d) -> (b, q, v)``."""
        logits = self.backbone.get_output_embeddings()(hidden).float()  # (b, q, v)
        logits[..., self.mask_token_id] = float("-inf")
        return logits

    def format_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean (b|1, 1, q, s) "may attend" mask in the form the attention implementation expects."""
        if self.attn_implementation == "eager":
            return _additive(allowed, self.backbone.dtype)
        return allowed

    # -- training forward -------------------------------------------------------------------------
    def forward(self, xt: torch.Tensor, x0: torch.Tensor, block_length: int | None = None) -> torch.Tensor:
        """Vectorised training forward: logits ``(b, n, v)`` predicting ``x0`` at every position of ``xt``.

        Runs the network once on ``x_t ⊕ x_0`` (positions ``0..n-1`` twice) under the three-part mask.
        The last clean block is left out of the input: no noisy block may see it and no clean block
        before it does, so dropping it is exact and the input is ``2n - l`` tokens (``n`` for MDLM).
        With the logit shift, row ``0`` has no predecessor and holds no prediction (``num_unpredictable``).
        """
        return self.logits(self.training_hidden(xt, x0, block_length))

    def training_hidden(
        self,
        xt: torch.Tensor,
        x0: torch.Tensor,
        block_length: int | None = None,
        bidirectional: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The hidden states behind ``forward``'s logits, ``(b, n, d)`` (lets the loss project only masked rows).

        ``block_length`` overrides the model's own for this call (block-length curricula and mixtures);
        the spec, and so generation, keeps the model's. ``bidirectional < 1`` anneals the mask: each
        anti-causal cell inside a noisy block stays open with that probability (``curriculum.py``).
        """
        b, n = xt.shape
        block_length = block_length or self.block_length
        if n % block_length:
            raise UsageError(f"block_length={block_length} must divide the sequence length {n}")
        kind = self.attn_implementation
        if kind == "flex_attention" and xt.device.type != "cuda":
            raise RuntimeError("model.attn_implementation=flex_attention needs CUDA; use sdpa on CPU")
        mask = _cached_training_mask(n, block_length, str(xt.device), kind)
        if bidirectional < 1.0:
            if kind == "flex_attention":
                raise UsageError("attention-mask annealing needs a dense mask; use attn_implementation=sdpa or eager")
            mask = mask & _annealing_keep(n, block_length, bidirectional, generator, xt.device)
        if kind != "flex_attention":
            mask = self.format_mask(mask)
        clean = n - block_length  # clean tokens fed: all blocks but the last
        positions = torch.cat([torch.arange(n), torch.arange(clean)]).to(xt.device)[None].expand(b, -1)  # (b, n+clean)
        hidden, _ = self.hidden_states(torch.cat([xt, x0[:, :clean]], dim=1), positions, mask)  # (b, n+clean, d)
        h_xt, h_x0 = hidden[:, :n], hidden[:, n:]  # (b, n, d), (b, clean, d)
        if self.spec.logit_shift:
            first_of_block = (torch.arange(1, n, device=xt.device) % block_length == 0)[None, :, None]
            h_x0 = torch.nn.functional.pad(h_x0, (0, 0, 0, n - 1 - clean))  # (b, n-1, d); pad rows never read
            shifted = torch.where(first_of_block, h_x0, h_xt[:, :-1])  # (b, n-1, d)
            h_xt = torch.cat([h_xt[:, :1], shifted], dim=1)  # (b, n, d); row 0 is a placeholder
        return h_xt

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor | list[list[int]],
        attention_mask: torch.Tensor | None = None,
        generation_config: BlockDiffusionGenerationConfig | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        streamer=None,
        observer=None,
        **overrides,
    ):
        """Write up to ``max_new_tokens`` after each prompt, block by block (``sampling/generation.py``).

        ``input_ids``: a ``(b, p)`` tensor (left padding marked by ``attention_mask``) or a list of token-id
        lists of any lengths. Settings come from ``generation_config`` (default: the model's own, saved
        with it) updated by keyword ``overrides`` such as ``max_new_tokens=256, sampler="first_hitting"``.
        ``generator``: one for the batch, or one per prompt so each sample is independent of its batch.
        Returns a ``GenerationOutput``.
        """
        from blockdiff.sampling.generation import generate

        config = copy.deepcopy(generation_config or self.generation_config)
        unknown = [k for k in overrides if not hasattr(config, k)]
        if unknown:
            raise UsageError(f"unknown generation setting(s) {unknown}; see BlockDiffusionGenerationConfig")
        for key, value in overrides.items():
            setattr(config, key, value)
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() != 2:
                raise UsageError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise UsageError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
            if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise UsageError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
                )
            keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            input_ids = [row[m].tolist() for row, m in zip(input_ids, keep)]
        prompts = [list(p) for p in input_ids]
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for p in prompts for t in p):
            raise UsageError("input_ids must be lists of integer token ids")
        return generate(self, [[int(t) for t in p] for p in prompts], config, generator, streamer, observer)

    # -- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write weights (safetensors), the HF config, ``blockdiff.json`` and the generation defaults."""
        directory = Path(directory)
        self.backbone.save_pretrained(directory, safe_serialization=True)
        (directory / SPEC_FILE).write_text(json.dumps(asdict(self.spec), indent=2) + "\n")
        self.generation_config.save_pretrained(directory, config_file_name=GENERATION_CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path, attn_implementation: str = "sdpa") -> "BlockDiffusionLM":
        """Load a directory written by ``save_pretrained`` (never executes remote code)."""
        directory = Path(directory)
        spec_path = directory / SPEC_FILE
        if not spec_path.is_file():
            raise MissingFileError(
                f"{directory} is not a blockdiff model directory (no {SPEC_FILE}); "
                "pass the model/ folder of a run, or a directory written by BlockDiffusionLM.save_pretrained"
            )
        spec = BlockDiffusionSpec(**json.loads(spec_path.read_text()))
        backbone = AutoModelForCausalLM.from_pretrained(
            directory, attn_implementation=attn_implementation, trust_remote_code=False, use_safetensors=True
        )
        model = cls(backbone, spec)
        if (directory / GENERATION_CONFIG_FILE).is_file():
            model.generation_config = BlockDiffusionGenerationConfig.from_pretrained(
                directory, config_file_name=GENERATION_CONFIG_FILE
            )
        return model
