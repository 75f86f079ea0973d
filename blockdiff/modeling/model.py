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
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

from blockdiff.core.masks import block_causal_mask, causal_prefix_mask
from blockdiff.errors import UsageError
from blockdiff.modeling.adapter import ADAPTER_FILE, GatedLoRA
from blockdiff.modeling.device import resolve_device
from blockdiff.modeling.model_files import (
    BlockDiffusionConfig,
    honour_umask,
    load_generation_config,
    read_model_dir,
)
from blockdiff.modeling.spec import SPEC_FILE, BlockDiffusionSpec
from blockdiff.modeling.training_forward import TrainingForward
from blockdiff.sampling.config import GENERATION_CONFIG_FILE, BlockDiffusionGenerationConfig

__all__ = ["BlockDiffusionLM", "BlockDiffusionConfig", "register_auto_classes", "FULL_ATTENTION"]

# ``hidden_states``' attention mask meaning "every query sees every key" (no mask is built or passed: SDPA's fast
# path). ``None`` keeps the decoder's own (causal) default, as in transformers.
FULL_ATTENTION = "full_attention"


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" mask -> additive float mask (eager attention adds it to the scores)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class BlockDiffusionLM(TrainingForward, nn.Module):
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
        soft=None,
    ):
        """Run the decoder body with an explicit 4-D mask and positions; returns ``(hidden (b,q,d), cache)``.

        ``soft`` (b, q, d): self-conditioning input (``soft_embedding`` of the last prediction, zero where there is
        none), added to the token embeddings; ``None`` runs the decoder on ``input_ids`` exactly as without it.

        ``gate`` (b, q): where the gated adapter is on (1: a noisy row, drafting) or off (0: a clean row, the base
        decoder); ``None`` = off everywhere. Without an adapter it has no effect. The gate holds for this call only.
        ``attention_mask=FULL_ATTENTION``: every query sees every key (its cached ones and the fed ones), with no
        mask at all. ``fast_gqa``: under SDPA on CPU, a grouped-query decoder given a mask attends with SDPA's
        ``enable_gqa`` instead of copying keys and values per query head (transformers' ``repeat_kv``; same
        result). Both are the sampling forward's fast paths (docs/benchmarks.md); see ``_attention_options``.
        """
        gated = self.adapter.gated(gate) if self.adapter is not None else contextlib.nullcontext()
        inputs = {"input_ids": input_ids}
        if soft is not None:  # self-conditioning: the token embeddings plus the last prediction's expected embedding
            inputs = {"inputs_embeds": self.backbone.get_input_embeddings()(input_ids) + soft.to(self.backbone.dtype)}
        with gated, self._attention_options(attention_mask, fast_gqa, input_ids.device) as kwargs:
            out = self.backbone.base_model(
                **inputs,
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

    def soft_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input (docs/design.md §3.3): the expected input embedding ``softmax(logits) @ E`` of a
        prediction, ``(..., v) -> (..., d)``, with no gradient (the previous pass is a constant to the next)."""
        with torch.no_grad():
            weight = self.backbone.get_input_embeddings().weight  # (v, d)
            return logits.float().softmax(-1).to(weight.dtype) @ weight

    def format_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean (b|1, 1, q, s) "may attend" mask in the form the attention implementation expects."""
        if self.attn_implementation == "eager":
            return _additive(allowed, self.backbone.dtype)
        return allowed

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
        cancelled=None,
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
        batch. ``cancelled(i)``, asked after every block, ends sample ``i`` there (a server's client went away).
        Returns a ``GenerationOutput``.
        """
        from blockdiff.sampling.generation import generate
        from blockdiff.sampling.inputs import prompt_lists, with_overrides

        config = with_overrides(generation_config or self.generation_config, overrides)
        prompts = prompt_lists(input_ids, attention_mask, config)
        return generate(self, prompts, config, generator, streamer, observer, tokenizer, cancelled)

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
        own type), or a hub id (``owner/name``: downloaded once, then read from the cache; offline a clear error at
        once); never executes code from the directory. Every file is checked first, and an error names it.

        ``device``: ``cpu``, ``cuda``, ``mps`` or ``auto`` (``resolve_device``). ``config`` and ``hf_kwargs`` are
        what ``AutoModelForCausalLM.from_pretrained`` passes on (after ``import blockdiff``); ``hf_kwargs`` such as
        ``dtype=torch.bfloat16`` go to the decoder's ``from_pretrained``.
        """
        from blockdiff.modeling.hub import local_model_dir

        directory = local_model_dir(directory)
        spec, backbone = read_model_dir(directory, config, attn_implementation, **hf_kwargs)
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
