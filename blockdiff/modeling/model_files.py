"""The one reader of a blockdiff model directory: every file read and checked, every error naming the file and saying
how to fix it. ``read_model_dir`` (for ``BlockDiffusionLM.from_pretrained``) reads and cross-checks the recipe and the
decoder; ``modeling/io.py`` is the public load/export built on it.

* ``blockdiff.json`` — the ``BlockDiffusionSpec`` (``spec.py``, which names the file: ``SPEC_FILE``);
* ``config.json`` — ``BlockDiffusionConfig``: ``model_type: "blockdiff"`` with the decoder's own config as
  ``text_config``; directories written before it hold the decoder's config itself (both load);
* ``model.safetensors`` (or shards and an index) — the decoder's weights, checked before loading (an empty or
  truncated file fails its header check) and against the config (missing, unexpected or reshaped weights);
* ``blockdiff_generation_config.json`` — the generation defaults, checked like ``generate``'s arguments;
* any JSON file (``blockdiff.files.read_json_file``): undecodable UTF-8 or malformed JSON names the file.

``model.py`` assembles the model from what ``read_model_dir`` returns (and loads the adapter's tensors into it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from blockdiff.errors import MissingFileError, UsageError
from blockdiff.files import read_json_file
from blockdiff.modeling.spec import SPEC_FILE, BlockDiffusionSpec
from blockdiff.sampling.config import BlockDiffusionGenerationConfig

__all__ = [
    "CONFIG_FILE", "WEIGHTS_FILE", "WEIGHTS_INDEX_FILE", "BlockDiffusionConfig", "read_model_dir", "check_decoder_type",
    "backbone_config", "check_weight_files", "load_backbone", "load_generation_config", "honour_umask",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


class BlockDiffusionConfig(PreTrainedConfig):
    """``config.json`` of a blockdiff model directory: ``model_type: "blockdiff"`` around the decoder's config.

    The decoder's own config (``llama``, ``qwen2``, ``gpt2``, ...) is ``text_config``, as in transformers'
    composite models (``DiffusionGemmaConfig``). Plain transformers refuses the unknown type; with
    ``import blockdiff`` the Auto classes resolve it to ``BlockDiffusionLM``. The recipe (mask token, block
    length, ...) is not repeated here: it lives in ``blockdiff.json``.
    """

    model_type = "blockdiff"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: PreTrainedConfig | dict[str, Any] | None = None


def check_decoder_type(model_type, where: str) -> None:
    """``model_type`` must name a causal decoder transformers knows (and not blockdiff itself)."""
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UsageError(
            f"{where}: model_type {model_type!r} is not a model type this transformers knows; the file is damaged, "
            "or the model needs a newer transformers (pip install -U transformers)"
        )
    if model_type == BlockDiffusionConfig.model_type or CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UsageError(
            f"{where}: model_type {model_type!r} is not a causal decoder; blockdiff drives decoders such as "
            "llama, qwen2 or gpt2"
        )


def backbone_config(directory: Path) -> PreTrainedConfig:
    """The decoder's config from ``config.json``: the ``text_config`` of a blockdiff config, or (directories written
    before ``BlockDiffusionConfig``) the file itself."""
    path = directory / CONFIG_FILE
    data = read_json_file(path)
    where = str(path)
    if data.get("model_type") == BlockDiffusionConfig.model_type:
        data, where = data.get("text_config"), f"{path} (text_config)"
        if not isinstance(data, dict):
            raise UsageError(f"{path} has model_type 'blockdiff' but no text_config object (the decoder's own config)")
    elif "text_config" in data:  # a composite config of another model type (a bert, a VLM), not ours
        raise UsageError(
            f"{path}: model_type {data.get('model_type')!r} is not a block diffusion model blockdiff can load (its "
            "config.json has model_type 'blockdiff' with the decoder's config as text_config); restore the config.json "
            "written with the weights, or re-export the run: blockdiff export RUN_DIR OUT_DIR"
        )
    check_decoder_type(data.get("model_type"), where)
    try:
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise UsageError(f"{where} is not a valid {data['model_type']} config: {err}") from None


def check_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of ``directory`` (one, or the shards of an index), each with a readable header that
    covers the file exactly (safetensors checks that: an empty or truncated file fails here, before loading)."""
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = read_json_file(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UsageError(f"{index} has no weight_map of tensor names to shard files")
        files = sorted({directory / name for name in weight_map.values()})
    else:
        files = [directory / WEIGHTS_FILE]
    for file in files:
        if not file.is_file():
            raise MissingFileError(
                f"{file} does not exist: the model's weights are missing; copy the whole model directory again "
                "(or re-export the run: blockdiff export RUN_DIR OUT_DIR)"
            )
        try:
            with safe_open(str(file), framework="pt") as reader:
                reader.keys()
        except (SafetensorError, OSError) as err:
            raise UsageError(
                f"{file} is not a readable safetensors file ({err}): it is empty, truncated or corrupt; copy it again "
                "(or re-export the run: blockdiff export RUN_DIR OUT_DIR)"
            ) from None
    return files


def load_backbone(directory: Path, config: PreTrainedConfig, attn_implementation: str, **hf_kwargs) -> PreTrainedModel:
    """The decoder built from ``config`` with the weights of ``directory``; every weight must match the config."""
    files = check_weight_files(directory)
    backbone, info = AutoModelForCausalLM.from_pretrained(
        directory, config=config, attn_implementation=attn_implementation, trust_remote_code=False,
        use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, **hf_kwargs,
    )
    problems = []
    if info.get("missing_keys"):
        keys = sorted(info["missing_keys"])
        problems.append(f"{len(keys)} weight(s) the config needs are not in the file (e.g. {keys[:2]})")
    if info.get("unexpected_keys"):
        keys = sorted(info["unexpected_keys"])
        problems.append(f"{len(keys)} weight(s) in the file have no place in the config's network (e.g. {keys[:2]})")
    if info.get("mismatched_keys"):
        key, in_file, wanted = sorted(info["mismatched_keys"])[0][:3]
        problems.append(
            f"{len(info['mismatched_keys'])} weight(s) have another shape (e.g. {key}: {tuple(in_file)} in the file, "
            f"{tuple(wanted)} by the config)"
        )
    if problems:
        raise UsageError(
            f"{directory / CONFIG_FILE} does not describe the weights in {', '.join(f.name for f in files)}: "
            f"{'; '.join(problems)}. The config was edited or comes from another model; restore the config.json "
            "written with the weights"
        )
    return backbone


def load_generation_config(path: Path, block_length: int) -> BlockDiffusionGenerationConfig:
    read_json_file(path)  # a clear error naming the file for bad JSON / UTF-8
    try:
        config = BlockDiffusionGenerationConfig.from_pretrained(path.parent, config_file_name=path.name)
        config.check(block_length)
    except (UsageError, ValueError, TypeError, OSError) as err:
        raise UsageError(f"{path}: {err}; fix or delete the file (the defaults apply without it)") from None
    return config


def honour_umask(directory: Path) -> None:
    """Give the safetensors files of ``directory`` the mode the umask gives new files (safetensors writes through a
    private temporary file, so its output is owner-only, 0600, whatever the umask)."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    for weights in directory.glob("*.safetensors"):
        os.chmod(weights, 0o666 & ~mask)


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
