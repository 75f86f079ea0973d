"""``BlockDiffusionGenerationConfig``: generation defaults stored with a model, checked in one place.

A ``transformers.GenerationConfig`` subclass (docs/design.md §9), so it saves/loads as JSON next to the
weights (``blockdiff_generation_config.json``) and can be overridden per call:
``model.generate(ids, max_new_tokens=256, sampler="threshold", tau=0.8)``.

Of transformers' own settings, those in ``HONOURED`` mean what they mean there; any other one set to a value
other than transformers' default (``num_beams=4``, ``repetition_penalty=1.2``, ...) is refused by name, never
silently ignored.
"""

from __future__ import annotations

import math
import numbers

from transformers import GenerationConfig

from blockdiff.errors import UsageError
from blockdiff.sampling.samplers.registry import (
    check_knobs,
    knobs,
    make_sampler,
    sampler_class,
    sampler_names,
    settings,
)

__all__ = ["BlockDiffusionGenerationConfig", "GENERATION_CONFIG_FILE", "HONOURED", "make_sampler"]  # and SAMPLERS

GENERATION_CONFIG_FILE = "blockdiff_generation_config.json"
TEMPERATURE_RANGE = (1e-4, 1e4)  # a positive temperature must lie here; 0 is greedy
MAX_BEAM_ROWS = 256  # block beam search holds block_beams x beam_width rows (each with its KV cache) at once


def check_beams(block_beams: int, beam_width: int, names: tuple[str, str] = ("block_beams", "beam_width")) -> None:
    """Refuse a beam search that cannot be meant or allocated: ``beam_width > block_beams``, or more than
    ``MAX_BEAM_ROWS`` rows (``block_beams * beam_width``) at once. ``names``: the keys or flags the user set."""
    if beam_width > block_beams:
        raise UsageError(
            f"{names[1]}={beam_width} must be at most {names[0]}={block_beams} (the beams kept after each block are "
            f"chosen among the candidates drawn)"
        )
    if block_beams * beam_width > MAX_BEAM_ROWS:
        raise UsageError(
            f"{names[0]}={block_beams} x {names[1]}={beam_width} rows is more than block beam search holds at once "
            f"(at most {MAX_BEAM_ROWS}: every row keeps its own KV cache); use fewer"
        )


def __getattr__(name: str):
    if name == "SAMPLERS":  # the registered sampler names, read now (a sampler registered later is in it)
        return sampler_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# transformers GenerationConfig fields block generation honours (bos_token_id is only carried along)
