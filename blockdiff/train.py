"""The training recipe: config -> data + model -> Lightning -> checkpoints -> exported model directory.

Everything that can be wrong with the inputs (config, corpus, tokenizer) is checked *before* the run
directory is created, so a failed start leaves nothing behind. The run directory holds::

    config.yaml                 the resolved config
    checkpoints/last.ckpt       Lightning checkpoint, rewritten (atomically) every trainer.checkpoint_every_n_steps
    checkpoints/prev.ckpt       the checkpoint before it (blockdiff/checkpoint.py)
    logs/metrics.csv            CSV log (train/loss, val/nll, val/ppl, val/bpb, lr)
    model/                      final (EMA) weights: safetensors + blockdiff.json + tokenizer + train_config.yaml

``model/`` is written to a temporary name and renamed when complete.

``train(cfg, resume=RUN_DIR|CKPT)`` continues a run exactly where its checkpoint left it: weights,
optimiser, LR schedule, EMA, the position in the shuffled epoch and the random streams of the noise
(``blockdiff/callbacks.py``). A NaN/Inf loss stops the run before it touches the weights; Ctrl-C writes
a resumable checkpoint first. With several processes (``trainer.devices``, ``trainer.num_nodes``,
``trainer.strategy``) only global rank 0 writes files.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint, RichProgressBar, Timer
from lightning.pytorch.loggers import CSVLogger

from blockdiff.callbacks import (
    FinalCheckpoint,
    GracefulInterrupt,
    NonFiniteLossGuard,
    ResumableRNG,
    TrainingInterrupted,
)
from blockdiff.checkpoint import LAST, SafeCheckpointIO, load_checkpoint, resolve_resume
from blockdiff.config import Config, ConfigError, load_config, to_yaml
from blockdiff.data import BlockDiffusionDataModule, load_documents, pack_documents
from blockdiff.errors import WouldOverwriteError
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
            raise WouldOverwriteError(
                f"trainer.out_dir={str(run_dir)!r} already holds a run; choose another trainer.out_dir "
                "or pass --overwrite"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _env_is_global_zero() -> bool:
    """Global rank 0 as told by the launcher's environment (torchrun, SLURM, Lightning's own launcher)."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0))) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def _known_process_count(cfg: Config) -> int | None:
    """devices x num_nodes when the config says it outright (``None`` for 'auto', -1 and the like)."""
    devices = cfg.trainer.devices
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    return devices * cfg.trainer.num_nodes if isinstance(devices, int) and devices > 0 else None


@dataclass
class _Resume:
    checkpoint: Path | None = None
    in_place: bool = False  # continuing in the checkpoint's own run directory (kept, log carried over)
    old_log: list[dict] = field(default_factory=list)  # that run's CSV rows
    tokenizer: object = None  # that run's tokenizer (a BPE is not re-trained)


