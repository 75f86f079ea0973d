"""The run-directory layout, spelled once (``RunDir``), and the one rule for writing over a directory: never
delete what is not ours.

A run directory (``trainer.out_dir``) holds exactly::

    config.yaml                 the resolved config
    checkpoints/last.ckpt       the newest checkpoint (checkpoints/prev.ckpt: the one before it)
    logs/metrics.csv            the CSV log
    tokenizer/                  the run's tokenizer
    model/                      the exported model (safetensors + blockdiff.json + tokenizer + train_config.yaml
                                + README.md, the model card)

Every other module names these paths through ``RunDir`` (or the constants below), never as literals.

``prepare_run_dir`` and ``replace_dir`` are the only places that remove a directory. They replace a
directory only when asked to (``--overwrite``) *and* when it is recognisably a blockdiff run / model
export holding nothing else; a folder with the user's own files in it is refused, whatever the flags.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from blockdiff.errors import StorageError, WouldOverwriteError
from blockdiff.modeling.spec import SPEC_FILE  # a model export is a folder with a spec file (model.py writes it)

__all__ = [
    "CONFIG", "CHECKPOINTS", "LOGS", "METRICS", "MODEL", "TOKENIZER", "LAST", "PREV", "TRAIN_CONFIG",
    "MODEL_CARD", "RunDir", "model_dir_of",
    "is_model_dir", "is_run_dir", "check_new_run_dir", "prepare_run_dir", "check_replaceable", "staging_dir",
    "replace_dir",
]

CONFIG, CHECKPOINTS, LOGS, MODEL, TOKENIZER = "config.yaml", "checkpoints", "logs", "model", "tokenizer"  # in a run
METRICS = "metrics.csv"  # under LOGS: the CSV log (Lightning's CSVLogger names it)
LAST, PREV = "last.ckpt", "prev.ckpt"  # under CHECKPOINTS: the newest checkpoint and the one it replaced
TRAIN_CONFIG = "train_config.yaml"  # in a model export: the config it was trained with
MODEL_CARD = "README.md"  # in a model export: the model card (modeling/model_card.py)

# What a model export (or a tokenizer folder) is made of: flat files of these kinds, nothing else.
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".yaml", ".jinja", ".tiktoken")
_RUN_ENTRIES = {CONFIG, CHECKPOINTS, LOGS, MODEL, TOKENIZER}


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory; builds paths only, never touches the disk."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, path: str | Path) -> "RunDir":
        """The run a ``--resume PATH`` names: the directory itself, or ``RUN`` for ``RUN/checkpoints/x.ckpt``."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            return cls(path)
        return cls(path.parent.parent if path.parent.name == CHECKPOINTS else path.parent)

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST

    @property
    def prev_checkpoint(self) -> Path:
        return self.checkpoints / PREV

    @property
    def logs(self) -> Path:
        return self.root / LOGS

    @property
    def metrics(self) -> Path:
        return self.logs / METRICS

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER

    @property
    def model(self) -> Path:
        return self.root / MODEL


def model_dir_of(path: str | Path) -> Path:
    """The model export a path names: a model directory itself, or a run directory's ``model/``."""
    path = Path(path)
    return RunDir(path).model if (RunDir(path).model / SPEC_FILE).is_file() else path


def _foreign_files(directory: Path) -> list[str]:
    """Entries of a would-be model/tokenizer folder that such a folder never holds (subfolders, other files)."""
    return sorted(
        p.name for p in directory.iterdir()
        if not (p.is_file() and (p.name.endswith(_MODEL_FILE_SUFFIXES) or p.name == MODEL_CARD))
    )


def is_model_dir(directory: str | Path) -> bool:
    """A blockdiff model export: ``blockdiff.json`` next to the weights, and only files such an export holds."""
    directory = Path(directory)
    return directory.is_dir() and (directory / SPEC_FILE).is_file() and not _foreign_files(directory)


