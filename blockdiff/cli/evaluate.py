"""``blockdiff eval``: the held-out NELBO bound, optionally next to the base decoder and judged samples."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from blockdiff.cli import render
from blockdiff.cli.render import console
from blockdiff.errors import UsageError


def run(args) -> None:
    """Evaluate a trained model (run dir or model dir): NELBO, perplexity bound and bits/byte on held-out text."""
    from blockdiff.evaluation.nelbo import evaluate

    if args.max_batches is not None and args.max_batches < 1:
        raise UsageError(
            f"--max-batches must be >= 1 (leave it out to use every held-out batch), got {args.max_batches}"
        )
    if args.block_length is not None and any(
        o.split("=", 1)[0].strip() == "model.block_length" for o in args.overrides
    ):
        raise UsageError("give the block length once: --block-length N or model.block_length=N, not both")
    if args.base_ppl or args.gen:
        _compare_with_base(args)
        return
    with render.stage_progress() as progress:
        result = evaluate(
            args.path, args.overrides, args.max_batches, args.seed, args.block_length, args.device, progress
        )
    render.print_nelbo(args.path, result)
    if args.json:
        render.write_json(args.json, render.nelbo_record(result))


def _compare_with_base(args) -> None:
    """`eval --base-ppl/--gen`: the bound next to the base decoder's exact AR perplexity, and judged samples."""
    from blockdiff.evaluation.judge import compare_with_base

    cmp = compare_with_base(
        args.path,
        args.overrides,
        base=args.base,
        judge=args.judge,
        samplers=args.samplers.split(","),
        num_samples=args.num_samples if args.gen else 0,
        gen_length=args.gen_length,
        max_batches=args.max_batches,
        seed=args.seed,
        block_length=args.block_length,
        device=args.device,
    )
    render.print_nelbo(args.path, cmp.nelbo)
    table = Table(title=escape(f"vs the base decoder {cmp.base_name} (same held-out tokens)"))
    for col in ("base AR PPL", "block diffuser PPL ≤", "bound / AR", "tokens"):
        table.add_column(col, justify="right")
    table.add_row(f"{cmp.base_ppl:.2f}", f"{cmp.nelbo.ppl:.2f}", f"{cmp.bound_ratio:.2f}×", f"{cmp.base_tokens:,}")
    console.print(table)
    if cmp.generative:
        table = Table(title=escape(f"samples judged by {args.judge or cmp.base_name}"))
        for col in ("generator", "gen PPL", "entropy (nats)", "NFE/token", "tokens/s"):
            table.add_column(col, justify="right")
        for r in cmp.generative:
            table.add_row(
                r.label, f"{r.gen_ppl:.2f}", f"{r.entropy:.2f}", f"{r.nfe_per_token:.2f}", f"{r.tokens_per_second:.1f}"
            )
        console.print(table)
    if args.json:
        render.write_json(
            args.json,
            {
                "base": cmp.base_name,
                "base_ppl": cmp.base_ppl,
                **render.nelbo_record(cmp.nelbo),
                "bound_ratio": cmp.bound_ratio,
                "tokens": cmp.base_tokens,
                "prompts": cmp.prompts,
                "generative": [vars(r) for r in cmp.generative],
            },
        )


def add_arguments(p):
    from blockdiff.sampling.samplers.registry import (
        sampler_names,  # here, not at the top: `blockdiff --help` skips torch
    )

    p.add_argument("path", help="run directory or its model/ folder")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of the training config, e.g. data.source=x.txt "
        "(model.block_length=N is --block-length N; other model.* keys are fixed by the trained network)",
    )
    p.add_argument("--max-batches", type=int, default=None, help="evaluate on at most N held-out batches")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise levels and masks")
    p.add_argument(
        "--block-length", type=int, help="evaluate at this block length instead of the model's (mixture models)"
    )
    p.add_argument(
        "--base-ppl", action="store_true", help="also the base decoder's exact AR perplexity on the same tokens"
    )
    p.add_argument("--gen", action="store_true", help="also judge samples: generative perplexity, entropy, tokens/s")
    p.add_argument("--base", help="reference decoder (default: the model.pretrained it was fine-tuned from)")
    p.add_argument("--judge", help="judge decoder for --gen (default: the base decoder)")
    p.add_argument(
        "--samplers", default="threshold,first_hitting",
        help=f"comma-separated samplers for --gen (of {', '.join(sampler_names())})",
    )
    p.add_argument("--num-samples", type=int, default=8, help="--gen: prompts taken from held-out windows")
    p.add_argument("--gen-length", type=int, default=64, help="--gen: new tokens per sample")
    p.add_argument("--json", help="write the numbers (and the --gen samples) to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
