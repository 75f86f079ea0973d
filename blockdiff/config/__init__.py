"""Typed run configuration: dataclasses validated at start, YAML + ``key=value`` overrides via OmegaConf.

The dataclass defaults *are* the embedded demo: ``blockdiff demo`` trains exactly ``Config()``.
Every field has a docstring-style comment; errors name the CLI key (``model.block_length ...``) so a
user can fix the command line. Nothing outside the CLI and the recipes reads a ``Config``; library
modules take the sections they need as explicit arguments.

This package is a leaf: it imports neither the samplers, the model nor Lightning. ``sections.py`` holds the
dataclasses (``trainer.py`` the trainer section), ``load.py`` the YAML/override merge, ``checks.py`` the shared checks.
"""

from blockdiff.config.checks import SEED_MAX, ConfigError
from blockdiff.config.load import describe_keys, load_config, read_utf8, to_yaml
from blockdiff.config.sections import (
    T_EPS,
    Adapter,
    CertaintyConfig,
    CleanAttention,
    ClipSearch,
    Config,
    CurriculumConfig,
    DataConfig,
    Family,
    LRSchedule,
    ModelConfig,
    NoiseConfig,
    NoiseKind,
    OptimConfig,
    SampleConfig,
    Schedule,
    set_sampler_names,
)
from blockdiff.config.trainer import TrainerConfig
from blockdiff.files import path_problem

__all__ = [
    "T_EPS",
    "Adapter",
    "CleanAttention",
    "Family",
    "Schedule",
    "ClipSearch",
    "LRSchedule",
    "ModelConfig",
    "NoiseConfig",
    "NoiseKind",
    "DataConfig",
    "OptimConfig",
    "TrainerConfig",
    "SampleConfig",
    "CertaintyConfig",
    "CurriculumConfig",
    "Config",
    "ConfigError",
    "load_config",
    "describe_keys",
    "to_yaml",
    "path_problem",
    "read_utf8",
    "SEED_MAX",
    "set_sampler_names",
]
