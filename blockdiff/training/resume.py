"""Planning a ``blockdiff train --resume``: which checkpoint, whether it may continue with this config, what it keeps.

Everything here only reads, and refuses before anything is written: the run's own files (``config.yaml``,
``logs/metrics.csv``, the checkpoints) are untouched until the resume is known to be possible. The
config a checkpoint was trained with is stored *in the checkpoint* (``RUN_CONFIG_KEY``, written by
``callbacks.RunConfigRecord``), so editing ``config.yaml`` between runs cannot slip a different network,
corpus or noise under the saved weights. Only ``trainer.*`` keys may change on resume.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from blockdiff.training.checkpoint import ResumePoint, resolve_resume
from blockdiff.config import Config, ConfigError, load_config
from blockdiff.modeling.rundir import CONFIG, LOGS, METRICS, TOKENIZER

__all__ = ["RUN_CONFIG_KEY", "ResumePlan", "plan_resume", "resumed_config"]

RUN_CONFIG_KEY = "blockdiff_run_config"  # the resolved config (YAML text) inside every checkpoint
_FIXED_SECTIONS = ("model", "data", "noise", "curriculum")


@dataclass
class ResumePlan:
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


def plan_resume(cfg: Config, run_dir: Path, resume: str | Path) -> ResumePlan:
    """Check the checkpoint (falling back to ``prev.ckpt`` of a run directory), that ``cfg`` may continue it, and
    what the resume keeps. Reads only."""
    point = resolve_resume(resume)
    plan = ResumePlan(point, in_place=run_dir.resolve() == point.run_dir.resolve())
    trained = resumed_config(point)
    source = f"{point.checkpoint} (the config stored in it)"
    if trained is None and plan.in_place and (run_dir / CONFIG).is_file():
        trained, source = load_config([run_dir / CONFIG]), str(run_dir / CONFIG)
    if trained is not None:
        _check_same_run(cfg, trained, point.run_dir, source)
    if plan.in_place:
        log_file = run_dir / LOGS / METRICS
        if log_file.is_file():
            with open(log_file, newline="") as f:
                plan.old_log = list(csv.DictReader(f))
        if (run_dir / TOKENIZER).is_dir():
            from transformers import AutoTokenizer

            plan.tokenizer = AutoTokenizer.from_pretrained(run_dir / TOKENIZER, trust_remote_code=False)
    return plan


def _check_same_run(cfg: Config, trained: Config, run_dir: Path, source: str) -> None:
    """A resume must train the same network on the same data with the same noise and seed as the run it continues."""
    for section in _FIXED_SECTIONS:
        now, then = _plain(getattr(cfg, section)), _plain(getattr(trained, section))
        changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        if changed:
            diffs = ", ".join(f"{section}.{k}={now.get(k)!r} (trained with {then.get(k)!r})" for k in changed[:4])
            raise ConfigError(
                f"cannot resume {run_dir}: {diffs}; the run was trained with the values in {source}. Only trainer.* "
                "keys (e.g. trainer.max_steps) may change on resume. To train a changed model from these weights, start "
                f"a new run with model.init_from={run_dir}"
            )
    if trained.trainer.seed != cfg.trainer.seed:
        raise ConfigError(f"cannot resume {run_dir} with trainer.seed={cfg.trainer.seed}; the run used {trained.trainer.seed}")


def _plain(section) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(section), enum_to_str=True)
