"""``blockdiff plot``: the figures a user reaches for, for runs and traces (``blockdiff/viewer/plots.py``)."""

from __future__ import annotations

from pathlib import Path

from blockdiff.cli import render
from blockdiff.cli.render import console
from blockdiff.errors import MissingFileError, UsageError


def run(args) -> None:
    """Plot runs and traces as PNGs: the loss and validation curves of every run on one figure, each run's held-out
    NELBO per position inside a block, and for each trace (a .jsonl from `sample --trace`) the number of tokens each
    network forward revealed. The PNGs go to the first run's plots/ unless -o; existing files only with --overwrite."""
    from blockdiff.modeling.rundir import RunDir, model_dir_of

    if args.nelbo_batches < 0:
        raise UsageError(f"--nelbo-batches must be >= 0 (0 skips the per-position NELBO), got {args.nelbo_batches}")
    if args.smooth < 1:
        raise UsageError(f"--smooth must be >= 1 (1: no smoothing), got {args.smooth}")
    from blockdiff.files import check_output_file

    runs, traces = _split(args.paths)
    out = Path(args.out_dir) if args.out_dir else RunDir(runs[0]).plots if runs else traces[0].parent
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file; give a directory")
    if runs and not any(RunDir(r).metrics.is_file() for r in runs):
        raise MissingFileError(f"no run among {', '.join(map(str, runs))} has logs/metrics.csv to plot")
    with_model = [(label, r) for label, r in zip(_labels(runs), runs) if (model_dir_of(r) / "blockdiff.json").is_file()]
    targets = {"curves": out / "curves.png"} if runs else {}
    if args.nelbo_batches and with_model:
        targets["nelbo"] = out / "nelbo_by_position.png"
    targets.update({t: out / f"reveals_{t.stem}.png" for t in traces})
    if len(set(targets.values())) < len(targets):
        raise UsageError("two traces have the same name: their figures would share a file; rename one")
    if out.is_dir():  # every output checked before any is written (or any NELBO is computed)
        for path in targets.values():
            check_output_file(path, "", args.overwrite, inputs=traces)
    require_plots("blockdiff plot")
    out.mkdir(parents=True, exist_ok=True)  # the run's plots/ (or -o): a folder this command may create
    from blockdiff.viewer import plots

    written = []
    if runs:
        written.append(plots.training_curves(list(zip(_labels(runs), runs)), targets["curves"], smooth=args.smooth))
        if "nelbo" in targets:
            rows = {label: _nelbo_by_position(r, args) for label, r in with_model}
            written.append(plots.nelbo_by_position(rows, targets["nelbo"]))
    if traces:
        from blockdiff.viewer.trace import read_trace

        for t in traces:
            written.append(plots.reveal_histogram(read_trace(t), targets[t]))
    for path in written:
        console.print(f"written {path}", markup=False, highlight=False)


def require_plots(what: str) -> None:
    """Refuse clearly when matplotlib / Pillow (the ``plots`` extra) are missing."""
    import importlib.util

    missing = [m for m in ("matplotlib", "PIL") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{what} needs {' and '.join(missing)}: pip install 'blockdiff[plots]'")


def _split(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """Run directories and trace files, in the order given; anything else is refused by name."""
    from blockdiff.modeling.rundir import CONFIG, LOGS

    runs, traces = [], []
    for p in map(Path, paths):
        if p.is_file():
            traces.append(p)
        elif p.is_dir() and ((p / LOGS).is_dir() or (p / CONFIG).is_file()):
            runs.append(p)
        elif p.is_dir():
            raise UsageError(f"{p} is not a run directory (no {LOGS}/ or {CONFIG}); give a run or a trace .jsonl")
        else:
            raise MissingFileError(f"{p} does not exist")
    return runs, traces


def _labels(runs: list[Path]) -> list[str]:
    names = [r.name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def _nelbo_by_position(run: Path, args) -> list[float]:
    from blockdiff.evaluation.nelbo import evaluate_held_out
    from blockdiff.modeling.io import load_model_dir

    with render.stage_progress() as progress:
        loaded = load_model_dir(run, device=args.device)
        result = evaluate_held_out(loaded, args.nelbo_batches, args.seed, progress=progress, by_position=True)[0]
    values = ", ".join(f"{v:.3f}" for v in result.per_position)
    console.print(f"{run}: NELBO {result.nll:.4f} nats/token; per block position: {values}", markup=False,
                  highlight=False)
    return result.per_position


def add_arguments(p):
    p.add_argument("paths", nargs="+", help="run directories and/or trace files (blockdiff sample --trace)")
    p.add_argument("-o", "--out-dir",
                   help="where the PNGs go (default: the first run's plots/; for traces alone, the trace's folder)")
    p.add_argument("--overwrite", action="store_true", help="replace PNGs that already exist (else they are refused)")
    p.add_argument("--nelbo-batches", type=int, default=8,
                   help="held-out batches for the NELBO per block position (default 8; 0 skips it)")
    p.add_argument("--smooth", type=int, default=5, help="moving average of the training loss over N logs (default 5)")
    p.add_argument("--seed", type=int, default=0, help="noise draws of the NELBO estimate")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
