"""The ``trainer`` section: steps, validation and checkpoint cadence, time budget, devices, precision, seed.

Lightning's own names (``strategy``, ``precision``, ``accelerator``) are checked against Lightning's lists,
which are imported only when a value other than ``auto`` is given, so a default config never loads Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from blockdiff.config.checks import SEED_MAX, ConfigError, check_numbers

__all__ = ["TrainerConfig"]


@dataclass
class TrainerConfig:
    max_steps: int = 600
    """Optimisation steps."""
    max_minutes: Optional[float] = 4.0
    """Wall-clock training budget of one command; training stops (and checkpoints) when it is spent, and a --resume gets
    the budget again. None = no limit."""
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
    """Devices per node: a count (-1 = all), 'auto', or a list of GPU ids; data.batch_size is split over all
    processes."""
    num_nodes: int = 1
    """Machines taking part (multi-node DDP/FSDP; see docs/distributed.md)."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp (several processes), fsdp (weights, gradients and optimiser state sharded over
    the processes: FSDP2 through Lightning's ModelParallelStrategy; CPU or GPU; needs optim.ema_decay=0), ddp_spawn,
    ..."""
    precision: str = "auto"
    """'auto' = fp32 on CPU, bf16-mixed on GPU; or any Lightning precision string."""
    accumulate_grad_batches: int = 1
    """Micro-batches of data.batch_size summed per optimiser step (effective batch = product)."""
    seed: int = 0
    """Seed for data order, initialisation and noise."""
    out_dir: str = "runs/demo"
    """Run directory: config.yaml, checkpoints/, model/, metrics.csv."""

    def __post_init__(self) -> None:
        check_numbers("trainer", self)
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"trainer.seed={self.seed} is out of range: a seed is an integer from 0 to {SEED_MAX}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"trainer.max_minutes must be > 0 (or null for no time limit), got {self.max_minutes}")
        for key in (
            "max_steps",
            "val_every_n_steps",
            "checkpoint_every_n_steps",
            "log_every_n_steps",
            "accumulate_grad_batches",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        if self.limit_val_batches < 0:
            raise ConfigError(f"trainer.limit_val_batches must be >= 0, got {self.limit_val_batches}")
        if self.num_nodes < 1:
            raise ConfigError(f"trainer.num_nodes must be >= 1, got {self.num_nodes}")
        self._check_devices()
        self._check_gpu_count()
        if (self.precision, self.accelerator) != ("auto", "auto"):  # a default config never imports Lightning
            self._check_lightning_names()
        if self.strategy != "auto":
            from lightning.pytorch.strategies import StrategyRegistry

            if self.strategy not in StrategyRegistry.available_strategies():
                raise ConfigError(
                    f"trainer.strategy={self.strategy!r} is not a Lightning strategy; use auto, ddp, fsdp or ddp_spawn "
                    "(lightning.pytorch.strategies.StrategyRegistry.available_strategies() lists them all)"
                )

    def _check_lightning_names(self) -> None:
        """``precision`` and ``accelerator`` against Lightning's own lists (asked only when they are not ``auto``)."""
        import typing

        from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
        from lightning.pytorch.accelerators import AcceleratorRegistry

        precisions = ("auto", *typing.get_args(_PRECISION_INPUT_STR))
        aliases = {str(p) for p in typing.get_args(_PRECISION_INPUT_INT) + typing.get_args(_PRECISION_INPUT_STR_ALIAS)}
        if self.precision not in precisions and self.precision not in aliases:
            raise ConfigError(
                f"trainer.precision={self.precision!r} is not a precision; use one of {', '.join(precisions)}"
            )
        accelerators = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
        if self.accelerator not in accelerators:
            raise ConfigError(
                f"trainer.accelerator={self.accelerator!r} is not an accelerator; use one of {', '.join(accelerators)}"
            )
        if self.accelerator in AcceleratorRegistry:  # its package must be installed (tpu needs torch_xla)
            try:
                AcceleratorRegistry.get(self.accelerator)
            except ImportError as err:  # Lightning's message names the package and its pip command
                raise ConfigError(
                    f"trainer.accelerator={self.accelerator!r} cannot be used here: {str(err).strip().splitlines()[0]}"
                    " (or use trainer.accelerator=auto)"
                ) from None

    def _check_gpu_count(self) -> None:
        """More GPUs per node than this machine has (a GPU accelerator named outright, a count given) is refused here:
        on a GPU machine ``trainer.devices`` processes each take one GPU of this node."""
        if self.accelerator not in ("gpu", "cuda") or not isinstance(self.devices, int) or self.devices < 1:
            return
        import torch

        available = torch.cuda.device_count()
        if self.devices > available:
            raise ConfigError(
                f"trainer.devices={self.devices} GPUs per node, but this machine has {available} CUDA GPU"
                f"{'' if available == 1 else 's'}; use trainer.devices <= {available}"
                + ("" if available else " or trainer.accelerator=cpu")
            )

    def _check_devices(self) -> None:
        devices = self.devices
        ok = (
            devices == "auto"
            or (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1))
            or (isinstance(devices, str) and devices.replace(",", "").replace(" ", "").lstrip("-").isdigit())
            or (isinstance(devices, (list, tuple)) and devices and all(isinstance(d, int) and d >= 0 for d in devices))
        )
        if not ok:
            raise ConfigError(
                f"trainer.devices must be a count >= 1 (or -1 for all), 'auto', or a list of GPU ids; got {devices!r}"
            )
