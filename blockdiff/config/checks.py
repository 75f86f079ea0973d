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


def check_at_most(section: str, obj, limits: dict[str, int], why: str) -> None:
    """Each named int field (``None`` skipped) at most its limit: larger sizes cannot be allocated (``why`` says so)."""
    for name, limit in limits.items():
        value = getattr(obj, name)
        if value is not None and value > limit:
            raise ConfigError(f"{section}.{name}={value} is too large: at most {limit} ({why})")


SIZE_LIMITS = {
    "hidden_size": 2**16,
    "intermediate_size": 2**18,
    "num_layers": 2**10,
    "num_heads": 2**10,
    "lora_rank": 2**16,
    "adapter_rank": 2**16,
}
"""Largest ``model.*`` sizes: a few times the largest published decoders (hidden 16384, MLP 53248, 126 layers, 128
heads); anything larger cannot be allocated on any machine."""

DATA_LIMITS = {"max_seq_len": 2**20, "bpe_vocab_size": 2**20, "batch_size": 2**20}
"""Largest ``data.*`` sizes (a context of a million tokens, a vocabulary of a million, a million sequences a step)."""

MAX_PARAMETERS = 10**12
"""Largest from-scratch network ``config validate`` accepts (a trillion parameters: 4 TB of fp32 weights)."""

LR_MAX = 1.0
"""Largest ``optim.lr``: AdamW steps each weight by about ``lr`` a step, so a larger one only diverges."""

SEED_MAX = 2**32 - 1
"""Largest seed: ``lightning.seed_everything`` and numpy take ``0 .. 2**32 - 1``; ``--seed`` and ``trainer.seed`` share
the range."""
