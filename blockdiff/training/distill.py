"""Self-distillation data: a teacher's own continuations of corpus prompts, written as a resumable distilled set.

Speculative drafts are accepted when they match the AR model's own choices, so a drafter / block diffuser learns
best from the base model's continuations rather than from the corpus text (docs/design.md §9). ``distill``:

1. packs the corpus exactly as ``blockdiff finetune --base TEACHER`` with the same ``data.*`` keys would (the
   teacher's tokenizer plus the special tokens a fine-tune adds, ``data.max_seq_len`` windows, the held-out tail of
   ``data.val_fraction``), and takes prompts only from the *training* windows: the first ``prompt_tokens`` tokens
   (those the teacher knows) of ``num_prompts`` windows drawn in a seeded order. The held-out tail is never read;
2. continues every prompt with the teacher's HF ``generate()`` — batched with left padding, greedy
   (temperature 0) and/or plain sampling at each temperature (no top-k / top-p), up to ``new_tokens`` or EOS;
3. writes the rows shard by shard (``blockdiff/data/distilled.py`` has the layout): a shard is written under a
   temporary name and renamed when complete, so a stopped run resumes at the first missing shard and a half-written
   one is never used. Each (shard, temperature) samples from its own seeded stream, so a resumed set equals an
   uninterrupted one. The manifest is written first; a resume must match it (``DistillSettings``).

What it does not do: train (``data.source=distilled:DIR`` does, through ``load_documents``), or decide the output
directory's fate beyond the one rule — only a distilled set is ever replaced (``--overwrite``), never a folder
holding anything else.

Shape legend: ``b`` batch (prompts of one ``generate`` call), ``p`` prompt tokens (the longest in the batch),
``m`` new tokens.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import datasets
import torch

from blockdiff.config import DataConfig
from blockdiff.data.corpus import load_documents, pack_documents
from blockdiff.data.distill_store import check_resume, clear_unfinished, plan_out_dir, remove_new_set, write_shard
from blockdiff.data.distilled import (
    MANIFEST,
    DistillSettings,
    finished_shards,
    is_distilled_source,
    tokenizer_fingerprint,
)
from blockdiff.errors import MissingFileError, UsageError
from blockdiff.files import write_text_atomic
from blockdiff.modeling.device import resolve_device
from blockdiff.modeling.spec import SPEC_FILE
from blockdiff.modeling.tokenizer import ensure_special_tokens

__all__ = ["Progress", "DistillResult", "check_settings", "select_prompts", "generate_continuations", "distill"]

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class DistillResult:
    out_dir: Path
    settings: DistillSettings
    rows: int  # continuations in the whole set (num_prompts x temperatures)
    rows_written: int  # continuations this command generated and wrote
    shards_written: int  # by this command
    shards_skipped: int  # already finished before it
    seconds: float  # generating and writing shards in this command (loading the teacher and corpus excluded)
    generated_tokens: int  # continuation tokens this command generated


def check_settings(settings: DistillSettings) -> None:
    """Every number a user gives, checked before any work (phrased with the command-line flag)."""
    for flag, value in (
        ("--num-prompts", settings.num_prompts), ("--prompt-tokens", settings.prompt_tokens),
        ("--new-tokens", settings.new_tokens), ("--batch-size", settings.batch_size),
        ("--shard-size", settings.shard_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{flag} must be an integer >= 1, got {value!r}")
    temps = settings.temperatures
    if not temps:
        raise UsageError("give at least one --temperature (0 = greedy)")
    bad = [t for t in temps if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {bad[0]}")
    if len(set(temps)) != len(temps):
        raise UsageError(f"--temperature values must differ, got {list(temps)}")
    source = str(settings.corpus.get("source", ""))
    if is_distilled_source(source):
        raise UsageError(
            f"data.source={source} is a distilled set; distil from a text corpus (e.g. data.source=shakespeare)"
        )
    prompt_max = settings.corpus.get("max_seq_len")
    if prompt_max is not None and settings.prompt_tokens > prompt_max:
        raise UsageError(
            f"--prompt-tokens {settings.prompt_tokens} is longer than the corpus windows prompts are cut from "
            f"(data.max_seq_len={prompt_max}); use --prompt-tokens <= {prompt_max}"
        )


def _local_or_name(name: str) -> str:
    """A local path made absolute (so a resume from another directory matches), anything else as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _corpus_keys(data: DataConfig) -> dict:
    """The ``data.*`` keys that decide which windows are training windows (the tokenizer is the teacher's)."""
    return {
        "source": _local_or_name(data.source), "hub_config": data.hub_config, "text_column": data.text_column,
        "max_documents": data.max_documents, "max_seq_len": data.max_seq_len, "val_fraction": data.val_fraction,
    }


# -- the output directory: new, ours to resume, or ours to replace ----------------------------------------------------


# -- prompts and continuations ----------------------------------------------------------------------------------------


