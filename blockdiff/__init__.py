"""blockdiff: block diffusion language models — autoregressive across blocks, masked diffusion inside them.

Importing the package registers the ``blockdiff`` model type with transformers' ``AutoConfig`` and
``AutoModelForCausalLM`` (in this process only), so ``AutoModelForCausalLM.from_pretrained(model_dir)`` gives a
``BlockDiffusionLM``; without the import, plain transformers refuses a blockdiff directory.

The names below are the public entry points; none of them imports Lightning or ``datasets``.
"""

from blockdiff.config import Config, ConfigError, load_config
from blockdiff.core.loss import LossOutput, block_diffusion_loss
from blockdiff.modeling.io import LoadedModel, load_model_dir
from blockdiff.modeling.model import BlockDiffusionConfig, BlockDiffusionLM, register_auto_classes
from blockdiff.modeling.spec import BlockDiffusionSpec
from blockdiff.sampling import sample_texts
from blockdiff.training.builders import build_backbone

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "BlockDiffusionConfig",
    "BlockDiffusionLM",
    "BlockDiffusionSpec",
    "Config",
    "ConfigError",
    "LoadedModel",
    "LossOutput",
    "block_diffusion_loss",
    "build_backbone",
    "load_config",
    "load_model_dir",
    "register_auto_classes",
    "sample_texts",
]
