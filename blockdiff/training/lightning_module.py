"""``BlockDiffusionModule``: the thin Lightning wiring around model, noise and loss.

``training_step`` draws ``t`` from the clipped training range; ``validation_step`` always uses the full
range ``[eps, 1]`` with a generator re-seeded at every validation, so successive validations are
comparable. Validation NELBO is averaged per token with ``torchmetrics.MeanMetric`` (token-weighted)
and logged as ``val/nll`` (nats/token), ``val/ppl`` and ``val/bpb``. The optimiser is AdamW with a
linear warm-up then cosine or constant LR (``torch.optim.lr_scheduler``). EMA, checkpointing, gradient
clipping, progress bars and logging are Lightning callbacks/flags configured in ``train.py``.

With ``model.block_length_mixture`` each training sequence draws its block length (``loss.mixture_loss``).
With ``certainty.weight > 0`` the optimised ``train/loss`` is the NELBO plus that weight times the certainty-forcing
term (``core/certainty.py``; logged apart as ``train/nelbo`` and ``train/certainty``); validation never adds it.
With ``noise.clip_search`` set, every validation also scores each ``(beta, omega)`` window of the grid on
the first ``noise.clip_search_batches`` batches, logs the lowest-variance one (``val/clip_beta``,
``val/clip_omega``, ``val/clip_var``) and, under ``apply``, trains with it from then on (``clip_search.py``).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from blockdiff.config import CertaintyConfig, ClipSearch, CurriculumConfig, LRSchedule, NoiseConfig, OptimConfig
from blockdiff.core.clip_search import ClipWindowScores
from blockdiff.core.curriculum import bidirectional_fraction_at, block_length_at, mask_floor_at
from blockdiff.core.loss import bits_per_byte, block_diffusion_loss, mixture_loss
from blockdiff.core.noise import make_schedule
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.training.sharding import shard_model

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
        curriculum: CurriculumConfig | None = None,
        block_length_mixture: dict[int, float] | None = None,
        certainty: CertaintyConfig | None = None,
    ):
        super().__init__()
        self.certainty = certainty or CertaintyConfig()
        self.model, self.noise, self.optim = model, noise, optim
        self.curriculum = curriculum or CurriculumConfig()
        self.max_steps, self.tokens_per_byte, self.seed = max_steps, tokens_per_byte, seed
        self.schedule = make_schedule(noise.schedule)
        self.val_nll = MeanMetric()
        self.generation_overrides: dict = {}  # e.g. {"max_new_tokens": 128, "sampler": "first_hitting"}
        self._val_generator: torch.Generator | None = None
        self.block_length_mixture = dict(block_length_mixture or {})
        self.train_range = noise.train_range  # replaced by the clip search's window under noise.clip_search=apply
        self._clip_scores: ClipWindowScores | None = None  # this validation's clip-search samples
        self.last_fit_validation: tuple[int, dict[str, float]] | None = None  # (global step, val/* numbers)

    def configure_model(self) -> None:
        """Under ``trainer.strategy=fsdp`` (a ``data_parallel`` device mesh exists): shard the network with FSDP2
        (``sharding.shard_model``); otherwise nothing."""
        mesh = self.device_mesh
        if mesh is not None:
            shard_model(self.model, mesh["data_parallel"])

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        block_length, bidirectional = self.curriculum_at(self.global_step)
        train_range = self.training_range(self.global_step)
        if self.block_length_mixture:  # each sequence draws its own block length
            out = mixture_loss(
                self.model, batch, self.schedule, train_range, self.block_length_mixture, self.noise.antithetic,
                self_condition="random",
            )
        else:
            cf = self.certainty
            out = block_diffusion_loss(
                self.model,
                batch,
                self.schedule,
                train_range,
                self.noise.antithetic,
                block_length=block_length,
                bidirectional=bidirectional,
                certainty=(cf.temperature, cf.only_correct) if cf.weight > 0 else None,
                self_condition="random",  # half the steps (a model without self-conditioning ignores it)
            )
        loss = out.loss
        if out.certainty is not None:  # the NELBO plus the certainty-forcing term (never in val/nll)
            loss = out.loss + self.certainty.weight * out.certainty
            self.log_dict({"train/nelbo": out.loss.detach(), "train/certainty": out.certainty.detach()},
                          batch_size=batch.shape[0], sync_dist=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.shape[0], sync_dist=True)  # mean over ranks
        if self.curriculum.block_length_fraction > 0 or bidirectional < 1.0:
            self.log_dict(
                {"train/block_length": float(block_length), "train/bidirectional": bidirectional},
                batch_size=batch.shape[0],
            )
        return loss

    def training_range(self, step: int) -> tuple[float, float]:
        """``(lo, hi)`` of the training noise levels at ``step``: ``train_range``, its floor raised by the mask-floor
        curriculum while it runs (``core/curriculum.py``)."""
        lo, hi = self.train_range
        c = self.curriculum
        if c.mask_floor_fraction > 0:
            lo = max(lo, min(hi, mask_floor_at(step, self.max_steps, self.noise.beta, c.mask_floor_end,
                                               c.mask_floor_fraction)))
        return lo, hi

    def curriculum_at(self, step: int) -> tuple[int, float]:
        """``(block length, open fraction of anti-causal in-block attention)`` at optimiser step ``step``."""
        c = self.curriculum
        block_length = block_length_at(
            step, self.max_steps, self.model.block_length, c.block_length_fraction, c.start_block_length
        )
        return block_length, bidirectional_fraction_at(step, self.max_steps, c.mask_annealing_fraction)

    def on_validation_epoch_start(self) -> None:
        self._val_generator = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        if ClipSearch(self.noise.clip_search) is not ClipSearch.off:  # its own generator: val/nll is unchanged
            generator = torch.Generator(device=self.device).manual_seed(self.seed + 2)
            self._clip_scores = ClipWindowScores(self.noise.clip_windows, self.schedule, self.noise.eps, generator)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        out = block_diffusion_loss(
            self.model, batch, self.schedule, self.noise.eval_range, self.noise.antithetic, self._val_generator
        )
        self.val_nll.update(out.loss, weight=out.num_tokens)
        if self._clip_scores is not None and batch_idx < self.noise.clip_search_batches:
            self._clip_scores.add(self.model, batch)

    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()
        self.val_nll.reset()
        metrics = {
            "val/nll": nll,
            "val/ppl": torch.exp(nll),
            "val/bpb": torch.tensor(bits_per_byte(nll.item(), self.tokens_per_byte)),
        }
        self.log_dict(metrics, prog_bar=True, sync_dist=True)
        trainer = self._trainer  # None when the hooks are driven by hand (tests)
        if trainer is not None:
            # the row's step is that of the weights measured (Lightning would log an in-fit validation one step
            # earlier, and the final one after fit at this step): resume.carry_over_log relies on it
            self.log_dict({"step": float(trainer.global_step), "epoch": float(trainer.current_epoch)}, sync_dist=True)
        if trainer is not None and trainer.state.fn == "fit":  # lets the recipe skip re-validating the same weights
            self.last_fit_validation = (trainer.global_step, {k: float(v) for k, v in metrics.items()})
        if self._clip_scores is not None:
            self._log_clip_search()

    def _log_clip_search(self) -> None:
        """Pick the lowest-variance (beta, omega) window of this validation; adopt it under ``apply``."""
        choice = self._clip_scores.choice()
        self._clip_scores = None
        self.log_dict({"val/clip_beta": choice.beta, "val/clip_omega": choice.omega, "val/clip_var": choice.variance})
        if ClipSearch(self.noise.clip_search) is ClipSearch.apply:
            self.train_range = (max(choice.beta, self.noise.eps), max(choice.omega, self.noise.eps))

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
