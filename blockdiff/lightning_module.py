"""``BlockDiffusionModule``: the thin Lightning wiring around model, noise and loss.

``training_step`` draws ``t`` from the clipped training range; ``validation_step`` always uses the full
range ``[eps, 1]`` with a generator re-seeded at every validation, so successive validations are
comparable. Validation NELBO is averaged per token with ``torchmetrics.MeanMetric`` (token-weighted)
and logged as ``val/nll`` (nats/token), ``val/ppl`` and ``val/bpb``. The optimiser is AdamW with a
linear warm-up then cosine or constant LR (``torch.optim.lr_scheduler``). EMA, checkpointing, gradient
clipping, progress bars and logging are Lightning callbacks/flags configured in ``train.py``.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from blockdiff.config import LRSchedule, NoiseConfig, OptimConfig
from blockdiff.loss import bits_per_byte, block_diffusion_loss
from blockdiff.model import BlockDiffusionLM
from blockdiff.noise import make_schedule

__all__ = ["BlockDiffusionModule", "lr_lambda"]


def lr_lambda(step: int, warmup_steps: int, max_steps: int, schedule: LRSchedule, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` (or constant 1)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if LRSchedule(schedule) is LRSchedule.constant:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BlockDiffusionModule(L.LightningModule):
    def __init__(
        self,
        model: BlockDiffusionLM,
        noise: NoiseConfig,
        optim: OptimConfig,
        max_steps: int,
        tokens_per_byte: float,
        seed: int = 0,
    ):
        super().__init__()
        self.model, self.noise, self.optim = model, noise, optim
        self.max_steps, self.tokens_per_byte, self.seed = max_steps, tokens_per_byte, seed
        self.schedule = make_schedule(noise.schedule)
        self.val_nll = MeanMetric()
        self.generation_overrides: dict = {}  # e.g. {"max_new_tokens": 128, "sampler": "first_hitting"}
        self._val_generator: torch.Generator | None = None

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = block_diffusion_loss(self.model, batch, self.schedule, self.noise.train_range, self.noise.antithetic)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch.shape[0])
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._val_generator = torch.Generator(device=self.device).manual_seed(self.seed + 1)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        out = block_diffusion_loss(
            self.model, batch, self.schedule, self.noise.eval_range, self.noise.antithetic, self._val_generator
        )
        self.val_nll.update(out.loss, weight=out.num_tokens)

    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()
        self.val_nll.reset()
        self.log_dict(
            {
                "val/nll": nll,
                "val/ppl": torch.exp(nll),
                "val/bpb": torch.tensor(bits_per_byte(nll.item(), self.tokens_per_byte)),
            },
            prog_bar=True,
            sync_dist=True,
        )

    def predict_step(self, batch, batch_idx: int):
        """Generation for ``Trainer.predict``: ``batch`` is a list of prompts (token-id lists) or a dict with
        ``input_ids`` (and ``attention_mask``); settings come from ``self.generation_overrides``."""
        if isinstance(batch, dict):
            return self.model.generate(batch["input_ids"], batch.get("attention_mask"), **self.generation_overrides)
        return self.model.generate(batch, **self.generation_overrides)

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
        )
        scheduler = LambdaLR(
            optimizer,
            lambda step: lr_lambda(
                step, self.optim.warmup_steps, self.max_steps, self.optim.lr_schedule, self.optim.min_lr_ratio
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