def select_prompts(
    train_windows: datasets.Dataset, known: int, num_prompts: int, prompt_tokens: int, seed: int
) -> list[tuple[int, list[int]]]:
    """``(window index, prompt ids)`` for ``num_prompts`` training windows in a seeded order: each window's first
    ``prompt_tokens`` tokens with an id below ``known`` (special tokens a fine-tune adds are not the teacher's)."""
    order = torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = []
    for w in order:
        ids = [t for t in train_windows[w]["input_ids"].tolist() if t < known][:prompt_tokens]
        if ids:
            chosen.append((w, ids))
        if len(chosen) == num_prompts:
            break
    return chosen


@torch.no_grad()
def generate_continuations(
    model, prompts: list[list[int]], new_tokens: int, temperature: float, eos_ids: list[int], pad_id: int,
    suppress: list[int] = (),
) -> list[tuple[list[int], bool]]:
    """``(continuation ids, finished)`` per prompt from one left-padded ``model.generate`` call: greedy at temperature
    0, else plain sampling at ``temperature`` (no top-k / top-p) from the global torch RNG. A continuation is cut after
    its first EOS (kept); ``finished`` says it reached one. ``suppress``: token ids never generated (the teacher
    tokenizer's mask token: a block diffuser cannot train on text that holds it)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (b, p), left-padded
    attention = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        attention[i, width - len(prompt):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False
    }
    out = model.generate(
        input_ids=ids.to(device), attention_mask=attention.to(device), max_new_tokens=new_tokens, min_new_tokens=0,
        eos_token_id=eos_ids, pad_token_id=pad_id, suppress_tokens=list(suppress) or None, **sampling,
    )  # (b, p + up to m)
    results = []
    for row in out[:, width:].tolist():
        end = next((j + 1 for j, t in enumerate(row) if t in eos_ids), None)
        results.append((row[:end] if end is not None else row, end is not None))
    return results


def _stream_seed(seed: int, shard: int, setting: int) -> int:
    """The sampling seed of one (shard, temperature): independent of every other and of how many ran before."""
    digest = hashlib.sha256(f"blockdiff-distill/{seed}/{shard}/{setting}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -- the recipe ------------------------------------------------------------------------------------------------------


def _load_teacher(name: str, device: torch.device):
    """``(model, tokenizer)``: a plain causal LM in eval mode, refusing a blockdiff model (a block diffuser is not an
    autoregressive teacher)."""
    from blockdiff.modeling.pretrained import load_decoder  # loads transformers' model classes: only when needed

    path = Path(name).expanduser()
    if not path.exists() and name.startswith((".", "/", "~")):  # a path, not a hub id
        raise MissingFileError(f"--teacher {name}: no such file or directory")
    if (path / SPEC_FILE).is_file() or (path / "model" / SPEC_FILE).is_file():
        raise UsageError(
            f"--teacher {name} is a blockdiff model (a block diffuser), not an autoregressive decoder; give the AR "
            "model it was fine-tuned from (its model.pretrained), e.g. --teacher smollm2"
        )
    model, tokenizer, _ = load_decoder(name, what="--teacher")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UsageError(
            f"--teacher {name}: its tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows"
        )
    return model.to(device).eval(), tokenizer


def _special_ids(model, tokenizer) -> tuple[list[int], int, list[int]]:
    """``(eos ids, pad id, suppressed ids)``: EOS and padding as the teacher's own ``generate()`` uses them
    (generation config, else tokenizer), and its tokenizer's mask token where the model can emit it (a teacher that
    is a block diffuser's AR parent, written out as a plain decoder, has one; no training text may hold it)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    mask = getattr(tokenizer, "mask_token_id", None)
    rows = model.get_output_embeddings().weight.shape[0]
    return eos_ids, int(pad), [mask] if mask is not None and mask < rows else []


def _check_positions(model, settings: DistillSettings) -> None:
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and settings.prompt_tokens + settings.new_tokens > positions:
        raise UsageError(
            f"--prompt-tokens {settings.prompt_tokens} + --new-tokens {settings.new_tokens} exceeds the {positions} "
            f"positions of --teacher {settings.teacher}"
        )


def _training_prompts(data: DataConfig, tokenizer, settings: DistillSettings) -> list[tuple[int, list[int]]]:
    """The prompts, from the training windows of the corpus packed as a fine-tune on the teacher packs it."""
    packing = copy.deepcopy(tokenizer)
    ensure_special_tokens(packing)  # what a fine-tune on the teacher adds: the split is the same as that run's
    corpus = pack_documents(load_documents(data), packing, data.max_seq_len, data.val_fraction)
    if settings.num_prompts > len(corpus.train):
        raise UsageError(
            f"--num-prompts {settings.num_prompts} is more than the {len(corpus.train)} training windows of "
            f"data.source={data.source} (data.max_seq_len={data.max_seq_len}; the held-out tail is never used); use "
            f"--num-prompts <= {len(corpus.train)}, more text, or a smaller data.max_seq_len"
        )
    prompts = select_prompts(corpus.train, len(tokenizer), settings.num_prompts, settings.prompt_tokens, settings.seed)
    if len(prompts) < settings.num_prompts:
        raise UsageError(
            f"only {len(prompts)} training windows hold tokens the teacher knows; use --num-prompts <= {len(prompts)}"
        )
    return prompts


