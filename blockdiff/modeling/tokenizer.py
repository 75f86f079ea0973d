"""Tokenizers: any Hugging Face tokenizer, plus two that need no download.

* ``bytes`` — 256 byte tokens (byte-level, lossless for any UTF-8 text), no training;
* ``bpe``   — a byte-level BPE trained with the ``tokenizers`` library on the training corpus
  (seconds on the Shakespeare corpus), small enough for tiny CPU models;
* anything else is passed to ``AutoTokenizer.from_pretrained`` (hub id or local directory).

All three come back as a ``PreTrainedTokenizerFast`` with BOS, EOS, PAD and a mask token, so the
rest of the package sees one type. ``ensure_special_tokens`` adds whatever a pretrained tokenizer
lacks and says so.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from blockdiff.errors import MissingFileError

__all__ = [
    "SPECIAL_TOKENS",
    "byte_tokenizer",
    "train_bpe",
    "load_tokenizer",
    "ensure_special_tokens",
    "build_tokenizer",
]

SPECIAL_TOKENS = {
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "pad_token": "<|pad|>",
    "mask_token": "<|mask|>",
}


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.model_max_length = 1 << 30  # packing decides lengths, not the tokenizer
    return fast


def _byte_level(model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (ids 0-255) followed by the four special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = _byte_level(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return _wrap(tok)


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``vocab_size`` entries (special tokens included) trained on ``texts`` (``show_progress``:
    the trainer's own progress bars on a terminal)."""
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def load_tokenizer(name_or_path: str, **kwargs) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer by hub id or local directory (never trusts remote code)."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **{"trust_remote_code": False, **kwargs})
    except OSError as err:
        raise MissingFileError(
            f"could not load tokenizer {name_or_path!r}: not a local directory and not reachable on the hub "
            f"(offline?). Use data.tokenizer=bpe or data.tokenizer=bytes to work offline. ({err})"
        ) from None


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add a mask token (and BOS/EOS/PAD) where the tokenizer has none; returns the names added.

    A model built on this tokenizer must have ``len(tokenizer)`` embedding rows.
    """
    missing = {k: v for k, v in SPECIAL_TOKENS.items() if getattr(tokenizer, k, None) is None}
    if "pad_token" in missing and tokenizer.eos_token is not None:  # the usual convention for decoders
        tokenizer.pad_token = tokenizer.eos_token
        del missing["pad_token"]
    if missing:
        tokenizer.add_special_tokens(missing)
    return sorted(missing)


def build_tokenizer(
    spec: str, texts: Iterable[str] = (), bpe_vocab_size: int = 2048, show_progress: bool = False
) -> PreTrainedTokenizerBase:
    """``bytes``, ``bpe`` (trained on ``texts``) or a Hugging Face name/path; always with a mask token."""
    if spec == "bytes":
        return byte_tokenizer()
    if spec == "bpe":
        return train_bpe(texts, bpe_vocab_size, show_progress)
    tokenizer = load_tokenizer(spec)
    ensure_special_tokens(tokenizer)
    return tokenizer
