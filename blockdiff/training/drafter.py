"""``blockdiff train-drafter``: a DFlash-style drafter trained on a frozen target's cached features (docs/design.md
§14, docs/generation.md "Training a drafter"). Named phases:

1. ``prepare``: the target (loaded once), the distilled rows split by prompt, the corpus rows (``data.corpus``;
   training only, labelled by the target), the mask token, per-layer feature scales, the features of every row and
   the draft vocabulary (``drafter_data.py``); the target is dropped after, only its embedding and head are kept
   (frozen);
2. ``init_drafter``: the drafter's layers copied from the target's top layers, its final norm from the target's,
   ``fc`` reading the last fed layer (identity), ``hidden_norm`` from the first copied layer's input norm: at step 0
   it already behaves like the target's last layers reading the last fed layer;
3. ``fit``: Lightning trains ``DrafterModule`` (no backward through the target: its features are inputs), checks
   held-out acceptance every ``train.val_every`` steps and stops early when it stops rising;
4. ``save``: the best checkpoint's drafter, scales folded into ``fc``, written in DFlash's layout (bf16) with its
   model card (``drafter_card.py``) into ``out_dir/drafter``.

Resuming: Lightning's ``last.ckpt`` in ``out_dir/checkpoints`` (weights, optimiser, schedule, step, the early-stop
and best-checkpoint state); the features are captured again from the token ids (minutes, the same on any machine),
and the random anchors continue from a stream seeded by the step resumed at (not the first run's own stream: a
resumed run is not bit-identical to an uninterrupted one).

Held-out acceptance (``val/accept``): for each held-out anchor, the number of leading drafts equal to the target's
own next tokens (the distilled continuation is the target's greedy output) — what greedy speculative decoding would
accept with a block of ``block_length - 1`` drafts.

Shape legend: ``r`` rows, ``q`` block tokens of a batch (anchors x l), ``l`` block length, ``v`` draft vocabulary.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from torch.nn import functional as F

from blockdiff.config.drafter import DrafterConfig
from blockdiff.errors import UsageError
from blockdiff.modeling.dflash import DFlashDrafter, default_layer_ids, drafter_config, target_fingerprint
from blockdiff.training.drafter_data import (
    Rows,
    anchor_batch,
    capture_features,
    corpus_rows,
    draft_vocabulary,
    feature_scales,
    read_rows,
)

__all__ = ["Prepared", "prepare", "init_drafter", "DrafterModule", "train_drafter", "pick_mask_token"]


@dataclass
class Prepared:
    """Everything training reads, the target itself gone."""

    train: Rows
    held: Rows
    train_features: list[torch.Tensor]
    held_features: list[torch.Tensor]
    embed: torch.Tensor  # (V, d) the target's input embedding (frozen)
    head: torch.Tensor  # (V, d) the target's output head rows (frozen)
    scales: torch.Tensor  # (len(layer_ids),) feature divisors
    drafter: DFlashDrafter
    capture_seconds: float


def pick_mask_token(tokenizer, rows: Rows, wanted: int | None) -> int:
    """``wanted``, or the highest special token id that no row contains (an id the unmodified target already
    embeds, as DFlash's layout requires)."""
    if wanted is not None:
        return wanted
    seen = {t for ids in rows.ids for t in ids}
    special = sorted(i for i in set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
                     if i not in seen and i < len(tokenizer))
    if not special:
        raise UsageError("the target's tokenizer has no special token the data never uses, to serve as the mask: "
                         "set net.mask_token_id")
    return special[-1]


def init_drafter(target, config) -> DFlashDrafter:
    """A drafter initialised from ``target`` (module docstring, phase 2)."""
    drafter = DFlashDrafter(config)
    body = target.model if hasattr(target, "model") else target.base_model
    layers = body.layers[-len(drafter.layers):]
    with torch.no_grad():
        for mine, theirs in zip(drafter.layers, layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(mine.self_attn, name).weight.copy_(getattr(theirs.self_attn, name).weight)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(mine.mlp, name).weight.copy_(getattr(theirs.mlp, name).weight)
            mine.input_layernorm.weight.copy_(theirs.input_layernorm.weight)
            mine.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight)
        drafter.norm.weight.copy_(body.norm.weight)
        drafter.hidden_norm.weight.copy_(layers[0].input_layernorm.weight)
        d = config.hidden_size
        drafter.fc.weight.zero_()
        drafter.fc.weight[:, -d:] = torch.eye(d)  # the last fed layer, as the scaled features give it
    return drafter


def prepare(config: DrafterConfig, progress=None) -> Prepared:
    """Phase 1 (module docstring)."""
    from blockdiff.modeling.pretrained import load_decoder

    target, tokenizer, _ = load_decoder(config.target, what="target")
    target.eval().requires_grad_(False)
    train, held = read_rows(config.data.distilled, config.data.val_fraction)
    data = config.data
    corpus = (corpus_rows(data.corpus, tokenizer, data.corpus_windows, data.corpus_window_tokens, config.train.seed)
              if data.corpus_windows else Rows([], []))
    net = config.net
    layer_ids = default_layer_ids(target.config.num_hidden_layers, net.target_layers)
    scales = feature_scales(target, train.ids[0], layer_ids)
    start = time.perf_counter()
    batch = data.feature_batch
    train_f = capture_features(target, train, layer_ids, scales, batch, progress)
    train_f += capture_features(target, corpus, layer_ids, scales, batch, progress, labels=True)
    held_f = capture_features(target, held, layer_ids, scales, batch)
    train.extend(corpus)
    mask_id = pick_mask_token(tokenizer, train, net.mask_token_id)
    vocab = draft_vocabulary(train, net.draft_vocab, target.get_output_embeddings().weight.shape[0])
    cfg = drafter_config(target.config, num_layers=net.num_layers, layer_ids=layer_ids, block_length=net.block_length,
                         mask_token_id=mask_id, draft_vocab=len(vocab) if net.draft_vocab else 0,
                         target=target_fingerprint(target))
    drafter = init_drafter(target, cfg)
    if net.draft_vocab:
        drafter.draft_ids.copy_(vocab)
    embed = target.get_input_embeddings().weight.detach().clone()
    head = target.get_output_embeddings().weight.detach().clone()
    return Prepared(train, held, train_f, held_f, embed, head, scales, drafter, time.perf_counter() - start)


class DrafterModule(L.LightningModule):
    """Training and held-out acceptance of a drafter on cached features (module docstring)."""

    def __init__(self, drafter: DFlashDrafter, embed: torch.Tensor, head: torch.Tensor, config: DrafterConfig):
        super().__init__()
        self.drafter = drafter
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("head", head[drafter.draft_ids], persistent=False)  # (v, d) the draft rows
        lookup = torch.full((head.shape[0],), -100, dtype=torch.long)
        lookup[drafter.draft_ids] = torch.arange(len(drafter.draft_ids))
        self.register_buffer("to_draft", lookup, persistent=False)  # full id -> draft row (-100: not drafted)
        self.cfg = config
        l = drafter.block_length
        decay = config.train.loss_decay
        weights = torch.tensor([0.0] + [math.exp(-(i - 1) / decay) if decay else 1.0 for i in range(1, l)])
        self.register_buffer("weights", weights, persistent=False)  # (l,) position 0 is the anchor: no loss
        self.hits = torch.zeros(l)  # held-out: right drafts by in-block position
        self.accepted, self.counted = 0.0, 0  # held-out: leading right drafts, blocks

    def _forward(self, batch):
        ctx_pos = torch.arange(batch.features.shape[1], device=self.device)[None].expand(len(batch.features), -1)
        cache = self.drafter.context_cache(batch.features.to(self.drafter.fc.weight.dtype), ctx_pos)
        hidden = self.drafter(F.embedding(batch.block_ids, self.embed), batch.positions, cache, batch.mask)
        return hidden @ self.head.T  # (r, q, v)

    def training_step(self, batch, _):
        logits = self._forward(batch)
        l = self.drafter.block_length
        targets = self.to_draft[batch.targets.clamp(min=0)].masked_fill(batch.targets < 0, -100)  # (r, q)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
        w = self.weights.repeat(logits.shape[1] // l)[None].expand_as(targets).flatten() * (targets.flatten() >= 0)
        loss = (loss * w).sum() / w.sum().clamp(min=1e-9)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _):
        logits = self._forward(batch)
        l = self.drafter.block_length
        guess = self.drafter.draft_ids[logits.argmax(-1)]  # (r, q) full ids
        right = (guess == batch.targets).view(-1, l)[:, 1:]  # (blocks, l - 1)
        real = (batch.targets.view(-1, l)[:, 1] >= 0)  # blocks that exist
        self.hits[1:] += right[real].float().sum(0).cpu()
        self.accepted += float(right[real].long().cumprod(1).sum())
        self.counted += int(real.sum())

    def on_validation_epoch_end(self):
        count = max(self.counted, 1)
        self.log("val/accept", self.accepted / count, prog_bar=True)
        for i in (1, 2, 3):
            if i < self.drafter.block_length:
                self.log(f"val/acc_{i}", float(self.hits[i]) / count)
        self.hits.zero_()
        self.accepted, self.counted = 0.0, 0

    def configure_optimizers(self):
        t = self.cfg.train
        opt = torch.optim.AdamW(self.drafter.parameters(), lr=t.lr, weight_decay=0.0, betas=(0.9, 0.95))
        warm = max(t.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, t.max_steps) / t.max_steps))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _Anchors(torch.utils.data.IterableDataset):
    """Endless random batches (training) or one fixed pass (held out, fixed anchors)."""

    def __init__(self, rows: Rows, features, config: DrafterConfig, mask_id: int, train: bool, start: int = 0):
        self.rows, self.features, self.cfg, self.mask_id, self.train = rows, features, config, mask_id, train
        self.start = start  # the step a resumed run starts at: its batches differ from the first run's

    def __iter__(self):
        t, l = self.cfg.train, self.cfg.net.block_length
        gen = torch.Generator().manual_seed(t.seed + (10**6 if not self.train else 7919 * self.start))
        if not self.train:
            for s in range(0, len(self.rows), t.batch_size):
                idx = list(range(s, min(s + t.batch_size, len(self.rows))))
                yield self._batch(idx, gen, l)
            return
        while True:
            idx = torch.randint(len(self.rows), (t.batch_size,), generator=gen).tolist()
            yield self._batch(idx, gen, l)

    def _batch(self, idx, gen, l):
        return anchor_batch([self.features[i] for i in idx], [self.rows.ids[i] for i in idx],
                            [self.rows.prompt[i] for i in idx], self.cfg.train.anchors, l, self.mask_id, gen,
                            [self.rows.labels.get(i) for i in idx])