def distill(
    teacher: str,
    data: DataConfig,
    out_dir: str | Path,
    *,
    temperatures: tuple[float, ...] = (0.0,),
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    num_prompts: int = 256,
    batch_size: int = 16,
    shard_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> DistillResult:
    """Write (or finish) the distilled set ``out_dir``: ``num_prompts`` training-split prompts of ``data``'s corpus,
    each continued by ``teacher`` once per temperature.

    Phases: check the settings and ``out_dir`` -> load the teacher -> pack the corpus and pick the prompts -> write
    the manifest (a new set) or check it (a resume) -> generate and write each missing shard.
    """
    out_dir = Path(out_dir)
    asked = DistillSettings(
        teacher=_local_or_name(teacher), tokenizer={}, temperatures=tuple(float(t) for t in temperatures),
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, num_prompts=num_prompts, seed=seed, shard_size=shard_size,
        batch_size=batch_size, corpus=_corpus_keys(data),
    )
    check_settings(asked)
    plan = plan_out_dir(out_dir, overwrite, asked)  # before the slow part
    device = resolve_device(device)
    model, tokenizer = _load_teacher(teacher, device)
    settings = replace(asked, tokenizer=tokenizer_fingerprint(tokenizer))
    _check_positions(model, settings)
    prompts = _training_prompts(data, tokenizer, settings)
    _open_set(out_dir, plan, overwrite, asked, settings)

    done = finished_shards(out_dir)
    start, written, rows_written, generated = time.monotonic(), 0, 0, 0
    total = len(prompts) * len(settings.temperatures)
    rows_done = sum(len(_shard(prompts, settings, i)) for i in done) * len(settings.temperatures)

    def on_batch(size: int) -> None:
        nonlocal rows_done
        rows_done += size
        if progress is not None:
            progress("distilling", rows_done, total)

    try:
        for index in range(settings.num_shards):
            if index in done:
                continue
            rows, tokens = _distill_shard(model, tokenizer, prompts, settings, index, device, on_batch)
            generated += tokens
            write_shard(out_dir, index, rows)
            written += 1
            rows_written += len(rows)
    finally:
        if plan != "resume" and not finished_shards(out_dir):
            remove_new_set(out_dir)  # a new set that never finished a shard holds nothing to resume
    return DistillResult(
        out_dir=out_dir, settings=settings, rows=total, rows_written=rows_written, shards_written=written,
        shards_skipped=len(done), seconds=time.monotonic() - start, generated_tokens=generated,
    )


def _open_set(out_dir: Path, plan: str, overwrite: bool, asked: DistillSettings, settings: DistillSettings) -> None:
    """Make ``out_dir`` ready for the missing shards: a resume is checked again (now with the teacher's tokenizer)
    and loses its half-written shards; a new or replaced set gets its manifest first."""
    if plan == "resume":
        check_resume(out_dir, settings)
        clear_unfinished(out_dir)
        return
    plan_out_dir(out_dir, overwrite, asked)  # the folder may have changed while the teacher loaded
    if plan == "replace":
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / MANIFEST, settings.to_json())


def _distill_shard(model, tokenizer, prompts, settings: DistillSettings, index: int, device, on_batch):
    """The rows of shard ``index`` (prompt by prompt, settings in order) and the tokens generated; each temperature
    samples from its own seeded stream, so the shard is the same whether or not earlier shards ran here."""
    eos_ids, pad_id, suppress = _special_ids(model, tokenizer)
    rows, generated = [], 0
    for setting, temperature in enumerate(settings.temperatures):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_stream_seed(settings.seed, index, setting))
            for batch in _batches(_shard(prompts, settings, index), settings.batch_size):
                outs = generate_continuations(
                    model, [ids for _, _, ids in batch], settings.new_tokens, temperature, eos_ids, pad_id, suppress
                )
                for (order, window, ids), (continuation, finished) in zip(batch, outs):
                    rows.append(_row(tokenizer, order, window, setting, temperature, ids, continuation, finished))
                    generated += len(continuation)
                on_batch(len(batch))
    rows.sort(key=lambda r: (r["prompt_index"], r["_setting"]))
    for r in rows:
        del r["_setting"]
    return rows, generated


def _shard(prompts: list[tuple[int, list[int]]], settings: DistillSettings, index: int) -> list[tuple[int, int, list]]:
    """``(prompt index, window, ids)`` of shard ``index``."""
    first = index * settings.shard_size
    return [(first + i, w, ids) for i, (w, ids) in enumerate(prompts[first : first + settings.shard_size])]


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _row(tokenizer, order, window, setting, temperature, prompt, continuation, finished) -> dict:
    return {
        "prompt_index": order, "window": window, "temperature": float(temperature), "prompt_ids": prompt,
        "continuation_ids": continuation, "finished": finished,
        "prompt_text": tokenizer.decode(prompt, skip_special_tokens=True),
        "continuation_text": tokenizer.decode(continuation, skip_special_tokens=True),
        "_setting": setting,  # the sort key of the shard's rows; removed before writing
    }
