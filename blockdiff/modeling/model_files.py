"""The files of a blockdiff model directory, read and checked: every error names the file and says how to fix it.

* ``config.json`` — ``BlockDiffusionConfig``: ``model_type: "blockdiff"`` with the decoder's own config as
  ``text_config``; directories written before it hold the decoder's config itself (both load);
* ``model.safetensors`` (or shards and an index) — the decoder's weights, checked before loading (an empty or
  truncated file fails its header check) and against the config (missing, unexpected or reshaped weights);
* ``blockdiff_generation_config.json`` — the generation defaults, checked like ``generate``'s arguments;
* any JSON file (``read_json_file``): undecodable UTF-8 or malformed JSON names the file.

``blockdiff.json`` (the ``BlockDiffusionSpec``) is read by ``model.py``, which assembles the model.
"""

from __future__ import annotations

import json
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
from blockdiff.sampling.config import BlockDiffusionGenerationConfig

__all__ = [
    "CONFIG_FILE", "WEIGHTS_FILE", "WEIGHTS_INDEX_FILE", "BlockDiffusionConfig", "read_json_file", "check_decoder_type",
    "backbone_config", "check_weight_files", "load_backbone", "load_generation_config", "honour_umask",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def read_json_file(path: str | Path) -> dict:
    """The JSON object in ``path``; a missing, non-UTF-8, malformed or non-object file is a user error naming it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise MissingFileError(f"{path} is a directory, not a JSON file") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): the file is damaged; "
                         "copy it again from where the model was written") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): the file is "
                         "damaged or truncated; copy it again from where the model was written") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


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
