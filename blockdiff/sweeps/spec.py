"""Sweep specs: a sweep file -> validated runs (grid expansion, run names, configs), and what a run left behind.

A sweep file (``configs/sweeps/*.yaml``, ``experiments/block_length/*.yaml``)::

    name: block_length                  # label (default: the file's stem)
    out_dir: runs/ablation/block_length # where the run directories go
    base: [../../configs/demo.yaml]     # config files, relative to the sweep file (optional)
    overrides: {data.max_seq_len: 64}   # applied to every run (dotted or nested keys)
    grid:                               # key: [values] -> the cartesian product, one run each
      model.block_length: [1, 4, "${data.max_seq_len}"]   # interpolations resolve per run
      noise.beta,noise.omega: [[0.0, 1.0], [0.3, 0.8]]   # comma-joined keys vary together
      trainer.seed: [0, 1]
    # grid may also be a list of such mappings: the union of their products
    evaluate: {block_lengths: [1, 4, 16], max_batches: 16, clip_variance: true}
    sample:                             # sampling-time grid applied to every trained run
      prompts: ["ROMEO.\\n"]
      max_new_tokens: 48
      reference: block_length-1_seed-0  # run whose model scores the samples (AR NLL); optional
      grid: {sampler: [threshold, first_hitting], tau: [0.9], block_length: [null]}

``load_sweep`` reads the file, expands the grid and validates every run's config before anything runs
(nothing is written). ``-c FILE`` / ``key=value`` from the command line layer between the file's ``overrides``
and the grid (the same sweep at GPU size). ``read_summary`` / ``config_changes`` read what a finished run left
(``summary.json``, ``config.yaml``). Running the runs is ``runner.py``; the report ``report.py``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blockdiff.config import Config, ConfigError, describe_keys, load_config, path_problem, read_utf8, to_yaml
from blockdiff.errors import MissingFileError, UsageError
from blockdiff.modeling.rundir import RunDir
from blockdiff.sampling.samplers.registry import WithKnobs

__all__ = ["Sweep", "Run", "load_sweep", "expand_grid", "run_name", "config_changes", "read_summary", "SUMMARY_FILE",
           "SAMPLE_KEYS"]

SUMMARY_FILE = "summary.json"
SAMPLE_KEYS = WithKnobs(  # + knobs
    "sampler", "steps_per_block", "temperature", "top_k", "top_p", "block_length", "block_beams", "beam_width",
    "beam_score_draws",
)


@dataclass
class Run:
    name: str  # directory name, built from the grid values
    values: dict[str, Any]  # grid key -> value for this run
    config: Config  # validated, trainer.out_dir = the run directory

    @property
    def run_dir(self) -> Path:
        return Path(self.config.trainer.out_dir)

    @property
    def finished(self) -> bool:
        return (self.run_dir / SUMMARY_FILE).is_file()


@dataclass
class Sweep:
    name: str
    path: Path
    out_dir: Path
    runs: list[Run]
    evaluate: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)
    sample_settings: list[dict] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)  # -c files applied to every run
    cli_overrides: list[str] = field(default_factory=list)  # key=value applied to every run


# -- expansion --------------------------------------------------------------------------------------

def expand_grid(grid: dict | list) -> list[dict[str, Any]]:
    """``{key: [values]}`` (or a list of them) -> one ``{key: value}`` per combination, in order.

    A comma-joined key (``"noise.beta,noise.omega"``) takes a list of value lists and varies its keys
    together. Raises ``ValueError`` for an empty grid, a key without values or a mis-sized zipped value.
    """
    grids = grid if isinstance(grid, list) else [grid]
    if not grids or any(not isinstance(g, dict) or not g for g in grids):
        raise UsageError("the sweep grid is empty: give `grid:` at least one `key: [values]` entry")
    combos = []
    for g in grids:
        axes = []
        for key, values in g.items():
            if not isinstance(values, list) or not values:
                raise UsageError(f"grid key {key!r} needs a non-empty list of values, got {values!r}")
            keys = [k.strip() for k in str(key).split(",")]
            if len(keys) > 1:
                bad = [v for v in values if not isinstance(v, list) or len(v) != len(keys)]
                if bad:
                    raise UsageError(
                        f"grid key {key!r} varies {len(keys)} keys together; each value must be a list of "
                        f"{len(keys)}, got {bad[0]!r}"
                    )
                axes.append([dict(zip(keys, v)) for v in values])
            else:
                axes.append([{keys[0]: v} for v in values])
        for combo in itertools.product(*axes):
            merged: dict[str, Any] = {}
            for part in combo:
                merged.update(part)
            combos.append(merged)
    return combos


def _fmt(value) -> str:
    if isinstance(value, str) and value.startswith("${"):  # an interpolation such as ${data.max_seq_len}
        return value.strip("${}").rsplit(".", 1)[-1]
    if isinstance(value, dict):
        return "+".join(f"{k}x{_fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_fmt(v) for v in value)
    return str(value)


def run_name(values: dict[str, Any]) -> str:
    """A readable, stable directory name: ``block_length-4_seed-0``."""
    if not values:
        return "base"
    name = "_".join(f"{key.rsplit('.', 1)[-1]}-{_fmt(v)}" for key, v in values.items())
    return re.sub(r"[^A-Za-z0-9._+-]", "", name)


def _nested(flat: dict[str, Any]) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (nested mappings pass through)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update(value)
        else:
            node[last] = value
    return out


def _flat_keys(mapping: dict, known: set[str], prefix: str = "") -> list[str]:
    """Dotted keys of a (possibly nested) override mapping; a known key's dict value is a value, not a level."""
    out = []
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full not in known:
            out.extend(_flat_keys(value, known, full + "."))
        else:
            out.append(full)
    return out


