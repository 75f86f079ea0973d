"""``blockdiff plot``: the figures a user reaches for, for runs and traces (``blockdiff/viewer/plots.py``)."""

from __future__ import annotations

from pathlib import Path

from blockdiff.cli import render
from blockdiff.cli.render import console
from blockdiff.errors import MissingFileError, UsageError


def run(args) -> None:
    """Plot runs and traces as PNGs: the loss and validation curves of every run on one figure, each run's held-out
    NELBO per position inside a block, and for each trace (a .jsonl from `sample --trace`) the number of tokens each
    network forward revealed."""
    from blockdiff.modeling.rundir import RunDir, model_dir_of

    if args.nelbo_batches < 0:
        raise UsageError(f"--nelbo-batches must be >= 0 (0 skips the per-position NELBO), got {args.nelbo_batches}")
    if args.smooth < 1:
        raise UsageError(f"--smooth must be >= 1 (1: no smoothing), got {args.smooth}")
    runs, traces = _split(args.paths)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file; give a directory")
    require_plots("blockdiff plot")
    from blockdiff.viewer import plots

    written = []
    labels = _labels(runs)
    if runs:
        if not any(RunDir(r).metrics.is_file() for r in runs):
            raise MissingFileError(f"no run among {', '.join(map(str, runs))} has logs/metrics.csv to plot")
        written.append(plots.training_curves(list(zip(labels, runs)), out / "curves.png", smooth=args.smooth))
        with_model = [(label, r) for label, r in zip(labels, runs) if (model_dir_of(r) / "blockdiff.json").is_file()]
        if args.nelbo_batches and with_model:
            rows = {label: _nelbo_by_position(r, args) for label, r in with_model}
            written.append(plots.nelbo_by_position(rows, out / "nelbo_by_position.png"))
    if traces:
        from blockdiff.viewer.trace import read_trace

        for t in traces:
            written.append(plots.reveal_histogram(read_trace(t), out / f"reveals_{t.stem}.png"))
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
    p.add_argument("-o", "--out-dir", default="plots", help="where the PNGs go (default ./plots)")
    p.add_argument("--nelbo-batches", type=int, default=8,
                   help="held-out batches for the NELBO per block position (default 8; 0 skips it)")
    p.add_argument("--smooth", type=int, default=5, help="moving average of the training loss over N logs (default 5)")
    p.add_argument("--seed", type=int, default=0, help="noise draws of the NELBO estimate")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
