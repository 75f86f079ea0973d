"""Sweeps: a grid of config values -> one run directory each -> one table, CSVs and plots.

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

``blockdiff sweep FILE -c bigger.yaml key=value`` layers more config between the file's ``overrides`` and
the grid (the same sweep at GPU size). Every run directory holds the training run (``config.yaml``, ``logs/metrics.csv``, ``model/``) and, once
everything finished, ``summary.json``: a run with a ``summary.json`` is never run again, so re-launching a
sweep resumes it (sampling settings added to the file since are run on the finished models without training
them again). A finished run whose stored ``config.yaml`` differs from the config the sweep now gives it is
refused, naming the run and the keys (its results would be stale): pass another ``--out-dir``, or
``rerun_changed=True`` (``--rerun-changed``) to train it again. All runs are expanded and their configs
validated before the first one starts.
``--parallel N`` runs N at a time as subprocesses (``blockdiff sweep FILE --only NAME``); with 1 they run
one after another in this process. ``report(dir)`` gathers every ``summary.json`` below a directory.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blockdiff.config import Config, ConfigError, describe_keys, load_config, path_problem, read_utf8, to_yaml
from blockdiff.errors import MissingFileError, UsageError
from blockdiff.evaluation.judge import unigram_entropy
from blockdiff.files import write_text_atomic
from blockdiff.modeling.rundir import RunDir

__all__ = ["Sweep", "Run", "load_sweep", "expand_grid", "run_sweep", "run_one", "changed_runs", "config_changes",
           "read_summary", "SUMMARY_FILE"]

SUMMARY_FILE = "summary.json"
SAMPLE_KEYS = ("sampler", "tau", "steps_per_block", "tokens_per_step", "temperature", "top_k", "top_p",
               "entropy_bound", "block_length")
DEFAULT_PROMPTS = ["ROMEO.\n", "JULIET.\n", "HAMLET.\n", "KING LEAR.\n"]


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
                    raise UsageError(f"grid key {key!r} varies {len(keys)} keys together; each value must be a list of {len(keys)}, got {bad[0]!r}")
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


def _config_for(base: list[Path], overrides: dict, extra: list[str | Path], values: dict, cli: list[str] = ()) -> Config:
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
        raise ConfigError(f"sweep file {path}: unknown section(s) {sorted(unknown)}; allowed: name, out_dir, base, overrides, grid, evaluate, sample")
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
            cfg = _config_for(base, file_overrides, list(configs), {**values, "trainer.out_dir": str(root / name_)}, overrides)
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
    return Sweep(name, path, root, runs, spec.get("evaluate") or {}, sample, settings,
                 [str(c) for c in configs], list(overrides))


# -- running ----------------------------------------------------------------------------------------

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


def _selected(sweep: Sweep, only: list[str] | None) -> list[Run]:
    todo = [r for r in sweep.runs if only is None or r.name in only]
    if only:
        missing = set(only) - {r.name for r in todo}
        if missing:
            raise UsageError(f"--only names no run of {sweep.path}: {sorted(missing)}; runs: {[r.name for r in sweep.runs]}")
    return todo


def changed_runs(sweep: Sweep, only: list[str] | None = None, rerun_changed: bool = False) -> dict[str, list[str]]:
    """``{run name: config changes}`` of the finished (selected) runs whose config changed since they ran.

    Unless ``rerun_changed``, any such run is a ``UsageError`` naming the runs and keys: their
    ``summary.json`` would silently stand for a config the sweep no longer has."""
    changed = {r.name: c for r in _selected(sweep, only) if r.finished and (c := config_changes(r))}
    if changed and not rerun_changed:
        listed = "; ".join(f"{name} ({', '.join(c)})" for name, c in changed.items())
        raise UsageError(
            f"sweep {sweep.path}: {len(changed)} finished run(s) in {sweep.out_dir} were trained with another config "
            f"than the sweep now gives them, so their results would be stale: {listed}. Pass --out-dir NEW_DIR to "
            "keep both, or --rerun-changed to train those runs again (replacing their results)"
        )
    return changed


def run_sweep(
    sweep: Sweep, parallel: int = 1, only: list[str] | None = None, log=print, rerun_changed: bool = False
) -> list[str]:
    """Run every unfinished run (``parallel`` at a time); returns the names of runs that failed.

    A finished run whose config changed since is refused before anything runs (``UsageError`` naming the runs
    and keys), or with ``rerun_changed`` trained again (its old ``summary.json`` removed first)."""
    todo = _selected(sweep, only)
    changed = changed_runs(sweep, only, rerun_changed)
    for r in todo:
        if r.name in changed:
            log(f"{r.name}: config changed ({', '.join(changed[r.name])}); training it again")
            (r.run_dir / SUMMARY_FILE).unlink()
    done = [r for r in todo if r.finished]
    for r in done:
        missing = _missing_samples(sweep, r)
        if missing:  # trained and evaluated; only sampling settings added to the sweep since are run
            log(f"{r.name}: sampling {len(missing)} new setting(s)")
            _add_samples(sweep, r, missing)
        else:
            log(f"skip {r.name} (finished: {r.run_dir / SUMMARY_FILE})")
    todo = [r for r in todo if not r.finished]
    if parallel <= 1:
        failed = []
        for i, run in enumerate(todo):
            log(f"[{i + 1}/{len(todo)}] {run.name}")
            try:
                run_one(sweep, run)
            except Exception:  # noqa: BLE001 - one failed run must not stop the sweep
                failed.append(run.name)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                (run.run_dir / "error.txt").write_text(traceback.format_exc())
                log(f"FAILED {run.name}: see {run.run_dir / 'error.txt'}")
        return failed
    return _run_subprocesses(sweep, todo, parallel, log)


def _run_subprocesses(sweep: Sweep, todo: list[Run], parallel: int, log) -> list[str]:
    logs = sweep.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending, active, failed = list(todo), {}, []
    while pending or active:
        while pending and len(active) < parallel:
            run = pending.pop(0)
            cmd = [sys.executable, "-m", "blockdiff.cli", "sweep", str(sweep.path), "--out-dir", str(sweep.out_dir),
                   "--only", run.name, *itertools.chain.from_iterable(["-c", c] for c in sweep.configs), *sweep.cli_overrides]
            out = open(logs / f"{run.name}.log", "w")
            active[run.name] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), out)
            log(f"started {run.name} (log: {logs / (run.name + '.log')})")
        time.sleep(1.0)
        for name, (proc, out) in list(active.items()):
            if proc.poll() is not None:
                out.close()
                del active[name]
                ok = proc.returncode == 0 and (sweep.out_dir / name / SUMMARY_FILE).is_file()
                log(f"{'finished' if ok else 'FAILED'} {name}")
                if not ok:
                    failed.append(name)
    return failed


def run_one(sweep: Sweep, run: Run) -> dict:
    """Train one run, then evaluate and sample it as the sweep says; writes and returns ``summary.json``."""
    from blockdiff.training.train import train

    result = train(run.config, overwrite=True, progress=False)
    cfg = run.config
    summary = {
        "name": run.name,
        "sweep": sweep.name,
        "values": run.values,
        "settings": {
            "block_length": cfg.model.block_length,
            "block_length_mixture": {str(k): v for k, v in cfg.model.block_length_mixture.items()},
            "schedule": getattr(cfg.noise.schedule, "value", cfg.noise.schedule),
            "beta": cfg.noise.beta,
            "omega": cfg.noise.omega,
            "clip_search": getattr(cfg.noise.clip_search, "value", cfg.noise.clip_search),
            "seed": cfg.trainer.seed,
            "max_seq_len": cfg.data.max_seq_len,
        },
        "train": {
            "steps": result.steps,
            "minutes": result.seconds / 60,
            "tokens": result.steps * cfg.data.batch_size * cfg.data.max_seq_len * cfg.trainer.accumulate_grad_batches,
        },
        "final": result.metrics,
    }
    summary.update(_evaluate_run(sweep, run, result.model_dir))
    path = run.run_dir / SUMMARY_FILE
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    return summary


def _evaluate_run(sweep: Sweep, run: Run, model_dir: Path) -> dict:
    """NELBO at each inference block length, per-window NELBO variance, and the sampling grid."""
    import torch

    from blockdiff.core.clip_search import block_nelbo_samples, select_clip_window
    from blockdiff.core.noise import make_schedule
    from blockdiff.data.corpus import collate_windows, load_documents, pack_documents
    from blockdiff.evaluation.nelbo import evaluate_nelbo
    from blockdiff.modeling.io import load_model_dir

    cfg, ev = run.config, sweep.evaluate
    loaded = load_model_dir(model_dir)
    corpus = pack_documents(load_documents(cfg.data), loaded.tokenizer, cfg.data.max_seq_len, cfg.data.val_fraction)
    loader = torch.utils.data.DataLoader(corpus.val, batch_size=cfg.data.batch_size, collate_fn=collate_windows)
    schedule = make_schedule(cfg.noise.schedule)
    max_batches = ev.get("max_batches", cfg.trainer.limit_val_batches or None)
    lengths = [cfg.model.block_length, *cfg.model.block_length_mixture, *ev.get("block_lengths", [])]
    lengths = sorted({l for l in lengths if cfg.data.max_seq_len % l == 0})
    out: dict = {"eval": []}
    for l in lengths:
        r = evaluate_nelbo(loaded.model, loader, schedule, cfg.noise.eval_range, corpus.tokens_per_byte, 0, max_batches, l)
        out["eval"].append({"block_length": l, "nll": r.nll, "ppl": r.ppl, "bpb": r.bpb, "num_tokens": r.num_tokens})
    if ev.get("clip_variance"):
        g = torch.Generator().manual_seed(0)
        batches = [b for _, b in zip(range(ev.get("clip_batches", 4)), loader)]
        samples = {
            w: torch.cat([block_nelbo_samples(loaded.model, b, schedule, w, cfg.noise.eps, g).flatten() for b in batches])
            for w in cfg.noise.clip_windows
        }
        choice = select_clip_window(samples)
        out["clip"] = {
            "beta": choice.beta, "omega": choice.omega, "variance": choice.variance,
            "windows": [[b, o, v] for (b, o), v in choice.variances.items()],
        }
    if sweep.sample_settings:
        out["samples"] = [_sample(sweep, loaded, s) for s in sweep.sample_settings]
    return out


def _missing_samples(sweep: Sweep, run: Run) -> list[dict]:
    """Sampling settings of the sweep that a finished run's summary does not hold yet."""
    records = read_summary(run.run_dir / SUMMARY_FILE).get("samples", [])
    native = run.config.model.block_length

    def held(setting):
        want = {**setting, "block_length": setting.get("block_length") or native}
        return any(rec.get("per_sequence") and all(rec.get(k) == v for k, v in want.items()) for rec in records)

    return [s for s in sweep.sample_settings if not held(s)]


