"""``blockdiff train``: train from a config, or ``--resume`` a stopped run."""

from __future__ import annotations

from rich.markup import escape

from blockdiff.cli import options, render
from blockdiff.cli.render import console
from blockdiff.config import load_config


def run(args) -> None:
    """Train a block diffusion LM from a config; writes config, checkpoints, logs and model/ to trainer.out_dir.

    `--resume RUN_DIR` (or a .ckpt file) continues a stopped run exactly, with the run's own config.yaml
    (trailing trainer.* overrides such as trainer.max_steps=2000 may extend it).
    """
    from blockdiff.training.callbacks import NonFiniteLoss, TrainingInterrupted
    from blockdiff.training.resume import resume_config
    from blockdiff.training.train import train

    if args.resume:
        cfg = resume_config(args.resume, args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, overwrite=args.overwrite, resume=args.resume)
    except NonFiniteLoss as err:
        console.print(f"[bold red]training stopped:[/] {escape(str(err))}", highlight=False)
        raise SystemExit(1) from None
    except TrainingInterrupted as err:
        console.print(f"[yellow]{escape(str(err))}[/]", highlight=False)
        raise
    render.print_metrics(
        "final validation", result.metrics, extra={"steps": result.steps, "minutes": result.seconds / 60}
    )
    console.print(f"model written to [bold]{escape(str(result.model_dir))}[/]")


def add_arguments(p):
    options.train_args(p)
    p.add_argument(
        "--resume",
        metavar="RUN_DIR|CKPT",
        help="continue a stopped run exactly from its last checkpoint (or from this .ckpt file)",
    )
