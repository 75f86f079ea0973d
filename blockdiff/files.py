"""Small file helpers: writes that never leave a half-written file behind, follow the umask, and never replace a
file the user did not ask to replace; JSON reads whose errors name the file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from blockdiff.errors import MissingFileError, UsageError, WouldOverwriteError

__all__ = [
    "read_json_file", "write_text_atomic", "atomic_path", "new_file_mode", "check_output_file", "write_failure_reason",
    "path_problem",
]


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


def new_file_mode() -> int:
    """The mode the umask gives a new file (``0o644`` under the usual ``022``)."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s directory to write to; renamed over ``path`` (with the umask's mode) when the
    block ends without an error, removed otherwise: ``path`` is never half-written. The temporary name keeps
    ``path``'s suffix (``.x.gif.tmp.gif``) for writers that pick a format by it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, new_file_mode())  # mkstemp makes it 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file in the same directory, then rename it over ``path`` (mode per the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_output_file(path: str | Path, flag: str, overwrite: bool = False, inputs: Iterable[str | Path] = (),
                      suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, to write the file ``path`` (given as ``flag``) where that would lose something:
    one of the command's ``inputs`` (whatever the flags), a directory, a folder that does not exist (it is not
    created), a name without one of ``suffixes``, or an existing file unless ``overwrite``. Returns ``path``.

    The rule for an existing file is the simple one: refuse it unless ``--overwrite``, even when an earlier run of
    the same command wrote it (no record says who wrote a file, so none is trusted)."""
    path = Path(path)
    shown = f"{flag} {path}" if flag else str(path)
    for given in inputs:
        if os.path.abspath(given) == os.path.abspath(path) or (path.exists() and _same_file(path, Path(given))):
            raise WouldOverwriteError(f"{shown} is this command's input {given}; choose another output name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{shown}: the file name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise UsageError(f"{shown} is a directory; give a file name such as {path / ('out' + (suffixes or ('',))[0])}")
    parent = path.parent
    if not parent.is_dir():
        raise MissingFileError(f"{shown}: the folder {parent} does not exist; create it first or choose another path")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise WouldOverwriteError(
            f"{shown} already exists; pass --overwrite to replace it (needed too when re-running the same command), "
            "or choose another name"
        )
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


_WRITE_FAILURES = ("unexpected pos", "failed writing", "file write failed", "i/o error", "os error", "no space left")


def write_failure_reason(err: BaseException) -> str | None:
    """Why a write failed when ``err`` is the disk refusing it (full, over quota, read-only), else ``None``.

    ``torch.save`` reports a full disk as a ``RuntimeError`` ("unexpected pos ...") and safetensors as a
    ``SafetensorError`` ("I/O error: ..."), not as ``OSError``; this recognises all three.
    """
    if isinstance(err, OSError):
        return os.strerror(err.errno) if err.errno else str(err)
    text = str(err).lower()
    if isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError":
        if any(marker in text for marker in _WRITE_FAILURES):
            return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def path_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file, as the end of a sentence (``f"{path} {problem}"``); ``None`` if it is one."""
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if path.is_symlink() else "does not exist"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "special")
        return f"is not a regular file ({kind})"
    return None
