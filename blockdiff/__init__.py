"""blockdiff: block diffusion language models — autoregressive across blocks, masked diffusion inside them."""

from blockdiff.config import Config, ConfigError, load_config
from blockdiff.loss import LossOutput, block_diffusion_loss
from blockdiff.model import BlockDiffusionLM, BlockDiffusionSpec, build_backbone

__version__ = "0.1.0"

__all__ = [
    "BlockDiffusionLM",
    "BlockDiffusionSpec",
    "Config",
    "ConfigError",
    "LossOutput",
    "block_diffusion_loss",
    "build_backbone",
    "load_config",
]
