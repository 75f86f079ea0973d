"""``blockdiff demo``: train a small model on the offline Shakespeare corpus, evaluate it, print samples."""

from __future__ import annotations

from rich.markup import escape

from blockdiff.cli import options, render
from blockdiff.cli.render import console
from blockdiff.config import load_config


def run(args) -> None:
    """Train a small model on the offline Shakespeare corpus for a few minutes, evaluate it, print samples.

    Writes runs/demo (trainer.out_dir); an earlier demo run there is replaced only with --overwrite.
    """
    from blockdiff.modeling.io import load_model_dir
    from blockdiff.sampling import sample_texts
    from blockdiff.training.train import train

    cfg = load_config(args.config, args.overrides)
    console.rule("[bold]blockdiff demo[/]: training")
    result = train(cfg, overwrite=args.overwrite)
    render.print_metrics(
        f"held-out NELBO bound, block_length={cfg.model.block_length}",
        result.metrics,
        extra={"steps": result.steps, "minutes": result.seconds / 60},
    )
    import torch

    loaded = load_model_dir(result.model_dir)
    prompts = [cfg.sample.prompt] * cfg.sample.num_samples
    texts, out = sample_texts(
        loaded.model,
        loaded.tokenizer,
        prompts,
        torch.Generator().manual_seed(cfg.trainer.seed),
        max_new_tokens=cfg.sample.max_new_tokens,
        steps_per_block=cfg.sample.steps_per_block,
        temperature=cfg.sample.temperature,
        sampler=cfg.sample.sampler,
        tau=cfg.sample.tau,
    )
    for prompt, text in zip(prompts, texts):
        console.rule("sample")
        console.print(prompt + text, markup=False, highlight=False)
    nfe = out.sample_nfe.float().mean().item()
    console.print(
        f"NFE {nfe:.1f} per sample, {out.sample_tokens_per_forward:.2f} new tokens per forward per sample",
        highlight=False,
    )
    console.print(
        f"\nmodel: [bold]{escape(str(result.model_dir))}[/]  — try `blockdiff eval {escape(str(result.run_dir))}`"
    )


def add_arguments(p):
    options.train_args(p)
