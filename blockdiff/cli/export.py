"""``blockdiff export``: a checkpoint (or a run's last one) as a Hugging Face model directory."""

from __future__ import annotations

from rich.markup import escape

from blockdiff.cli.render import console


def run(args) -> None:
    """Export a Lightning checkpoint (or a run directory's last one) as a Hugging Face model directory; a DFlash
    drafter (a train-drafter run or its drafter/ folder) in DFlash's checkpoint layout."""
    from blockdiff.training.export import export_checkpoint

    if args.push_to_hub:  # checked before anything is written
        from blockdiff.modeling.hub import check_repo_id

        check_repo_id(args.push_to_hub, "--push-to-hub")
    from blockdiff.training.drafter_card import drafter_source, export_drafter

    drafter = drafter_source(args.checkpoint)
    if drafter is not None:  # a DFlash drafter (train-drafter): DFlash's layout, loadable by dflash / vLLM / SGLang
        out = export_drafter(drafter, args.out_dir, overwrite=args.overwrite)
        console.print(f"drafter written to [bold]{escape(str(out))}[/] in DFlash's layout (load with "
                      "dflash.DFlashDraftModel.from_pretrained, or --dflash-path)")
    else:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.run_config, overwrite=args.overwrite)
        console.print(f"model written to [bold]{escape(str(out))}[/] (load with BlockDiffusionLM.from_pretrained)")
    if args.push_to_hub:
        from blockdiff.modeling.hub import push_to_hub

        url = push_to_hub(out, args.push_to_hub, private=args.private)
        console.print(f"pushed to [bold]{escape(url)}[/]")


def add_arguments(p):
    p.add_argument("checkpoint", help="a .ckpt file, a run directory (uses checkpoints/last.ckpt), or a train-drafter "
                   "run / drafter folder")
    p.add_argument("out_dir", help="directory to write (safetensors + blockdiff.json + tokenizer)")
    p.add_argument("--run-config", help="the run's config.yaml (default: next to checkpoints/)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it holds a previous blockdiff model export (anything else is never deleted)",
    )
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", help="then upload OUT_DIR to this hub repository (online)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
