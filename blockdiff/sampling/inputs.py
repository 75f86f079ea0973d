"""What ``generate`` accepts, made uniform: the settings (a generation config updated by keyword overrides) and the
prompts (a padded ``(b, p)`` tensor with its attention mask, or token-id lists of any lengths), with
transformers' ``max_length`` turned into ``max_new_tokens``. Every error says what was wrong and how to pass it."""

from __future__ import annotations

import copy
import numbers

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.config import BlockDiffusionGenerationConfig

__all__ = ["with_overrides", "prompt_lists"]


def with_overrides(config: BlockDiffusionGenerationConfig, overrides: dict) -> BlockDiffusionGenerationConfig:
    """A copy of ``config`` with keyword ``overrides`` set; an unknown setting is refused by name."""
    config = copy.deepcopy(config)
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise UsageError(f"unknown generation setting(s) {unknown}; see BlockDiffusionGenerationConfig")
    if "max_length" in overrides and "max_new_tokens" not in overrides:
        config.max_new_tokens = None  # as in transformers: max_length counts only when max_new_tokens is unset
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def prompt_lists(input_ids, attention_mask, config: BlockDiffusionGenerationConfig) -> list[list[int]]:
    """The prompts as token-id lists (left padding removed); sets ``config.max_new_tokens`` from ``max_length``
    when only that was given (the prompt counted at the batch's padded width, as in transformers)."""
    width = None  # the prompt length max_length counts: the padded width of a tensor batch
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise UsageError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise UsageError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise UsageError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}"
            )
        width = input_ids.shape[1]
        keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        input_ids = [row[m].tolist() for row, m in zip(input_ids, keep)]
    if not isinstance(input_ids, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in input_ids):
        raise UsageError(
            "input_ids must be a (batch, length) tensor or a list of token-id lists, one per prompt, e.g. [[1, 2, 3]] "
            "(tokenize text first, or use blockdiff.sampling.sample_texts)"
        )
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for p in input_ids for t in p):
        raise UsageError("input_ids must be lists of integer token ids")
    prompts = [[int(t) for t in p] for p in input_ids]
    if config.max_new_tokens is None and config.max_length is not None and prompts:
        width = width if width is not None else max(len(p) for p in prompts)
        if (
            not isinstance(config.max_length, numbers.Integral)
            and not isinstance(config.max_length, bool)
            or config.max_length <= width
        ):
            raise UsageError(
                f"max_length={config.max_length!r} leaves no room after the {width}-token prompt (max_length counts "
                "prompt + new tokens, as in transformers); pass max_new_tokens instead"
            )
        config.max_new_tokens = config.max_length - width
    return prompts
