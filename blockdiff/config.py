"""Typed run configuration: dataclasses validated at start, YAML + ``key=value`` overrides via OmegaConf.

The dataclass defaults *are* the embedded demo: ``blockdiff demo`` trains exactly ``Config()``.
Every field has a docstring-style comment; errors name the CLI key (``model.block_length ...``) so a
user can fix the command line. Nothing outside ``cli.py`` and the recipes reads a ``Config``; library
modules take the sections they need as explicit arguments.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "Family",
    "Schedule",
    "LRSchedule",
    "ModelConfig",
    "NoiseConfig",
    "DataConfig",
    "OptimConfig",
    "TrainerConfig",
    "SampleConfig",
    "Config",
    "ConfigError",
    "load_config",
    "describe_keys",
    "to_yaml",
]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and how to fix it."""


class Family(str, enum.Enum):
    """Hugging Face decoder families buildable from scratch (any causal LM loads via ``model.pretrained``)."""

    llama = "llama"
    qwen2 = "qwen2"
    gpt2 = "gpt2"


class Schedule(str, enum.Enum):
    loglinear = "loglinear"
    cosine = "cosine"


class LRSchedule(str, enum.Enum):
    cosine = "cosine"
    constant = "constant"


@dataclass
class ModelConfig:
    family: Family = Family.llama
    """Backbone family for a from-scratch network."""
    init_from: Optional[str] = None
    """Start from the weights and tokenizer of a blockdiff model/run directory (size fields and data.tokenizer are then ignored); e.g. an AR run to adapt to a larger block_length."""
    hidden_size: int = 192
    """Width of the from-scratch network."""
    num_layers: int = 4
    """Number of transformer layers."""
    num_heads: int = 4
    """Attention heads (must divide hidden_size)."""
    intermediate_size: Optional[int] = None
    """MLP width; default 4 * hidden_size (8/3 * hidden_size rounded for gated MLPs)."""
    block_length: int = 4
    """Diffusion window L' (tokens denoised together); 1 = autoregressive, data.max_seq_len = MDLM."""
    logit_shift: bool = False
    """Predict masked token i from the output at i-1 (for AR-initialised backbones)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa (dense 4-D mask, every device), eager, or flex_attention (CUDA only)."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "block_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size}"
            )
        if self.attn_implementation not in ("sdpa", "eager", "flex_attention"):
            raise ConfigError(
                f"model.attn_implementation must be sdpa, eager or flex_attention, got {self.attn_implementation!r}"
            )


@dataclass
class NoiseConfig:
    schedule: Schedule = Schedule.loglinear
    """alpha(t): loglinear (1 - t) or cosine."""
    beta: float = 0.0
    """Lower end of the clipped training range t ~ U[beta, omega]."""
    omega: float = 1.0
    """Upper end of the clipped training range (beta == omega fixes t; 1.0/1.0 masks everything)."""
    eps: float = 1e-3
    """Smallest t ever sampled (the weight 1/t is singular at 0); evaluation uses U[eps, 1]."""
    antithetic: bool = True
    """Stratify the per-block t across the batch (lower-variance loss estimate)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"noise.eps must be in (0, 1), got {self.eps}")
        if not 0.0 <= self.beta <= self.omega <= 1.0:
            raise ConfigError(
                f"noise.beta and noise.omega must satisfy 0 <= beta <= omega <= 1, got beta={self.beta}, omega={self.omega}"
            )

    @property
    def train_range(self) -> tuple[float, float]:
        """The clipped training range, floored at eps."""
        return max(self.beta, self.eps), max(self.omega, self.eps)

    @property
    def eval_range(self) -> tuple[float, float]:
        return self.eps, 1.0


