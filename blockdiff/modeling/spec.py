"""``BlockDiffusionSpec``: what turns a decoder into a block diffuser (mask token, block length, logit shift,
training context, noise schedule and kind, clean-stream attention, drafting adapter), stored next to the weights as
``blockdiff.json`` (``SPEC_FILE``: the file that marks a blockdiff model directory) and checked on read.

The keys added after the first release (``clean_attention``, ``adapter``, ``adapter_rank``, ``adapter_alpha``,
``noise_kind``, ``self_conditioning``) are
written only when they differ from their defaults, so a model that does not use them reads with an older blockdiff;
a file without them takes the defaults (today's behaviour)."""

from __future__ import annotations

import json
import numbers
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from blockdiff.core.noise import make_schedule
from blockdiff.errors import UsageError, require_divides
from blockdiff.files import read_json_file

__all__ = ["SPEC_FILE", "BlockDiffusionSpec", "CLEAN_ATTENTION_CHOICES", "ADAPTER_CHOICES", "NOISE_KIND_CHOICES"]

SPEC_FILE = "blockdiff.json"  # in a model directory, beside the weights: the spec; its presence marks a blockdiff model

CLEAN_ATTENTION_CHOICES = ("block_causal", "causal")
NOISE_KIND_CHOICES = ("absorbing", "uniform")
ADAPTER_CHOICES = ("none", "gated_lora")
_OPTIONAL_DEFAULTS = {
    "clean_attention": "block_causal", "adapter": "none", "adapter_rank": None, "adapter_alpha": None,
    "noise_kind": "absorbing", "self_conditioning": False,
}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class BlockDiffusionSpec:
    """What turns a decoder into a block diffuser; stored next to the weights as ``blockdiff.json``.

    Checked on construction: ``block_length >= 1`` dividing ``max_seq_len``, ``mask_token_id >= 0``, a known
    ``schedule``. ``from_file`` also refuses unknown keys and names the file in every error."""

    mask_token_id: int
    block_length: int
    logit_shift: bool = False
    max_seq_len: int | None = None  # training context length, for reference
    schedule: str = "loglinear"  # noise schedule it was trained with (evaluation uses the same)
    clean_attention: str = "block_causal"  # x_0 -> x_0 of the training mask: block_causal or causal (token-causal)
    adapter: str = "none"  # none, or gated_lora: a LoRA only noisy rows use (modeling/adapter.py, adapter.safetensors)
    adapter_rank: int | None = None  # gated_lora: rank r
    adapter_alpha: float | None = None  # gated_lora: the delta is scaled by adapter_alpha / adapter_rank
    noise_kind: str = "absorbing"  # absorbing (mask) or uniform (random-token) noise inside a block (core/uniform.py)
    self_conditioning: bool = False  # the noised positions' input also gets the last prediction's expected embedding

    def __post_init__(self):
        if not _is_int(self.mask_token_id) or self.mask_token_id < 0:
            raise UsageError(f"mask_token_id must be a token id (an integer >= 0), got {self.mask_token_id!r}")
        if not _is_int(self.block_length) or self.block_length < 1:
            raise UsageError(f"block_length must be an integer >= 1, got {self.block_length!r}")
        if not isinstance(self.logit_shift, bool):
            raise UsageError(f"logit_shift must be true or false, got {self.logit_shift!r}")
        if self.max_seq_len is not None and (not _is_int(self.max_seq_len) or self.max_seq_len < 1):
            raise UsageError(f"max_seq_len must be an integer >= 1 (or null), got {self.max_seq_len!r}")
        if self.max_seq_len is not None:
            note = " (the training context is a whole number of blocks)"
            require_divides("block_length", self.block_length, "max_seq_len", self.max_seq_len, UsageError, note)
        try:
            make_schedule(self.schedule)
        except (ValueError, TypeError) as err:
            raise UsageError(f"schedule: {err}") from None
        if self.clean_attention not in CLEAN_ATTENTION_CHOICES:
            raise UsageError(
                f"clean_attention must be one of {list(CLEAN_ATTENTION_CHOICES)}, got {self.clean_attention!r}"
            )
        if not isinstance(self.self_conditioning, bool):
            raise UsageError(f"self_conditioning must be true or false, got {self.self_conditioning!r}")
        if self.noise_kind not in NOISE_KIND_CHOICES:
            raise UsageError(f"noise_kind must be one of {list(NOISE_KIND_CHOICES)}, got {self.noise_kind!r}")
        if self.adapter not in ADAPTER_CHOICES:
            raise UsageError(f"adapter must be one of {list(ADAPTER_CHOICES)}, got {self.adapter!r}")
        if self.adapter == "gated_lora":
            if not _is_int(self.adapter_rank) or self.adapter_rank < 1:
                raise UsageError(
                    f"adapter_rank must be an integer >= 1 with adapter=gated_lora, got {self.adapter_rank!r}"
                )
            alpha = self.adapter_alpha
            if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0 < alpha < float("inf"):
                raise UsageError(f"adapter_alpha must be a number > 0 with adapter=gated_lora, got {alpha!r}")
        elif self.adapter_rank is not None or self.adapter_alpha is not None:
            raise UsageError(
                "adapter_rank and adapter_alpha belong to adapter=gated_lora; remove them or set adapter=gated_lora"
            )

    @property
    def has_adapter(self) -> bool:
        return self.adapter != "none"

    @classmethod
    def from_file(cls, path: str | Path) -> "BlockDiffusionSpec":
        """Read and check ``blockdiff.json``; every error names the file (and the key)."""
        data = read_json_file(path)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UsageError(
                f"{path} has key(s) {unknown} that this version of blockdiff does not know (it knows {known}): the "
                "model was written by a newer blockdiff (upgrade: pip install -U blockdiff) or the file was edited "
                "(remove those keys)"
            )
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise UsageError(f"{path} lacks the required key(s) {missing}; restore the file written with the model")
        try:
            return cls(**data)
        except UsageError as err:
            raise UsageError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> None:
        data = {k: v for k, v in asdict(self).items() if k not in _OPTIONAL_DEFAULTS or v != _OPTIONAL_DEFAULTS[k]}
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