HONOURED = (
    "max_new_tokens", "max_length", "min_new_tokens", "stop_strings", "do_sample", "temperature", "top_k", "top_p",
    "num_return_sequences", "use_cache", "eos_token_id", "pad_token_id", "bos_token_id", "return_dict_in_generate",
)
_ACCEPTED = {"cache_implementation": ("dynamic",)}  # the one cache block generation uses
_HF_FIELDS = tuple(k for k in vars(GenerationConfig()) if not k.startswith("_") and k != "transformers_version")
_HF_DEFAULTS = {**vars(GenerationConfig()), **getattr(GenerationConfig, "_get_default_generation_params", dict)()}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite real number (``nan`` and ``inf`` are not: they would silently turn every choice into garbage)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class BlockDiffusionGenerationConfig(GenerationConfig):
    """Generation settings for block diffusion; the usual ``max_new_tokens``, ``temperature``, ``top_k``,
    ``top_p``, ``eos_token_id``, ``pad_token_id`` plus the block-diffusion fields of ``registry.settings()``: the
    general ones (``sampler``, ``steps_per_block``, ``window``, ...) and every registered sampler's knobs."""

    def __init__(self, **kwargs):
        ours = {key: kwargs.pop(key, default) for key, default in settings().items()}
        kwargs.setdefault("do_sample", True)
        kwargs.setdefault("max_new_tokens", 64)
        kwargs.setdefault("temperature", 1.0)
        kwargs.setdefault("top_k", None)
        super().__init__(**kwargs)
        for key, value in ours.items():
            setattr(self, key, value)

    def __getattr__(self, name: str):
        """The default of a knob of a sampler registered after this config was made (only called for attributes
        the instance lacks)."""
        knob = knobs().get(name)
        if knob is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return knob.default

    def check(self, block_length: int, schedule=None) -> None:
        """Every generation input check, in one place, with a message that says how to fix it. Each sampler's own
        checks run on its knobs (``registry.check_knobs``; ``schedule``: the trained one, for DDPM)."""
        unsupported = self.unsupported_settings()
        if unsupported:
            raise UsageError(
                f"generation setting(s) {', '.join(unsupported)} are not supported by block-diffusion generation; "
                f"remove them (supported transformers settings: {', '.join(HONOURED)}; plus {', '.join(settings())})"
            )
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens < 2**63:
            raise UsageError(
                f"max_new_tokens must be an integer in [1, 2**63), got {self.max_new_tokens!r} "
                "(a huge value means: until EOS)"
            )
        if self.sampler not in sampler_names():
            raise UsageError(f"sampler must be one of {sampler_names()}, got {self.sampler!r}")
        if self.steps_per_block is not None and (not _is_int(self.steps_per_block) or self.steps_per_block < 1):
            raise UsageError(f"steps_per_block must be an integer >= 1, got {self.steps_per_block!r}")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise UsageError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.temperature is not None and (not _is_real(self.temperature) or self.temperature < 0):
            raise UsageError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.temperature and not TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]:
            # logits / temperature overflows float32 outside this range (nan probabilities)
            raise UsageError(
                f"temperature={self.temperature!r} is outside [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}]; "
                "use 0 for greedy decoding, or a temperature in that range"
            )
        if self.do_sample not in (None, True, False):
            raise UsageError(f"do_sample must be true or false, got {self.do_sample!r}")
        if self.min_new_tokens is not None and (not _is_int(self.min_new_tokens) or self.min_new_tokens < 0):
            raise UsageError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        copies = self.num_return_sequences
        if copies is not None and (not _is_int(copies) or copies < 1):
            raise UsageError(f"num_return_sequences must be an integer >= 1, got {self.num_return_sequences!r}")
        if self.stop_strings is not None and not self.stop_string_list():
            raise UsageError(f"stop_strings must be a non-empty string or a list of them, got {self.stop_strings!r}")
        window = self.window
        if window is not None and (not _is_int(window) or window < 2 * block_length or window % block_length):
            raise UsageError(
                f"window={self.window!r} must be a multiple of block_length={block_length} and at least two blocks"
            )
        for key in ("block_beams", "beam_width", "beam_score_draws"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise UsageError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        check_beams(self.block_beams, self.beam_width)
        if block_length == 1 and sampler_class(self.sampler).edits:
            raise UsageError(
                f"sampler={self.sampler!r} (editing_threshold, max_post_steps) edits the tokens of a block it has "
                "written, but block_length=1 leaves nothing to edit (the block is its one new token); use a model "
                "with block_length > 1, or another sampler"
            )
        check_knobs(self, schedule)  # each sampler's own checks, on its knobs

    def unsupported_settings(self) -> list[str]:
        """``name=value`` of every transformers setting this generation does not implement that is set to a value
        other than transformers' default."""
        out, ours = [], settings()
        for key in _HF_FIELDS:
            if key in HONOURED or key in ours:
                continue
            value = getattr(self, key, None)
            if value is None or value == _HF_DEFAULTS.get(key) or value in _ACCEPTED.get(key, ()):
                continue
            out.append(f"{key}={value!r}")
        return out

    def stop_string_list(self) -> list[str]:
        """``stop_strings`` as a list (transformers accepts one string or a list); ``[]`` if malformed or unset."""
        stops = [self.stop_strings] if isinstance(self.stop_strings, str) else self.stop_strings
        if not isinstance(stops, (list, tuple)) or not stops or not all(isinstance(x, str) and x for x in stops):
            return []
        return list(stops)

    def to_diff_dict(self):  # keep our fields even when they equal GenerationConfig's defaults
        out = super().to_diff_dict()
        out.update({key: getattr(self, key) for key in settings()})
        return out
