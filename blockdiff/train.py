"""The training recipe: config -> data + model -> Lightning -> checkpoints -> exported model directory.

Everything that can be wrong with the inputs (config, corpus, tokenizer) is checked *before* the run
directory is created, so a failed start leaves nothing behind. The run directory holds::

    config.yaml                 the resolved config
    checkpoints/last.ckpt       Lightning checkpoint, rewritten every trainer.checkpoint_every_n_steps
    logs/metrics.csv            CSV log (train/loss, val/nll, val/ppl, val/bpb, lr)
    model/                      final (EMA) weights: safetensors + blockdiff.json + tokenizer + train_config.yaml

``model/`` is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint, RichProgressBar, Timer
from lightning.pytorch.loggers import CSVLogger

from blockdiff.config import Config, ConfigError, to_yaml
from blockdiff.data import BlockDiffusionDataModule, load_documents, pack_documents
from blockdiff.lightning_module import BlockDiffusionModule
from blockdiff.model import BlockDiffusionLM, BlockDiffusionSpec, build_backbone
from blockdiff.tokenizer import build_tokenizer

__all__ = ["TrainResult", "train", "resolve_precision"]


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    seconds: float
    metrics: dict[str, float]  # final validation: val/nll, val/ppl, val/bpb


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' -> fp32 on CPU (bf16 matmul is very slow there), bf16-mixed on a GPU."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"trainer.out_dir={str(run_dir)!r} already holds a run; choose another trainer.out_dir "
                "or pass --overwrite"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def train(cfg: Config, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train a block diffusion LM as configured; returns where it went and the final validation numbers."""
    start = time.monotonic()
    if cfg.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError("model.attn_implementation=flex_attention needs a CUDA GPU; use sdpa (the default) on CPU")
    L.seed_everything(cfg.trainer.seed, verbose=False)

    # -- inputs first: nothing is written until they are known to be usable -------------------------
    docs = load_documents(cfg.data)
    tokenizer, backbone = _tokenizer_and_backbone(cfg, docs)
    corpus = pack_documents(docs, tokenizer, cfg.data.max_seq_len, cfg.data.val_fraction)
    spec = BlockDiffusionSpec(tokenizer.mask_token_id, cfg.model.block_length, cfg.model.logit_shift, cfg.data.max_seq_len)
    model = BlockDiffusionLM(backbone, spec)

    run_dir = Path(cfg.trainer.out_dir)
    _prepare_run_dir(run_dir, overwrite)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))

    module = BlockDiffusionModule(model, cfg.noise, cfg.optim, cfg.trainer.max_steps, corpus.tokens_per_byte, cfg.trainer.seed)
    datamodule = BlockDiffusionDataModule(corpus, cfg.data.batch_size, cfg.data.num_workers, cfg.trainer.seed)
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints", every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
            save_last=True, save_top_k=0,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if progress:
        callbacks.append(RichProgressBar())
    if cfg.optim.ema_decay > 0:
        callbacks.append(EMAWeightAveraging(decay=cfg.optim.ema_decay))
    if cfg.trainer.max_minutes:
        callbacks.append(Timer(duration={"minutes": cfg.trainer.max_minutes}, interval="step"))
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        max_steps=cfg.trainer.max_steps,
        val_check_interval=cfg.trainer.val_every_n_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.trainer.limit_val_batches or 1.0,
        num_sanity_val_steps=0,
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=CSVLogger(run_dir, name="logs", version=""),
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    trainer.fit(module, datamodule=datamodule)
    # Final numbers with the weights being exported (EMA weights are swapped in at the end of fit).
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    model_dir = run_dir / "model"
    export_model(model, tokenizer, cfg, model_dir)
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        steps=trainer.global_step,
        seconds=time.monotonic() - start,
        metrics={k: float(v) for k, v in metrics.items()},
    )


def _tokenizer_and_backbone(cfg: Config, docs):
    """A fresh tokenizer + randomly initialised network, or both taken from ``model.init_from``."""
    if cfg.model.init_from is None:
        tokenizer = build_tokenizer(cfg.data.tokenizer, docs["text"], cfg.data.bpe_vocab_size)
        backbone = build_backbone(
            cfg.model,
            vocab_size=len(tokenizer),
            max_seq_len=cfg.data.max_seq_len,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return tokenizer, backbone
    from blockdiff.evaluate import load_model_dir

    loaded = load_model_dir(cfg.model.init_from)
    positions = getattr(loaded.model.backbone.config, "max_position_embeddings", None)
    if positions is not None and cfg.data.max_seq_len > positions:
        raise ConfigError(
            f"data.max_seq_len={cfg.data.max_seq_len} exceeds the {positions} positions of model.init_from="
            f"{cfg.model.init_from}; use data.max_seq_len <= {positions}"
        )
    return loaded.tokenizer, loaded.model.backbone.train()  # loaded for inference; back to training mode


def export_model(model: BlockDiffusionLM, tokenizer, cfg: Config, model_dir: Path) -> None:
    """Write weights, tokenizer and the training config to ``model_dir`` atomically (temp dir + rename)."""
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "train_config.yaml").write_text(to_yaml(cfg))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
