"""``BlockDiffusionGenerationConfig``: generation defaults stored with a model, checked in one place.

A ``transformers.GenerationConfig`` subclass (DESIGN.md §3), so it saves/loads as JSON next to the
weights (``blockdiff_generation_config.json``) and can be overridden per call:
``model.generate(ids, max_new_tokens=256, sampler="threshold", tau=0.8)``.
"""

from __future__ import annotations

from transformers import GenerationConfig

from blockdiff.errors import UsageError
from blockdiff.sampling.ddpm import DDPMSampler
from blockdiff.sampling.entropy_bound import EntropyBoundSampler
from blockdiff.sampling.first_hitting import FirstHittingSampler
from blockdiff.sampling.fixed import FixedStepSampler
from blockdiff.sampling.remasking import RemaskingSampler
from blockdiff.sampling.threshold import ThresholdSampler

__all__ = ["BlockDiffusionGenerationConfig", "GENERATION_CONFIG_FILE", "SAMPLERS", "make_sampler"]

GENERATION_CONFIG_FILE = "blockdiff_generation_config.json"
SAMPLERS = ("threshold", "first_hitting", "fixed", "ddpm", "remask", "entropy_bound")

_OURS = {
    "sampler": "threshold",  # one of SAMPLERS
    "steps_per_block": None,  # denoising-step budget per block (default: block_length)
    "tau": 0.9,  # threshold sampler: reveal positions with confidence >= tau
    "tokens_per_step": None,  # fixed sampler: tokens revealed per step (default: spread over steps_per_block)
    "remask_threshold": 0.3,  # remask sampler: re-open generated tokens below this confidence
    "max_remask": 1,  # remask sampler: at most this many re-opened per step
    "entropy_bound": 0.5,  # entropy_bound sampler: reveal lowest-entropy tokens while sum - max <= this (nats)
    "window": None,  # sliding-window size in tokens (default: the training context); must be >= 2 blocks
    "use_cache": True,  # block KV cache over finished blocks (False recomputes the whole prefix)
    "reuse_predictions": True,  # skip the forward when no token of the block changed
    "seed": None,  # seed for a fresh generator when none is passed
}


class BlockDiffusionGenerationConfig(GenerationConfig):
    """Generation settings for block diffusion; the usual ``max_new_tokens``, ``temperature``, ``top_k``,
    ``top_p``, ``eos_token_id``, ``pad_token_id`` plus the block-diffusion fields in ``_OURS``."""

    def __init__(self, **kwargs):
        ours = {key: kwargs.pop(key, default) for key, default in _OURS.items()}
        kwargs.setdefault("do_sample", True)
        kwargs.setdefault("max_new_tokens", 64)
        kwargs.setdefault("temperature", 1.0)
        kwargs.setdefault("top_k", None)
        super().__init__(**kwargs)
        for key, value in ours.items():
            setattr(self, key, value)

    def check(self, block_length: int) -> None:
        """Every generation input check, in one place, with a message that says how to fix it."""
        if self.max_new_tokens is None or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.steps_per_block is not None and self.steps_per_block < 1:
            raise UsageError(f"steps_per_block must be >= 1, got {self.steps_per_block}")
        if not 0.0 < self.tau <= 1.0:
            raise UsageError(f"tau must be in (0, 1], got {self.tau}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.window is not None and (self.window < 2 * block_length or self.window % block_length):
            raise UsageError(
                f"window={self.window} must be a multiple of block_length={block_length} and at least two blocks"
            )
        make_sampler(self)  # sampler-specific checks

    def to_diff_dict(self):  # keep our fields even when they equal GenerationConfig's defaults
        out = super().to_diff_dict()
        out.update({key: getattr(self, key) for key in _OURS})
        return out


def make_sampler(config: BlockDiffusionGenerationConfig):
    """The sampler object named by ``config.sampler``."""
    if config.sampler == "threshold":
        return ThresholdSampler(config.tau)
    if config.sampler == "first_hitting":
        return FirstHittingSampler()
    if config.sampler == "fixed":
        return FixedStepSampler(config.tokens_per_step)
    if config.sampler == "ddpm":
        return DDPMSampler()
    if config.sampler == "remask":
        return RemaskingSampler(config.remask_threshold, config.max_remask)
    if config.sampler == "entropy_bound":
        return EntropyBoundSampler(config.entropy_bound)
    raise UsageError(f"sampler must be one of {SAMPLERS}, got {config.sampler!r}")