def _config_for(
    base: list[Path], overrides: dict, extra: list[str | Path], values: dict, cli: list[str] = ()
) -> Config:
    """Defaults <- base files <- the sweep's ``overrides`` <- ``extra`` files <- ``cli`` key=value <- the
    run's grid ``values``, validated. Mappings go through temporary YAML files so dict values (the
    block-length mixture) keep their types and interpolations (``${data.max_seq_len}``) resolve."""
    files = []
    try:
        for mapping in (overrides, values):
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                yaml.safe_dump(_nested(mapping), f, sort_keys=False)
            files.append(f.name)
        if cli:
            from omegaconf import OmegaConf

            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                f.write(OmegaConf.to_yaml(OmegaConf.from_dotlist(list(cli))))
            files.insert(1, f.name)
        return load_config([*base, files[0], *extra, *files[1:]])
    finally:
        for name in files:
            os.unlink(name)


def load_sweep(
    path: str | Path, out_dir: str | Path | None = None, configs: list[str | Path] = (), overrides: list[str] = ()
) -> Sweep:
    """Read a sweep file, expand its grid and validate every run's config (nothing is written).

    ``configs`` / ``overrides`` (``-c FILE`` and ``key=value`` on the command line) apply to every run after
    the file's own ``overrides`` and before the grid: the same sweep at another model/data size."""
    path = Path(path)
    problem = path_problem(path)
    if problem is not None:
        raise MissingFileError(f"sweep file {path} {problem}; pass a sweep YAML file (configs/sweeps/NAME.yaml)")
    spec = _read_yaml(path, "sweep file") or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping (name:, grid:, ...)")
    unknown = set(spec) - {"name", "out_dir", "base", "overrides", "grid", "evaluate", "sample"}
    if unknown:
        raise ConfigError(
            f"sweep file {path}: unknown section(s) {sorted(unknown)}; allowed: name, out_dir, base, overrides, "
            "grid, evaluate, sample"
        )
    name = spec.get("name", path.stem)
    root = Path(out_dir or spec.get("out_dir") or f"runs/sweeps/{name}")
    base = [(path.parent / p) for p in spec.get("base") or []]
    file_overrides = spec.get("overrides") or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"overrides must look like key=value, got {item!r}")
    combos = expand_grid(spec.get("grid"))
    keys = {k for k, _, _ in describe_keys()}
    cli_keys = [item.partition("=")[0] for item in overrides]
    for key in [*itertools.chain.from_iterable(c.keys() for c in combos), *_flat_keys(file_overrides, keys), *cli_keys]:
        if key not in keys:
            raise ConfigError(f"sweep {path}: key {key!r} is not a config key (`blockdiff config keys` lists them)")
    runs, seen = [], set()
    for values in combos:
        name_ = run_name(values)
        if name_ in seen:
            raise ConfigError(f"sweep {path}: two grid entries give the same run {name_!r}")
        seen.add(name_)
        try:
            cfg = _config_for(
                base, file_overrides, list(configs), {**values, "trainer.out_dir": str(root / name_)}, overrides
            )
        except ConfigError as err:
            raise ConfigError(f"sweep {path}, run {name_}: {err}") from None
        runs.append(Run(name_, values, cfg))
    sample = spec.get("sample") or {}
    settings = expand_grid(sample["grid"]) if sample.get("grid") else ([{}] if sample else [])
    for s in settings:
        bad = [k for k in s if k not in SAMPLE_KEYS]
        if bad:
            raise ConfigError(f"sweep {path}: sample.grid key(s) {bad} unknown; allowed: {', '.join(SAMPLE_KEYS)}")
    reference = sample.get("reference")
    if reference is not None:  # the scoring model trains first
        runs.sort(key=lambda r: r.name != reference)
    return Sweep(
        name, path, root, runs, spec.get("evaluate") or {}, sample, settings, [str(c) for c in configs], list(overrides)
    )


