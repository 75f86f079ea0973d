"""``blockdiff sweep``: run a grid of configs, or ``--report DIR``."""

from __future__ import annotations

import sys

from rich.text import Text

from blockdiff.cli.render import console
from blockdiff.errors import UsageError


def run(args) -> None:
    """Run a grid of configs (one run directory each, resumable), or --report DIR: table, CSV, markdown and plots."""
    from blockdiff.sweeps.runner import changed_runs, run_sweep
    from blockdiff.sweeps.spec import load_sweep

    if args.report:
        from blockdiff.sweeps.report import report

        written = report(args.report, console)
        console.print("wrote " + ", ".join(str(p) for p in written), markup=False)
        return
    if not args.file:
        raise UsageError("say which sweep to run (blockdiff sweep configs/sweeps/NAME.yaml) or pass --report DIR")
    if args.parallel < 1:
        raise UsageError(f"--parallel must be >= 1, got {args.parallel}")
    sweep = load_sweep(args.file, args.out_dir, args.config, args.overrides)  # every run validated before any starts
    changed_runs(sweep, args.only, args.rerun_changed)  # refuse stale finished runs before printing anything
    console.print(Text.assemble("sweep ", (sweep.name, "bold"), f": {len(sweep.runs)} runs in {sweep.out_dir}"))
    failed = run_sweep(
        sweep,
        args.parallel,
        args.only,
        log=lambda m: console.print(m, highlight=False, markup=False),
        rerun_changed=args.rerun_changed,
    )
    if failed:
        print(
            f"{len(failed)} run(s) failed: {', '.join(failed)} (see error.txt or logs/ in {sweep.out_dir})",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)
    console.print(f"done — `blockdiff sweep --report {sweep.out_dir}`", markup=False)


def add_arguments(p):
    p.add_argument("file", nargs="?", help="sweep file (configs/sweeps/NAME.yaml)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (subprocesses when > 1)")
    p.add_argument("--only", action="append", help="run only this run name (repeatable)")
    p.add_argument("--out-dir", help="override the sweep file's out_dir")
    p.add_argument("--report", metavar="DIR", help="summarise the finished runs below DIR instead of running")
    p.add_argument(
        "--rerun-changed",
        action="store_true",
        help="train again the finished runs whose config changed since (default: refuse, naming them)",
    )
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        help="config file applied to every run (after the sweep's overrides)",
    )
    p.add_argument("overrides", nargs="*", help="key=value applied to every run, e.g. trainer.max_steps=2000")