def _loader(dataset):
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0)


def train_drafter(config: DrafterConfig, resume: bool = False, progress=None) -> dict:
    """Phases 1-4 (module docstring); returns the summary the model card and the CLI print."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from blockdiff.training.drafter_card import write_drafter

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    out = Path(config.out_dir)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if last.exists() and not resume:
        raise UsageError(f"{out} holds a drafter run: add --resume to continue it, or choose another out_dir")
    torch.manual_seed(config.train.seed)
    prep = prepare(config)
    module = DrafterModule(prep.drafter, prep.embed, prep.head, config)
    mask_id = prep.drafter.mask_token_id
    t = config.train
    best = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/accept", mode="max", save_last=True, filename="best")
    stop = EarlyStopping(monitor="val/accept", mode="max", patience=t.patience, min_delta=1e-3)
    trainer = L.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto", max_steps=t.max_steps,
        max_time={"minutes": t.max_minutes}, val_check_interval=t.val_every, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, callbacks=[best, stop], logger=False, enable_progress_bar=bool(progress),
        enable_model_summary=False, default_root_dir=str(out), limit_val_batches=None,
    )
    started = time.perf_counter()
    start = 0
    if resume and last.exists():
        start = int(torch.load(last, map_location="cpu", weights_only=False).get("global_step", 0))
    trainer.fit(module, _loader(_Anchors(prep.train, prep.train_features, config, mask_id, True, start)),
                _loader(_Anchors(prep.held, prep.held_features, config, mask_id, False)),
                ckpt_path=str(last) if resume and last.exists() else None)
    seconds = time.perf_counter() - started
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state, strict=False)
    summary = {
        "steps": trainer.global_step, "train_seconds": seconds, "capture_seconds": prep.capture_seconds,
        "best_accept": float(best.best_model_score) if best.best_model_score is not None else None,
        "early_stopped": stop.wait_count >= stop.patience,
        "train_rows": len(prep.train), "train_tokens": prep.train.tokens, "held_rows": len(prep.held),
        "corpus_rows": len(prep.train.labels),  # the labelled rows are the corpus's
        "corpus_tokens": sum(len(prep.train.ids[i]) for i in prep.train.labels),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "config": asdict(config),
    }
    drafter = module.drafter
    drafter.fold_scales(prep.scales)
    write_drafter(drafter, out / "drafter", summary)
    return summary
