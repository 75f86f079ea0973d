"""A distilled set on disk: the teacher's own continuations of corpus prompts, and how training reads them.

``blockdiff distill`` (``blockdiff/training/distill.py``) writes; this module only defines the layout and reads it::

    DIR/manifest.json          what the set was made with (``DistillSettings``): a resume must match it exactly
    DIR/shards/shard-00000/    one ``datasets`` dataset per shard of ``shard_size`` prompts (``save_to_disk``)
    DIR/shards/.shard-*.tmp-*  a shard being written (renamed to its real name when complete; never read)

One row per (prompt, temperature): ``prompt_ids`` (the first ``prompt_tokens`` tokens of a *training* window of the
corpus), ``continuation_ids`` (what the teacher generated, up to and including its EOS), their decoded texts,
``temperature`` (0 = greedy), ``window`` (the index of the training window the prompt came from) and ``finished``
(the teacher stopped at EOS before ``new_tokens``). The ids are the teacher's tokenizer's, so a model trained on
the set must use that tokenizer: ``check_tokenizer`` compares a fingerprint of its vocabulary.

``data.source=distilled:DIR`` makes ``load_documents`` return ``distilled_documents(DIR)``: one document per row,
``prompt_ids + continuation_ids``, with the manifest in the dataset's ``info.description`` so that
``pack_documents`` can check the tokenizer and use the ids as they are (no re-tokenisation of decoded text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import datasets

from blockdiff.errors import MissingFileError, UserError

__all__ = [
    "PREFIX", "MANIFEST", "SHARDS", "FORMAT", "FEATURES", "DistilledSetError", "DistillSettings",
    "is_distilled_source", "distilled_dir", "shard_name", "tokenizer_fingerprint", "read_settings",
    "finished_shards", "load_distilled", "distilled_documents", "manifest_of", "check_tokenizer",
]

PREFIX = "distilled:"  # data.source=distilled:DIR
MANIFEST, SHARDS = "manifest.json", "shards"
FORMAT = "blockdiff-distilled/1"  # written into the manifest; another value is not a set this code can read

FEATURES = datasets.Features({
    "prompt_index": datasets.Value("int64"),  # position in the seeded prompt order (0 .. num_prompts - 1)
    "window": datasets.Value("int64"),  # index of the training window the prompt is the start of
    "temperature": datasets.Value("float64"),  # 0 = greedy
    "prompt_ids": datasets.List(datasets.Value("int32")),
    "continuation_ids": datasets.List(datasets.Value("int32")),  # up to and including the teacher's EOS
    "finished": datasets.Value("bool"),  # the teacher emitted EOS (else it ran to new_tokens)
    "prompt_text": datasets.Value("string"),
    "continuation_text": datasets.Value("string"),
})


class DistilledSetError(UserError, ValueError):
    """A distilled set cannot be written or used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class DistillSettings:
    """Everything that decides a distilled set's contents: the manifest, compared field by field on resume."""

    teacher: str  # as given (an alias or hub id), or the absolute path of a local model
    tokenizer: dict  # tokenizer_fingerprint(teacher's tokenizer as published): name, vocab_size, sha256
    temperatures: tuple[float, ...]  # one continuation of every prompt per setting; 0 = greedy
    prompt_tokens: int
    new_tokens: int
    num_prompts: int
    seed: int  # the prompt order and the sampling streams
    shard_size: int  # prompts per shard
    batch_size: int  # prompts per generate() call (part of the recipe: sampling streams follow the batches)
    corpus: dict  # the data.* keys that decide the training split: source, hub_config, text_column, ...

    # the command-line name of each field, for messages
    FLAGS = {
        "teacher": "--teacher", "tokenizer": "the teacher's tokenizer", "temperatures": "--temperature",
        "prompt_tokens": "--prompt-tokens", "new_tokens": "--new-tokens", "num_prompts": "--num-prompts",
        "seed": "--seed", "shard_size": "--shard-size", "batch_size": "--batch-size",
    }

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_prompts / self.shard_size)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_dict(cls, record: dict, where: str) -> "DistillSettings":
        if record.get("format") != FORMAT:
            raise DistilledSetError(
                f"{where} is not a blockdiff distilled-set manifest of format {FORMAT} "
                f"(format={record.get('format')!r})"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in record]
        if missing:
            raise DistilledSetError(f"{where} lacks {', '.join(missing)}; it is damaged. Make the set again")
        values = {n: record[n] for n in names}
        values["temperatures"] = tuple(float(t) for t in values["temperatures"])
        return cls(**values)

    def differences(self, other: "DistillSettings") -> list[str]:
        """What differs from ``other`` (the stored set), one phrase per setting: ``--new-tokens: the set has 64, this
        command asks for 32``."""
        found = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if field.name == "corpus":
                keys = sorted(set(mine) | set(theirs))
                found += [
                    f"data.{k}: the set has {theirs.get(k)!r}, this command asks for {mine.get(k)!r}"
                    for k in keys if mine.get(k) != theirs.get(k)
                ]
            elif field.name == "tokenizer":  # the table decides, not where it was read from
                if (mine.get("vocab_size"), mine.get("sha256")) != (theirs.get("vocab_size"), theirs.get("sha256")):
                    found.append(
                        f"{self.FLAGS['tokenizer']}: the set has {theirs.get('name')} ({theirs.get('vocab_size')} "
                        f"tokens), this command's is {mine.get('name')} ({mine.get('vocab_size')} tokens, different)"
                    )
            elif mine != theirs:
                shown = (lambda v: list(v)) if field.name == "temperatures" else (lambda v: v)
                found.append(
                    f"{self.FLAGS[field.name]}: the set has {shown(theirs)!r}, this command asks for {shown(mine)!r}"
                )
        return found


