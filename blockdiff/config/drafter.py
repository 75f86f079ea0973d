"""The typed config of ``blockdiff train-drafter``: a DFlash-style drafter trained on a frozen target's features
(docs/design.md §14, docs/generation.md "Training a drafter"). Loaded like the main config (YAML files merged in
order, then ``key=value`` overrides, every key checked at start); ``configs/drafter/smollm2.yaml`` is the shipped
recipe."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blockdiff.config.checks import ConfigError

__all__ = [
    "DrafterConfig", "DrafterNetConfig", "DrafterDataConfig", "DrafterTrainConfig", "load_drafter_config",
    "check_drafter_config",
]


@dataclass
class DrafterNetConfig:
    num_layers: int = 2  # decoder layers of the drafter (initialised from the target's top layers)
    target_layers: int = 5  # how many target layers feed it (DFlash's spread over [1, layers - 3])
    block_length: int = 8  # tokens per drafted block: the last committed token and block_length - 1 masks
    draft_vocab: int = 16384  # the drafts use the most frequent tokens of the training data (0: the whole head)
    mask_token_id: int | None = None  # None: the target tokenizer's highest special token the data never uses


@dataclass
class DrafterDataConfig:
    distilled: list[str] = field(default_factory=lambda: ["runs/distill_greedy"])  # sets `blockdiff distill` wrote
    val_fraction: float = 0.05  # of the rows (by prompt), held out for acceptance
    feature_batch: int = 8  # rows per target forward when capturing features
    corpus: str | None = None  # a text corpus (a data.source value, e.g. shakespeare) whose training windows are added,
    # labelled by the target's own greedy next tokens (drafter_data.corpus_rows); None: none
    corpus_windows: int = 0  # how many of its training windows (0: none)
    corpus_window_tokens: int = 128  # tokens per corpus window


@dataclass
class DrafterTrainConfig:
    max_steps: int = 3000
    max_minutes: float = 90.0  # stop (and save) after this much training time
    lr: float = 1.0e-3
    warmup_steps: int = 50
    batch_size: int = 4  # rows per step
    anchors: int = 16  # blocks drafted per row per step (random anchors in the continuation)
    loss_decay: float = 4.0  # in-block position i (1-based) weighs exp(-(i - 1) / loss_decay); 0: all equal
    val_every: int = 200  # steps between held-out acceptance checks
    patience: int = 4  # stop when held-out acceptance has not risen for this many checks
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)


@dataclass
class DrafterConfig:
    target: str = "smollm2"  # the frozen decoder the drafter speeds up (hub id, local directory, .gguf, 'smollm2')
    out_dir: str = "runs/drafter"
    net: DrafterNetConfig = field(default_factory=DrafterNetConfig)
    data: DrafterDataConfig = field(default_factory=DrafterDataConfig)
    train: DrafterTrainConfig = field(default_factory=DrafterTrainConfig)


def check_drafter_config(c: DrafterConfig) -> None:
    """Every value a run would choke on, named by its key."""
    positive = {"net.num_layers": c.net.num_layers, "net.target_layers": c.net.target_layers,
                "data.feature_batch": c.data.feature_batch, "train.max_steps": c.train.max_steps,
                "train.batch_size": c.train.batch_size, "train.anchors": c.train.anchors,
                "train.val_every": c.train.val_every, "train.patience": c.train.patience}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if not 2 <= c.net.block_length <= 64:
        raise ConfigError(f"net.block_length must be in [2, 64] (the last committed token and >= 1 mask), got "
                          f"{c.net.block_length}")
    if c.net.draft_vocab < 0:
        raise ConfigError(f"net.draft_vocab must be >= 0 (0: the whole head), got {c.net.draft_vocab}")
    if not 0 < c.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {c.data.val_fraction}")
    if not 0 < c.train.lr <= 1:
        raise ConfigError(f"train.lr must be in (0, 1], got {c.train.lr}")
    if c.train.loss_decay < 0 or c.train.max_minutes <= 0 or c.train.warmup_steps < 0 or c.train.threads < 0:
        raise ConfigError("train.loss_decay, train.warmup_steps and train.threads must be >= 0 and train.max_minutes "
                          "> 0")
    if c.data.corpus_windows < 0 or c.data.corpus_window_tokens < 8:
        raise ConfigError(f"data.corpus_windows must be >= 0 and data.corpus_window_tokens >= 8, got "
                          f"{c.data.corpus_windows} and {c.data.corpus_window_tokens}")
    if c.data.corpus_windows and not c.data.corpus:
        raise ConfigError(f"data.corpus_windows={c.data.corpus_windows} needs data.corpus (a text corpus, e.g. "
                          "data.corpus=shakespeare)")
    if not c.data.distilled:
        raise ConfigError("data.distilled must name at least one distilled set (blockdiff distill --out DIR)")


def load_drafter_config(paths=(), overrides=()) -> DrafterConfig:
    """Defaults, then each YAML file, then ``key=value`` overrides; a wrong key or value is a one-line ConfigError."""
    try:
        merged = OmegaConf.structured(DrafterConfig)
        for path in paths:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"drafter config: {str(err).splitlines()[0]} (keys: net.*, data.*, train.*, target, "
                          "out_dir)") from None
    except OSError as err:
        raise ConfigError(f"cannot read drafter config: {err}") from None
    check_drafter_config(config)
    return config