def _add_samples(sweep: Sweep, run: Run, settings: list[dict]) -> None:
    from blockdiff.modeling.io import load_model_dir

    loaded = load_model_dir(RunDir(run.run_dir).model)
    path = run.run_dir / SUMMARY_FILE
    summary = read_summary(path)
    kept = [rec for rec in summary.get("samples", []) if rec.get("per_sequence")]  # older batched-NFE records go
    summary["samples"] = kept + [_sample(sweep, loaded, s) for s in settings]
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


_REFERENCES: dict[Path, Any] = {}  # loaded once per process


def _reference_model(sweep: Sweep):
    """The run named by ``sample.reference`` (relative to the sweep's out_dir), or None until it is trained."""
    ref = sweep.sample.get("reference")
    if ref is None:
        return None
    model_dir = RunDir(sweep.out_dir / ref).model.resolve()
    if model_dir not in _REFERENCES:
        if not model_dir.is_dir():
            return None
        from blockdiff.modeling.io import load_model_dir

        _REFERENCES[model_dir] = load_model_dir(model_dir)
    return _REFERENCES[model_dir]


def _sample(sweep: Sweep, loaded, setting: dict) -> dict:
    """Generate from fixed prompts with one sampling setting; NFE per token and quality under the reference."""
    import torch

    from blockdiff.sampling import sample_texts

    setting = dict(setting)
    l = setting.pop("block_length", None) or loaded.model.block_length
    model = loaded.model.with_block_length(l)  # the same network, maybe generating with another block length
    prompts = sweep.sample.get("prompts", DEFAULT_PROMPTS)
    n_new = int(sweep.sample.get("max_new_tokens", 48))
    seed = int(sweep.sample.get("seed", 0))
    texts, nfes, tokens = [], [], []
    for i, prompt in enumerate(prompts):  # one at a time: a batch's NFE is that of its slowest row
        (text,), out = sample_texts(
            model, loaded.tokenizer, [prompt], torch.Generator().manual_seed(seed + i),
            max_new_tokens=n_new, eos_token_id=None, temperature=float(sweep.sample.get("temperature", 1.0)), **setting,
        )
        texts.append(text)
        nfes.append(out.nfe)
        tokens.append(out.new_tokens(0))
    record = {
        "sampler": setting.get("sampler", model.generation_config.sampler), **setting, "block_length": l,
        "per_sequence": True, "nfe": sum(nfes) / len(nfes), "new_tokens": n_new,
        "nfe_per_token": sum(nfes) / len(nfes) / n_new,
        "entropy": sum(unigram_entropy(t, base=2) for t in tokens) / len(tokens),  # bits
        "example": prompts[0] + texts[0],
    }
    ref = _reference_model(sweep)
    record["gen_nll"] = _score(ref, prompts, texts) if ref is not None else None
    return record


def _score(ref, prompts: list[str], texts: list[str]) -> float:
    """Nats per token of the continuations under a block-length-1 reference model (exact AR NLL: every
    position masked, t = 1, so the NELBO is the causal cross-entropy), continuation positions only."""
    import torch
    import torch.nn.functional as F

    from blockdiff.sampling.text import encode_prompts

    model = ref.model.with_block_length(1)
    limit = model.spec.max_seq_len or 10**9
    nll, count = 0.0, 0
    with torch.no_grad():
        for prompt, text in zip(prompts, texts):
            start = len(encode_prompts(ref.tokenizer, [prompt])[0])
            ids = encode_prompts(ref.tokenizer, [prompt + text])[0][:limit]
            if len(ids) <= start:
                continue
            x0 = torch.tensor([ids])  # (1, n)
            xt = torch.full_like(x0, model.mask_token_id)  # (1, n)
            logits = model(xt, x0, 1)[0, start:]  # (n - start, v)
            nll += F.cross_entropy(logits, x0[0, start:], reduction="sum").item()
            count += len(ids) - start
    return nll / count if count else float("nan")
