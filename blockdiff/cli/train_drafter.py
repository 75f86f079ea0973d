"""``blockdiff train-drafter``: a DFlash-style drafter for a frozen decoder, trained on its cached features."""

from __future__ import annotations

from rich.markup import escape

from blockdiff.cli import options
from blockdiff.cli.render import console


def run(args) -> None:
    """Train a DFlash-style block-diffusion drafter that speeds up a frozen decoder (lossless speculative decoding).

    Reads the decoder's own continuations (distilled sets: `blockdiff distill`), captures its hidden states once and
    trains a few decoder layers on them with no backward through the decoder. Held-out acceptance is checked every
    train.val_every steps; training stops early when it stops rising. Writes OUT_DIR/drafter (DFlash's checkpoint
    layout, bf16, with a model card). `configs/drafter/smollm2.yaml` is the shipped recipe (`make drafter`).
    """
    from blockdiff.config.drafter import load_drafter_config
    from blockdiff.training.drafter import train_drafter

    config = load_drafter_config(args.config, args.overrides)
    if args.out_dir:
        config.out_dir = args.out_dir
    console.print(f"training a DFlash drafter for [bold]{escape(config.target)}[/] into {escape(config.out_dir)}",
                  highlight=False)
    summary = train_drafter(config, resume=args.resume, progress=True)
    accept = summary["best_accept"]
    why = ("held-out acceptance stopped rising (train.patience checks without a gain): stopped early"
           if summary["early_stopped"] else f"ran {summary['steps']} steps")
    console.print(
        f"{why}; best held-out acceptance {accept if accept is None else round(accept, 3)} drafts per block; "
        f"{summary['train_seconds'] / 60:.1f} min training + {summary['capture_seconds'] / 60:.1f} min features. "
        f"Drafter: {escape(config.out_dir)}/drafter — use it with `blockdiff sample {escape(config.target)} "
        f"--speculative --drafter hybrid --dflash-path {escape(config.out_dir)}/drafter`", highlight=False,
    )


def add_arguments(p):
    options.config_args(p)
    p.add_argument("--out-dir", help="where the run and its drafter go (default: the config's out_dir)")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last checkpoint")
