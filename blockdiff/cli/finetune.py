"""``blockdiff finetune``: a pretrained decoder into a block diffuser."""

from __future__ import annotations

from rich.markup import escape

from blockdiff.cli import options, render
from blockdiff.cli.render import console


def run(args) -> None:
    """Fine-tune a pretrained decoder into a block diffuser (default: the offline SmolLM2-135M, block length 4)."""
    from blockdiff.training.finetune import finetune_config
    from blockdiff.training.train import train

    cfg = finetune_config(args.base, args.config, args.overrides)
    result = train(cfg, overwrite=args.overwrite)
    render.print_metrics(
        "final validation", result.metrics, extra={"steps": result.steps, "minutes": result.seconds / 60}
    )
    console.print(
        f"model written to [bold]{escape(str(result.model_dir))}[/]  — compare with the base: "
        f"`blockdiff eval {escape(str(result.run_dir))} --base-ppl`"
    )


def add_arguments(p):
    p.add_argument("--base", help="hub id, local model directory, .gguf file or 'smollm2' (default: smollm2, offline)")
    options.train_args(p)