# -- what a run left behind ---------------------------------------------------------------------------


def _read_yaml(path: Path, what: str):
    """``yaml.safe_load`` of a file; bad UTF-8 or bad YAML is a ``ConfigError`` naming the file."""
    text = read_utf8(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {' '.join(str(err).split())}") from None


def read_summary(path: str | Path) -> dict:
    """A run's ``summary.json``; an unreadable, non-UTF-8 or non-JSON file is a ``UsageError`` naming it."""
    path = Path(path)
    try:
        summary = json.loads(read_utf8(path, "run summary"))
    except json.JSONDecodeError as err:
        raise UsageError(f"run summary {path} is damaged (not JSON: {err}); delete it to run that run again") from None
    if not isinstance(summary, dict):
        raise UsageError(f"{path} is damaged (not a JSON object); delete it to run that run again")
    return summary


def config_changes(run: Run) -> list[str]:
    """``key: stored -> now`` for each config key whose value differs between the run directory's ``config.yaml``
    (what the finished run was trained with) and ``run.config``; ``trainer.out_dir`` aside (a moved sweep)."""
    stored_path = RunDir(run.run_dir).config
    if not stored_path.is_file():
        return [f"{stored_path} is missing, so the config it was trained with is unknown"]
    try:
        stored = _read_yaml(stored_path, "run config")
    except ConfigError as err:
        return [str(err)]
    now, defaults = yaml.safe_load(to_yaml(run.config)), yaml.safe_load(to_yaml(Config()))
    stored = stored if isinstance(stored, dict) else {}
    changes = []
    for section, fields in now.items():
        old_section = stored.get(section) if isinstance(stored.get(section), dict) else {}
        for name, value in fields.items():
            old = old_section.get(name, defaults[section][name])  # a key added to blockdiff since: its default
            if f"{section}.{name}" != "trainer.out_dir" and old != value:
                changes.append(f"{section}.{name}: {old!r} -> {value!r}")
    return changes