def _plan_resume(cfg: Config, run_dir: Path, resume: str | Path, is_zero: bool) -> _Resume:
    """Check the checkpoint (falling back to ``prev.ckpt`` of a run directory) and what a resume keeps."""
    checkpoint, resume_dir, warnings = resolve_resume(resume)
    for warning in warnings if is_zero else []:
        print(f"warning: {warning}", flush=True)
    plan = _Resume(checkpoint, in_place=run_dir.resolve() == resume_dir.resolve())
    if plan.in_place:
        _check_resumable(cfg, run_dir)
        log_file = run_dir / "logs" / "metrics.csv"
        if log_file.is_file():
            with open(log_file, newline="") as f:
                plan.old_log = list(csv.DictReader(f))
        if (run_dir / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            plan.tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer", trust_remote_code=False)
    return plan


def _check_resumable(cfg: Config, run_dir: Path) -> None:
    """A resume must train the same network on the same data with the same noise as the run it continues."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = load_config([saved_path])
    for section in ("model", "data", "noise", "curriculum"):
        if _section_yaml(saved, section) != _section_yaml(cfg, section):
            raise ConfigError(
                f"cannot resume {run_dir} with a different {section}.* config than the run used ({saved_path}); "
                "only trainer.* keys (e.g. trainer.max_steps) may change on resume. To train a changed model from "
                f"these weights, start a new run with model.init_from={run_dir}"
            )
    if saved.trainer.seed != cfg.trainer.seed:
        raise ConfigError(f"cannot resume {run_dir} with trainer.seed={cfg.trainer.seed}; the run used {saved.trainer.seed}")


def _section_yaml(cfg: Config, section: str) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(getattr(cfg, section)))


def _carry_over_log(logger: CSVLogger, rows: list[dict], before_step: int) -> None:
    """Re-log the rows of a resumed run's CSV log up to its checkpoint (Lightning's CSV logger restarts the file)."""
    for row in rows:
        step = int(float(row.get("step") or 0))
        if step >= before_step:
            continue
        values = {k: float(v) if k != "epoch" else int(float(v)) for k, v in row.items() if k != "step" and v not in ("", None)}
        logger.experiment.log_metrics(values, step)
    logger.save()


def train(
    cfg: Config, overwrite: bool = False, progress: bool = True, resume: str | Path | None = None
) -> TrainResult:
    """Train a block diffusion LM as configured; returns where it went and the final validation numbers.

    ``resume``: a run directory (its ``checkpoints/last.ckpt``, or ``prev.ckpt`` if that one is damaged) or
    a ``.ckpt`` file to continue from. Resuming into the checkpoint's own run directory keeps it (and its
    log); ``cfg`` must then describe the same model, data and noise.
    """
    start = time.monotonic()
    if cfg.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError("model.attn_implementation=flex_attention needs a CUDA GPU; use sdpa (the default) on CPU")
    L.seed_everything(cfg.trainer.seed, verbose=False)

    # -- inputs first: nothing is written until they are known to be usable -------------------------
    run_dir = Path(cfg.trainer.out_dir)
    is_zero = _env_is_global_zero()
    plan = _plan_resume(cfg, run_dir, resume, is_zero) if resume is not None else _Resume()
    ckpt_path, in_place = plan.checkpoint, plan.in_place
    processes = _known_process_count(cfg)
    if processes and cfg.data.batch_size % processes:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (the global batch) must be a multiple of the {processes} processes "
            f"(trainer.devices x trainer.num_nodes)"
        )
    docs = load_documents(cfg.data)
    tokenizer, model = build_model(cfg, docs, plan.tokenizer)
    corpus = pack_documents(docs, tokenizer, cfg.data.max_seq_len, cfg.data.val_fraction)

    if is_zero:  # only global rank 0 writes (DDP/FSDP run this function once per process)
        if not in_place:
            _prepare_run_dir(run_dir, overwrite)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        tokenizer.save_pretrained(run_dir / "tokenizer")  # `blockdiff export` rebuilds the network from these two

    module = BlockDiffusionModule(
        model, cfg.noise, cfg.optim, cfg.trainer.max_steps, corpus.tokens_per_byte, cfg.trainer.seed, cfg.curriculum,
        block_length_mixture=cfg.model.block_length_mixture,
    )
    datamodule = BlockDiffusionDataModule(corpus, cfg.data.batch_size, cfg.data.num_workers, cfg.trainer.seed)
    checkpoint_dir = run_dir / "checkpoints"
    interrupt = GracefulInterrupt(checkpoint_dir / LAST)
    callbacks = [
        ModelCheckpoint(
            dirpath=checkpoint_dir, every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
            save_last=True, save_top_k=0,
        ),
        LearningRateMonitor(logging_interval="step"),
        ResumableRNG(cfg.trainer.seed),
        NonFiniteLossGuard(checkpoint_dir),
        FinalCheckpoint(checkpoint_dir / LAST, cfg.trainer.checkpoint_every_n_steps),
        interrupt,
    ]
    if progress:
        callbacks.append(RichProgressBar())
    if cfg.optim.ema_decay > 0:
        callbacks.append(EMAWeightAveraging(decay=cfg.optim.ema_decay))
    if cfg.trainer.max_minutes:
        callbacks.append(Timer(duration={"minutes": cfg.trainer.max_minutes}, interval="step"))
    logger = CSVLogger(run_dir, name="logs", version="")
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
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
        default_root_dir=run_dir,
    )
    resumed_step = int(load_checkpoint(ckpt_path, mmap=True)["global_step"]) if ckpt_path else 0
    if plan.old_log and is_zero:
        _carry_over_log(logger, plan.old_log, before_step=resumed_step)
    try:
        with interrupt.handling_sigint():
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:  # Lightning ends a SIGTERMed run with SIGTERMException (a SystemExit, status 0)
        if not getattr(trainer, "received_sigterm", False):
            raise
        last = checkpoint_dir / LAST
        saved = "a resumable checkpoint is in" if interrupt.interrupted else "the last checkpoint is"
        raise TrainingInterrupted(
            f"terminated (SIGTERM) at step {trainer.global_step}; {saved} {last}. "
            f"Continue with `blockdiff train --resume {run_dir}`"
        ) from None
    if ckpt_path and resumed_step >= cfg.trainer.max_steps:
        # The checkpoint is final (the run died while validating or exporting): Lightning skips the whole fit,
        # end-of-fit hooks included, so take the weights the run would have exported (EMA ones, if any).
        module.load_state_dict(load_checkpoint(ckpt_path)["state_dict"])
        trainer.fit_loop.epoch_loop._batches_that_stepped = resumed_step  # the final validation's log step, as unbroken
    if interrupt.interrupted:
        raise TrainingInterrupted(
            f"interrupted at step {trainer.global_step}; a resumable checkpoint is in {checkpoint_dir / LAST}. "
            f"Continue with `blockdiff train --resume {run_dir}`"
        )
    # Final numbers with the weights being exported (EMA weights are swapped in at the end of fit).
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    model_dir = run_dir / "model"
    if trainer.is_global_zero:
        export_model(model, tokenizer, cfg, model_dir)
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        steps=trainer.global_step,
        seconds=time.monotonic() - start,
        metrics={k: float(v) for k, v in metrics.items()},
    )


def build_model(cfg: Config, docs, tokenizer=None) -> tuple[object, BlockDiffusionLM]:
    """``(tokenizer, model)`` as ``cfg`` describes them, ready to train: the backbone (``_tokenizer_and_backbone``;
    ``docs`` is only read to train a BPE), the block-diffusion spec, LoRA / checkpointing, and the sampler
    defaults of the ``sample`` section saved with the model."""
    tokenizer, backbone = _tokenizer_and_backbone(cfg, docs, tokenizer)
    spec = BlockDiffusionSpec(
        tokenizer.mask_token_id, cfg.model.block_length, cfg.logit_shift, cfg.data.max_seq_len,
        getattr(cfg.noise.schedule, "value", cfg.noise.schedule),
    )
    model = BlockDiffusionLM(_adapt_for_training(backbone, cfg), spec)
    model.generation_config.update(
        sampler=cfg.sample.sampler, tau=cfg.sample.tau, steps_per_block=cfg.sample.steps_per_block,
        temperature=cfg.sample.temperature,
    )
    return tokenizer, model


def _tokenizer_and_backbone(cfg: Config, docs, tokenizer=None):
    """A fresh tokenizer (or the given one) + randomly initialised network, or both from ``model.pretrained`` /
    ``model.init_from``."""
    if cfg.model.pretrained is not None:
        from blockdiff.pretrained import load_pretrained

        backbone, tokenizer, _ = load_pretrained(
            cfg.model.pretrained, cfg.model.trust_remote_code, cfg.model.attn_implementation
        )
        _check_positions(backbone, cfg.data.max_seq_len, f"model.pretrained={cfg.model.pretrained}")
        return tokenizer, backbone.train()
    if cfg.model.init_from is None:
        tokenizer = tokenizer or build_tokenizer(cfg.data.tokenizer, docs["text"], cfg.data.bpe_vocab_size)
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
    _check_positions(loaded.model.backbone, cfg.data.max_seq_len, f"model.init_from={cfg.model.init_from}")
    return loaded.tokenizer, loaded.model.backbone.train()  # loaded for inference; back to training mode


def _check_positions(backbone, max_seq_len: int, source: str) -> None:
    positions = getattr(backbone.config, "max_position_embeddings", None) or getattr(backbone.config, "n_positions", None)
    if positions is not None and max_seq_len > positions:
        raise ConfigError(f"data.max_seq_len={max_seq_len} exceeds the {positions} positions of {source}; use data.max_seq_len <= {positions}")


def _adapt_for_training(backbone, cfg: Config):
    """Optional LoRA adapters and gradient checkpointing (both mostly for large pretrained decoders)."""
    if cfg.model.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora_rank > 0:
        from blockdiff.pretrained import apply_lora

        backbone = apply_lora(backbone, cfg.model.lora_rank, cfg.model.lora_alpha)
    return backbone


def export_model(model: BlockDiffusionLM, tokenizer, cfg: Config, model_dir: Path) -> None:
    """Write weights, tokenizer and the training config to ``model_dir`` atomically (temp dir + rename)."""
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from blockdiff.pretrained import merge_lora

    export = BlockDiffusionLM(merge_lora(model.backbone), model.spec)  # LoRA (if any) folded in
    export.generation_config = model.generation_config
    export.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "train_config.yaml").write_text(to_yaml(cfg))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
