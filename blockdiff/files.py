"""Small file helpers: writes that never leave a half-written file behind, and JSON reads whose errors name the
file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from blockdiff.errors import MissingFileError, UsageError

__all__ = ["read_json_file", "write_text_atomic", "write_failure_reason"]


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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file in the same directory, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
