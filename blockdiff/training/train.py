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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from blockdiff.config import Config, ConfigError, to_yaml
from blockdiff.data.corpus import load_documents, pack_documents
from blockdiff.files import write_text_atomic
from blockdiff.modeling.io import export_model
from blockdiff.modeling.rundir import RunDir, check_new_run_dir, is_run_dir, prepare_run_dir
from blockdiff.training.builders import build_model
from blockdiff.training.datamodule import BlockDiffusionDataModule
from blockdiff.training.lightning_module import BlockDiffusionModule
from blockdiff.training.resume import ResumePlan, plan_resume
from blockdiff.training.sharding import full_state_dict, is_sharded
from blockdiff.training.trainer import Run, build_trainer, check_runnable, env_is_global_zero, fit

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    seconds: float
    metrics: dict[str, float]  # final validation: val/nll, val/ppl, val/bpb
    stopped_by: str = "max_steps"  # or "time budget" (trainer.max_minutes spent first)


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
    check_runnable(cfg)
    L.seed_everything(cfg.trainer.seed, verbose=False)
    run_dir, is_zero = RunDir(cfg.trainer.out_dir), env_is_global_zero()

    # -- inputs first: nothing is written until they are known to be usable -------------------------
    plan = plan_resume(cfg, run_dir.root, resume)
    if is_zero and not plan.in_place:
        check_new_run_dir(run_dir.root, overwrite)  # before the slow part; prepare_run_dir repeats it when writing
    tokenizer, model, module, datamodule = _training_parts(cfg, plan, progress)
    run = build_trainer(cfg, run_dir, progress)  # Lightning checks accelerator, precision, strategy here

    # -- the run directory, the fit, the final numbers, the export -----------------------------------
    new_dir = run_dir if is_zero and not plan.in_place else None  # removed if it fails before its first checkpoint
    if is_zero:  # only global rank 0 writes (DDP/FSDP run this function once per process)
        _write_run_dir(cfg, run_dir, plan, tokenizer, run, overwrite)
    with _removed_on_failure(new_dir):
        fit(run, module, datamodule, plan.checkpoint, run_dir)
    plan.finish(module, run.trainer, cfg.trainer.max_steps, is_zero)
    stopped_by = _stopped_by(cfg, run, run_dir, is_zero)
    metrics = _final_metrics(run, module, datamodule)
    model = _gathered(cfg, model, tokenizer, run.trainer.is_global_zero)
    if run.trainer.is_global_zero:
        export_model(model, tokenizer, cfg, run_dir.model, metrics={**metrics, "step": run.trainer.global_step})
    return TrainResult(
        run_dir=run_dir.root,
        model_dir=run_dir.model,
        steps=run.trainer.global_step,
        seconds=time.monotonic() - start,
        metrics=metrics,
        stopped_by=stopped_by,
    )


def _training_parts(cfg: Config, plan: ResumePlan, progress: bool = False):
    """``(tokenizer, model, module, datamodule)``: the corpus read and packed, the network built (the resumed run's
    tokenizer kept; a BPE trained with its progress bars when ``progress``), and the Lightning module and data module
    around them."""
    docs = load_documents(cfg.data)
    tokenizer, model = build_model(cfg, docs, plan.tokenizer, progress)
    corpus = pack_documents(docs, tokenizer, cfg.data.max_seq_len, cfg.data.val_fraction)
    if cfg.data.batch_size > len(corpus.train):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {len(corpus.train)} training windows of "
            f"data.max_seq_len={cfg.data.max_seq_len} tokens in the corpus; use data.batch_size <= {len(corpus.train)}"
        )
    module = BlockDiffusionModule(
        model, cfg.noise, cfg.optim, cfg.trainer.max_steps, corpus.tokens_per_byte, cfg.trainer.seed, cfg.curriculum,
        block_length_mixture=cfg.model.block_length_mixture, certainty=cfg.certainty,
    )
    datamodule = BlockDiffusionDataModule(corpus, cfg.data.batch_size, cfg.data.num_workers, cfg.trainer.seed)
    return tokenizer, model, module, datamodule


def _gathered(cfg: Config, model, tokenizer, is_zero: bool):
    """The model to export: ``model`` itself, or under ``trainer.strategy=fsdp`` its weights gathered from every rank
    (a collective) into an unsharded copy on rank 0 (``None`` on the other ranks)."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model)  # every rank takes part; rank 0 (cpu_offload) holds the whole state
    if not is_zero:
        return None
    _, plain = build_model(cfg, {"text": []}, tokenizer)  # the same network, unsharded (the tokenizer is given)
    plain.load_state_dict(state)
    return plain


def _write_run_dir(cfg: Config, run_dir: RunDir, plan: ResumePlan, tokenizer, run: Run, overwrite: bool) -> None:
    """Say what this command does, then write the run directory: a new one (``config.yaml``, ``tokenizer/``), or the
    resumed one settled on the checkpoint it continues from, with its old log rows carried over (rank 0 only)."""
    for warning in plan.warnings:
        print(f"warning: {warning}", flush=True)
    print(_announce(cfg, run_dir.root, plan), flush=True)
    if plan.in_place:
        plan.settle()  # exactly last.ckpt (the state resumed from) + prev.ckpt
    else:
        prepare_run_dir(run_dir.root, overwrite)
    with _removed_on_failure(None if plan.in_place else run_dir):
        write_text_atomic(run_dir.config, to_yaml(cfg))
        tokenizer.save_pretrained(run_dir.tokenizer)  # `blockdiff export` rebuilds the network from these two
        plan.carry_over_log(run.logger, cfg.trainer.max_steps)


def _stopped_by(cfg: Config, run: Run, run_dir: RunDir, is_zero: bool) -> str:
    """``"time budget"`` when ``trainer.max_minutes`` ran out first (said, with the command that continues), else
    ``"max_steps"``."""
    if run.timer is None or not run.timer.ran_out:
        return "max_steps"
    if is_zero:
        print(
            f"the time budget of trainer.max_minutes={cfg.trainer.max_minutes:g} was spent at step "
            f"{run.trainer.global_step} of {cfg.trainer.max_steps}; continue with "
            f"`blockdiff train --resume {run_dir.root}`",
            flush=True,
        )
    return "time budget"


def _final_metrics(run: Run, module, datamodule) -> dict[str, float]:
    """Final numbers with the weights being exported (EMA weights are swapped in at the end of fit); a validation
    that fit already ran at the final step measured these very weights, and is not run (or logged) twice."""
    validated = module.last_fit_validation
    if validated is not None and validated[0] == run.trainer.global_step:
        metrics = validated[1]
    else:
        metrics = run.trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return {k: float(v) for k, v in metrics.items()}


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
def _removed_on_failure(run_dir: RunDir | None):
    """A new run directory that fails before its first checkpoint is removed (it holds nothing to resume)."""
    try:
        yield
    except BaseException:
        if run_dir is not None and is_run_dir(run_dir.root) and not any(run_dir.checkpoints.glob("*.ckpt")):
            shutil.rmtree(run_dir.root, ignore_errors=True)
        raise
