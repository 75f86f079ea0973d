"""``BlockDiffusionLM``: an ordinary Hugging Face causal decoder driven with block-diffusion masks.

One network path for both uses (docs/design.md §6): a from-scratch network built from a small config, or a
pretrained decoder. The wrapper adds only what block diffusion needs on top of the decoder:

* the vectorised training forward over ``x_t ⊕ x_0`` with the three-part mask (``masks.py``), whose clean part is
  block-causal or token-causal (``spec.clean_attention``);
* an optional drafting adapter that only noisy rows use (``spec.adapter="gated_lora"``, ``adapter.py``): the clean
  stream is then the frozen decoder itself, bit for bit;
* the SUBS output: the mask token is never predicted (its logit is ``-inf``);
* the optional logit shift for AR-initialised backbones (predict token ``i`` from the output at
  ``i-1``; the first token of block ``k`` reads the clean stream at the last position of block ``k-1``);
* save/load as a ``save_pretrained`` directory (safetensors) plus ``blockdiff.json``.

It knows nothing about time, noise schedules or samplers.

A model directory holds

* ``model.safetensors`` — the decoder's weights under its own names (``model.layers.0...``);
* ``config.json`` — ``BlockDiffusionConfig``: ``model_type: "blockdiff"`` with the decoder's own config as
  ``text_config`` (the transformers convention for composite models). Plain transformers does not know the
  type and refuses the directory, so an export can never be run autoregressively by mistake; ``import
  blockdiff`` registers the type, and ``AutoModelForCausalLM.from_pretrained(dir)`` then gives a
  ``BlockDiffusionLM`` (whose ``generate`` is the block generation). Directories written before this
  (``config.json`` of the decoder's own type) still load with ``BlockDiffusionLM.from_pretrained``;
* ``blockdiff.json`` — the ``BlockDiffusionSpec`` (mask token, block length, logit shift, context, schedule,
  clean attention, adapter settings).
  Every key must be known: a key this version does not know (a newer blockdiff, or a hand edit) is refused
  rather than ignored, since it could change what the numbers mean; a missing optional key takes its default;
* ``blockdiff_generation_config.json`` — the generation defaults (``sampling/config.py``);
* ``adapter.safetensors`` — only with a gated adapter: its tensors (``adapter.py``; not mergeable into the weights).

Every file is checked on load; a damaged, truncated or inconsistent one is a ``UserError`` naming the file.

Shape legend: ``b`` batch, ``n`` tokens per half, ``q``/``s`` query/key lengths, ``v`` vocab, ``d`` hidden.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

from blockdiff.core.masks import block_causal_mask, causal_prefix_mask, training_block_mask, training_mask
from blockdiff.errors import MissingFileError, UsageError
from blockdiff.modeling.adapter import ADAPTER_FILE, GatedLoRA
from blockdiff.modeling.device import resolve_device
from blockdiff.modeling.model_files import (
    CONFIG_FILE,
    BlockDiffusionConfig,
    backbone_config,
    check_decoder_type,
    honour_umask,
    load_backbone,
    load_generation_config,
)
from blockdiff.modeling.rundir import SPEC_FILE
from blockdiff.modeling.spec import BlockDiffusionSpec
from blockdiff.sampling.config import GENERATION_CONFIG_FILE, BlockDiffusionGenerationConfig

__all__ = ["BlockDiffusionLM", "BlockDiffusionConfig", "register_auto_classes", "FULL_ATTENTION"]

# ``hidden_states``' attention mask meaning "every query sees every key" (no mask is built or passed: SDPA's fast
# path). ``None`` keeps the decoder's own (causal) default, as in transformers.
FULL_ATTENTION = "full_attention"


@lru_cache(maxsize=16)
def _cached_training_mask(n: int, block_length: int, device: str, kind: str, clean_attention: str = "block_causal"):
    """The training mask without the last clean block (no query ever needs it): ``2n - l`` square."""
    length = 2 * n - block_length
    if kind == "flex_attention":
        return training_block_mask(n, block_length, None, device=device, length=length, clean_attention=clean_attention)
    mask = training_mask(n, block_length, device=device, clean_attention=clean_attention)
    return mask[None, None, :length, :length]  # (1, 1, 2n-l, 2n-l)


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

    config_class = BlockDiffusionConfig  # what AutoModelForCausalLM maps to this class (register_auto_classes)

    def __init__(self, backbone: PreTrainedModel, spec: BlockDiffusionSpec):
        super().__init__()
        vocab = backbone.get_input_embeddings().num_embeddings
        if not 0 <= spec.mask_token_id < vocab:
            raise UsageError(f"mask_token_id={spec.mask_token_id} is outside the backbone's vocabulary of {vocab}")
        self.backbone = backbone
        self.spec = spec
        self.adapter = _adapter_for(backbone, spec)  # GatedLoRA or None (a submodule: trains, moves, checkpoints)
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

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def config(self) -> BlockDiffusionConfig:
        """The ``config.json`` this model is saved with (the decoder's config as ``text_config``)."""
        decoder = copy.deepcopy(self.backbone.config)
        return BlockDiffusionConfig(text_config=decoder, architectures=[type(self).__name__])

    def with_block_length(self, block_length: int) -> "BlockDiffusionLM":
        """The same network (shared weights) generating and evaluating with another block length, e.g. a
        model trained on a block-length mixture sampled at each length it saw."""
        if block_length == self.block_length:
            return self
        if block_length < 1 or (self.spec.max_seq_len and self.spec.max_seq_len % block_length):
            raise UsageError(
                f"block_length={block_length} must be >= 1 and divide the training context {self.spec.max_seq_len}"
            )
        other = BlockDiffusionLM(self.backbone, replace(self.spec, block_length=block_length))
        other.generation_config = self.generation_config
        return other.train(self.training)

    def train(self, mode: bool = True) -> "BlockDiffusionLM":
        """As ``nn.Module.train``, except that a frozen decoder under a gated adapter stays in eval mode (no dropout):
        its clean stream is then the base model in training too, and its cache the one inference computes."""
        super().train(mode)
        if self.adapter is not None and not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        return self

    # -- the network call -------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key_values=None,
        use_cache=False,
        gate=None,
        *,
        fast_gqa=False,
    ):
        """Run the decoder body with an explicit 4-D mask and positions; returns ``(hidden (b,q,d), cache)``.

        ``gate`` (b, q): where the gated adapter is on (1: a noisy row, drafting) or off (0: a clean row, the base
        decoder); ``None`` = off everywhere. Without an adapter it has no effect. The gate holds for this call only.
        ``attention_mask=FULL_ATTENTION``: every query sees every key (its cached ones and the fed ones), with no
        mask at all. ``fast_gqa``: under SDPA on CPU, a grouped-query decoder given a mask attends with SDPA's
        ``enable_gqa`` instead of copying keys and values per query head (transformers' ``repeat_kv``; same
        result). Both are the sampling forward's fast paths (docs/benchmarks.md); see ``_attention_options``.
        """
        gated = self.adapter.gated(gate) if self.adapter is not None else contextlib.nullcontext()
        with gated, self._attention_options(attention_mask, fast_gqa, input_ids.device) as kwargs:
            out = self.backbone.base_model(
                input_ids=input_ids,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        return out.last_hidden_state, out.past_key_values

    @contextlib.contextmanager
    def _attention_options(self, attention_mask, fast_gqa: bool, device: torch.device):
        """The decoder's keyword arguments for ``attention_mask``, and the settings they need while it runs.

        transformers (5.x) builds a causal mask whenever it is given none, and takes ``enable_gqa`` with a mask only
        when ``TRANSFORMERS_SDPA_FORCE_GQA=1``. So full attention runs with this backbone's ``config.is_causal``
        set to False (transformers' switch to a bidirectional mask, which it skips when nothing is masked) and
        ``is_causal=False`` for SDPA; ``fast_gqa`` sets the variable (on CPU only: on CUDA a mask with GQA would
        fall back to the math kernel). Both are restored on exit, so they are not meant for concurrent threads."""
        config = self.backbone.config
        if isinstance(attention_mask, str):
            if attention_mask != FULL_ATTENTION:
                raise ValueError(f"attention_mask must be a tensor, None or FULL_ATTENTION, got {attention_mask!r}")
            had, old = hasattr(config, "is_causal"), getattr(config, "is_causal", None)
            config.is_causal = False
            try:
                yield {"attention_mask": None, "is_causal": False}
            finally:
                if had:
                    config.is_causal = old
                else:
                    del config.is_causal
            return
        gqa = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        grouped = gqa is not None and gqa != getattr(config, "num_attention_heads", gqa)
        if not (fast_gqa and grouped and attention_mask is not None and device.type == "cpu"
                and self.attn_implementation == "sdpa"):
            yield {"attention_mask": attention_mask}
            return
        old = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
        try:
            yield {"attention_mask": attention_mask}
        finally:
            if old is None:
                del os.environ["TRANSFORMERS_SDPA_FORCE_GQA"]
            else:
                os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = old

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
        block_length = block_length or self.block_length
        h_xt, h_x0 = self.training_streams(xt, x0, block_length, bidirectional, generator)
        if self.spec.logit_shift:  # block k > 0 reads the clean stream at its last position; block 0 a placeholder
            before = torch.cat([h_xt[:, :1], h_x0[:, block_length - 1 :: block_length]], dim=1)  # (b, n/l, d)
            h_xt = self.apply_logit_shift(h_xt, before, block_length)  # (b, n, d); row 0 is a placeholder
        return h_xt

    def training_streams(
        self,
        xt: torch.Tensor,
        x0: torch.Tensor,
        block_length: int | None = None,
        bidirectional: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two halves of the training forward before the logit shift: ``(noisy (b, n, d), clean (b, n - l, d))``,
        row ``i`` of each being the decoder's output at position ``i`` of ``x_t`` / ``x_0``.

        Without an adapter: one forward over ``x_t ⊕ x_0[:n-l]`` under the training mask. With the gated adapter (on
        for the x_t rows, off for the x_0 rows) and a dense mask: two forwards with the same result — the clean
        stream alone first (the base decoder; without gradients when the base is frozen, so the backward pass runs
        over the ``n`` noisy rows only), then the noisy stream against the clean stream's keys and values."""
        b, n = xt.shape
        block_length = block_length or self.block_length
        if n % block_length:
            raise UsageError(f"block_length={block_length} must divide the sequence length {n}")
        kind = self.attn_implementation
        if kind == "flex_attention" and xt.device.type != "cuda":
            raise RuntimeError("model.attn_implementation=flex_attention needs CUDA; use sdpa on CPU")
        if bidirectional < 1.0 and kind == "flex_attention":
            raise UsageError("attention-mask annealing needs a dense mask; use attn_implementation=sdpa or eager")
        mask = _cached_training_mask(n, block_length, str(xt.device), kind, self.spec.clean_attention)
        if bidirectional < 1.0:
            mask = mask & _annealing_keep(n, block_length, bidirectional, generator, xt.device)
        if self.adapter is not None and kind != "flex_attention":
            return self._split_streams(xt, x0, block_length, mask)
        if kind != "flex_attention":
            mask = self.format_mask(mask)
        clean = n - block_length  # clean tokens fed: all blocks but the last
        positions = torch.cat([torch.arange(n), torch.arange(clean)]).to(xt.device)[None].expand(b, -1)  # (b, n+clean)
        gate = (torch.arange(n + clean, device=xt.device) < n)[None] if self.adapter is not None else None  # x_t rows
        hidden, _ = self.hidden_states(torch.cat([xt, x0[:, :clean]], dim=1), positions, mask, gate=gate)
        return hidden[:, :n], hidden[:, n:]  # (b, n, d), (b, clean, d)

    def _split_streams(self, xt, x0, block_length: int, mask: torch.Tensor):
        """``training_streams`` as two forwards (``mask``: the dense training mask (1, 1, n + clean, n + clean) over
        ``[x_t ; x_0[:clean]]``): the clean stream with the gate off, then the noisy rows, gate on, against its cache
        (keys ``[x_0[:clean] ; x_t]``)."""
        b, n = xt.shape
        clean = n - block_length
        device = xt.device
        cache = None
        h_x0 = torch.zeros(b, 0, self.backbone.config.hidden_size, device=device, dtype=self.backbone.dtype)
        if clean > 0:
            base_trainable = any(p.requires_grad for p in self.backbone.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and base_trainable):
                h_x0, cache = self.hidden_states(
                    x0[:, :clean], torch.arange(clean, device=device)[None].expand(b, -1),
                    self.format_mask(mask[..., n:, n:]), past_key_values=self.new_cache(), use_cache=True,
                )  # (b, clean, d)
        noisy_mask = torch.cat([mask[..., :n, n:], mask[..., :n, :n]], dim=-1)  # (1, 1, n, clean + n)
        h_xt, _ = self.hidden_states(
            xt, torch.arange(n, device=device)[None].expand(b, -1), self.format_mask(noisy_mask),
            past_key_values=cache, use_cache=cache is not None, gate=torch.ones(1, n, device=device),
        )  # (b, n, d)
        return h_xt, h_x0

    def apply_logit_shift(self, noisy: torch.Tensor, before: torch.Tensor, block_length: int | None = None):
        """The logit shift, the one place it is done (docs/design.md §5): row ``i`` of the result is the state that
        predicts token ``i``, i.e. row ``i - 1`` of ``noisy`` (b, n, d), except at the first position of each block,
        which takes that block's row of ``before`` (b, n/l, d): the clean stream's state just before the block.
        Without the shift (``spec.logit_shift`` false) ``noisy`` is returned as it is."""
        if not self.spec.logit_shift:
            return noisy
        block_length = block_length or self.block_length
        shifted = torch.cat([before[:, :1], noisy[:, :-1]], dim=1)  # (b, n, d): row i holds row i-1
        first_of_block = (torch.arange(noisy.shape[1], device=noisy.device) % block_length == 0)[None, :, None]
        return torch.where(first_of_block, before.repeat_interleave(block_length, dim=1), shifted)  # (b, n, d)

    # -- sampling forwards (the block loop's view of the network, docs/design.md §8) ----------------
    @property
    def max_positions(self) -> int | None:
        """Positions the network was built for (``max_position_embeddings``); ``None`` if its config has no limit."""
        return getattr(self.backbone.config, "max_position_embeddings", None)

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for this network (the block loop writes finished blocks into it)."""
        return DynamicCache(config=self.backbone.config)

    def sampling_mask(
        self,
        query_columns: torch.Tensor,
        key_columns: torch.Tensor,
        first_valid: torch.Tensor,
        noisy_from: int | None = None,
        *,
        allow_full: bool = False,
    ):
        """The attention mask of a sampling forward, formatted for the attention implementation: (b, 1, q, s).

        Columns lie on the block grid (column ``c`` is in block ``c // l``), ascending. A query sees the keys of its
        own and earlier blocks (``masks.block_causal_mask``), never a key left of its sample's ``first_valid`` column
        (b,) (left padding), and always itself (so a pad query has no empty row). Under
        ``spec.clean_attention=causal`` the columns before ``noisy_from`` (default: the first column of the last
        query block) are the clean stream and attend token-causally (``masks.causal_prefix_mask``). With
        ``allow_full``, a mask that would allow everything (the queries are one block, no key is padding) is
        ``FULL_ATTENTION`` instead, for ``hidden_states``."""
        l = self.block_length
        if allow_full and int(key_columns[-1]) // l <= int(query_columns[0]) // l and int(first_valid.max()) <= int(
            key_columns[0]
        ):
            return FULL_ATTENTION
        if self.spec.clean_attention == "causal":
            if noisy_from is None:
                noisy_from = int(query_columns[-1]) // l * l
            allowed = causal_prefix_mask(query_columns, key_columns, l, noisy_from)[None]  # (1, q, s)
        else:
            allowed = block_causal_mask(query_columns, key_columns, l)[None]  # (1, q, s)
        allowed = allowed & (key_columns[None, None, :] >= first_valid[:, None, None])  # (b, q, s)
        allowed |= query_columns[:, None] == key_columns[None, :]
        return self.format_mask(allowed[:, None])  # (b, 1, q, s)

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor | list[list[int]],
        attention_mask: torch.Tensor | None = None,
        generation_config: BlockDiffusionGenerationConfig | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        streamer=None,
        observer=None,
        tokenizer=None,
        **overrides,
    ):
        """Write up to ``max_new_tokens`` after each prompt, block by block (``sampling/generation.py``).

        ``input_ids``: a ``(b, p)`` tensor (left padding marked by ``attention_mask``) or a list of token-id
        lists of any lengths. Settings come from ``generation_config`` (default: the model's own, saved
        with it) updated by keyword ``overrides`` such as ``max_new_tokens=256, sampler="first_hitting"``.
        The transformers settings that make sense here mean what they mean in transformers: ``do_sample=False``
        (greedy tokens, as ``temperature=0``), ``max_length`` (prompt + new tokens, the prompt counted at the
        batch's padded width; ``max_new_tokens`` wins when both are given), ``num_return_sequences`` (that many
        sequences per prompt, those of prompt 0 first), ``min_new_tokens`` (no EOS before that many new tokens),
        ``stop_strings`` (needs ``tokenizer``; a sample stops after the token that completes one). Any other
        transformers setting (``num_beams``, ``repetition_penalty``, ...) is refused by name.
        ``generator``: one for the batch, or one per returned sequence so each sample is independent of its
        batch. Returns a ``GenerationOutput``.
        """
        from blockdiff.sampling.generation import generate
        from blockdiff.sampling.inputs import prompt_lists, with_overrides

        config = with_overrides(generation_config or self.generation_config, overrides)
        prompts = prompt_lists(input_ids, attention_mask, config)
        return generate(self, prompts, config, generator, streamer, observer, tokenizer)

    # -- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write weights (safetensors), ``config.json`` (a ``BlockDiffusionConfig``), ``blockdiff.json`` and the
        generation defaults. Every file gets the permissions the umask gives (safetensors alone would make the
        weights owner-only: it writes through a private temporary file)."""
        directory = Path(directory)
        self.backbone.save_pretrained(directory, safe_serialization=True)
        self.config.save_pretrained(directory)  # replaces the decoder's own config.json: plain transformers refuses it
        self.spec.save(directory / SPEC_FILE)
        self.generation_config.save_pretrained(directory, config_file_name=GENERATION_CONFIG_FILE)
        if self.adapter is not None:
            self.adapter.save(directory / ADAPTER_FILE)
        honour_umask(directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        attn_implementation: str = "sdpa",
        device: str | torch.device | None = None,
        *,
        config: BlockDiffusionConfig | None = None,
        **hf_kwargs,
    ) -> "BlockDiffusionLM":
        """Load a directory written by ``save_pretrained`` (or by an older blockdiff: ``config.json`` of the decoder's
        own type); never executes code from the directory. Every file is checked first, and an error names it.

        ``device``: ``cpu``, ``cuda``, ``mps`` or ``auto`` (``resolve_device``). ``config`` and ``hf_kwargs`` are
        what ``AutoModelForCausalLM.from_pretrained`` passes on (after ``import blockdiff``); ``hf_kwargs`` such as
        ``dtype=torch.bfloat16`` go to the decoder's ``from_pretrained``.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise MissingFileError(f"{directory} is not a directory; pass a run directory's model/ folder")
        spec_path = directory / SPEC_FILE
        if not spec_path.is_file():
            raise MissingFileError(
                f"{directory} is not a blockdiff model directory (no {SPEC_FILE}); "
                "pass the model/ folder of a run, or a directory written by BlockDiffusionLM.save_pretrained"
            )
        spec = BlockDiffusionSpec.from_file(spec_path)
        if config is not None and not isinstance(config, BlockDiffusionConfig):
            raise UsageError(
                f"config must be a BlockDiffusionConfig (the model's config.json), got {type(config).__name__}"
            )
        if config is not None:
            check_decoder_type(
                getattr(config.text_config, "model_type", None), f"{directory / CONFIG_FILE} (text_config)"
            )
        decoder_config = config.text_config if config is not None else backbone_config(directory)
        for key in (
            "trust_remote_code",
            "adapter_kwargs",
            "_from_auto",
        ):  # the decoder is a built-in class: no code runs
            hf_kwargs.pop(key, None)
        backbone = load_backbone(directory, decoder_config, attn_implementation, **hf_kwargs)
        vocab = backbone.get_input_embeddings().num_embeddings
        if spec.mask_token_id >= vocab:
            raise UsageError(
                f"{spec_path}: mask_token_id={spec.mask_token_id} is outside the decoder's vocabulary of {vocab} "
                f"({directory / CONFIG_FILE}); the two files come from different models"
            )
        positions = getattr(backbone.config, "max_position_embeddings", None) or getattr(
            backbone.config, "n_positions", None
        )
        if spec.max_seq_len and positions and spec.max_seq_len > positions:
            raise UsageError(
                f"{spec_path}: max_seq_len={spec.max_seq_len} exceeds the {positions} positions of the decoder in "
                f"{directory / CONFIG_FILE}; the two files come from different models"
            )
        model = cls(backbone, spec)
        if model.adapter is not None:
            model.adapter.load(directory / ADAPTER_FILE)
        if (directory / GENERATION_CONFIG_FILE).is_file():
            model.generation_config = load_generation_config(directory / GENERATION_CONFIG_FILE, spec.block_length)
        return model.to(resolve_device(device)) if device is not None else model


def _adapter_for(backbone: PreTrainedModel, spec: BlockDiffusionSpec) -> GatedLoRA | None:
    """The gated adapter ``spec`` asks for: the one already attached to ``backbone`` (another view of the same
    network) or a fresh one (``B = 0``: the base model until trained); ``None`` without one."""
    attached = GatedLoRA.of(backbone)
    if not spec.has_adapter:
        if attached is not None:
            raise UsageError("this decoder carries a gated adapter, but the spec says adapter=none")
        return None
    if attached is None:
        return GatedLoRA.attach(backbone, spec.adapter_rank, spec.adapter_alpha)
    if (attached.rank, attached.alpha) != (spec.adapter_rank, float(spec.adapter_alpha)):
        raise UsageError(
            f"this decoder's gated adapter has rank {attached.rank}, alpha {attached.alpha}; the spec says "
            f"adapter_rank={spec.adapter_rank}, adapter_alpha={spec.adapter_alpha}"
        )
    return attached


def register_auto_classes() -> None:
    """Teach transformers' ``AutoConfig`` / ``AutoModelForCausalLM`` the ``blockdiff`` model type (``import blockdiff``
    does this): ``AutoModelForCausalLM.from_pretrained(export_dir)`` then returns a ``BlockDiffusionLM``."""
    AutoConfig.register(BlockDiffusionConfig.model_type, BlockDiffusionConfig, exist_ok=True)
    AutoModelForCausalLM.register(BlockDiffusionConfig, BlockDiffusionLM, exist_ok=True)