@dataclass
class DataConfig:
    source: str = "shakespeare"
    """'shakespeare' (bundled offline corpus), a local text file / directory / glob, or a hub dataset id."""
    hub_config: Optional[str] = None
    """Configuration name of a hub dataset (e.g. wikitext-103-raw-v1)."""
    text_column: str = "text"
    """Column holding the text in a hub dataset."""
    tokenizer: str = "bpe"
    """'bytes' (256 byte tokens, no training), 'bpe' (trained on the corpus), or a Hugging Face tokenizer id/path."""
    bpe_vocab_size: int = 2048
    """Vocabulary size when data.tokenizer=bpe."""
    max_seq_len: int = 128
    """Context length L of each packed training window."""
    val_fraction: float = 0.05
    """Fraction of the packed windows held out (the tail of the corpus, never trained on)."""
    batch_size: int = 16
    """Sequences per optimisation step."""
    num_workers: int = 0
    """DataLoader workers."""
    max_documents: Optional[int] = None
    """Use only the first N documents (quick experiments and tests)."""

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len must be >= 2, got {self.max_seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.tokenizer == "bpe" and self.bpe_vocab_size < 300:
            raise ConfigError(f"data.bpe_vocab_size must be >= 300 (256 bytes + merges), got {self.bpe_vocab_size}")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    lr_schedule: LRSchedule = LRSchedule.cosine
    """After warm-up: cosine decay to min_lr_ratio * lr, or constant."""
    min_lr_ratio: float = 0.1
    """Final LR of the cosine schedule as a fraction of lr."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    ema_decay: float = 0.99
    """EMA of weights used for validation and export (0 disables)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainerConfig:
    max_steps: int = 600
    """Optimisation steps."""
    max_minutes: Optional[float] = 4.0
    """Wall-clock budget; training stops (and checkpoints) when it is spent. None = no limit."""
    val_every_n_steps: int = 200
    """Validate every N steps (and at the end)."""
    limit_val_batches: int = 16
    """Validation batches per evaluation (0 = all)."""
    checkpoint_every_n_steps: int = 200
    """Write checkpoints/last.ckpt every N steps."""
    log_every_n_steps: int = 10
    """Metrics logging period."""
    accelerator: str = "auto"
    """Lightning accelerator (auto, cpu, gpu)."""
    devices: Any = 1
    """Lightning devices."""
    precision: str = "auto"
    """'auto' = fp32 on CPU, bf16-mixed on GPU; or any Lightning precision string."""
    seed: int = 0
    """Seed for data order, initialisation and noise."""
    out_dir: str = "runs/demo"
    """Run directory: config.yaml, checkpoints/, model/, metrics.csv."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "val_every_n_steps", "checkpoint_every_n_steps", "log_every_n_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        if self.limit_val_batches < 0:
            raise ConfigError(f"trainer.limit_val_batches must be >= 0, got {self.limit_val_batches}")


@dataclass
class SampleConfig:
    num_samples: int = 2
    """Samples printed after the demo."""
    max_new_tokens: int = 64
    """Tokens generated per sample."""
    sampler: str = "threshold"
    """Sampler: threshold, first_hitting, fixed, ddpm or remask."""
    tau: float = 0.9
    """Confidence threshold of the threshold sampler."""
    steps_per_block: Optional[int] = None
    """Denoising-step budget per block (default block_length)."""
    temperature: float = 0.8
    """Softmax temperature."""
    prompt: str = "ROMEO."
    """Prompt for the demo samples."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"sample.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.steps_per_block is not None and self.steps_per_block < 1:
            raise ConfigError(f"sample.steps_per_block must be >= 1, got {self.steps_per_block}")
        if self.temperature < 0:
            raise ConfigError(f"sample.temperature must be >= 0, got {self.temperature}")
        from blockdiff.sampling.config import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sample.sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"sample.tau must be in (0, 1], got {self.tau}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.data.max_seq_len % self.model.block_length:
            raise ConfigError(
                f"model.block_length={self.model.block_length} must divide data.max_seq_len={self.data.max_seq_len}"
            )


def _merge(merged: DictConfig, update, source: str) -> DictConfig:
    """Merge one file or override; any failure becomes a ``ConfigError`` naming the key or the source."""
    try:
        return OmegaConf.merge(merged, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or source
        reason = str(err).splitlines()[0]
        raise ConfigError(f"invalid config key {key!r}: {reason} (`blockdiff config keys` lists every key)") from None


def load_config(paths: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Merge YAML files (in order) and ``key=value`` overrides onto the defaults, then validate."""
    merged: DictConfig = OmegaConf.structured(Config)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 - YAML syntax errors come in several types
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...), not a list")
        merged = _merge(merged, loaded, str(path))
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"overrides must look like key=value (e.g. model.block_length=8), got {override!r}")
        try:
            update = OmegaConf.from_dotlist([override])
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot parse override {override!r}: {str(err).splitlines()[0]}") from None
        merged = _merge(merged, update, key)
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"invalid config key {key!r}: {str(err).splitlines()[0]}") from None


def describe_keys() -> list[tuple[str, str, str]]:
    """``(key, default, help)`` for every config key; help is the docstring under each field."""
    import ast
    import dataclasses
    import inspect
    import sys

    helps: dict[tuple[str, str], str] = {}
    for node in ast.parse(inspect.getsource(sys.modules[__name__])).body:
        if isinstance(node, ast.ClassDef):
            for stmt, nxt in zip(node.body, node.body[1:]):
                if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                    helps[(node.name, stmt.target.id)] = str(nxt.value.value)
    rows, defaults = [], Config()
    for section in dataclasses.fields(Config):
        sub = getattr(defaults, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            value = value.value if isinstance(value, enum.Enum) else value
            rows.append((f"{section.name}.{f.name}", str(value), helps.get((type(sub).__name__, f.name), "")))
    return rows


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (written next to every run's checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
