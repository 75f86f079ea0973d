"""Builders from a run config: the network and tokenizer a training run starts from.

``build_model(cfg, docs)`` gives ``(tokenizer, BlockDiffusionLM)`` ready to train: a randomly initialised decoder of
the configured family and size (``build_backbone``), a pretrained decoder (``model.pretrained``), or the network of
an earlier blockdiff model (``model.init_from``); then the block-diffusion spec, LoRA / gradient checkpointing (or
the gated drafting adapter over a frozen decoder, ``model.adapter=gated_lora``) and the sampler defaults saved with
the model. These read ``Config`` / ``ModelConfig``, so they live in the training
layer: the network itself (``modeling/model.py``) never sees a run config (docs/design.md, "Layers").
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from blockdiff.config import Adapter, CleanAttention, Config, ConfigError, Family, ModelConfig, NoiseKind
from blockdiff.files import read_json_file
from blockdiff.modeling.io import load_model_dir
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.rundir import RunDir
from blockdiff.modeling.spec import SPEC_FILE, BlockDiffusionSpec
from blockdiff.modeling.tokenizer import build_tokenizer

__all__ = ["build_backbone", "build_model", "enable_activation_checkpointing"]


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


def build_model(cfg: Config, docs, tokenizer=None, progress: bool = False) -> tuple[object, BlockDiffusionLM]:
    """``(tokenizer, model)`` as ``cfg`` describes them, ready to train: the backbone (``_tokenizer_and_backbone``;
    ``docs`` is only read to train a BPE, with its progress bars when ``progress``), the block-diffusion spec, LoRA /
    checkpointing, and the sampler defaults of the ``sample`` section saved with the model."""
    tokenizer, backbone, inherited_shift = _tokenizer_and_backbone(cfg, docs, tokenizer, progress)
    logit_shift = inherited_shift if cfg.model.logit_shift is None and inherited_shift is not None else cfg.logit_shift
    gated = Adapter(cfg.model.adapter) is Adapter.gated_lora
    spec = BlockDiffusionSpec(
        tokenizer.mask_token_id, cfg.model.block_length, logit_shift, cfg.data.max_seq_len,
        getattr(cfg.noise.schedule, "value", cfg.noise.schedule),
        clean_attention=CleanAttention(cfg.model.clean_attention).value,
        adapter=Adapter(cfg.model.adapter).value,
        adapter_rank=cfg.model.adapter_rank if gated else None,
        adapter_alpha=float(cfg.model.adapter_alpha) if gated else None,
        noise_kind=NoiseKind(cfg.noise.kind).value,
        self_conditioning=bool(cfg.model.self_conditioning),
    )
    if gated:  # the decoder is the frozen verifier: only the adapter (attached by BlockDiffusionLM) trains
        backbone.requires_grad_(False)
    model = BlockDiffusionLM(_adapt_for_training(backbone, cfg), spec)
    model.generation_config.update(
        sampler=cfg.sample.sampler, tau=cfg.sample.tau, steps_per_block=cfg.sample.steps_per_block,
        temperature=cfg.sample.temperature,
    )
    return tokenizer, model


def _tokenizer_and_backbone(cfg: Config, docs, tokenizer=None, progress: bool = False):
    """``(tokenizer, backbone, logit_shift of the source)``: a fresh tokenizer (or the given one) + randomly initialised
    network, or both from ``model.pretrained`` / ``model.init_from`` (whose logit shift a run keeps unless
    ``model.logit_shift`` says otherwise)."""
    if cfg.model.pretrained is not None:
        from blockdiff.modeling.pretrained import load_pretrained

        _refuse_blockdiff_model_as_base(cfg)
        backbone, tokenizer, _ = load_pretrained(
            cfg.model.pretrained, cfg.model.trust_remote_code, cfg.model.attn_implementation
        )
        _check_positions(backbone, cfg.data.max_seq_len, f"model.pretrained={cfg.model.pretrained}")
        return tokenizer, backbone.train(), None
    if cfg.model.init_from is None:
        tokenizer = tokenizer or build_tokenizer(cfg.data.tokenizer, docs["text"], cfg.data.bpe_vocab_size, progress)
        backbone = build_backbone(
            cfg.model,
            vocab_size=len(tokenizer),
            max_seq_len=cfg.data.max_seq_len,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return tokenizer, backbone, None
    loaded = load_model_dir(cfg.model.init_from, lean=False)  # to be trained: no packed copies
    if loaded.model.adapter is not None and Adapter(cfg.model.adapter) is not Adapter.gated_lora:
        raise ConfigError(
            f"model.init_from={cfg.model.init_from} has a gated drafting adapter over a frozen decoder; continue it "
            f"with model.adapter=gated_lora model.adapter_rank={loaded.model.adapter.rank} "
            f"model.adapter_alpha={loaded.model.adapter.alpha}"
        )
    _check_positions(loaded.model.backbone, cfg.data.max_seq_len, f"model.init_from={cfg.model.init_from}")
    return loaded.tokenizer, loaded.model.backbone.train(), loaded.model.spec.logit_shift  # back to training mode


def _refuse_blockdiff_model_as_base(cfg: Config) -> None:
    """A blockdiff model given as ``model.pretrained`` would be read as a plain AR decoder and get the logit shift
    of one (on), silently flipping a from-scratch model's; continuing it is what ``model.init_from`` is for."""
    source = Path(cfg.model.pretrained)
    spec_file = next((d / SPEC_FILE for d in (source, RunDir(source).model) if (d / SPEC_FILE).is_file()), None)
    if spec_file is None or cfg.model.logit_shift is not None:
        return
    shift = read_json_file(spec_file).get("logit_shift")  # a damaged file is an error naming it
    raise ConfigError(
        f"model.pretrained={cfg.model.pretrained} is a blockdiff model (trained with logit_shift={shift}), not a plain "
        f"decoder; continue training it with model.init_from={cfg.model.pretrained} (keeps its tokenizer and logit "
        "shift), or set model.logit_shift explicitly to use its weights as a base"
    )


def _check_positions(backbone, max_seq_len: int, source: str) -> None:
    config = backbone.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and max_seq_len > positions:
        raise ConfigError(
            f"data.max_seq_len={max_seq_len} exceeds the {positions} positions of {source}; "
            f"use data.max_seq_len <= {positions}"
        )


def enable_activation_checkpointing(backbone) -> None:
    """Recompute each decoder layer's activations in the backward pass (transformers' per-layer checkpointing,
    non-reentrant). The layer's inputs (hidden states, the 4-D training mask, positions) are passed as they are, so
    the recomputation sees the same mask, and dropout's random state is replayed: loss and gradients are those of
    the plain step (tests/test_distributed.py, fp64, llama / qwen2 / gpt2, with and without the logit shift)."""
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.x (the older name is deprecated)
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _adapt_for_training(backbone, cfg: Config):
    """Optional LoRA adapters and gradient checkpointing (both mostly for large pretrained decoders)."""
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(backbone)
    if cfg.model.lora_rank > 0:
        from blockdiff.modeling.pretrained import apply_lora

        backbone = apply_lora(backbone, cfg.model.lora_rank, cfg.model.lora_alpha)
    return backbone
