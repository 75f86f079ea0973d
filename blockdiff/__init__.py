"""blockdiff: block diffusion language models — autoregressive across blocks, masked diffusion inside them.

Importing the package registers the ``blockdiff`` model type with transformers' ``AutoConfig`` and
``AutoModelForCausalLM`` (in this process only), so ``AutoModelForCausalLM.from_pretrained(model_dir)`` gives a
``BlockDiffusionLM``; without the import, plain transformers refuses a blockdiff directory.
"""

from blockdiff.config import Config, ConfigError, load_config
from blockdiff.core.loss import LossOutput, block_diffusion_loss
from blockdiff.modeling.model import BlockDiffusionConfig, BlockDiffusionLM, BlockDiffusionSpec, build_backbone, register_auto_classes

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "BlockDiffusionConfig",
    "BlockDiffusionLM",
    "BlockDiffusionSpec",
    "Config",
    "ConfigError",
    "LossOutput",
    "block_diffusion_loss",
    "build_backbone",
    "load_config",
    "register_auto_classes",
]
