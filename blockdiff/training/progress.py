"""The training progress bar: optimisation steps out of ``trainer.max_steps``, and the time budget left.

Lightning's ``RichProgressBar`` counts batches per epoch ("Epoch 0/-2" when only ``max_steps`` is set, and
totals like ``70/54`` after a mid-epoch resume). A block-diffusion run is defined by steps, so this bar
shows ``step k/max_steps`` across epochs and resumes, and — when ``trainer.max_minutes`` is set — how much
of this command's budget is left, since the run stops at whichever comes first.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar

from blockdiff.training.callbacks import SessionTimer

__all__ = ["StepProgressBar"]


class StepProgressBar(RichProgressBar):
    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'train':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        timer = next((c for c in trainer.callbacks if isinstance(c, SessionTimer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is not None:
            seconds = max(0, int(remaining))
            metrics["budget left"] = f"{seconds // 60}:{seconds % 60:02d}"
        return metrics
