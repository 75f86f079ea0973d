"""Where a distilled set lives on disk: deciding what to do with ``--out`` (new, resume, replace — never delete a
folder that is not a distilled set), checking a resume against the manifest, and writing a shard atomically.
The layout itself (names, manifest, reader) is ``distilled.py``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import datasets

from blockdiff.data.distilled import (
    FEATURES,
    MANIFEST,
    SHARDS,
    DistilledSetError,
    DistillSettings,
    read_settings,
    shard_name,
)
from blockdiff.errors import WouldOverwriteError

__all__ = ["plan_out_dir", "check_resume", "clear_unfinished", "write_shard", "remove_new_set"]


_SHARD_DIR = re.compile(r"shard-\d{5}")
_SHARD_TMP = re.compile(r"\.shard-\d{5}\.tmp-.*")


def foreign_entries(out_dir: Path) -> list[str]:
    """Entries of ``out_dir`` a distilled set never holds."""
    found = [p.name for p in out_dir.iterdir() if p.name not in (MANIFEST, SHARDS)]
    shards = out_dir / SHARDS
    if shards.exists() and not shards.is_dir():
        found.append(SHARDS)
    elif shards.is_dir():
        found += [
            f"{SHARDS}/{p.name}" for p in shards.iterdir()
            if not (p.is_dir() and (_SHARD_DIR.fullmatch(p.name) or _SHARD_TMP.fullmatch(p.name)))
        ]
    if not (out_dir / MANIFEST).is_file():
        found.append(f"no {MANIFEST}")
    return sorted(found)


def plan_out_dir(out_dir: Path, overwrite: bool, asked: DistillSettings) -> str:
    """``"new"``, ``"resume"`` or ``"replace"`` for ``out_dir``; refuses (changing nothing) a folder that is not a
    distilled set, and one made with other settings unless ``overwrite``. ``asked.tokenizer`` is not compared here
    (the teacher is not loaded yet); ``check_resume`` compares it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise WouldOverwriteError(f"--out {out_dir} is a file, not a directory; choose another --out")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return "new"
    foreign = foreign_entries(out_dir)
    if foreign:
        raise WouldOverwriteError(
            f"--out {out_dir} is not empty and is not a distilled set ({', '.join(foreign[:5])}); nothing was deleted. "
            "Choose another --out"
        )
    if overwrite:
        return "replace"
    check_resume(out_dir, replace(asked, tokenizer=read_settings(out_dir).tokenizer))
    return "resume"


def check_resume(out_dir: Path, asked: DistillSettings) -> None:
    diffs = asked.differences(read_settings(out_dir))
    if diffs:
        raise DistilledSetError(
            f"--out {out_dir} holds a distilled set made with other settings — {'; '.join(diffs)}. Resume it with the "
            "same settings, choose another --out, or pass --overwrite to replace it"
        )


def clear_unfinished(out_dir: Path) -> None:
    """Remove shards a stopped run left half-written (only our own temporary names)."""
    shards = out_dir / SHARDS
    for p in shards.iterdir() if shards.is_dir() else ():
        if _SHARD_TMP.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)


def write_shard(out_dir: Path, index: int, rows: list[dict]) -> None:
    """Write a shard under a temporary name, then rename it: a shard directory exists only once complete."""
    shards = out_dir / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    final, tmp = shards / shard_name(index), shards / f".{shard_name(index)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        datasets.Dataset.from_list(rows, features=FEATURES).save_to_disk(str(tmp))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_new_set(out_dir: Path) -> None:
    """Remove what this command wrote into a new ``out_dir`` (the manifest, the shards folder), then the folder if it is
    left empty."""
    shutil.rmtree(out_dir / SHARDS, ignore_errors=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        out_dir.rmdir()
