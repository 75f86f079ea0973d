"""Sweeps: a grid of config values -> one run directory each -> one table, CSVs and plots.

The sweep file and its expansion into validated runs are ``spec.py``. This module runs them. Every run
directory holds the training run (``config.yaml``, ``logs/metrics.csv``, ``model/``) and, once everything
finished, ``summary.json``: a run with a ``summary.json`` is never run again, so re-launching a sweep resumes
it (sampling settings added to the file since are run on the finished models without training them again).
A finished run whose stored ``config.yaml`` differs from the config the sweep now gives it is refused, naming
the run and the keys (its results would be stale): pass another ``--out-dir``, or ``rerun_changed=True``
(``--rerun-changed``) to train it again. ``--parallel N`` runs N at a time as subprocesses
(``blockdiff sweep FILE --only NAME``); with 1 they run one after another in this process.

After training, each run is evaluated with the library's evaluations, each defined once in
``blockdiff.evaluation``: NELBO on the held-out split at each inference block length (``nelbo.py`` over
``heldout.py``'s loader), the clip-window variances (``core.clip_search.ClipWindowScores``), and the sampling
grid (``generative.sample_each``), scored under the reference run (``scoring.continuation_nll``).
``report(dir)`` (``report.py``) gathers every ``summary.json`` below a directory.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from blockdiff.errors import UsageError
from blockdiff.files import write_text_atomic
from blockdiff.modeling.rundir import RunDir
from blockdiff.sweeps.spec import SUMMARY_FILE, Run, Sweep, config_changes, read_summary

__all__ = ["run_sweep", "run_one", "changed_runs"]

DEFAULT_PROMPTS = ["ROMEO.\n", "JULIET.\n", "HAMLET.\n", "KING LEAR.\n"]


ERROR_FILE = "error.txt"  # written into a run directory when its run failed; removed when it is tried again


def _selected(sweep: Sweep, only: list[str] | None) -> list[Run]:
    todo = [r for r in sweep.runs if only is None or r.name in only]
    if only:
        missing = set(only) - {r.name for r in todo}
        if missing:
            raise UsageError(
                f"--only names no run of {sweep.path}: {sorted(missing)}; runs: {[r.name for r in sweep.runs]}"
            )
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
            (run.run_dir / ERROR_FILE).unlink(missing_ok=True)  # a failed run's note: it is tried again
            try:
                run_one(sweep, run)
            except Exception:  # noqa: BLE001 - one failed run must not stop the sweep
                failed.append(run.name)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                (run.run_dir / ERROR_FILE).write_text(traceback.format_exc())
                log(f"FAILED {run.name}: see {run.run_dir / ERROR_FILE}")
        return failed
    return _run_subprocesses(sweep, todo, parallel, log)


def _run_subprocesses(sweep: Sweep, todo: list[Run], parallel: int, log) -> list[str]:
    logs = sweep.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending, active, failed = list(todo), {}, []
    while pending or active:
        while pending and len(active) < parallel:
            run = pending.pop(0)
            cmd = [
                sys.executable,
                "-m",
                "blockdiff.cli",
                "sweep",
                str(sweep.path),
                "--out-dir",
                str(sweep.out_dir),
                "--only",
                run.name,
                *itertools.chain.from_iterable(["-c", c] for c in sweep.configs),
                *sweep.cli_overrides,
            ]
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
            "noise_kind": getattr(cfg.noise.kind, "value", cfg.noise.kind),
            "beta": cfg.noise.beta,
            "omega": cfg.noise.omega,
            "clip_search": getattr(cfg.noise.clip_search, "value", cfg.noise.clip_search),
            "seed": cfg.trainer.seed,
            "max_seq_len": cfg.data.max_seq_len,
            "self_conditioning": cfg.model.self_conditioning,
            "certainty_weight": cfg.certainty.weight,
            "data_source": cfg.data.source,
            "mask_floor": [cfg.curriculum.mask_floor_fraction, cfg.curriculum.mask_floor_end],
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

    from blockdiff.core.clip_search import ClipWindowScores
    from blockdiff.core.noise import make_schedule
    from blockdiff.evaluation.heldout import held_out_split
    from blockdiff.evaluation.nelbo import evaluate_nelbo
    from blockdiff.modeling.io import load_model_dir

    cfg, ev = run.config, sweep.evaluate
    loaded = load_model_dir(model_dir)
    held = held_out_split(cfg.data, loaded.tokenizer)
    schedule = make_schedule(cfg.noise.schedule)
    max_batches = ev.get("max_batches", cfg.trainer.limit_val_batches or None)
    lengths = [cfg.model.block_length, *cfg.model.block_length_mixture, *ev.get("block_lengths", [])]
    lengths = sorted({l for l in lengths if cfg.data.max_seq_len % l == 0})
    out: dict = {"eval": []}
    for l in lengths:
        r = evaluate_nelbo(
            loaded.model, held.loader, schedule, cfg.noise.eval_range, held.tokens_per_byte, 0, max_batches, l
        )
        out["eval"].append({"block_length": l, "nll": r.nll, "ppl": r.ppl, "bpb": r.bpb, "num_tokens": r.num_tokens})
    if ev.get("clip_variance"):
        scores = ClipWindowScores(cfg.noise.clip_windows, schedule, cfg.noise.eps, torch.Generator().manual_seed(0))
        batches = [b for _, b in zip(range(ev.get("clip_batches", 4)), held.loader)]
        for window in cfg.noise.clip_windows:  # window by window, as the summaries have always been drawn
            for batch in batches:
                scores.add(loaded.model, batch, window)
        choice = scores.choice()
        out["clip"] = {
            "beta": choice.beta,
            "omega": choice.omega,
            "variance": choice.variance,
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
    from blockdiff.evaluation.generative import sample_each
    from blockdiff.evaluation.scoring import distinct_ngrams, unigram_entropy

    setting = dict(setting)
    l = setting.pop("block_length", None) or loaded.model.block_length
    model = loaded.model.with_block_length(l)  # the same network, maybe generating with another block length
    prompts = sweep.sample.get("prompts", DEFAULT_PROMPTS)
    n_new = int(sweep.sample.get("max_new_tokens", 48))
    start = time.perf_counter()
    gens = sample_each(  # one prompt at a time: a batch's NFE is that of its slowest row
        model,
        loaded.tokenizer,
        prompts,
        int(sweep.sample.get("seed", 0)),
        max_new_tokens=n_new,
        eos_token_id=None,
        temperature=float(sweep.sample.get("temperature", 1.0)),
        **setting,
    )
    seconds = time.perf_counter() - start
    nfe = sum(gens.nfes) / len(gens.nfes)
    record = {
        "sampler": setting.get("sampler", model.generation_config.sampler),
        **setting,
        "block_length": l,
        "per_sequence": True,
        "nfe": nfe,
        "new_tokens": n_new,
        "nfe_per_token": nfe / n_new,
        "seconds_per_token": seconds / (n_new * len(prompts)),  # wall time: a record of this machine, not a metric
        "rewrites_per_token": sum(gens.rewrites) / max(1, gens.produced),  # uniform noise: corrected tokens
        "row_forwards_per_token": sum(gens.row_forwards) / max(1, gens.produced),  # compute (beams: x candidates)
        "entropy": sum(unigram_entropy(t, base=2) for t in gens.tokens) / len(gens.tokens),  # bits
        "distinct_2": sum(distinct_ngrams(t, 2) for t in gens.tokens) / len(gens.tokens),  # repetition lowers it
        "example": prompts[0] + gens.texts[0],
    }
    ref = _reference_model(sweep)
    record["gen_nll"] = _score(ref, prompts, gens.texts) if ref is not None else None
    return record


def _score(ref, prompts: list[str], texts: list[str]) -> float:
    """Nats per token of the continuations under a block-length-1 reference model (exact AR NLL: every
    position masked, t = 1, so the NELBO is the causal cross-entropy), continuation positions only; text past
    the reference's training context is scored in sliding windows of that context (``continuation_nll``)."""
    from blockdiff.evaluation.scoring import block_diffusion_ar_logits, continuation_nll
    from blockdiff.sampling.text import encode_prompts

    scorer = block_diffusion_ar_logits(ref.model)
    limit = ref.model.spec.max_seq_len or 10**9
    nll, count = 0.0, 0
    for prompt, text in zip(prompts, texts):
        head = encode_prompts(ref.tokenizer, [prompt])[0]
        ids = encode_prompts(ref.tokenizer, [prompt + text])[0]
        if len(ids) <= len(head):
            continue
        total, n = continuation_nll(scorer, ids[: len(head)], ids[len(head) :], context=limit, device=ref.model.device)
        nll += total
        count += n
    return nll / count if count else float("nan")
