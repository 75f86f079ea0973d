"""The training recipe: config -> data + model -> Lightning -> checkpoints -> exported model directory.

Everything that can be wrong with the inputs (config, corpus, tokenizer) is checked *before* the run
directory is created, so a failed start leaves nothing behind. The run directory holds::

    config.yaml                 the resolved config
    checkpoints/last.ckpt       Lightning checkpoint, rewritten (atomically) every trainer.checkpoint_every_n_steps
    checkpoints/prev.ckpt       the checkpoint before it (blockdiff/training/checkpoint.py)
    logs/metrics.csv            CSV log (train/loss, val/nll, val/ppl, val/bpb, lr)
    model/                      final (EMA) weights: safetensors + blockdiff.json + tokenizer + train_config.yaml

``model/`` is written to a temporary name and renamed when complete.

``train(cfg, resume=RUN_DIR|CKPT)`` continues a run exactly where its checkpoint left it: weights,
optimiser, LR schedule, EMA, the position in the shuffled epoch and the random streams of the noise
(``blockdiff/training/callbacks.py``). A NaN/Inf loss stops the run before it touches the weights; Ctrl-C writes
a resumable checkpoint first. With several processes (``trainer.devices``, ``trainer.num_nodes``,
``trainer.strategy``) only global rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from blockdiff.training.callbacks import (
    GracefulInterrupt,
    LastCheckpoint,
    NonFiniteLossGuard,
    ResumableRNG,
    RunConfigRecord,
    SessionTimer,
    TrainingInterrupted,
)
from blockdiff.training.checkpoint import LAST, SafeCheckpointIO, load_checkpoint, remove_legacy, settle_checkpoints
from blockdiff.config import Config, ConfigError, to_yaml
from blockdiff.data.corpus import load_documents, pack_documents
from blockdiff.errors import StorageError
from blockdiff.training.datamodule import BlockDiffusionDataModule
from blockdiff.files import write_failure_reason, write_text_atomic
from blockdiff.training.lightning_module import BlockDiffusionModule
from blockdiff.modeling.model import BlockDiffusionLM, BlockDiffusionSpec, build_backbone
from blockdiff.training.progress import StepProgressBar
from blockdiff.training.resume import RUN_CONFIG_KEY, ResumePlan, plan_resume
from blockdiff.modeling.rundir import (
    CHECKPOINTS,
    CONFIG,
    LOGS,
    MODEL,
    SPEC_FILE,
    TOKENIZER,
    check_new_run_dir,
    check_replaceable,
    is_run_dir,
    prepare_run_dir,
    replace_dir,
    staging_dir,
)
from blockdiff.modeling.tokenizer import build_tokenizer

__all__ = ["TrainResult", "train", "resolve_precision"]


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    seconds: float
    metrics: dict[str, float]  # final validation: val/nll, val/ppl, val/bpb
    stopped_by: str = "max_steps"  # or "time budget" (trainer.max_minutes spent first)


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' -> fp32 on CPU (bf16 matmul is very slow there), bf16-mixed on a GPU."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


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


def train(
    cfg: Config, overwrite: bool = False, progress: bool = True, resume: str | Path | None = None
) -> TrainResult:
    """Train a block diffusion LM as configured; returns where it went and the final validation numbers.

    ``resume``: a run directory (its ``checkpoints/last.ckpt``, or ``prev.ckpt`` if that one is damaged) or
    a ``.ckpt`` file to continue from. Resuming into the checkpoint's own run directory keeps it (and its
    log); ``cfg`` must then describe the same model, data, noise and seed as the checkpoint was trained with.

    Phases: check every input (config, resume point, corpus, network, Lightning settings) -> write the run
    directory -> fit -> validate -> export. A run that fails before its first checkpoint leaves no run
    directory behind, so the corrected command can simply be run again.
    """
    start = time.monotonic()
    _check_runnable(cfg)
    L.seed_everything(cfg.trainer.seed, verbose=False)

    # -- inputs first: nothing is written until they are known to be usable -------------------------
    run_dir = Path(cfg.trainer.out_dir)
    is_zero = _env_is_global_zero()
    plan = plan_resume(cfg, run_dir, resume) if resume is not None else ResumePlan()
    if is_zero and not plan.in_place:
        check_new_run_dir(run_dir, overwrite)  # before the slow part; prepare_run_dir repeats it when writing
    docs = load_documents(cfg.data)
    tokenizer, model = build_model(cfg, docs, plan.tokenizer)
    corpus = pack_documents(docs, tokenizer, cfg.data.max_seq_len, cfg.data.val_fraction)
    if cfg.data.batch_size > len(corpus.train):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {len(corpus.train)} training windows of "
            f"data.max_seq_len={cfg.data.max_seq_len} tokens in the corpus; use data.batch_size <= {len(corpus.train)}"
        )
    module = BlockDiffusionModule(
        model, cfg.noise, cfg.optim, cfg.trainer.max_steps, corpus.tokens_per_byte, cfg.trainer.seed, cfg.curriculum,
        block_length_mixture=cfg.model.block_length_mixture,
    )
    datamodule = BlockDiffusionDataModule(corpus, cfg.data.batch_size, cfg.data.num_workers, cfg.trainer.seed)
    run = _build_trainer(cfg, run_dir, progress)  # Lightning checks accelerator, precision, strategy here

    # -- the run directory ---------------------------------------------------------------------------
    checkpoint_dir = run_dir / CHECKPOINTS
    fresh = not plan.in_place
    if is_zero:  # only global rank 0 writes (DDP/FSDP run this function once per process)
        for warning in plan.point.warnings if plan.point else []:
            print(f"warning: {warning}", flush=True)
        print(_announce(cfg, run_dir, plan), flush=True)
        if fresh:
            prepare_run_dir(run_dir, overwrite)
        else:
            settle_checkpoints(plan.point)  # exactly last.ckpt (the state resumed from) + prev.ckpt
        with _removed_on_failure(run_dir if fresh else None, checkpoint_dir):
            write_text_atomic(run_dir / CONFIG, to_yaml(cfg))
            tokenizer.save_pretrained(run_dir / TOKENIZER)  # `blockdiff export` rebuilds the network from these two
            if plan.old_log:
                _carry_over_log(run.logger, plan.old_log, before_step=plan.step)

    with _removed_on_failure(run_dir if fresh and is_zero else None, checkpoint_dir):
        _fit(run, module, datamodule, plan, run_dir)
    if is_zero and plan.point is not None and plan.in_place:
        remove_legacy(plan.point)  # last-vN.ckpt of older versions: last.ckpt is now the newest
    if plan.checkpoint and plan.step >= cfg.trainer.max_steps:
        # The checkpoint is final (the run died while validating or exporting): Lightning skips the whole fit,
        # end-of-fit hooks included, so take the weights the run would have exported (EMA ones, if any).
        module.load_state_dict(load_checkpoint(plan.checkpoint)["state_dict"])
        run.trainer.fit_loop.epoch_loop._batches_that_stepped = plan.step  # the final validation's log step, as unbroken
    stopped_by = "time budget" if run.timer is not None and run.timer.ran_out else "max_steps"
    if is_zero and stopped_by == "time budget":
        print(
            f"the time budget of trainer.max_minutes={cfg.trainer.max_minutes:g} was spent at step "
            f"{run.trainer.global_step} of {cfg.trainer.max_steps}; continue with `blockdiff train --resume {run_dir}`",
            flush=True,
        )
    # Final numbers with the weights being exported (EMA weights are swapped in at the end of fit); a validation
    # that fit already ran at the final step measured these very weights, and is not run (or logged) twice.
    validated = module.last_fit_validation
    if validated is not None and validated[0] == run.trainer.global_step:
        metrics = validated[1]
    else:
        metrics = run.trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    model_dir = run_dir / MODEL
    if run.trainer.is_global_zero:
        export_model(model, tokenizer, cfg, model_dir)
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        steps=run.trainer.global_step,
        seconds=time.monotonic() - start,
        metrics={k: float(v) for k, v in metrics.items()},
        stopped_by=stopped_by,
    )


def _check_runnable(cfg: Config) -> None:
    """Checks that need the machine (not just the config): the attention kernel, the split of the global batch."""
    if cfg.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError("model.attn_implementation=flex_attention needs a CUDA GPU; use sdpa (the default) on CPU")
    processes = _known_process_count(cfg)
    if processes and cfg.data.batch_size % processes:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (the global batch) must be a multiple of the {processes} processes "
            f"(trainer.devices x trainer.num_nodes)"
        )


def _announce(cfg: Config, run_dir: Path, plan: ResumePlan) -> str:
    """What this command will do, in one line."""
    budget = f", budget {cfg.trainer.max_minutes:g} min" if cfg.trainer.max_minutes else ""
    if plan.checkpoint is None:
        return f"training {run_dir}: {cfg.trainer.max_steps} steps{budget}"
    if plan.step >= cfg.trainer.max_steps:
        return (
            f"resuming {run_dir} at step {plan.step}: trainer.max_steps={cfg.trainer.max_steps} is already reached, so "
            "only the final validation and export run (raise trainer.max_steps to train longer)"
        )
    return f"resuming {run_dir} at step {plan.step} of {cfg.trainer.max_steps}{budget} (from {plan.checkpoint})"


@contextlib.contextmanager
def _removed_on_failure(run_dir: Path | None, checkpoint_dir: Path):
    """A new run directory that fails before its first checkpoint is removed (it holds nothing to resume)."""
    try:
        yield
    except BaseException:
        if run_dir is not None and is_run_dir(run_dir) and not any(checkpoint_dir.glob("*.ckpt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


@dataclass
class _Run:
    trainer: L.Trainer
    logger: CSVLogger
    interrupt: GracefulInterrupt
    timer: SessionTimer | None


def _build_trainer(cfg: Config, run_dir: Path, progress: bool) -> _Run:
    """The Lightning ``Trainer`` with blockdiff's callbacks; builds nothing on disk."""
    last = LastCheckpoint(run_dir / CHECKPOINTS / LAST, cfg.trainer.checkpoint_every_n_steps)
    interrupt = GracefulInterrupt(last)
    timer = SessionTimer(cfg.trainer.max_minutes) if cfg.trainer.max_minutes else None
    callbacks = [
        LearningRateMonitor(logging_interval="step"),
        ResumableRNG(cfg.trainer.seed),
        NonFiniteLossGuard(run_dir / CHECKPOINTS),
        RunConfigRecord(RUN_CONFIG_KEY, to_yaml(cfg)),
        *([timer] if timer else []),
        last,
        interrupt,
    ]
    if progress:
        callbacks.append(StepProgressBar())
    if cfg.optim.ema_decay > 0:
        callbacks.append(EMAWeightAveraging(decay=cfg.optim.ema_decay))
    logger = CSVLogger(run_dir, name=LOGS, version="")
    try:
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
    except (MisconfigurationException, ValueError, RuntimeError) as err:  # Lightning's own checks of these keys
        raise ConfigError(
            f"Lightning refused trainer.accelerator={cfg.trainer.accelerator!r} / trainer.precision={cfg.trainer.precision!r} "
            f"/ trainer.strategy={cfg.trainer.strategy!r} / trainer.devices={cfg.trainer.devices!r}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from None
    return _Run(trainer, logger, interrupt, timer)


def _fit(run: _Run, module, datamodule, plan: ResumePlan, run_dir: Path) -> None:
    """``trainer.fit``, turning Ctrl-C and SIGTERM into ``TrainingInterrupted`` with the command that resumes."""
    last = run_dir / CHECKPOINTS / LAST
    try:
        with run.interrupt.handling_sigint():
            run.trainer.fit(module, datamodule=datamodule, ckpt_path=plan.checkpoint, weights_only=True)
    except SystemExit:  # Lightning ends a SIGTERMed run with SIGTERMException (a SystemExit, status 0)
        if not getattr(run.trainer, "received_sigterm", False):
            raise
        saved = "a resumable checkpoint is in" if run.interrupt.interrupted else "the last checkpoint is"
        raise TrainingInterrupted(
            f"terminated (SIGTERM) at step {run.trainer.global_step}; {saved} {last}. "
            f"Continue with `blockdiff train --resume {run_dir}`"
        ) from None
    if run.interrupt.interrupted:
        raise TrainingInterrupted(
            f"interrupted at step {run.trainer.global_step}; a resumable checkpoint is in {last}. "
            f"Continue with `blockdiff train --resume {run_dir}`"
        )


def _carry_over_log(logger: CSVLogger, rows: list[dict], before_step: int) -> None:
    """Re-log the rows of a resumed run's CSV log up to its checkpoint (Lightning's CSV logger restarts the file)."""
    for row in rows:
        step = int(float(row.get("step") or 0))
        if step >= before_step:
            continue
        values = {k: float(v) if k != "epoch" else int(float(v)) for k, v in row.items() if k != "step" and v not in ("", None)}
        logger.experiment.log_metrics(values, step)
    logger.save()


def build_model(cfg: Config, docs, tokenizer=None) -> tuple[object, BlockDiffusionLM]:
    """``(tokenizer, model)`` as ``cfg`` describes them, ready to train: the backbone (``_tokenizer_and_backbone``;
    ``docs`` is only read to train a BPE), the block-diffusion spec, LoRA / checkpointing, and the sampler
    defaults of the ``sample`` section saved with the model."""
    tokenizer, backbone, inherited_shift = _tokenizer_and_backbone(cfg, docs, tokenizer)
    logit_shift = inherited_shift if cfg.model.logit_shift is None and inherited_shift is not None else cfg.logit_shift
    spec = BlockDiffusionSpec(
        tokenizer.mask_token_id, cfg.model.block_length, logit_shift, cfg.data.max_seq_len,
        getattr(cfg.noise.schedule, "value", cfg.noise.schedule),
    )
    model = BlockDiffusionLM(_adapt_for_training(backbone, cfg), spec)
    model.generation_config.update(
        sampler=cfg.sample.sampler, tau=cfg.sample.tau, steps_per_block=cfg.sample.steps_per_block,
        temperature=cfg.sample.temperature,
    )
    return tokenizer, model


def _tokenizer_and_backbone(cfg: Config, docs, tokenizer=None):
    """``(tokenizer, backbone, logit_shift of the source)``: a fresh tokenizer (or the given one) + randomly initialised
    network, or both from ``model.pretrained`` / ``model.init_from`` (whose logit shift a run keeps unless
    ``model.logit_shift`` says otherwise)."""
    if cfg.model.pretrained is not None:
        from blockdiff.modeling.pretrained import load_pretrained

        _refuse_blockdiff_model_as_base(cfg)
        backbone, tokenizer, _ = load_pretrained(
            cfg.model.pretrained, cfg.model.trust_remote_code, cfg.model.attn_implementation
        )
        _check_positions(backbone, cfg.data.max_seq_len, f"model.pretrained={cfg.model.pretrained}")
        return tokenizer, backbone.train(), None
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
        return tokenizer, backbone, None
    from blockdiff.evaluation.nelbo import load_model_dir

    loaded = load_model_dir(cfg.model.init_from)
    _check_positions(loaded.model.backbone, cfg.data.max_seq_len, f"model.init_from={cfg.model.init_from}")
    return loaded.tokenizer, loaded.model.backbone.train(), loaded.model.spec.logit_shift  # back to training mode


def _refuse_blockdiff_model_as_base(cfg: Config) -> None:
    """A blockdiff model given as ``model.pretrained`` would be read as a plain AR decoder and get the logit shift
    of one (on), silently flipping a from-scratch model's; continuing it is what ``model.init_from`` is for."""
    from blockdiff.modeling.model_files import read_json_file

    source = Path(cfg.model.pretrained)
    spec_file = next((d / SPEC_FILE for d in (source, source / MODEL) if (d / SPEC_FILE).is_file()), None)
    if spec_file is None or cfg.model.logit_shift is not None:
        return
    shift = read_json_file(spec_file).get("logit_shift")  # a damaged file is an error naming it
    raise ConfigError(
        f"model.pretrained={cfg.model.pretrained} is a blockdiff model (trained with logit_shift={shift}), not a plain "
        f"decoder; continue training it with model.init_from={cfg.model.pretrained} (keeps its tokenizer and logit "
        "shift), or set model.logit_shift explicitly to use its weights as a base"
    )


def _check_positions(backbone, max_seq_len: int, source: str) -> None:
    positions = getattr(backbone.config, "max_position_embeddings", None) or getattr(backbone.config, "n_positions", None)
    if positions is not None and max_seq_len > positions:
        raise ConfigError(f"data.max_seq_len={max_seq_len} exceeds the {positions} positions of {source}; use data.max_seq_len <= {positions}")


def _adapt_for_training(backbone, cfg: Config):
    """Optional LoRA adapters and gradient checkpointing (both mostly for large pretrained decoders)."""
    if cfg.model.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora_rank > 0:
        from blockdiff.modeling.pretrained import apply_lora

        backbone = apply_lora(backbone, cfg.model.lora_rank, cfg.model.lora_alpha)
    return backbone


def export_model(model: BlockDiffusionLM, tokenizer, cfg: Config, model_dir: Path, overwrite: bool = True) -> None:
    """Write weights, tokenizer and the training config to ``model_dir``: into a staging folder next to it, which
    replaces ``model_dir`` only when complete. An existing ``model_dir`` is replaced only if it is a blockdiff model
    export (and ``overwrite``); a failed write (disk full) leaves ``model_dir`` as it was and no staging folder."""
    from blockdiff.modeling.pretrained import merge_lora

    model_dir = Path(model_dir)
    check_replaceable(model_dir, overwrite)
    tmp = staging_dir(model_dir)
    try:
        export = BlockDiffusionLM(merge_lora(model.backbone), model.spec)  # LoRA (if any) folded in
        export.generation_config = model.generation_config
        export.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_config.yaml").write_text(to_yaml(cfg))
        replace_dir(tmp, model_dir, overwrite)
    except Exception as err:
        reason = write_failure_reason(err)
        if reason is None:
            raise
        raise StorageError(
            errno.ENOSPC, f"could not write the model to {model_dir} ({reason}); nothing under {model_dir} was changed. "
            "Free some space and export again (`blockdiff export RUN OUT`)"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
