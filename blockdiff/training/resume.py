"""Resuming a run (``blockdiff train --resume RUN_DIR|CKPT``), all in one place.

``plan_resume`` finds the checkpoint and opens it once (memory-mapped, ``weights_only``): a run directory
resumes from ``checkpoints/last.ckpt``, or from ``checkpoints/prev.ckpt`` (with a warning) when ``last.ckpt``
is missing or damaged. Every later question about the checkpoint (its step, the config stored in it, the
final weights of a finished run) is answered from that one opened state; only Lightning's own restore in
``trainer.fit`` reads the file again.

Planning only reads, and refuses before anything is written: the run's own files (``config.yaml``,
``logs/metrics.csv``, the checkpoints) are untouched until the resume is known to be possible. The config a
checkpoint was trained with is stored *in the checkpoint* (``RUN_CONFIG_KEY``, written by
``callbacks.RunConfigRecord``), so editing ``config.yaml`` between runs cannot slip a different network,
corpus or noise under the saved weights. Only ``trainer.*`` keys may change on resume.

The plan then does the few writes a resume needs, at the points ``train()`` names: ``settle`` (the state
resumed from becomes ``last.ckpt``), ``carry_over_log`` (the old CSV rows) and ``finish`` (after fitting).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from blockdiff.config import Config, ConfigError, load_config, path_problem
from blockdiff.errors import MissingFileError
from blockdiff.modeling.rundir import LAST, RunDir
from blockdiff.training.checkpoint import CheckpointError, copy_into_place, load_checkpoint

__all__ = [
    "RUN_CONFIG_KEY", "ResumePoint", "ResumePlan", "resolve_resume", "plan_resume", "resumed_config", "resume_config",
]

RUN_CONFIG_KEY = "blockdiff_run_config"  # the resolved config (YAML text) inside every checkpoint
_FIXED_SECTIONS = ("model", "data", "noise", "curriculum")


# -- which checkpoint ---------------------------------------------------------------------------------

@dataclass
class ResumePoint:
    """Where ``--resume`` continues from: a readable checkpoint of a run, and what was noticed on the way."""

    checkpoint: Path  # the checkpoint file to load
    run_dir: Path  # the run directory it belongs to
    state: dict[str, Any]  # its contents, memory-mapped (global_step, the stored run config, ...)
    warnings: list[str] = field(default_factory=list)
    fell_back: bool = False  # last.ckpt was missing or damaged: ``checkpoint`` is prev.ckpt
    legacy: list[Path] = field(default_factory=list)  # last-vN.ckpt files an older blockdiff left next to last.ckpt

    @property
    def step(self) -> int:
        return int(self.state.get("global_step", 0))


def resolve_resume(path: str | Path) -> ResumePoint:
    """The checkpoint ``--resume PATH`` continues from: a run directory or a ``.ckpt`` file.

    A run directory resumes from ``checkpoints/last.ckpt``, or from ``checkpoints/prev.ckpt`` (with a
    warning) when ``last.ckpt`` is missing or damaged. A named file is used as is: if it is damaged the
    error says so and names the previous checkpoint to try. Only reads: nothing is changed on disk.
    """
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        last, prev = run.last_checkpoint, run.prev_checkpoint
        if not last.is_file() and not prev.is_file():
            raise CheckpointError(
                f"{path} holds no checkpoint to resume from (no {last.relative_to(path)}); the run may have stopped "
                "before its first trainer.checkpoint_every_n_steps"
            )
        legacy = sorted(p for p in run.checkpoints.glob("last-v*.ckpt"))
        if legacy:
            return _newest_of(last, legacy, path)
        try:
            return ResumePoint(last, path, load_checkpoint(last, mmap=True, hint_previous=False))
        except CheckpointError as err:
            if not prev.is_file():
                raise
            state = load_checkpoint(prev, mmap=True)  # raises, naming prev.ckpt, if that one is bad too
            warning = f"{err}; resuming from the previous checkpoint {prev} instead"
            return ResumePoint(prev, path, state, [warning], fell_back=True)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such run directory or checkpoint file")
    return ResumePoint(path, RunDir.of(path).root, load_checkpoint(path, mmap=True))


def _newest_of(last: Path, legacy: list[Path], run_dir: Path) -> ResumePoint:
    """Older blockdiff versions let Lightning write ``last-v1.ckpt``, ``last-v2.ckpt`` ... next to a ``last.ckpt`` that
    then went stale: resume from whichever readable one holds the latest step."""
    readable = []
    for candidate in [last, *legacy]:
        try:
            state = load_checkpoint(candidate, mmap=True)
        except CheckpointError:
            continue
        readable.append((int(state.get("global_step", 0)), candidate, state))
    if not readable:
        names = ", ".join(p.name for p in [last, *legacy])
        raise CheckpointError(f"none of the checkpoints in {last.parent} can be read ({names})")
    step, newest, state = max(readable, key=lambda found: found[:2])
    warning = (
        f"{last.parent} holds {', '.join(p.name for p in legacy)} next to {LAST} (written by an older blockdiff, which "
        f"could leave {LAST} stale); resuming from the newest, {newest.name} at step {step}, which becomes {LAST}"
    )
    return ResumePoint(newest, run_dir, state, [warning], legacy=legacy)


# -- whether it may continue with this config ------------------------------------------------------------

def resume_config(resume: str | Path, paths: list = (), overrides: list[str] = ()) -> Config:
    """The config ``blockdiff train --resume RESUME`` continues with: the run's own ``config.yaml``, then ``paths``,
    then ``overrides`` (``trainer.out_dir`` is the run directory unless an override says otherwise)."""
    if not os.path.isdir(resume) and path_problem(resume) is not None:
        raise MissingFileError(f"--resume {resume} {path_problem(resume)}; pass a run directory or a .ckpt file")
    run = RunDir.of(resume)
    if not run.config.is_file():
        raise ConfigError(f"--resume {resume}: {run.config} does not exist, so the run's config is unknown")
    out_dir = [] if any(o.startswith("trainer.out_dir=") for o in overrides) else [f"trainer.out_dir={run.root}"]
    return load_config([run.config, *paths], [*overrides, *out_dir])


def resumed_config(point: ResumePoint) -> Config | None:
    """The config the checkpoint was trained with, as stored in it (``None`` for checkpoints that predate this)."""
    text = point.state.get(RUN_CONFIG_KEY)
    if not isinstance(text, str):
        return None
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))
    except Exception as err:  # noqa: BLE001 - a config of another version: say so rather than guess
        raise ConfigError(
            f"the run config stored in {point.checkpoint} cannot be read by this version of blockdiff "
            f"({str(err).splitlines()[0]}); resume it with the version that wrote it"
        ) from None


def _check_same_run(cfg: Config, trained: Config, run_dir: Path, source: str) -> None:
    """A resume must train the same network on the same data with the same noise and seed as the run it continues."""
    for section in _FIXED_SECTIONS:
        now, then = _plain(getattr(cfg, section)), _plain(getattr(trained, section))
        changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        if changed:
            diffs = ", ".join(f"{section}.{k}={now.get(k)!r} (trained with {then.get(k)!r})" for k in changed[:4])
            raise ConfigError(
                f"cannot resume {run_dir}: {diffs}; the run was trained with the values in {source}. Only trainer.* "
                "keys (e.g. trainer.max_steps) may change on resume. To train a changed model from these weights, "
                f"start a new run with model.init_from={run_dir}"
            )
    if trained.trainer.seed != cfg.trainer.seed:
        raise ConfigError(
            f"cannot resume {run_dir} with trainer.seed={cfg.trainer.seed}; the run used {trained.trainer.seed}"
        )


def _plain(section) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(section), enum_to_str=True)


# -- the plan ---------------------------------------------------------------------------------------------

@dataclass
class ResumePlan:
    """What a run continues from (nothing, for a fresh run) and what it keeps of the run it continues."""

    point: ResumePoint | None = None  # the checkpoint to continue from (None: a fresh run)
    in_place: bool = False  # continuing in the checkpoint's own run directory (kept, log carried over)
    old_log: list[dict] = field(default_factory=list)  # that run's CSV rows
    tokenizer: object = None  # that run's tokenizer (a BPE is not re-trained)

    @property
    def checkpoint(self) -> Path | None:
        return self.point.checkpoint if self.point else None

    @property
    def step(self) -> int:
        return self.point.step if self.point else 0

    @property
    def warnings(self) -> list[str]:
        return self.point.warnings if self.point else []

    def settle(self) -> None:
        """Before a run resumes in place, make ``last.ckpt`` the state it resumes from (rank 0, before fitting).

        After a fallback the good ``prev.ckpt`` is copied back over the damaged ``last.ckpt`` (otherwise the first
        save would rotate the damaged file over the good backup). When older versions left ``last-vN.ckpt``
        files, the newest is copied to ``last.ckpt``; ``finish`` deletes them once the run is done with them
        (other ranks may still be loading one).
        """
        point = self.point
        if self.in_place and (point.fell_back or (point.legacy and point.checkpoint.name != LAST)):
            copy_into_place(point.checkpoint, point.checkpoint.with_name(LAST))

    def carry_over_log(self, logger, max_steps: int) -> None:
        """Re-log the resumed run's CSV rows up to its checkpoint (Lightning's CSV logger restarts the file).

        A checkpoint at step ``S`` keeps every row logged before step ``S`` and the validation rows *at* ``S``
        (validation rows carry the step of the weights they measured: the final validation of the command that
        stopped at ``S``, which a resume that trains on never repeats). Rows the resumed command logs again are
        dropped: training rows from step ``S`` on (the batches after the checkpoint), later validations, and the
        validation at ``S`` itself when ``S >= max_steps`` (the resume then validates those weights once more)."""
        if not self.old_log:
            return
        for row in self.old_log:
            step = int(float(row.get("step") or 0))
            kept = {k: v for k, v in row.items() if k != "step" and v not in ("", None)}
            validation = any(k.startswith("val/") for k in kept)
            if step > self.step or (step == self.step and not (validation and self.step < max_steps)):
                continue
            values = {k: float(v) if k != "epoch" else int(float(v)) for k, v in kept.items()}
            logger.experiment.log_metrics(values, step)
        logger.save()

    def finish(self, module, trainer, max_steps: int, is_zero: bool) -> None:
        """After ``trainer.fit``: delete the ``last-vN.ckpt`` files of older versions (``last.ckpt`` is now the newest)
        and, when the checkpoint was already final, put the weights the run would have exported into ``module``."""
        if self.point is None:
            return
        if is_zero and self.in_place:
            for stale in self.point.legacy:
                stale.unlink(missing_ok=True)
                stale.with_name(stale.stem + ".prev" + stale.suffix).unlink(missing_ok=True)
        if self.step >= max_steps:
            # The run died while validating or exporting: Lightning skips the whole fit, end-of-fit hooks included,
            # so take the weights the run would have exported (EMA ones, if any) from the checkpoint opened above.
            module.load_state_dict(self.point.state["state_dict"])
            trainer.fit_loop.epoch_loop._batches_that_stepped = self.step  # the final validation's log step


def plan_resume(cfg: Config, run_dir: Path, resume: str | Path | None) -> ResumePlan:
    """Check the checkpoint (falling back to ``prev.ckpt`` of a run directory), that ``cfg`` may continue it, and
    what the resume keeps; a fresh plan when ``resume`` is ``None``. Reads only."""
    if resume is None:
        return ResumePlan()
    point = resolve_resume(resume)
    plan = ResumePlan(point, in_place=run_dir.resolve() == point.run_dir.resolve())
    run = RunDir(run_dir)
    trained = resumed_config(point)
    source = f"{point.checkpoint} (the config stored in it)"
    if trained is None and plan.in_place and run.config.is_file():
        trained, source = load_config([run.config]), str(run.config)
    if trained is not None:
        _check_same_run(cfg, trained, point.run_dir, source)
    if plan.in_place:
        if run.metrics.is_file():
            with open(run.metrics, newline="") as f:
                plan.old_log = list(csv.DictReader(f))
        if run.tokenizer.is_dir():
            from transformers import AutoTokenizer

            plan.tokenizer = AutoTokenizer.from_pretrained(run.tokenizer, trust_remote_code=False)
    return plan
