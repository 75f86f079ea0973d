"""Reading a model directory for ``BlockDiffusionLM.from_pretrained``: ``blockdiff.json`` and the decoder, each
file checked before use, every error naming the file and saying how to fix it."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from blockdiff.errors import MissingFileError, UsageError
from blockdiff.modeling.model_files import (
    CONFIG_FILE,
    BlockDiffusionConfig,
    backbone_config,
    check_decoder_type,
    load_backbone,
)
from blockdiff.modeling.rundir import SPEC_FILE
from blockdiff.modeling.spec import BlockDiffusionSpec

__all__ = ["read_model_dir"]


def read_model_dir(
    directory: Path, config: BlockDiffusionConfig | None, attn_implementation: str, **hf_kwargs
) -> tuple[BlockDiffusionSpec, PreTrainedModel]:
    """``(spec, decoder)`` of a model directory (``config``: the ``BlockDiffusionConfig`` transformers' Auto classes
    already read, else ``config.json`` is read here); the two are checked against each other."""
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
    for key in ("trust_remote_code", "adapter_kwargs", "_from_auto"):  # a built-in decoder class: no code runs
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
    return spec, backbone
