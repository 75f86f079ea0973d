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

__all__ = [
    "UserError",
    "UsageError",
    "MissingFileError",
    "WouldOverwriteError",
    "StorageError",
    "MissingPackageError",
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
