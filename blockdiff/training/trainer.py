"""The Lightning side of a training run: precision, process rank, the ``Trainer`` with blockdiff's callbacks, and
``fit`` with Ctrl-C / SIGTERM turned into a resumable stop.

Nothing here writes to disk by itself: ``build_trainer`` only constructs (Lightning checks the accelerator,
precision and strategy keys there), and the files a run writes come from the callbacks during ``fit``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from blockdiff.config import Config, ConfigError, to_yaml
from blockdiff.modeling.rundir import LOGS, RunDir
from blockdiff.training.callbacks import (
    GracefulInterrupt,
    LastCheckpoint,
    NonFiniteLossGuard,
    ResumableRNG,
    RunConfigRecord,
    SessionTimer,
    TrainingInterrupted,
)
from blockdiff.training.checkpoint import SafeCheckpointIO
from blockdiff.training.progress import StepProgressBar
from blockdiff.training.resume import RUN_CONFIG_KEY
from blockdiff.training.sharding import FSDP, DataParallelFSDP

__all__ = ["Run", "build_trainer", "fit", "check_runnable", "env_is_global_zero", "resolve_precision"]


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' -> fp32 on CPU (bf16 matmul is very slow there), bf16-mixed on a GPU."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def env_is_global_zero() -> bool:
    """Global rank 0 as told by the launcher's environment (torchrun, SLURM, Lightning's own launcher)."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return node == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def _known_process_count(cfg: Config) -> int | None:
    """devices x num_nodes when the config says it outright (``None`` for 'auto', -1 and the like)."""
    devices = cfg.trainer.devices
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    return devices * cfg.trainer.num_nodes if isinstance(devices, int) and devices > 0 else None


def check_runnable(cfg: Config) -> None:
    """Checks that need the machine (not just the config): the attention kernel, the split of the global batch."""
    if cfg.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError("model.attn_implementation=flex_attention needs a CUDA GPU; use sdpa (the default) on CPU")
    processes = _known_process_count(cfg)
    if processes and cfg.data.batch_size % processes:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (the global batch) must be a multiple of the {processes} processes "
            f"(trainer.devices x trainer.num_nodes)"
        )


def _check_launcher(trainer: L.Trainer) -> None:
    """Under an outside launcher (SLURM's srun, torchrun) the processes per node and the nodes must be the config's
    ``trainer.devices`` and ``trainer.num_nodes``: Lightning checks this only when it starts the processes itself, and
    a mismatch would split the global batch over the wrong count (raises ``ValueError`` naming both numbers)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is not None and environment.creates_processes_externally:
        environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)


@dataclass
class Run:
    """A built ``Trainer`` and the callbacks ``train()`` asks about afterwards."""

    trainer: L.Trainer
    logger: CSVLogger
    interrupt: GracefulInterrupt
    timer: SessionTimer | None


def build_trainer(cfg: Config, run_dir: RunDir, progress: bool) -> Run:
    """The Lightning ``Trainer`` with blockdiff's callbacks; builds nothing on disk."""
    last = LastCheckpoint(run_dir.last_checkpoint, cfg.trainer.checkpoint_every_n_steps)
    interrupt = GracefulInterrupt(last)
    timer = SessionTimer(cfg.trainer.max_minutes) if cfg.trainer.max_minutes else None
    callbacks = [
        LearningRateMonitor(logging_interval="step"),
        ResumableRNG(cfg.trainer.seed),
        NonFiniteLossGuard(run_dir.checkpoints),
        RunConfigRecord(RUN_CONFIG_KEY, to_yaml(cfg)),
        *([timer] if timer else []),
        last,
        interrupt,
    ]
    if progress:
        callbacks.append(StepProgressBar())
    if cfg.optim.ema_decay > 0:
        callbacks.append(EMAWeightAveraging(decay=cfg.optim.ema_decay))
    logger = CSVLogger(run_dir.root, name=LOGS, version="")  # writes logs/metrics.csv
    try:
        trainer = L.Trainer(
            accelerator=cfg.trainer.accelerator,
            devices=cfg.trainer.devices,
            num_nodes=cfg.trainer.num_nodes,
            strategy=DataParallelFSDP() if cfg.trainer.strategy == FSDP else cfg.trainer.strategy,
            plugins=[SafeCheckpointIO()],
            use_distributed_sampler=False,  # BlockDiffusionDataModule shards (and resumes) the data itself
            precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
            max_steps=cfg.trainer.max_steps,
            val_check_interval=cfg.trainer.val_every_n_steps,
            check_val_every_n_epoch=None,
            limit_val_batches=cfg.trainer.limit_val_batches or 1.0,
            num_sanity_val_steps=0,
            gradient_clip_val=cfg.optim.grad_clip or None,
            accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            logger=logger,
            callbacks=callbacks,
            enable_progress_bar=progress,
            enable_model_summary=False,
            default_root_dir=run_dir.root,
        )
        _check_launcher(trainer)
    except (MisconfigurationException, ValueError, RuntimeError, ImportError) as err:  # Lightning checks these keys
        raise ConfigError(
            f"Lightning refused trainer.accelerator={cfg.trainer.accelerator!r} / "
            f"trainer.precision={cfg.trainer.precision!r} / trainer.strategy={cfg.trainer.strategy!r} / "
            f"trainer.devices={cfg.trainer.devices!r}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from None
    return Run(trainer, logger, interrupt, timer)


def fit(run: Run, module, datamodule, checkpoint: Path | None, run_dir: RunDir) -> None:
    """``trainer.fit`` (from ``checkpoint``, if any), turning Ctrl-C and SIGTERM into ``TrainingInterrupted`` with the
    command that resumes."""
    last = run_dir.last_checkpoint
    try:
        with run.interrupt.handling_sigint():
            run.trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    except SystemExit:  # Lightning ends a SIGTERMed run with SIGTERMException (a SystemExit, status 0)
        if not getattr(run.trainer, "received_sigterm", False):
            raise
        saved = "a resumable checkpoint is in" if run.interrupt.interrupted else "the last checkpoint is"
        raise TrainingInterrupted(
            f"terminated (SIGTERM) at step {run.trainer.global_step}; {saved} {last}. "
            f"Continue with `blockdiff train --resume {run_dir.root}`"
        ) from None
    if run.interrupt.interrupted:
        raise TrainingInterrupted(
            f"interrupted at step {run.trainer.global_step}; a resumable checkpoint is in {last}. "
            f"Continue with `blockdiff train --resume {run_dir.root}`"
        )
