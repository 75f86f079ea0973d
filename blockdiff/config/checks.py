"""``ConfigError`` and the checks every section shares (finite floats, int64 ranges, the seed range)."""

from __future__ import annotations

import dataclasses
import math

from blockdiff.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the key and how to fix it."""


_INT64_MAX = 2**63 - 1


def check_numbers(section: str, obj) -> None:
    """Every float field finite and every int field within int64 (what torch and the data loaders can hold)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > _INT64_MAX:
                raise ConfigError(f"{section}.{f.name}={v} is too large (at most {_INT64_MAX})")


SEED_MAX = 2**32 - 1
"""Largest seed: ``lightning.seed_everything`` and numpy take ``0 .. 2**32 - 1``; ``--seed`` and ``trainer.seed`` share
the range."""
