"""The run-directory layout, spelled once (``RunDir``), and the one rule for writing over a directory: never
delete what is not ours.

A run directory (``trainer.out_dir``) holds exactly::

    config.yaml                 the resolved config
    checkpoints/last.ckpt       the newest checkpoint (checkpoints/prev.ckpt: the one before it)
    logs/metrics.csv            the CSV log
    tokenizer/                  the run's tokenizer
    model/                      the exported model (safetensors + blockdiff.json + tokenizer + train_config.yaml
                                + README.md, the model card + export.json, the list of its files)
    plots/                      `blockdiff plot`'s figures (PNGs), when it was run

Every other module names these paths through ``RunDir`` (or the constants below), never as literals.

``prepare_run_dir`` and ``replace_dir`` are the only places that remove a directory. They replace a
directory only when asked to (``--overwrite``) *and* when it is recognisably a blockdiff run / model
export; a folder with the user's own files in it is refused, whatever the flags.

What a model export is comes from the export itself: it lists its files in ``EXPORT_MANIFEST``
(``export.json``). ``--overwrite`` deletes exactly those files; anything else in the folder stays (and a new
file that would replace one of them is refused). An export written before manifests is recognised only when
every file in it has a name an export writes (``_LEGACY_EXPORT_NAMES``), never by suffix. A symbolic link
given as the export folder is written through: the folder it points to is replaced, the link stays.
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
    "CONFIG", "CHECKPOINTS", "LOGS", "METRICS", "MODEL", "TOKENIZER", "PLOTS",
    "LAST", "PREV", "TRAIN_CONFIG",
    "MODEL_CARD", "EXPORT_MANIFEST", "RunDir", "model_dir_of", "export_files", "write_export_manifest", "export_target",
    "is_model_dir", "is_run_dir", "check_new_run_dir", "prepare_run_dir", "check_replaceable", "staging_dir",
    "replace_dir",
]

CONFIG, CHECKPOINTS, LOGS, MODEL, TOKENIZER = "config.yaml", "checkpoints", "logs", "model", "tokenizer"  # in a run
PLOTS = "plots"  # in a run: `blockdiff plot`'s PNGs
METRICS = "metrics.csv"  # under LOGS: the CSV log (Lightning's CSVLogger names it)
LAST, PREV = "last.ckpt", "prev.ckpt"  # under CHECKPOINTS: the newest checkpoint and the one it replaced
TRAIN_CONFIG = "train_config.yaml"  # in a model export: the config it was trained with
MODEL_CARD = "README.md"  # in a model export: the model card (modeling/model_card.py)
EXPORT_MANIFEST = "export.json"  # in a model export: the exact list of files the export wrote

# What a model export (or a tokenizer folder) is made of: flat files of these kinds, nothing else.
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".yaml", ".jinja", ".tiktoken")
_RUN_ENTRIES = {CONFIG, CHECKPOINTS, LOGS, MODEL, TOKENIZER, PLOTS}
# The names of every file an export wrote before it listed them in EXPORT_MANIFEST (weights shards aside)
_LEGACY_EXPORT_NAMES = {
    "config.json", "model.safetensors", "model.safetensors.index.json", SPEC_FILE, "blockdiff_generation_config.json",
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    TRAIN_CONFIG, MODEL_CARD,
}


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

    @property
    def plots(self) -> Path:
        return self.root / PLOTS


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


def _legacy_export_name(name: str) -> bool:
    return name in _LEGACY_EXPORT_NAMES or (name.startswith("model-") and name.endswith(".safetensors"))


def export_files(directory: str | Path) -> set[str] | None:
    """The files of the blockdiff model export in ``directory`` (its manifest included), or ``None`` when it holds
    none: those its ``EXPORT_MANIFEST`` lists, or for an export written before manifests, every file when each has a
    name an export writes (``None`` if any other entry is there: what is ours cannot be told apart)."""
    directory = Path(directory)
    if not (directory / SPEC_FILE).is_file():
        return None
    manifest = directory / EXPORT_MANIFEST
    if manifest.is_file():
        import json

        try:
            files = json.loads(manifest.read_text(encoding="utf-8")).get("files")
        except (ValueError, UnicodeDecodeError, AttributeError, OSError):
            return None
        if not isinstance(files, list) or not all(isinstance(f, str) and f and "/" not in f and f not in (".", "..")
                                                  for f in files):
            return None
        return {f for f in files if (directory / f).is_file()} | {EXPORT_MANIFEST}
    entries = list(directory.iterdir())
    if all(p.is_file() and _legacy_export_name(p.name) for p in entries):
        return {p.name for p in entries}
    return None


def write_export_manifest(directory: Path) -> None:
    """List the files of a complete export in ``directory`` (flat: an export has no subfolders) as its manifest."""
    import json

    from blockdiff.files import write_text_atomic

    files = sorted(p.name for p in Path(directory).iterdir() if p.is_file() and p.name != EXPORT_MANIFEST)
    record = {"written_by": "blockdiff export", "files": files}
    write_text_atomic(Path(directory) / EXPORT_MANIFEST, json.dumps(record, indent=1) + "\n")


def is_model_dir(directory: str | Path) -> bool:
    """A blockdiff model export: ``blockdiff.json`` next to the weights, with a manifest of its files (or, written
    before manifests, only files such an export holds). With a manifest, other files may sit next to it."""
    directory = Path(directory)
    return directory.is_dir() and export_files(directory) is not None


def export_target(out_dir: str | Path) -> Path:
    """Where an export named ``out_dir`` goes: ``out_dir`` itself, or the folder a symbolic link points to (written
    through, so the link stays a link); a broken link is refused."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        target = out_dir.resolve()
        if not target.exists():
            raise WouldOverwriteError(
                f"{out_dir} is a symbolic link to {target}, which does not exist; create that folder or remove the link"
            )
        return target
    return out_dir


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
    plots = directory / PLOTS
    if plots.exists():
        other = sorted(p.name for p in plots.iterdir() if not (p.is_file() and p.suffix == ".png")) \
            if plots.is_dir() else [PLOTS]
        if other:
            return f"{PLOTS}/ also holds {', '.join(other[:5])}"
    model = directory / MODEL
    if model.is_dir() and any(model.iterdir()):
        ours = export_files(model) or set()
        other = sorted(p.name for p in model.iterdir() if p.name not in ours)
        if other:
            return f"{MODEL}/ also holds {', '.join(other[:5])}"
    if (directory / TOKENIZER).is_dir() and _foreign_files(directory / TOKENIZER):
        return f"{TOKENIZER}/ also holds {', '.join(_foreign_files(directory / TOKENIZER)[:5])}"
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
    a blockdiff model export (its manifest's files are replaced; anything else in it stays)."""
    out_dir = export_target(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WouldOverwriteError(f"{out_dir} is a file, not a directory; choose another output directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not is_model_dir(out_dir):
        if (out_dir / SPEC_FILE).is_file() and not (out_dir / EXPORT_MANIFEST).is_file():
            others = sorted(p.name for p in out_dir.iterdir() if not (p.is_file() and _legacy_export_name(p.name)))
            raise WouldOverwriteError(
                f"{out_dir} holds a blockdiff export written before exports listed their files ({EXPORT_MANIFEST}) "
                f"together with {', '.join(others[:5])}, which an export never writes, so what is ours cannot be "
                "told apart; nothing was written or deleted. Move those files out (or export to a new folder)"
            )
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
    """Move the complete export in ``tmp`` to ``out_dir``. An earlier export there is replaced: as a whole when it
    holds nothing but its own files (swapped out, removed after the move), else file by file, so the files its
    manifest does not list stay; a new file that would replace one of those is refused before anything moves.

    ``check_replaceable`` is applied again here, so a directory that changed since the check is still safe.
    """
    out_dir = Path(os.path.abspath(export_target(out_dir)))
    check_replaceable(out_dir, overwrite)
    ours = export_files(out_dir) if out_dir.is_dir() and any(out_dir.iterdir()) else None
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in ours) if ours is not None else []
    clash = sorted(set(others) & {p.name for p in tmp.iterdir()})
    if clash:
        raise WouldOverwriteError(
            f"{out_dir} holds {', '.join(clash[:5])}, which the earlier export did not write and the new one would "
            "replace; nothing was written or deleted. Move those files out of the folder and export again"
        )
    old = None
    moved: list[str] = []
    try:
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        if not others:
            if old is not None:
                os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
        else:  # the user's files stay where they are: move ours aside, then the new ones in
            for name in sorted(ours):
                os.replace(out_dir / name, old / name)
            for p in sorted(tmp.iterdir(), key=lambda p: p.name == EXPORT_MANIFEST):  # the manifest last
                os.replace(p, out_dir / p.name)
                moved.append(p.name)
    except OSError as err:
        if old is not None and not others and not out_dir.exists() and (old / out_dir.name).exists():
            os.replace(old / out_dir.name, out_dir)  # put the previous export back
        elif old is not None and others:
            for name in moved:
                (out_dir / name).unlink(missing_ok=True)
            for p in old.iterdir():
                os.replace(p, out_dir / p.name)
        raise StorageError(
            err.errno, f"could not move the new model into {out_dir} ({err.strerror or err}); nothing was lost"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