def is_distilled_source(source: str) -> bool:
    return source.startswith(PREFIX)


def distilled_dir(source: str) -> Path:
    """The directory of ``data.source=distilled:DIR``."""
    path = source[len(PREFIX):].strip()
    if not path:
        raise DistilledSetError(
            f"data.source={source!r} names no directory; use data.source=distilled:DIR with the --out of "
            "`blockdiff distill`"
        )
    return Path(path).expanduser()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def tokenizer_fingerprint(tokenizer) -> dict:
    """``{"name", "vocab_size", "sha256"}`` of a tokenizer's token -> id table (added tokens included)."""
    vocab = tokenizer.get_vocab()
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "vocab_size": len(vocab),
        "sha256": _vocab_hash(vocab, len(vocab)),
    }


def _vocab_hash(vocab: dict[str, int], below: int) -> str:
    table = sorted((i, t) for t, i in vocab.items() if i < below)
    return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_settings(directory: Path) -> DistillSettings:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MissingFileError(
            f"{directory} is not a distilled set (it has no {MANIFEST}); make one with "
            f"`blockdiff distill --out {directory}`"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DistilledSetError(f"{path} cannot be read ({err}); it is damaged. Make the set again") from None
    if not isinstance(record, dict):
        raise DistilledSetError(f"{path} is not a JSON object; it is damaged. Make the set again")
    return DistillSettings.from_dict(record, str(path))


def finished_shards(directory: Path) -> set[int]:
    """Indices of the complete shards (a shard directory exists only once it is complete: written, then renamed)."""
    shards = Path(directory) / SHARDS
    if not shards.is_dir():
        return set()
    return {int(p.name.split("-")[1]) for p in shards.iterdir() if p.is_dir() and p.name.startswith("shard-")}


def load_distilled(directory: str | Path) -> tuple[datasets.Dataset, DistillSettings]:
    """``(rows, settings)`` of a complete distilled set; an unfinished one is an error saying how to finish it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(
            f"distilled set {directory} does not exist; make it with `blockdiff distill --out {directory}`"
        )
    settings = read_settings(directory)
    done = finished_shards(directory)
    missing = [i for i in range(settings.num_shards) if i not in done]
    if missing:
        raise DistilledSetError(
            f"distilled set {directory} is unfinished: {settings.num_shards - len(missing)} of {settings.num_shards} "
            "shards are written. Run the same `blockdiff distill` command again to finish it (it resumes)"
        )
    parts = [  # in memory: reading a set never writes cache files into it
        datasets.load_from_disk(str(directory / SHARDS / shard_name(i)), keep_in_memory=True)
        for i in range(settings.num_shards)
    ]
    return datasets.concatenate_datasets(parts), settings


def distilled_documents(source: str, max_documents: int | None = None) -> datasets.Dataset:
    """The documents of ``data.source=distilled:DIR``: columns ``text`` (decoded) and ``input_ids`` (prompt +
    continuation, the teacher's ids); the manifest travels in ``info.description`` (``manifest_of``)."""
    directory = distilled_dir(source)
    rows, settings = load_distilled(directory)
    if max_documents:
        rows = rows.select(range(min(max_documents, len(rows))))

    def document(batch):
        return {
            "text": [p + c for p, c in zip(batch["prompt_text"], batch["continuation_text"])],
            "input_ids": [p + c for p, c in zip(batch["prompt_ids"], batch["continuation_ids"])],
        }

    docs = rows.map(document, batched=True, remove_columns=rows.column_names, desc="distilled documents")
    docs.info.description = settings.to_json()
    return docs


def manifest_of(docs: datasets.Dataset) -> DistillSettings | None:
    """The settings of the distilled set ``docs`` came from, or ``None`` for text documents."""
    if "input_ids" not in docs.column_names:
        return None
    try:
        record = json.loads(docs.info.description or "")
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DistilledSetError("documents with token ids must come from data.source=distilled:DIR (no manifest found)")
    return DistillSettings.from_dict(record, "the distilled documents' manifest")


def check_tokenizer(settings: DistillSettings, tokenizer, source: str = "the distilled set") -> None:
    """Refuse a tokenizer whose first ``vocab_size`` ids are not exactly the teacher's (tokens added after them, such
    as the mask token a fine-tune adds, are fine)."""
    want = settings.tokenizer
    vocab = tokenizer.get_vocab()
    same = len(vocab) >= want["vocab_size"] and _vocab_hash(vocab, want["vocab_size"]) == want["sha256"]
    if not same:
        raise DistilledSetError(
            f"{source} holds token ids of the teacher's tokenizer ({settings.teacher}: {want['name']}, "
            f"{want['vocab_size']} tokens), but this run's tokenizer ({len(vocab)} tokens) is a different one. Train "
            f"with the teacher's tokenizer: `blockdiff finetune --base {settings.teacher}` (model.pretrained), or "
            f"data.tokenizer set to the teacher's tokenizer"
        )
