"""Checkpoints that cannot hurt you: atomic writes, a kept previous file, safe and explained loading.

``SafeCheckpointIO`` is a Lightning ``CheckpointIO`` plugin (``Trainer(plugins=[SafeCheckpointIO()])``):

* **atomic writes** — the checkpoint is written to ``NAME.tmp`` *in the same directory*, flushed to disk
  (``fsync``) and renamed over ``NAME``; a crash or a full disk mid-save leaves the old ``NAME`` intact
  and no half-written file under the real name. (Lightning's own ``_atomic_save`` serialises to memory
  and then writes through an ``fsspec`` transaction whose temporary file lives in the system temp dir:
  when that is another file system the final "move" is a copy, which is not atomic, and nothing is
  fsynced.)
* **the previous checkpoint is kept** — before ``last.ckpt`` is replaced, the current one is hard-linked
  (or copied) to ``prev.ckpt``, so one bad file never costs the run;
* **no non-finite weights** — weights, EMA weights or optimiser moments holding NaN/Inf are refused before
  anything is written;
* **safe loading** — every load uses ``torch.load(weights_only=True)``: tensors and plain data only, a
  pickled object that would run code is refused; a truncated or corrupted file raises
  ``CheckpointError`` naming the file (and the previous checkpoint, if it is readable).

Which checkpoint a ``--resume`` continues from (and the fallback to ``prev.ckpt``) is ``resume.py``.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from blockdiff.errors import StorageError, UserError
from blockdiff.files import write_failure_reason
from blockdiff.modeling.rundir import CHECKPOINTS, LAST, PREV

__all__ = [
    "CheckpointError",
    "SafeCheckpointIO",
    "load_checkpoint",
    "atomic_torch_save",
    "copy_into_place",
    "previous_of",
]


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used (unreadable, corrupted, unsafe, or holding NaN); the message names the file."""


def previous_of(path: Path) -> Path:
    """Where the checkpoint replaced by a write to ``path`` is kept (``last.ckpt`` -> ``prev.ckpt``)."""
    return path.with_name(PREV) if path.name == LAST else path.with_name(path.stem + ".prev" + path.suffix)


def _non_finite(obj: Any, prefix: str = "") -> str | None:
    """The key of the first floating-point tensor holding NaN/Inf in a nested state, or ``None``."""
    if isinstance(obj, torch.Tensor):
        return prefix if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def copy_into_place(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source`` (a hard link where possible), atomically."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path.tmp`` in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        reason = write_failure_reason(err)
        if reason is not None:
            raise StorageError(
                getattr(err, "errno", None) or errno.EIO,
                f"could not write checkpoint {path} ({reason}); nothing was replaced: "
                + (
                    f"the previous {path.name} is intact. Free some space and resume with `blockdiff train --resume`"
                    if path.exists()
                    else "no checkpoint existed yet, so there is nothing to resume. Free some space (or choose another "
                    "trainer.out_dir) and start the run again"
                ),
            ) from None
        raise
    if path.exists():  # keep the checkpoint being replaced, without a moment where `path` is missing
        copy_into_place(path, previous_of(path))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _torch_reason(err: BaseException) -> str:
    """What torch found wrong, without its advice to retry with ``weights_only=False`` (which runs pickled code)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch colours part of its message
    found = re.search(r"WeightsUnpickler error: (.*?\.)(\s|$)", text)  # "Unsupported global: GLOBAL x.Y was not ..."
    if found:
        return found.group(1).rstrip(".")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    kept = [p for p in paragraphs if "weights_only" not in p and "torch.load" not in p]
    return " ".join(kept[0].split()).rstrip(".") if kept else type(err).__name__


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False, hint_previous: bool = True
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any failure is a ``CheckpointError`` naming the file.

    ``mmap=True`` maps tensors from the file instead of reading them (cheap validation of a large file).
    The message says what the file is: missing, a directory, not a regular file, empty, truncated or not a
    checkpoint at all (not the zip archive ``torch.save`` writes), corrupted inside, or holding pickled objects
    that are refused. It never suggests ``weights_only=False``. With ``hint_previous`` (and a ``prev.ckpt`` beside it)
    it names the previous checkpoint to resume from (a caller that falls back to it itself passes ``False``).
    """
    from blockdiff.config import path_problem

    path = Path(path)
    problem = path_problem(path)
    if problem is not None:
        fix = f"; pass the .ckpt file (e.g. RUN/{CHECKPOINTS}/{LAST})" if path.is_dir() else ""
        raise CheckpointError(f"checkpoint {path} {problem}{fix}")
    hint = ""
    prev = previous_of(path)
    if hint_previous and prev.is_file() and prev != path:
        hint = (
            f"; the previous checkpoint {prev} may still be good: resume from it with `blockdiff train --resume {prev}`"
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated, or not a checkpoint at all{hint}")
    if not zipfile.is_zipfile(path):  # torch.save (and so Lightning) has written zip archives since torch 1.6
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted, or not a checkpoint at all: its {size} "
            f"byte{'s' if size > 1 else ''} "
            f"are not the zip archive torch.save writes{hint}"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects other than tensors and plain data, which "
                f"could run code when unpickled ({_torch_reason(err)}). blockdiff never unpickles arbitrary objects; "
                "a checkpoint it wrote holds none" + hint
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupted ({_torch_reason(err)}){hint}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({_torch_reason(err)}){hint}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint {path} does not hold a Lightning checkpoint (a dict), got {type(checkpoint).__name__}"
        )
    return checkpoint


class SafeCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO``: atomic, finite-only writes that keep the previous file; ``weights_only`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO does not take storage_options")
        states = {
            key: checkpoint[key]
            for key in ("state_dict", "current_model_state", "optimizer_states")
            if key in checkpoint
        }
        bad = _non_finite(
            states
        )  # weights, EMA / raw weights, optimiser moments (not e.g. ModelCheckpoint's inf scores)
        if bad is not None:
            raise CheckpointError(
                f"refusing to write {path}: weight {bad!r} is NaN/Inf; the last good checkpoint is kept"
            )
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # weights_only is always True here, whatever the caller asked for.
        return load_checkpoint(path, map_location=map_location or "cpu")

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)
