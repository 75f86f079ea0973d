"""The errors a user can fix: one base class, caught in one place (``cli.main``) and printed as plain text.

Every error raised because of what the user gave (a config value, a file, a flag, a prompt, the disk)
derives from ``UserError``; its message says what was wrong and how to fix it. The CLI prints it as one
line on stderr (exit status 2), never interpreting it as markup. Anything else — a ``ValueError`` from
deep inside torch, a bug of ours — is *not* a user error and keeps its traceback.

The concrete classes also derive from the built-in exception a Python caller would expect
(``ValueError``, ``FileNotFoundError``, ``FileExistsError``, ``OSError``, ``ModuleNotFoundError``), so
``except ValueError`` around a library call keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "UserError",
    "UsageError",
    "MissingFileError",
    "WouldOverwriteError",
    "StorageError",
    "MissingPackageError",
    "require_divides",
]


class UserError(Exception):
    """Something the user gave is wrong; ``str(err)`` says what and how to fix it."""


class UsageError(UserError, ValueError):
    """A bad argument or flag value (``--temperature nan``, ``max_new_tokens=0``, a string where a list belongs)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (or is not the kind of file it should be)."""


class WouldOverwriteError(UserError, FileExistsError):
    """Writing here would replace something that is not ours to replace (pass ``--overwrite`` where allowed)."""


class StorageError(UserError, OSError):
    """The disk refused a write (full, read-only, permissions); nothing half-written was left under the real name."""


class MissingPackageError(UserError, ModuleNotFoundError):
    """An optional package is needed; the message gives the install command."""


def require_divides(
    key: str, value: int | Iterable[int], total_key: str, total: int, error: type[Exception] = UsageError,
    note: str = "",
) -> None:
    """Raise ``error("KEY=VALUE must divide TOTAL_KEY=TOTAL" + note)`` unless ``value`` divides ``total``.

    The one phrasing of every "a block length must divide a length" check, so each names the key a user sets
    (``model.block_length=5 must divide data.max_seq_len=32``). ``value`` may be several numbers (the lengths
    of a block-length mixture): the message then lists those that do not divide, after ``key``.
    Values must be integers >= 1 (callers check that first).
    """
    several = not isinstance(value, int)
    values = list(value) if several else [value]
    bad = [v for v in values if total % v]
    if bad:
        shown = f"{key} {bad}" if several else f"{key}={value}"
        raise error(f"{shown} must divide {total_key}={total}{note}")
