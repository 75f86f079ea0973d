"""Lightning callbacks that make a run resumable exactly and stop it safely.

* ``ResumableRNG`` — stores the global random states (torch CPU and CUDA, Python, NumPy) *of every
  rank* in every checkpoint and restores them right before the first training step after a resume, so
  the noise levels and masks drawn by ``training_step`` continue the very same streams. (Lightning
  itself does not keep random states in checkpoints.) With several processes it first gives each rank
  its own stream (``seed`` and the rank), so the ranks do not draw identical noise for their different
  data. It also flushes the loggers whenever a checkpoint is written, so the CSV log on disk always
  covers at least the checkpointed steps.
* ``NonFiniteLossGuard`` — a NaN/Inf training loss raises ``NonFiniteLoss`` *before* the backward pass,
  so no optimiser step (and no checkpoint) ever sees the bad values; every rank stops together.
* ``LastCheckpoint`` — the run's one checkpoint file, ``last.ckpt``: every
  ``trainer.checkpoint_every_n_steps`` steps and after the last step (``trainer.max_steps`` reached, the
  time budget spent, a stop asked for), so it is always the newest state and a time-boxed run can be
  continued with ``--resume``.
* ``SessionTimer`` — ``trainer.max_minutes`` as a budget per command: a resumed run gets it again.
* ``RunConfigRecord`` — the resolved run config inside every checkpoint, checked on resume.
* ``GracefulInterrupt`` — the first Ctrl-C (SIGINT) or a SIGTERM (preemption) asks the run to stop at the
  end of the current step, writes a resumable ``checkpoints/last.ckpt`` and stops; a second Ctrl-C
  interrupts at once.

None of these changes what is computed; they only decide what is saved, restored and when to stop.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, Timer

from blockdiff.modeling.rundir import LAST

__all__ = [
    "ResumableRNG",
    "NonFiniteLossGuard",
    "NonFiniteLoss",
    "LastCheckpoint",
    "RunConfigRecord",
    "SessionTimer",
    "GracefulInterrupt",
    "TrainingInterrupted",
]


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf; training stopped before applying it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after writing a resumable checkpoint; ``str()`` says how to resume."""


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        states["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]  # plain data: weights_only
    except ImportError:
        pass
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


class ResumableRNG(L.Callback):
    """Every rank's random states in the checkpoint, restored before the first step after a resume; loggers
    flushed on save. ``seed`` seeds each rank's own stream when there are several processes."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._pending: list[dict[str, Any]] | None = None
        self._world_size = 1

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._world_size = trainer.world_size

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:  # one stream per rank (a resume then restores each rank's own state)
            torch.manual_seed(self.seed * 1_000_003 + trainer.global_rank + 1)
            random.seed(self.seed * 1_000_003 + trainer.global_rank + 1)

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank when a checkpoint is made (only rank 0 writes it): gather all ranks' states.
        states = _rng_states()
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self._world_size
            torch.distributed.all_gather_object(gathered, states)
            return {"rng_by_rank": gathered}
        return {"rng_by_rank": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng_by_rank")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # Restored here, not at load time: Lightning draws from the global generator between loading the
        # checkpoint and the first step (it builds the model and data loaders first).
        if self._pending is not None:
            rank = trainer.global_rank
            if len(self._pending) != trainer.world_size:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"the checkpoint holds random states for {len(self._pending)} process(es), this run has "
                    f"{trainer.world_size}: noise streams are re-seeded, so this resume is not bit-exact"
                )
                torch.manual_seed(self.seed * 1_000_003 + rank + 1 + 7919 * trainer.global_step)
            else:
                _set_rng_states(self._pending[rank])
            self._pending = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()


class NonFiniteLossGuard(L.Callback):
    """Raise ``NonFiniteLoss`` before the backward pass of a NaN/Inf loss (on every rank at once)."""

    def __init__(self, checkpoint_dir: Path | None = None) -> None:
        self.checkpoint_dir = checkpoint_dir

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        kept = ""
        if self.checkpoint_dir is not None:
            last = Path(self.checkpoint_dir) / LAST
            kept = (
                f"; the last good checkpoint {last} is kept"
                if last.is_file()
                else "; no checkpoint had been written yet"
            )
        raise NonFiniteLoss(
            f"the training loss is {float(loss.detach()):.4g} at step {trainer.global_step}: training stopped before "
            f"this step was applied{kept}. Try a lower optim.lr, optim.grad_clip=1.0, or precision=32-true, then "
            "`blockdiff train --resume RUN_DIR`"
        )


class LastCheckpoint(Checkpoint):
    """The run's one checkpoint file: ``last.ckpt``, written every ``every_n_steps`` steps and after the last step.

    The last step is ``trainer.max_steps``, or the step at which the time budget ran out or a stop was asked
    for. The file is never written under another name (Lightning's ``ModelCheckpoint`` would write
    ``last-v1.ckpt`` next to a ``last.ckpt`` it did not write itself, leaving ``last.ckpt`` stale), and never
    twice for one step, so ``last.ckpt`` is always the newest state and ``prev.ckpt`` (kept by
    ``SafeCheckpointIO``) the one before it.
    """

    def __init__(self, checkpoint_path: Path, every_n_steps: int) -> None:
        self.checkpoint_path, self.every_n_steps = Path(checkpoint_path), every_n_steps
        self._saved_step: int | None = None

    def save(self, trainer) -> None:
        """Write ``last.ckpt`` now, unless it already holds this step."""
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
            self._saved_step = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_step = trainer.global_step  # a resumed run starts from a checkpoint of this very step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        last_step = trainer.should_stop or (trainer.max_steps > 0 and step >= trainer.max_steps)
        if last_step or step % self.every_n_steps == 0:
            self.save(trainer)


class RunConfigRecord(L.Callback):
    """Stores the resolved run config (YAML text) in every checkpoint, under ``key``, so a resume checks what the
    weights were trained with, not what ``config.yaml`` says now (``resume.py``)."""

    def __init__(self, key: str, config_yaml: str) -> None:
        self.key, self.config_yaml = key, config_yaml

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.key] = self.config_yaml


class SessionTimer(Timer):
    """Lightning's ``Timer`` with the budget counted per invocation: ``trainer.max_minutes`` is how long *this*
    command may train, so a resumed run gets the budget again instead of stopping at once (Lightning's own
    ``Timer`` restores the time already spent from the checkpoint). ``minutes_before`` keeps that time for
    reports; ``ran_out`` says whether the budget stopped the run."""

    def __init__(self, minutes: float) -> None:
        super().__init__(duration={"minutes": minutes}, interval="step", verbose=False)
        self.minutes = minutes
        self.minutes_before = 0.0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.minutes_before = float(state_dict.get("time_elapsed", {}).get("train", 0.0)) / 60

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["time_elapsed"]["train"] = state["time_elapsed"].get("train", 0.0) + self.minutes_before * 60
        return state

    @property
    def ran_out(self) -> bool:
        remaining = self.time_remaining()
        return remaining is not None and remaining <= 0


class GracefulInterrupt(Checkpoint):
    """First Ctrl-C: finish the current step, write ``last.ckpt``, stop. Second Ctrl-C: interrupt at once.

    A ``Checkpoint`` callback, so Lightning runs it after the others (EMA included) at each step's end:
    the checkpoint holds the step's complete state.

    Use ``with callback.handling_sigint(): trainer.fit(...)``; afterwards ``callback.interrupted`` says
    whether the run stopped because of it.
    """

    def __init__(self, last: LastCheckpoint) -> None:
        self.last = last
        self.requested = False
        self.interrupted = False

    @contextlib.contextmanager
    def handling_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        previous = signal.getsignal(signal.SIGINT)

        def request_stop(signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

        signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # SIGTERM (preemption, a scheduler's time limit) is caught by Lightning, which would exit before the next
        # step without a checkpoint; treat it like Ctrl-C.
        requested = self.requested or bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested and not self.interrupted:
            self.last.save(trainer)
            self.interrupted = True
            trainer.should_stop = True
            # Lightning validates once more when asked to stop; skip that unless this is a regular validation step
            # (a resumed run would not repeat it, so the log would differ from an uninterrupted run's).
            every = trainer.val_check_batch
            if not isinstance(every, int) or (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every:
                trainer.limit_val_batches = 0