def _run_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a blockdiff run directory, or ``None`` when it is one."""
    names = {p.name for p in directory.iterdir()}
    foreign = sorted(names - _RUN_ENTRIES)
    if foreign:
        return f"it holds {', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}"
    if CONFIG not in names:
        return f"it has no {CONFIG}"
    checkpoints = directory / CHECKPOINTS
    if checkpoints.is_dir():
        other = sorted(p.name for p in checkpoints.iterdir() if not (p.is_file() and ".ckpt" in p.name))
        if other:
            return f"{CHECKPOINTS}/ also holds {', '.join(other[:5])}"
    for sub in (MODEL, TOKENIZER):
        if (directory / sub).is_dir() and _foreign_files(directory / sub):
            return f"{sub}/ also holds {', '.join(_foreign_files(directory / sub)[:5])}"
    return None


def is_run_dir(directory: str | Path) -> bool:
    """A blockdiff run directory (the layout above) holding nothing else."""
    directory = Path(directory)
    return directory.is_dir() and _run_dir_problem(directory) is None


def check_new_run_dir(run_dir: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse, before any work, a ``trainer.out_dir`` a new run may not be written to (changes nothing on disk)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise WouldOverwriteError(
            f"trainer.out_dir={str(run_dir)!r} is a file, not a directory; choose another trainer.out_dir"
        )
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    problem = _run_dir_problem(run_dir)
    if problem is not None:
        raise WouldOverwriteError(
            f"trainer.out_dir={str(run_dir)!r} is not empty and is not a blockdiff run ({problem}); nothing was "
            "deleted. Choose another trainer.out_dir"
        )
    if not overwrite:
        raise WouldOverwriteError(
            f"trainer.out_dir={str(run_dir)!r} already holds a run; choose another trainer.out_dir, continue it with "
            f"`blockdiff train --resume {run_dir}`, or pass {flag} to replace it"
        )


def prepare_run_dir(run_dir: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Create ``run_dir`` for a new run; an existing non-empty one is replaced only with ``overwrite`` and only if
    it is a blockdiff run holding nothing else."""
    check_new_run_dir(run_dir, overwrite, flag)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def check_replaceable(out_dir: Path, overwrite: bool, what: str = "model") -> None:
    """Refuse, before any work, to write a model over ``out_dir`` unless it is empty, absent, or (with ``overwrite``)
    a blockdiff model export holding nothing else."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WouldOverwriteError(f"{out_dir} is a file, not a directory; choose another output directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not is_model_dir(out_dir):
        foreign = _foreign_files(out_dir)
        detail = f"it holds {', '.join(foreign[:5])}" if foreign else f"it has no {SPEC_FILE}"
        raise WouldOverwriteError(
            f"{out_dir} is not empty and is not a blockdiff {what} directory ({detail}); nothing was written or "
            "deleted. "
            "Choose a new or empty output directory"
        )
    if not overwrite:
        raise WouldOverwriteError(
            f"{out_dir} already holds a blockdiff {what}; pass --overwrite to replace it, or choose another directory"
        )


def staging_dir(out_dir: Path) -> Path:
    """A fresh, uniquely named folder next to ``out_dir`` (same file system) to write into before ``replace_dir``."""
    out_dir = Path(os.path.abspath(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the export should have the user's usual permissions
    return tmp


def replace_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the complete ``tmp`` to ``out_dir``; an existing export there is swapped out and removed after the move.

    ``check_replaceable`` is applied again here, so a directory that changed since the check is still safe.
    """
    out_dir = Path(os.path.abspath(out_dir))
    check_replaceable(out_dir, overwrite)
    old = None
    try:
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
    except OSError as err:
        if old is not None and not out_dir.exists() and (old / out_dir.name).exists():
            os.replace(old / out_dir.name, out_dir)  # put the previous export back
        raise StorageError(
            err.errno, f"could not move the new model into {out_dir} ({err.strerror or err}); nothing was lost"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
